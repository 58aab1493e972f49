"""Several brokers serving the same rooms: the shared state on NATS JetStream.

This is the broker-loop side of cluster mode: the room log, the registry and presence of
state.py, over a bridge task that holds the NATS connection (cluster_bridge.py). They keep
in memory what the broker reads often (the registry's buckets, watched; each room's latest
events), so that reads answer at once as on a single broker; changes go to the bridge and
complete their Op when NATS has answered. Liveness of the other brokers is watched here too:
the sessions of a broker that stopped beating, and that their clients did not resume on
another broker within the grace period, are announced as lost, once.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Final

from zmqchat import protocol as m
from zmqchat._cluster.accounts import BUCKETS as ACCOUNT_BUCKETS
from zmqchat._cluster.accounts import ClusterAccounts
from zmqchat._cluster.index import ClusterIndex, LogEdits
from zmqchat._core.state import Delivery, Draft, Identity, Member, Op, RoomSettings, gather
from zmqchat._ops.logs import event as log_event
from zmqchat.protocol import Code, ProtocolError, Reply

if TYPE_CHECKING:
    from zmqchat._config import Config
    from zmqchat._core.state import Listener

log = logging.getLogger("zmqchat.cluster")

CACHE_EVENTS: Final = 1000  # latest events kept per room: joins and gap repair read these
MSGID_CACHE: Final = 200_000  # message ids remembered to recognise a retry after the dedup window
READY_WAIT: Final = 30.0  # seconds a start waits for the cluster
OP_DEADLINE: Final = 10.0  # seconds after which an unanswered command fails (a stuck bridge)
STOP_WAIT: Final = 5.0  # seconds a stop waits for the bridge to let go of NATS


def msg_id(owner: str, cmid: str) -> str:
    """The dedup id of a client message: its sender's and its own, so that two clients who
    pick the same id do not collide, and a retry through any broker is recognised."""
    return hashlib.sha256(f"{owner}\x00{cmid}".encode()).hexdigest()[:32]


def hexkey(key: str) -> str:
    """A nick key as a bucket key (those allow only [-/_=.a-zA-Z0-9])."""
    return key.encode().hex()


def unhex(key: str) -> str:
    return bytes.fromhex(key).decode()


class Cluster:
    """The event loop the broker runs on in cluster mode, the bridge task on it, the queues
    between them, the Ops under way, and broker liveness."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.inbox: deque[list[bytes]] = deque()  # news and answers from the bridge
        self.queue: list[list[bytes]] = []  # commands of this pass, for the bridge
        self.ops: dict[bytes, tuple[Op, Callable[[list[bytes]], Any], float]] = {}
        self._ids = itertools.count(1)
        self.core: Listener | None = None
        self.name = ""
        self.log = ClusterLog(self)
        self.registry = ClusterRegistry(self, cfg)
        self.presence = ClusterPresence(self)
        self.accounts = ClusterAccounts(self.call, self.log.privates_of)  # issue 21
        self.bridge: Any = None
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None  # the loop's, while it waits
        # liveness: when each broker's beat last changed (our clock), when ours last got
        # through, and since when ours have been getting through without a break
        self.seen: dict[str, float] = {}
        self.dead: dict[str, float] = {}
        self.beat_ok = 0.0
        self.healthy_since: float | None = None
        self.started = 0.0
        self.peers: dict[str, dict[str, Any]] = {}  # broker name -> its last beat

    # ------------------------------------------------------------------ lifecycle
    def start(self, name: str) -> None:
        """Connect to NATS (through the bridge) and load the shared state; OSError if the
        cluster cannot be reached or will not serve."""
        from zmqchat._cluster.bridge import Bridge, BridgeConfig

        self.name = name
        servers = [s.strip() for s in (self.cfg.cluster_urls or "").split(",") if s.strip()]
        self.bridge = Bridge(
            BridgeConfig(
                servers, self.cfg.namespace, name, list(self.cfg.rooms), self.cfg.replicas
            ),
            self._from_bridge,
        )
        self.task = self.loop.create_task(self.bridge.main())
        try:
            replicas = self.loop.run_until_complete(asyncio.wait_for(self._ready(), READY_WAIT))
        except TimeoutError:
            raise OSError(
                f"the NATS cluster at {self.cfg.cluster_urls} did not get ready "
                f"within {READY_WAIT:g} s"
            ) from None
        log.info("in the cluster as %s (streams with %s replicas)", name, replicas)
        self.started = time.monotonic()
        mine = self.peers.get(name)
        if (
            mine is not None
            and mine.get("state") == "up"
            and time.time() - float(mine.get("at", 0)) < 3 * self.cfg.heartbeat
        ):
            raise OSError(
                f"a broker named {name} is already in this cluster: give each broker its own --name"
            )
        if any(i.broker == name for i in self.registry.identities()):
            self.dead[name] = self.started  # our last run's sessions: settle them too
        self.registry.seed(self.cfg.rooms, self.cfg.operators)
        self._beat()
        self.send_pending()

    async def _ready(self) -> str:
        """The bridge's news until it says READY (its replicas) or FATAL (OSError)."""
        while True:
            while not self.inbox:
                await self.wait(1.0)
            frames = self.inbox.popleft()
            if frames[0] == b"FATAL":
                raise OSError(f"cannot use the NATS cluster: {frames[1].decode()}")
            if frames[0] == b"READY":
                return frames[1].decode()
            self._dispatch(frames)

    def run(self, serve: Coroutine[Any, Any, None]) -> None:
        """Run the broker's loop (a coroutine) on this event loop, beside the bridge."""
        self.loop.run_until_complete(serve)

    def commands_pending(self) -> int:
        """Commands to NATS waiting for an answer (for the metrics)."""
        return len(self.ops)

    def attach(self, core: Listener) -> None:
        self.core = core
        self.registry.core = core

    def close(self) -> None:
        """Say we stopped (our clients' sessions are for the others to settle) and let go."""
        if self.task is not None and not self.task.done():
            self.put("brokers", self.name, {"state": "stopped", "at": time.time()})
            self.queue.append([b"STOP"])
            self.send_pending()
            try:
                self.loop.run_until_complete(asyncio.wait_for(self.task, STOP_WAIT))
            except Exception:  # noqa: BLE001 - stopping anyway
                log.warning("the bridge did not let go of NATS in %g s", STOP_WAIT)
        self.task = None
        if not self.loop.is_closed():
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
            self.loop.close()
        self.log.index.close()

    # ------------------------------------------------------------------ the bridge
    async def wait(self, timeout: float) -> None:
        """Until the bridge has news, wake() is called, or `timeout` seconds pass."""
        if self.inbox:
            return
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self.wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _from_bridge(self, frames: list[bytes]) -> None:
        self.inbox.append(frames)
        self.wake()

    def call(self, frames: list[bytes], decode: Callable[[list[bytes]], Any]) -> Op:
        """Send a command whose answer completes the returned Op (value: decode(frames))."""
        op_id = str(next(self._ids)).encode()
        op = Op()
        self.ops[op_id] = (op, decode, time.monotonic())
        frames.insert(1, op_id)
        self.queue.append(frames)
        return op

    def tell(self, frames: list[bytes]) -> None:
        """A command nobody waits for."""
        self.queue.append(frames)

    def send_pending(self) -> None:
        if self.queue and self.bridge is not None:
            self.bridge.take(self.queue)
        self.queue.clear()

    def drain(self) -> None:
        """Everything the bridge has sent since the last look."""
        inbox = self.inbox
        for _ in range(10_000):
            if not inbox:
                return
            frames = inbox.popleft()
            try:
                self._dispatch(frames)
            except Exception:  # a bug must not end the broker
                log.exception("cluster news %r failed", frames[:2])

    def _dispatch(self, frames: list[bytes]) -> None:
        verb = frames[0]
        if verb == b"EVENTS":
            self.log.arrived(frames)
        elif verb == b"DONE" or verb == b"FAIL":
            entry = self.ops.pop(frames[1], None)
            if entry is None:
                return
            op, decode, _ = entry
            if verb == b"FAIL":
                code = frames[2].decode()
                op.fail(
                    ProtocolError(
                        Code.UNAVAILABLE if code == "UNAVAILABLE" else Code.INTERNAL,
                        frames[3].decode(),
                        cluster=code,
                    )
                )
            else:
                try:
                    value = decode(frames[2:])
                except Exception as exc:  # noqa: BLE001 - a reply we cannot read
                    op.fail(exc)
                else:
                    op.resolve(value)
        elif verb == b"KVW":
            bucket, key, rev, what = (f.decode() for f in frames[1:5])
            value = frames[5]
            if bucket == "brokers":
                self._observe(key, value if what == "PUT" else None)
            else:
                self.registry.apply(bucket, key, int(rev), what == "PUT", value)
        elif verb == b"LAST":
            self.log.start_at(frames[1].decode(), int(frames[2]))
        elif verb == b"ROUTED":
            self.registry.routed(json.loads(frames[1]))
        elif verb == b"PRIVS":  # for the search index (issue 23)
            self.log.index.privates(frames[1:])

    def put(self, bucket: str, key: str, value: Any) -> Op:
        return self.call(
            [b"KV", bucket.encode(), b"put", key.encode(), json.dumps(value).encode(), b"0"],
            json_value,
        )

    # ------------------------------------------------------------------ liveness
    def tick(self) -> None:
        """Every half heartbeat: beat, and settle the sessions of brokers that stopped."""
        self._beat()
        now = time.monotonic()
        limit = 3 * self.cfg.heartbeat
        healthy = self.healthy_since is not None and now - self.healthy_since >= limit
        if healthy:
            for name, seen in list(self.seen.items()):
                if name not in self.dead and now - seen > limit:
                    log.warning(
                        "broker %s stopped beating: its clients have %g s to resume elsewhere",
                        name,
                        limit,
                    )
                    self.dead[name] = now
        for name, since in list(self.dead.items()):
            if now - since >= limit:
                self._reap(name)
        for op_id, (op, _, sent) in list(self.ops.items()):
            if now - sent > OP_DEADLINE:  # the bridge answers everything: this is a bug
                log.error("cluster command %s unanswered after %g s", op_id, OP_DEADLINE)
                del self.ops[op_id]
                op.fail(ProtocolError(Code.UNAVAILABLE, "the cluster did not answer"))
        for targets, op in list(self.registry.waiting):
            if now - self.registry.asked.get(id(op), now) > OP_DEADLINE:
                log.error(
                    "catch-up waited %g s for %s (heard %s)",
                    OP_DEADLINE,
                    targets,
                    self.registry.revs,
                )
                self.registry.waiting.remove((targets, op))
                self.registry.asked.pop(id(op), None)
                op.fail(ProtocolError(Code.UNAVAILABLE, "the cluster did not answer"))
        self.log.index.retry()
        self.log.index.commit()
        self.log.index._wake()
        self.send_pending()

    def _beat(self) -> None:
        sent = time.monotonic()
        op = self.put("brokers", self.name, {"state": "up", "at": time.time()})

        def answered(op: Op) -> None:
            now = time.monotonic()
            if op.error is None and now - sent < self.cfg.heartbeat:
                self.beat_ok = now
                if self.healthy_since is None:
                    self.healthy_since = now
            else:
                self.healthy_since = None  # we cannot tell who is dead while cut off

        op.then(answered)

    def _observe(self, name: str, value: bytes | None) -> None:
        beat = json.loads(value) if value else {}
        self.peers[name] = beat
        if name == self.name:
            return
        state = beat.get("state")
        if state == "up":
            self.seen[name] = time.monotonic()
            if self.dead.pop(name, None) is not None:
                log.warning("broker %s is beating again", name)
        elif state == "stopped" and name not in self.dead:
            self.dead[name] = time.monotonic()  # stopped on purpose: no need to wait
            self.seen.pop(name, None)

    def _reap(self, broker: str) -> None:
        """Settle the sessions a dead broker held and their clients did not take back:
        each is claimed with a compare-and-set on its record, so only one broker
        announces it."""
        del self.dead[broker]
        self.seen.pop(broker, None)
        for ident in list(self.registry.identities()):
            if ident.broker == broker and ident.sid not in self.registry.local_sids():
                self.registry.reap(ident)
        if broker != self.name:
            self.put("brokers", broker, {"state": "gone", "at": time.time(), "by": self.name})


def json_value(frames: list[bytes]) -> Any:
    return json.loads(frames[1])


def list_value(frames: list[bytes]) -> list[str]:
    return [f.decode() for f in frames[1:]]


class ClusterLog(LogEdits):
    """Rooms' events in their streams; the latest of each kept here for reads (edits,
    removals and search: index.py)."""

    msg_id = staticmethod(msg_id)

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.delivered: dict[str, int] = {}
        self.incoming: list[Delivery] = []
        self.acked: dict[str, int] = {}  # room -> the highest number our own appends got
        self.cache: dict[str, deque[bytes]] = {}
        self.ids: OrderedDict[str, tuple[str, int]] = OrderedDict()  # msg id -> room, seq
        self.index = ClusterIndex(self._index_read, self._erase, self._patch_cache)  # issue 23

    def start_at(self, room: str, last: int) -> None:
        self.delivered.setdefault(room, last)
        self.index.start(room, last)  # the search index reads the room up to last

    def last(self, room: str) -> int:
        return self.delivered.get(room, 0)

    def append(self, room: str, drafts: list[Draft]) -> Op:
        frames = [b"APPEND", room.encode()]
        for d in drafts:
            tail = m.encode_event_tail(time.time(), d.nick, d.kind, d.text, d.cmid, d.extra)
            mid = msg_id(d.owner, d.cmid) if d.cmid is not None else uuid.uuid4().hex
            frames += [mid.encode(), str(d.kind).encode(), tail]
        op = self.cluster.call(frames, json_value)

        def stored(op: Op) -> None:  # a read after the ack includes them (read your writes)
            if op.error is None and op.value:
                self.acked[room] = max(self.acked.get(room, 0), max(op.value))

        op.then(stored)
        return op

    def known_ids(self, owner: str, cmids: list[str]) -> dict[str, tuple[str, str, int] | None]:
        out: dict[str, tuple[str, str, int] | None] = {}
        for cmid in cmids:
            hit = self.ids.get(msg_id(owner, cmid))
            out[cmid] = (owner, *hit) if hit is not None else None
        return out

    def _read(
        self, room: str, *, after: int | None, before: int | None, since: float | None, limit: int
    ) -> Op:
        last = max(self.last(room), self.acked.get(room, 0))
        if last == self.last(room):  # everything it may ask for has reached us
            cached = self._from_cache(room, after, before, since, limit)
            if cached is not None:
                return Op.ready(cached)
        q = {"after": after, "before": before, "since": since, "limit": limit, "last": last}
        return self.cluster.call([b"READ", room.encode(), json.dumps(q).encode()], list_value)

    def _from_cache(
        self, room: str, after: int | None, before: int | None, since: float | None, limit: int
    ) -> list[str] | None:
        cache, last = self.cache.get(room), self.last(room)
        if not cache:
            return [] if last == 0 else None
        first = last - len(cache) + 1
        if after is not None:
            lo, hi = after + 1, min(last, after + limit)
        else:
            hi = min(before - 1, last) if before is not None else last
            lo = max(1, hi - limit + 1)
        if lo > hi:
            return []
        if lo < first:
            return None
        texts = [cache[seq - first].decode() for seq in range(lo, hi + 1)]
        if since is not None:
            texts = [t for t in texts if json.loads(t).get("ts", 0) >= since]
        return texts

    def append_private(
        self, ts: float, sender: str, recipient: str, cmid: str, data: bytes, from_key: str
    ) -> Op:
        from zmqchat._cluster.bridge import token

        to_owner, _, to_key = recipient.partition(" ")
        subject = f"{token(to_owner)}.{token(to_key)}.{token(sender)}.{token(from_key)}"
        mid = msg_id(sender, cmid)
        op = self.cluster.call([b"PRIV", subject.encode(), mid.encode(), data], json_value)

        def stored(op: Op) -> None:
            if op.error is None:  # a retry of it is a duplicate from now on
                self.ids[mid] = ("", 0)

        op.then(stored)
        return op

    def _privates(self, pattern: str, since: float, limit: int) -> Op:
        return self.cluster.call(
            [b"PRIVREAD", pattern.encode(), repr(since).encode(), str(limit).encode()], list_value
        )

    def privates_to(self, recipient: str, since: float, limit: int) -> Op:
        from zmqchat._cluster.bridge import token

        owner, _, key = recipient.partition(" ")
        return self._privates(f"{token(owner)}.{token(key)}.*.*", since, limit)

    def privates_of(self, owner: str, since: float, limit: int) -> Op:
        """The private messages kept for an identity under any nick (accounts)."""
        from zmqchat._cluster.bridge import token

        return self._privates(f"{token(owner)}.*.*.*", since, limit)

    def conversation(self, me: str, peer_key: str, since: float | None, limit: int) -> Op:
        from zmqchat._cluster.bridge import token

        both = gather(
            [
                self._privates(f"{token(me)}.*.*.{token(peer_key)}", since or 0.0, limit),
                self._privates(f"*.{token(peer_key)}.{token(me)}.*", since or 0.0, limit),
            ]
        )
        outer = Op()

        def merged(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
                return
            texts = {t: json.loads(t).get("ts", 0) for part in op.value for t in part}
            outer.resolve(sorted(texts, key=texts.__getitem__)[-limit:])

        both.then(merged)
        return outer

    def arrived(self, frames: list[bytes]) -> None:
        """EVENTS room first meta event...: a room's next events from its stream."""
        room, first, meta = frames[1].decode(), int(frames[2]), json.loads(frames[3])
        events = frames[4:]
        last = self.delivered.get(room, 0)
        if first > last + 1:
            log.error("%s: events %d..%d never arrived", room, last + 1, first - 1)
        end = first + len(events) - 1
        if end <= last:
            return
        self.delivered[room] = end
        self.incoming.append(Delivery(room, first, events, meta["departures"]))
        cache = self.cache.get(room)
        if cache is None or first > last + 1:
            cache = self.cache[room] = deque(maxlen=CACHE_EVENTS)
        cache.extend(events[max(0, last + 1 - first) :])
        self.index.arrived(room, first, events)  # edits, removals, search (issue 23)
        ids = self.ids
        for mid, seq in meta["ids"]:
            ids[mid] = (room, seq)
        while len(ids) > MSGID_CACHE:
            ids.popitem(last=False)

    def follow(self) -> list[Delivery]:
        """The events that arrived since the last pass; and the commands of this pass go
        out to the bridge now (the end of a pass of the broker's loop)."""
        self.cluster.send_pending()
        self.index.commit()
        out, self.incoming = self.incoming, []
        return out


class ClusterRegistry:
    """The registry's buckets as last heard (watched), and changes to them."""

    def __init__(self, cluster: Cluster, cfg: Config) -> None:
        self.cluster = cluster
        self.core: Listener | None = None
        self.sessions: dict[str, Identity] = {}
        self._members: dict[str, dict[str, Member]] = {}
        self.rooms: dict[str, RoomSettings] = {}
        self.saved: dict[str, RoomSettings] = {}  # as the bucket has them
        self.owners: dict[str, str] = {}
        self.revs: dict[str, int] = {}  # bucket -> the latest revision heard
        self.waiting: list[tuple[dict[str, int], Op]] = []  # catch-ups under way
        self.asked: dict[int, float] = {}

    # ---------------------------------------------------------------- news
    def catch_up(self) -> Op:
        """Done once we have heard every change stored before now (asked of each bucket's
        stream leader): what a command reads afterwards is what every broker agrees on."""
        outer = Op()

        def latest(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
            else:
                self.waiting.append((op.value, outer))
                self.asked[id(outer)] = time.monotonic()
                self._caught_up()

        self.cluster.call([b"SYNC"], json_value).then(latest)
        return outer

    def _caught_up(self) -> None:
        still = []
        for targets, op in self.waiting:
            if all(self.revs.get(b, 0) >= rev for b, rev in targets.items()):
                self.asked.pop(id(op), None)
                op.resolve()
            else:
                still.append((targets, op))
        self.waiting = still

    def apply(self, bucket: str, key: str, rev: int, put: bool, value: bytes) -> None:
        self.revs[bucket] = max(self.revs.get(bucket, 0), rev)
        self._apply(bucket, key, rev, put, value)
        if self.waiting:
            self._caught_up()

    def _apply(self, bucket: str, key: str, rev: int, put: bool, value: bytes) -> None:
        if bucket == "sessions":
            self._session(unhex(key), rev, json.loads(value) if put else None)
        elif bucket == "members":
            room, _, hexed = key.partition(".")
            if put:
                d = json.loads(value)
                self._members.setdefault(room, {})[unhex(hexed)] = Member(
                    d["nick"], unhex(hexed), d["sid"], d["broker"]
                )
            else:
                self._members.get(room, {}).pop(unhex(hexed), None)
        elif bucket == "rooms":
            self._room_field(key, put, value)
        elif bucket == "nickkeys":
            if put:
                self.owners[unhex(key)] = json.loads(value)
        elif bucket in ACCOUNT_BUCKETS:
            self.cluster.accounts.apply(bucket, key, put, value)  # issue 21

    def _session(self, key: str, rev: int, d: dict[str, Any] | None) -> None:
        old = self.sessions.get(key)
        if d is None:
            if old is None:
                return
            del self.sessions[key]
            ident = None
        else:
            ident = Identity(
                d["sid"],
                d["nick"],
                key,
                d["token"],
                d["pubkey"],
                d["bot"],
                d["broker"],
                rev,
                d.get("account", ""),
            )
            if old is not None and old.sid == ident.sid and old.rev > rev:
                return  # older news than what we made ourselves
            self.sessions[key] = ident
        if self.core is not None and (ident is None or old is None or old.sid != ident.sid):
            self.core.identity_changed(key, ident)

    def _room_field(self, key: str, put: bool, value: bytes) -> None:
        room, _, field = key.partition(".")
        settings = self.rooms.get(room)
        if settings is None:
            if not put:
                return
            settings = self.rooms[room] = RoomSettings(room)
            self.saved[room] = RoomSettings(room)
            if self.core is not None:
                self.core.room_added(room)
        for target in (settings, self.saved[room]):
            if field == "":
                target.created = put and json.loads(value).get("created") is True
            elif field == "topic":
                target.topic = json.loads(value) if put else ""
            elif field == "locked":
                target.locked = put and json.loads(value) is True
            elif field.startswith(("op.", "ban.")):
                kind, _, hexed = field.partition(".")
                group = target.operators if kind == "op" else target.bans
                (group.add if put else group.discard)(unhex(hexed))

    def routed(self, d: dict[str, Any]) -> None:
        if self.core is not None:
            self.core.routed(d["sid"], Reply(d["kind"]), d["body"])

    # ---------------------------------------------------------------- sessions
    def holder(self, key: str) -> Identity | None:
        return self.sessions.get(key)

    def identities(self) -> Iterable[Identity]:
        return self.sessions.values()

    def local_sids(self) -> set[str]:
        return set(self.core.local_sids()) if self.core is not None else set()

    def _record(self, ident: Identity) -> bytes:
        return json.dumps(
            {
                "sid": ident.sid,
                "nick": ident.nick,
                "token": ident.token_hash,
                "pubkey": ident.pubkey,
                "bot": ident.bot,
                "broker": ident.broker,
                "account": ident.account,
            }
        ).encode()

    def _kv(self, verb: str, bucket: str, key: str, value: bytes = b"", rev: int = 0) -> Op:
        return self.cluster.call(
            [b"KV", bucket.encode(), verb.encode(), key.encode(), value, str(rev).encode()],
            json_value,
        )

    def claim(self, ident: Identity, replacing: Identity | None) -> Op:
        key = hexkey(ident.key)
        inner = (
            self._kv("create", "sessions", key, self._record(ident))
            if replacing is None
            else self._kv("update", "sessions", key, self._record(ident), replacing.rev)
        )
        outer = Op()

        def answered(op: Op) -> None:
            if isinstance(op.error, ProtocolError) and op.error.extra.get("cluster") == "CONFLICT":
                outer.fail(ProtocolError(Code.NICK_TAKEN, f"the nickname {ident.nick} is taken"))
            elif op.error is not None:
                outer.fail(op.error)
            else:
                ident.rev = op.value
                old = self.sessions.get(ident.key)
                self.sessions[ident.key] = ident
                if self.core is not None and old is not None and old.sid != ident.sid:
                    self.core.identity_changed(ident.key, ident)
                outer.resolve()

        inner.then(answered)
        return outer

    def rename(self, ident: Identity, new_nick: str, new_key: str) -> Op:
        moved = Identity(
            ident.sid,
            new_nick,
            new_key,
            ident.token_hash,
            ident.pubkey,
            ident.bot,
            ident.broker,
            account=ident.account,
        )
        inner = self.claim(moved, self.sessions.get(new_key) if new_key == ident.key else None)
        outer = Op()

        def claimed(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
                return
            ops = [self.release(ident)] if new_key != ident.key else []
            for room, members in list(self._members.items()):
                member = members.get(ident.key)
                if member is not None and member.sid == ident.sid:
                    ops.append(self.remove_member(room, ident.key))
                    ops.append(
                        self.add_member(room, Member(new_nick, new_key, ident.sid, ident.broker))
                    )
            gather(ops).then(lambda done: outer.fail(done.error) if done.error else outer.resolve())

        inner.then(claimed)
        return outer

    def release(self, ident: Identity) -> Op:
        held = self.sessions.get(ident.key)
        if held is None or held.sid != ident.sid:
            return Op.ready()
        del self.sessions[ident.key]
        return self._kv("delete", "sessions", hexkey(ident.key), rev=held.rev)

    def reap(self, ident: Identity) -> None:
        """Claim a dead broker's session (compare-and-set on its record: only one broker
        wins), then announce it as lost."""
        op = self._kv("delete", "sessions", hexkey(ident.key), rev=ident.rev)

        def claimed(op: Op) -> None:
            if op.error is not None:
                log.info("%s: resumed, or settled by another broker", ident.nick)
                return
            self.sessions.pop(ident.key, None)
            log_event(
                log,
                "reaped",
                nick=ident.nick,
                sid=ident.sid,
                broker=ident.broker,
                why="did not resume after its broker stopped",
            )
            if self.core is not None:
                self.core.reap(ident)

        op.then(claimed)

    # ---------------------------------------------------------------- membership
    def members(self, room: str) -> dict[str, Member]:
        return self._members.get(room, {})

    def add_member(self, room: str, member: Member) -> Op:
        self._members.setdefault(room, {})[member.key] = member
        return self._kv(
            "put",
            "members",
            f"{room}.{hexkey(member.key)}",
            json.dumps({"nick": member.nick, "sid": member.sid, "broker": member.broker}).encode(),
        )

    def remove_member(self, room: str, key: str, sid: str | None = None) -> Op:
        members = self._members.get(room, {})
        member = members.get(key)
        if member is None or (sid is not None and member.sid != sid):
            return Op.ready()
        del members[key]
        return self._kv("delete", "members", f"{room}.{hexkey(key)}")

    # ---------------------------------------------------------------- rooms
    def seed(self, rooms: Iterable[str], ops: Iterable[str]) -> None:
        """Our --rooms and --ops, added to what the cluster has (nothing is taken away)."""
        op_keys = {m.nick_key(n) for n in ops}
        for name in rooms:
            settings = self.rooms.get(name)
            if settings is None:
                settings = self.rooms[name] = RoomSettings(name)
                self.saved[name] = RoomSettings(name)
                self._kv("create", "rooms", name, b'{"created":false}')
            if not op_keys <= settings.operators:
                settings.operators |= op_keys
                self.save(settings)

    def room_names(self) -> list[str]:
        fixed = [r for r in self.cluster.cfg.rooms if r in self.rooms]
        return fixed + sorted(r for r in self.rooms if r not in fixed)

    def settings(self, room: str) -> RoomSettings | None:
        return self.rooms.get(room)

    def create_room(self, settings: RoomSettings) -> Op:
        inner = self.cluster.call([b"ROOM", settings.name.encode()], json_value)
        outer = Op()

        def made(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
                return
            if settings.name not in self.rooms:
                self.rooms[settings.name] = RoomSettings(settings.name, created=True)
                self.saved[settings.name] = RoomSettings(settings.name, created=True)
            if not op.value:
                outer.resolve(False)
                return
            self.rooms[settings.name].operators |= settings.operators  # ours: we are its operator
            self.save(self.rooms[settings.name]).then(
                lambda saved: outer.fail(saved.error) if saved.error else outer.resolve(True)
            )

        inner.then(made)
        return outer

    def save(self, settings: RoomSettings) -> Op:
        """Write the fields that changed since the bucket last had them (a field a key:
        brokers changing different fields at once do not undo each other)."""
        name = settings.name
        old = self.saved.setdefault(name, RoomSettings(name))
        ops = []
        if settings.topic != old.topic:
            ops.append(
                self._kv("put", "rooms", f"{name}.topic", json.dumps(settings.topic).encode())
            )
        if settings.locked != old.locked:
            ops.append(
                self._kv("put", "rooms", f"{name}.locked", json.dumps(settings.locked).encode())
            )
        for kind, new, was in (
            ("op", settings.operators, old.operators),
            ("ban", settings.bans, old.bans),
        ):
            for key in new - was:
                ops.append(self._kv("put", "rooms", f"{name}.{kind}.{hexkey(key)}", b"true"))
            for key in was - new:
                ops.append(self._kv("delete", "rooms", f"{name}.{kind}.{hexkey(key)}"))
        self.saved[name] = RoomSettings(
            name,
            settings.topic,
            settings.locked,
            set(settings.operators),
            set(settings.bans),
            settings.created,
        )
        return gather(ops)

    # ---------------------------------------------------------------- CURVE
    def nick_owner(self, key: str) -> str | None:
        return self.owners.get(key)

    def bind_nick(self, key: str, pubkey: str) -> Op:
        """The first key wins, whichever broker it came through (a create, or the one
        that was there)."""
        if self.owners.get(key) == pubkey:
            return Op.ready()
        outer = Op()

        def created(op: Op) -> None:
            if op.error is None:
                self.owners[key] = pubkey
                outer.resolve()
            else:  # someone bound it first: ours only if it was the same key
                self.catch_up().then(
                    lambda _: (
                        outer.resolve()
                        if self.owners.get(key) == pubkey
                        else outer.fail(
                            ProtocolError(Code.NICK_TAKEN, "the nickname belongs to another key")
                        )
                    )
                )

        self._kv("create", "nickkeys", hexkey(key), json.dumps(pubkey).encode()).then(created)
        return outer


class ClusterPresence:
    """Pushes for sessions on other brokers go through NATS, to that broker's subject."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def send(self, broker: str, sid: str, kind: Reply, body: dict[str, Any]) -> None:
        self.cluster.tell(
            [
                b"ROUTE",
                broker.encode(),
                json.dumps({"sid": sid, "kind": str(kind), "body": body}).encode(),
            ]
        )
