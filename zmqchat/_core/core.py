"""The broker's core: sessions, rooms and every command's handler, with no I/O.

The loop in broker.py reads frames and hands them here; the core answers through two effect
lists that the loop sends (`outbox`: frames for the ROUTER, replies and pushes; `pubs`: topic
and batch frames for the XPUB) and through the shared state's interfaces (state.py). A
subscription is approved or refused on the spot (`subscription()` returns what the XPUB must
do at once, since XPUB_MANUAL applies it to the pipe just read).

Handlers take (session, request). One that needs the shared state to agree first (an append
acknowledged, a nick claimed) is a generator: it yields the pending Op and is resumed with
its value when it is done, at once on a single broker, later in a cluster; its reply goes
out then. Every request gets exactly one reply, whatever happens in between.

What belongs to this broker alone lives here: a `Session` (routing id, rate bucket, last
seen, rooms, approved topics) around its shared `Identity`, and a `Room` (epoch, the local
members who hear it, what was published) beside its shared `RoomSettings`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from zmqchat import protocol as m
from zmqchat._core.state import (
    Delivery,
    Draft,
    Identity,
    Member,
    Op,
    Presence,
    Registry,
    RoomLog,
    RoomSettings,
    gather,
    token_hash,
)
from zmqchat._ops.logs import event as log_event
from zmqchat._ops.metrics import Stats
from zmqchat.protocol import Code, EventKind, Kind, ProtocolError, Reply

log = logging.getLogger("zmqchat.broker")

DEFAULT_ROOMS: Final = ("lobby", "work", "support", "team")
# Commands that change rooms cost one rate-limit token each (SAY and PRIV pay per message).
CHARGED: Final = frozenset(
    {Kind.JOIN, Kind.LEAVE, Kind.NICK, Kind.TOPIC, Kind.KICK, Kind.BAN, Kind.UNBAN}
)
BATCH_EVENTS: Final = 256  # events per published frame: keeps frames well under 64 KiB
GRANT_TTL: Final = 120  # seconds a grant may wait before it is used
MAX_ROOMS: Final = 1000  # rooms /join may create: one client cannot fill memory
REPLAY_WINDOW: Final = 600  # seconds back a resuming client may be sent private messages again
MIN_REPLAY_TOKEN: Final = 16  # a shorter resume token proves too little to be sent them
_OK: Final = b"OK"
_SAY: Final = [b"SAY"]


@dataclass
class Config:
    """How the broker was started (broker.py's flags)."""

    host: str = "127.0.0.1"
    port: int = 9001
    pub_port: int = 9002
    rooms: tuple[str, ...] = DEFAULT_ROOMS
    allow_new_rooms: bool = False
    heartbeat: float = 2.0
    db: str = "chat.db"
    fsync: bool = False
    motd: str | None = None
    ops: tuple[str, ...] = ()
    rate: float = 5.0
    burst: int = 20
    curve_key: str | None = None  # the broker's secret key file: serve only CURVE
    allow_keys: str | None = None  # directory of client public keys allowed in
    name: str = ""  # shown in logs and in the welcome; made up if empty
    cluster: str | None = None  # NATS URLs: share the rooms with other brokers
    replicas: int = 0  # copies of each stream in a cluster (0: up to 3)
    namespace: str = "zmqchat"  # prefix of our streams and buckets in NATS
    metrics_port: int | None = None  # serve Prometheus metrics over HTTP on this port


@dataclass
class Bucket:
    """Token bucket: `burst` messages at once, refilled at `rate` per second (0 = unlimited)."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, n: float, now: float) -> float:
        """Take n tokens; return 0 on success, else seconds until they would be there."""
        if self.rate <= 0:
            return 0.0
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class Stage(Enum):
    """A session's life on this broker."""

    LIVE = "live"  # connected here
    GONE = "gone"  # ended: quit, lost, replaced, expired


@dataclass(eq=False)
class Session:
    """One client connection on this broker, around the identity every broker knows."""

    rid: bytes
    ident: Identity
    bucket: Bucket
    last_seen: float
    replayable: bool = False  # proved enough (CURVE key or a long token) for private replay
    stage: Stage = Stage.LIVE
    rooms: set[str] = field(default_factory=set)
    topics: dict[str, bytes] = field(default_factory=dict)  # room -> topic approved on our pipe

    @property
    def nick(self) -> str:
        return self.ident.nick

    @property
    def sid(self) -> str:
        return self.ident.sid

    @property
    def key(self) -> str:
        return self.ident.key


@dataclass(eq=False)
class Room:
    """A room as this broker serves it: who hears it here, under which topic."""

    name: str
    epoch: str = field(default_factory=lambda: secrets.token_hex(8))
    members: dict[str, Session] = field(default_factory=dict)  # sid -> local session
    published: int = 0  # the highest number published here
    rekey_after: int | None = None  # change the topic once this number is published

    @property
    def seq(self) -> int:
        """The room's latest event as this broker has published it."""
        return self.published


@dataclass(eq=False)
class Turn:
    """The requests of one connection that wait for the shared state, and those waiting
    behind them. A connection's requests are handled in the order they came: a JOIN that
    waits for the cluster holds up the SAY after it. SAYs may overlap one another (the room
    log keeps their order), and a PING never waits: a slow cluster must not look like a
    dead broker."""

    says: int = 0  # SAYs under way
    other: bool = False  # a request other than SAY under way
    queue: deque[tuple[list[bytes], str]] = field(default_factory=deque)

    def may_start(self, kind: bytes, queued: bool = False) -> bool:
        """Whether a request of this kind goes now (`queued`: it is the first in line)."""
        if kind == b"PING":
            return True
        if (self.queue and not queued) or self.other:
            return False
        return kind == b"SAY" or not self.says

    def started(self, say: bool) -> None:
        if say:
            self.says += 1
        else:
            self.other = True

    def finished(self, say: bool) -> None:
        if say:
            self.says -= 1
        else:
            self.other = False

    def idle(self) -> bool:
        return not (self.says or self.other or self.queue)


Result = dict[str, Any] | bytes | Generator[Op, Any, dict[str, Any] | bytes]
Handler = Callable[[Session, m.Request], Result]


class Core:
    """The broker's state and rules; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        log_: RoomLog,
        registry: Registry,
        presence: Presence,
        *,
        name: str,
        pub_port: int,
        motd: str,
    ) -> None:
        self.cfg, self.log, self.registry, self.presence = cfg, log_, registry, presence
        self.name, self.pub_port, self.motd = name, pub_port, motd
        self.curve = cfg.curve_key is not None
        self.key = secrets.token_bytes(32)  # signs grants
        self.rooms: dict[str, Room] = {}
        for room in registry.room_names():
            self.add_room(room)
        self.by_rid: dict[bytes, Session] = {}
        self.by_sid: dict[str, Session] = {}
        self.used_nonces: dict[str, float] = {}
        # A connection's requests are handled in the order they came (see Turn).
        self.turns: dict[bytes, Turn] = {}
        self.outbox: list[list[bytes]] = []  # [rid, kind, label, body] to send
        self.pubs: list[tuple[bytes, bytes]] = []  # (topic, batch) to publish
        self.stats = Stats()
        self.ack_starts: list[float] = []  # arrival times of the SAYs answered in outbox
        self.handlers: dict[Kind, Handler] = {
            Kind.JOIN: self._on_join,
            Kind.LEAVE: self._on_leave,
            Kind.SAY: self._on_say,
            Kind.PRIV: self._on_priv,
            Kind.ROOMS: self._on_rooms,
            Kind.WHO: self._on_who,
            Kind.NICK: self._on_nick,
            Kind.TOPIC: self._on_topic,
            Kind.HISTORY: self._on_history,
            Kind.PING: self._on_ping,
            Kind.BYE: self._on_bye,
            Kind.KICK: self._on_kick,
            Kind.BAN: self._on_ban,
            Kind.UNBAN: self._on_unban,
        }

    def add_room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, published=self.log.last(name))
        return room

    # ------------------------------------------------------------------ requests
    def request(self, rid: bytes, frames: list[bytes], key: str = "") -> None:
        """One request from a connection: exactly one reply, now or once it is decided."""
        turn = self.turns.get(rid)
        if turn is not None and not turn.may_start(frames[0] if frames else b""):
            turn.queue.append((frames, key))
            return
        self._handle(rid, frames, key)

    def _handle(self, rid: bytes, frames: list[bytes], key: str) -> None:
        started = time.perf_counter() if frames[:1] == _SAY else 0.0  # its ack's latency
        label = m.decode_label(frames)
        session = self.by_rid.get(rid)
        try:
            req = m.decode_request(frames)
            self.stats.requests[req.kind] += 1
            log.debug("<- %s %s", req.kind, session.nick if session else rid.hex())
            if req.kind is Kind.HELLO:
                result: Result = self._on_hello(rid, session, req, key)
            elif session is None:
                raise ProtocolError(Code.NO_HELLO, "say HELLO first")
            elif self.curve and key != session.ident.pubkey:  # a stolen routing id gets nothing
                raise ProtocolError(Code.NO_HELLO, "say HELLO first")
            else:
                session.last_seen = time.monotonic()
                if req.kind in CHARGED:
                    self._charge(session, 1)
                result = self.handlers[req.kind](session, req)
        except ProtocolError as err:
            self._error(rid, label, err)
            return
        except Exception:  # a bug: still exactly one reply, and the loop goes on
            log.exception("error handling %r from %s", [f[:64] for f in frames[:2]], rid.hex())
            self._error(
                rid, label, ProtocolError(Code.INTERNAL, "the broker failed on this request")
            )
            return
        if isinstance(result, (dict, bytes)):
            self.outbox.append([rid, _OK, label, _dumps_with_raw(result)])
            if started:
                self.ack_starts.append(started)
        elif not self._step(rid, label, result, Op.ready(), started):
            turn = self.turns.get(rid)  # it waits for the shared state
            if turn is None:
                turn = self.turns[rid] = Turn()
            turn.started(req.kind is Kind.SAY)

    def _resume(
        self,
        rid: bytes,
        label: bytes,
        gen: Generator[Op, Any, dict[str, Any] | bytes],
        op: Op,
        started: float,
    ) -> None:
        """A waiting handler's Op is done: run it on; once it has answered, its
        connection's requests that waited behind it go."""
        if not self._step(rid, label, gen, op, started):
            return
        turn = self.turns.get(rid)
        if turn is None:
            return
        turn.finished(bool(started))
        while turn.queue and turn.may_start(turn.queue[0][0][0] if turn.queue[0][0] else b"", True):
            frames, key = turn.queue.popleft()
            self._handle(rid, frames, key)
        if turn.idle():
            del self.turns[rid]

    def _step(
        self,
        rid: bytes,
        label: bytes,
        gen: Generator[Op, Any, dict[str, Any] | bytes],
        op: Op,
        started: float,
    ) -> bool:
        """Run the handler on; True once it has answered, False if it waits again."""
        while True:
            try:
                if op.error is not None:
                    op = gen.throw(op.error)
                else:
                    op = gen.send(op.value)
            except StopIteration as done:
                self.outbox.append([rid, _OK, label, _dumps_with_raw(done.value)])
                if started:
                    self.ack_starts.append(started)
                return True
            except ProtocolError as err:
                self._error(rid, label, err)
                return True
            except Exception:
                log.exception("error handling a request from %s", rid.hex())
                self._error(
                    rid, label, ProtocolError(Code.INTERNAL, "the broker failed on this request")
                )
                return True
            if not op.done:
                op.then(lambda op: self._resume(rid, label, gen, op, started))
                return False

    def _error(self, rid: bytes, label: bytes, err: ProtocolError) -> None:
        log.debug("-> ERROR %s %s", err.code, err.reason)
        self.stats.errors[err.code] += 1
        self.outbox.append([rid, *m.encode_error(label, err)])

    def _push(self, s: Session, kind: Reply, body: dict[str, Any]) -> None:
        self.outbox.append([s.rid, *m.encode_reply(kind, b"", body)])

    def push_to(self, ident: Identity | Member, kind: Reply, body: dict[str, Any]) -> None:
        """A push to a session wherever it is: here, or through its broker."""
        s = self.by_sid.get(ident.sid)
        if s is not None:
            self._push(s, kind, body)
        elif ident.broker and ident.broker != self.name:
            self.presence.send(ident.broker, ident.sid, kind, body)

    def routed(self, sid: str, kind: Reply, body: dict[str, Any]) -> None:
        """A push another broker sent to one of our sessions (gone meanwhile: dropped)."""
        s = self.by_sid.get(sid)
        if s is None:
            return
        if kind is Reply.KICKED:
            room = self.rooms.get(str(body.get("room")))
            if room is None or s.sid not in room.members:
                return
            self._remove(s, room)
        self._push(s, kind, body)

    # ------------------------------------------------------------------ publishing
    def deliver(self, d: Delivery) -> None:
        """Publish a room's new durable events to this broker's subscribers, in order.
        The topic changes right after each departure and wherever a re-key is due (what
        came before, the leave notice included, still goes out on the old topic, so the
        members who stay see it live; nothing after it reaches the departed)."""
        room = self.rooms.get(d.room)
        if room is None:
            room = self.add_room(d.room)
        if not d.departures and room.rekey_after is None and d.first == room.published + 1:
            self._publish(room, d.events)  # the usual case: nothing to cut at
            room.published += len(d.events)
            return
        i, n = max(room.published - d.first + 1, 0), len(d.events)  # a cluster may repeat
        ends = {seq - d.first + 1 for seq in d.departures if seq > room.published}
        while i < n:
            cut = min((c for c in ends if c > i), default=n)
            while cut + 1 in ends:  # a run of departures (a sweep): one re-key after it
                cut += 1
            if room.rekey_after is not None:
                cut = max(min(cut, room.rekey_after - d.first + 1), i + 1)
            self._publish(room, d.events[i:cut])
            room.published = d.first + cut - 1
            left = [c for c in ends if i < c <= cut]
            for c in sorted(left):
                self._departed_here(room, d.events[c - 1])
            if left:
                self._rekey_after(room, room.published)
            elif room.rekey_after is not None and room.rekey_after <= room.published:
                self._rotate(room)
            i = cut
        if room.rekey_after is not None and room.rekey_after <= room.published:
            self._rotate(room)

    def _publish(self, room: Room, events: list[bytes]) -> None:
        topic = m.room_topic(room.name, room.epoch)
        if len(events) == 1:
            self.pubs.append((topic, b"[" + events[0] + b"]"))
            return
        for i in range(0, len(events), BATCH_EVENTS):
            self.pubs.append((topic, b"[" + b",".join(events[i : i + BATCH_EVENTS]) + b"]"))

    def _departed_here(self, room: Room, data: bytes) -> None:
        """A kick or ban of one of our sessions that another broker made: it is out here."""
        if b'"kind":"kick"' not in data and b'"kind":"ban"' not in data:
            return
        ev = json.loads(data)
        if ev.get("kind") not in ("kick", "ban"):
            return
        target = self._local_by_key(m.nick_key(str(ev.get("nick", ""))))
        if target is None or target.sid not in room.members:
            return
        self._remove(target, room, rekey=False)  # the caller re-keys after the notice
        self._push(
            target,
            Reply.KICKED,
            {
                "room": room.name,
                "by": ev.get("by", ""),
                "reason": ev.get("reason", ""),
                "kind": ev["kind"],
            },
        )

    def _local_by_key(self, key: str) -> Session | None:
        ident = self.registry.holder(key)
        return self.by_sid.get(ident.sid) if ident is not None else None

    def _rekey_after(self, room: Room, seq: int) -> None:
        room.rekey_after = seq if room.rekey_after is None else max(room.rekey_after, seq)
        if room.rekey_after <= room.published:
            self._rotate(room)

    def _rotate(self, room: Room) -> None:
        """Change a room's topic so departed connections hear nothing; re-grant the rest."""
        room.rekey_after = None
        room.epoch = secrets.token_hex(8)
        for s in room.members.values():
            self._push(s, Reply.GRANT, {"room": room.name, "grant": self._grant(s, room)})

    # ------------------------------------------------------------------ subscriptions
    def _grant(self, s: Session, room: Room) -> str:
        payload = m.grant_payload(
            room.name, room.epoch, s.sid, int(time.time()) + GRANT_TTL, secrets.token_hex(8)
        )
        return payload + "." + self._mac(payload)

    def _mac(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()[:32]

    def subscription(self, data: bytes, key: str = "") -> tuple[bytes | None, bytes | None]:
        """A subscription message from the XPUB: (topic to drop, topic to approve) for the
        connection it came from, if `data` is a fresh, valid, unused grant of a member."""
        parsed = m.parse_grant(data)
        if parsed is None:
            log_event(log, "subscription-refused", why="not a grant", data=data[:40])
            return None, None
        name, epoch, sid, expiry, nonce, mac = parsed
        payload = m.grant_payload(name, epoch, sid, expiry, nonce)
        room, s = self.rooms.get(name), self.by_sid.get(sid)
        if (
            not hmac.compare_digest(mac, self._mac(payload))
            or expiry < time.time()
            or nonce in self.used_nonces
            or room is None
            or room.epoch != epoch
            or s is None
            or sid not in room.members
            or (self.curve and key != s.ident.pubkey)
        ):
            log_event(log, "subscription-refused", why="stale, used or forged", room=name)
            return None, None
        self.used_nonces[nonce] = expiry
        topic = m.room_topic(name, epoch)
        old = s.topics.get(name)
        s.topics[name] = topic
        self._push(s, Reply.LIVE, {"room": name, "seq": room.published})
        return (old if old is not None and old != topic else None), topic

    # ------------------------------------------------------------------ rooms and members
    def _room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            raise ProtocolError(
                Code.ROOM_UNKNOWN,
                f"no room {name!r}; rooms: {', '.join(self.rooms)}",
                rooms=list(self.rooms),
            )
        return room

    def _member_room(self, s: Session, name: str) -> Room:
        room = self._room(name)
        if s.sid not in room.members:
            raise ProtocolError(Code.NOT_MEMBER, f"you are not in {name}; /join {name} first")
        return room

    def _settings(self, room: Room) -> RoomSettings:
        settings = self.registry.settings(room.name)
        return settings if settings is not None else RoomSettings(room.name)

    def _listing(self, room: Room) -> tuple[list[str], list[str]]:
        """(members, operators among them) of a room, cluster-wide, sorted."""
        ops = self._settings(room).ops
        here = [mem for mem in self.registry.members(room.name).values() if self._present(mem)]
        return (
            sorted(mem.nick for mem in here),
            sorted(mem.nick for mem in here if mem.key in ops),
        )

    def _present(self, mem: Member) -> bool:
        """Whether a member record is held by the session now holding its nick."""
        ident = self.registry.holder(mem.key)
        return ident is not None and ident.sid == mem.sid

    def _append(
        self, room: Room, kind: EventKind, s: Session | Identity | Member, text: str, **extra: Any
    ) -> Op:
        nick = s.nick
        return self._store(
            room.name, [Draft(kind, nick, text, m.nick_key(nick), None, extra or None)]
        )

    def _store(self, room: str, drafts: list[Draft]) -> Op:
        """Append events to a room's log (counted by kind)."""
        events = self.stats.events
        for d in drafts:
            events[d.kind] += 1
        return self.log.append(room, drafts)

    def _remove(self, s: Session, room: Room, *, rekey: bool = True) -> None:
        """Take a session of ours out of a room's audience and re-key the room once all
        that was appended so far is published (its leave notice, if any, included)."""
        room.members.pop(s.sid, None)
        s.rooms.discard(room.name)
        s.topics.pop(room.name, None)
        if rekey:
            self._rekey_after(room, self.log.last(room.name))

    def _leave(self, s: Session, room: Room, why: str, reason: str = "") -> Op:
        """A departure with its notice: out of the room here and in the registry."""
        op = self._append(
            room,
            EventKind.LEAVE,
            s,
            leave_text(s.nick, why, reason),
            why=why,
            reason=reason,
            bot=s.ident.bot,
        )
        gone = self.registry.remove_member(room.name, s.key, s.sid)
        self._remove(s, room)
        return gather([op, gone])

    def _drop(self, s: Session, reason: str, why: str) -> Op:
        """End a session with leave notices in its rooms; its nick is free again."""
        ops = [self._leave(s, self.rooms[name], why, reason) for name in sorted(s.rooms)]
        self._forget(s)
        ops.append(self.registry.release(s.ident))
        return gather(ops)

    def _lose(self, s: Session) -> None:
        """A session silent for three heartbeats: its nick is let go first, and only if it
        still held it (a compare-and-set in a cluster) is it announced as lost. A client
        that resumed on another broker meanwhile holds it there: it ends here quietly."""
        self._forget(s)

        def released(op: Op) -> None:
            rooms = [self.rooms[name] for name in sorted(s.rooms)]
            if op.error is None and op.value is not False:
                for room in rooms:
                    self._leave(s, room, "lost", "connection lost")
            else:  # moved on (or the cluster is away: its broker settles it later)
                for room in rooms:
                    self._remove(s, room)

        self.registry.release(s.ident).then(released)

    def _drop_quietly(self, s: Session) -> None:
        """End a session that its own client took over (here or on another broker): no
        notices, its memberships stay for the resume-joins to come."""
        log_event(log, "replaced", nick=s.nick, sid=s.sid)
        for name in sorted(s.rooms):
            self._remove(s, self.rooms[name])
        self._forget(s)

    def _forget(self, s: Session) -> None:
        s.stage = Stage.GONE
        self.by_rid.pop(s.rid, None)
        self.by_sid.pop(s.sid, None)

    # ------------------------------------------------------------------ registry news
    def identity_changed(self, key: str, ident: Identity | None) -> None:
        """The registry heard that a nick moved (resumed on another broker) or was freed
        (by a broker that found ours dead): a session of ours that held it is over."""
        for s in [s for s in self.by_sid.values() if s.key == key]:
            if ident is not None and ident.sid == s.sid:
                continue
            log_event(
                log,
                "moved" if ident is not None else "ended",
                nick=s.nick,
                sid=s.sid,
                to=ident.broker if ident is not None else "",
            )
            self._drop_quietly(s)
            if ident is None:
                self._push(s, Reply.EXPIRED, {"reason": "your session was ended"})

    def reap(self, ident: Identity) -> Op:
        """A session of a broker that died and that its client did not resume elsewhere:
        announce it as lost in its rooms, once, and free its nick."""
        ops = []
        for name, room in self.rooms.items():
            member = self.registry.members(name).get(ident.key)
            if member is not None and member.sid == ident.sid:
                ops.append(self.registry.remove_member(name, ident.key, ident.sid))
                ops.append(
                    self._append(
                        room,
                        EventKind.LEAVE,
                        ident,
                        leave_text(ident.nick, "lost", ""),
                        why="lost",
                        reason="",
                        bot=ident.bot,
                    )
                )
        ops.append(self.registry.release(ident))
        return gather(ops)

    # ------------------------------------------------------------------ handlers
    def _on_hello(
        self, rid: bytes, session: Session | None, req: m.Request, pubkey: str = ""
    ) -> Generator[Op, Any, dict[str, Any]]:
        if session is not None:
            raise ProtocolError(Code.ALREADY_HELLO, f"already connected as {session.nick}")
        nick, b = req.body["nick"], req.body
        key = m.nick_key(nick)
        yield self.registry.catch_up()  # a nick freed or taken on another broker just now
        if self.curve:
            owner = self.registry.nick_owner(key)
            if owner is not None and owner != pubkey:
                raise ProtocolError(Code.NICK_TAKEN, f"the nickname {nick} belongs to another key")
        holder = self.registry.holder(key)
        hashed = token_hash(b["token"])
        if holder is not None and not (
            b["resume"] and hashed and hmac.compare_digest(holder.token, hashed)
        ):
            raise ProtocolError(Code.NICK_TAKEN, f"the nickname {holder.nick} is taken")
        ident = Identity(secrets.token_hex(8), nick, key, hashed, pubkey, b["bot"], self.name)
        replayable = bool(pubkey) or len(b["token"]) >= MIN_REPLAY_TOKEN
        missed: list[dict[str, Any]] = []
        if b["resume"] and b["privates_since"] is not None and replayable:
            missed = yield from self._missed_privates(ident, b["privates_since"])
        if self.curve:
            yield self.registry.bind_nick(key, pubkey)
        yield self.registry.claim(ident, holder)
        if rid in self.by_rid:  # this connection said HELLO twice at once: the first won
            self.registry.release(ident)
            raise ProtocolError(Code.ALREADY_HELLO, f"already connected as {self.by_rid[rid].nick}")
        old = self.by_sid.get(holder.sid) if holder is not None else None
        if old is not None:  # the same client, back on a new connection
            self._drop_quietly(old)
        now = time.monotonic()
        s = Session(
            rid, ident, Bucket(self.cfg.rate, self.cfg.burst, self.cfg.burst, now), now, replayable
        )
        self.by_rid[rid], self.by_sid[ident.sid] = s, s
        log_event(
            log,
            "hello",
            nick=nick,
            sid=ident.sid,
            resume=b["resume"],
            bot=b["bot"],
            curve=bool(pubkey),
        )
        for event in missed:
            self._push(s, Reply.PRIVATE, {"event": event})
        return {
            "nick": nick,
            "version": m.VERSION,
            "pub_port": self.pub_port,
            "motd": self.motd,
            "rooms": list(self.rooms),
            "heartbeat": self.cfg.heartbeat,
            "rate": self.cfg.rate,
            "burst": self.cfg.burst,
            "broker": self.name,
            "max_text": m.MAX_TEXT,
            "max_batch": m.MAX_BATCH,
            "time": time.time(),
        }

    def _missed_privates(
        self, ident: Identity, since: float
    ) -> Generator[Op, Any, list[dict[str, Any]]]:
        """For a resume: the private messages to this client at or after `since` (one may
        have gone to its old connection as it died). Only those sent to the identity it
        proves (a CURVE key, or a resume token of MIN_REPLAY_TOKEN characters or more; a nick
        proves nothing) under the nick it has now, in the last REPLAY_WINDOW seconds: the
        latest m.MAX_HISTORY of them. Read before the HELLO changes anything."""
        since = max(since, time.time() - REPLAY_WINDOW)
        try:
            stored = yield self.log.privates_to(ident.recipient, since, m.MAX_HISTORY)
        except Exception as exc:  # the client still gets in; only this replay is missing
            log.error("private messages for %s not read: %s", ident.nick, exc)
            return []
        return [json.loads(data) for data in stored]

    def _on_join(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        name = req.body["room"]
        yield self.registry.catch_up()  # a ban made on another broker just now
        room = self.rooms.get(name)
        if room is None and self.cfg.allow_new_rooms:
            if len(self.rooms) >= MAX_ROOMS:
                raise ProtocolError(Code.TOO_LARGE, f"there are {MAX_ROOMS} rooms already")
            created = yield self.registry.create_room(RoomSettings(name, ops={s.key}, created=True))
            room = self.add_room(name)
            if created:
                log_event(log, "room-created", room=name, by=s.nick)
        room = self._room(name) if room is None else room
        if s.key in self._settings(room).bans:
            raise ProtocolError(Code.BANNED, f"you are banned from {name}")
        before = self.log.last(name)
        if s.sid not in room.members:
            room.members[s.sid] = s
            s.rooms.add(name)
            was = self.registry.members(name).get(s.key)
            added = self.registry.add_member(name, Member(s.nick, s.key, s.sid, self.name))
            if not (req.body["resume"] and was is not None):
                joined = self._append(room, EventKind.JOIN, s, f"{s.nick} joined", bot=s.ident.bot)
                seqs, _ = yield gather([joined, added])
                before = seqs[0] - 1
            else:
                yield added
        if s.stage is not Stage.LIVE or s.sid not in room.members:  # gone meanwhile
            raise ProtocolError(Code.NOT_MEMBER, f"you are not in {name} any more")
        members, ops = self._listing(room)
        return {
            "room": name,
            "seq": before,
            "grant": self._grant(s, room),
            "topic": self._settings(room).topic,
            "members": members,
            "ops": ops,
        }

    def _on_leave(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        room = self._member_room(s, req.body["room"])
        yield self._leave(s, room, "part")
        return {"room": room.name}

    def _on_say(self, s: Session, req: m.Request) -> Result:
        room = self._member_room(s, req.body["room"])
        msgs = req.body["msgs"]
        owner = s.ident.owner
        known = self.log.known_ids(owner, [item["id"] for item in msgs])
        if any(prior is not None and prior[0] != owner for prior in known.values()):
            raise ProtocolError(
                Code.BAD_REQUEST,
                "a message id already used by another; nothing of this request was stored",
            )
        self._charge(s, sum(1 for prior in known.values() if prior is None))  # retries free
        extra: dict[str, Any] | None = {"bot": True} if s.ident.bot else None
        if req.body["relay"]:
            extra = {**(extra or {}), "relay": req.body["relay"]}
        if req.body["hops"] is not None:
            extra = {**(extra or {}), "hops": req.body["hops"]}
        drafts: list[Draft] = []
        fresh: dict[str, int] = {}
        for item in msgs:
            cmid = item["id"]
            if known[cmid] is None and cmid not in fresh:  # a repeat in the batch: a retry
                kind = EventKind.ACTION if item["action"] else EventKind.MSG
                fresh[cmid] = len(drafts)
                drafts.append(Draft(kind, s.nick, item["text"], owner, cmid, extra))
        op = self._store(room.name, drafts) if drafts else Op.ready([])
        if not op.done:  # a cluster: answered once it has stored them
            return self._say_stored(room.name, msgs, known, fresh, op)
        if op.error is not None:
            raise op.error
        return _acks(room.name, msgs, known, fresh, op.value)

    def _say_stored(
        self,
        room: str,
        msgs: list[dict[str, Any]],
        known: dict[str, tuple[str, str, int] | None],
        fresh: dict[str, int],
        op: Op,
    ) -> Generator[Op, Any, bytes]:
        seqs = yield op
        return _acks(room, msgs, known, fresh, seqs)

    def _charge(self, s: Session, n: float) -> None:
        if self.cfg.rate > 0 and n > self.cfg.burst:
            raise ProtocolError(Code.TOO_LARGE, f"at most {self.cfg.burst} messages at once")
        wait = s.bucket.take(n, time.monotonic()) if n else 0.0
        if wait:
            raise ProtocolError(
                Code.RATE_LIMITED, f"slow down: retry in {wait:.2f} s", retry_after=round(wait, 3)
            )

    def _on_priv(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        b = req.body
        target = self.registry.holder(m.nick_key(b["to"]))
        if target is None:  # connected just now on another broker?
            yield self.registry.catch_up()
            target = self.registry.holder(m.nick_key(b["to"]))
        if target is None:
            raise ProtocolError(Code.NO_SUCH_NICK, f"nobody called {b['to']} is connected")
        prior = self.log.known_ids(s.ident.owner, [b["id"]])[b["id"]]
        if prior is not None:
            if prior[0] != s.ident.owner:
                raise ProtocolError(Code.BAD_REQUEST, "a message id already used by another")
            return {"to": target.nick, "id": b["id"], "duplicate": True}
        self._charge(s, 1)
        ts = time.time()
        event = {
            "kind": "private",
            "nick": s.nick,
            "to": target.nick,
            "text": b["text"],
            "ts": ts,
            "cmid": b["id"],
            "bot": s.ident.bot,
        }
        if b["hops"] is not None:
            event["hops"] = b["hops"]
        yield self.log.append_private(
            ts, s.ident.owner, target.recipient, b["id"], m.dumps(event), s.key
        )
        self.push_to(target, Reply.PRIVATE, {"event": event})
        return {"to": target.nick, "id": b["id"], "event": event}

    def _on_rooms(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        out = []
        for room in self.rooms.values():
            count = sum(
                1 for mem in self.registry.members(room.name).values() if self._present(mem)
            )
            out.append(
                {
                    "name": room.name,
                    "members": count,
                    "topic": self._settings(room).topic,
                    "seq": self.log.last(room.name),
                }
            )
        return {"rooms": out}

    def _on_who(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        name = req.body["room"]
        if name is None:
            return {"room": None, "members": sorted(i.nick for i in self.registry.identities())}
        members, ops = self._listing(self._room(name))
        return {"room": name, "members": members, "ops": ops}

    def _on_nick(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        new = req.body["nick"]
        key = m.nick_key(new)
        yield self.registry.catch_up()
        holder = self.registry.holder(key)
        if holder is not None and holder.sid != s.sid:
            raise ProtocolError(Code.NICK_TAKEN, f"the nickname {holder.nick} is taken")
        if self.curve:
            owner = self.registry.nick_owner(key)
            if owner is not None and owner != s.ident.pubkey:
                raise ProtocolError(Code.NICK_TAKEN, f"the nickname {new} belongs to another key")
            yield self.registry.bind_nick(key, s.ident.pubkey)
        old = s.nick
        if old == new:
            return {"nick": new}
        yield self.registry.rename(s.ident, new, key)
        s.ident.nick, s.ident.key = new, key
        yield gather(
            self._store(
                name,
                [
                    Draft(
                        EventKind.NICK,
                        old,
                        f"{old} is now known as {new}",
                        m.nick_key(old),
                        None,
                        {"new": new},
                    )
                ],
            )
            for name in sorted(s.rooms)
        )
        return {"nick": new, "old": old}

    def _on_topic(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        room = self._member_room(s, req.body["room"])
        yield self.registry.catch_up()
        settings = self._settings(room)
        text, lock = req.body["text"], req.body["lock"]
        ops = []
        if lock is not None:  # operators choose whether only they may set the topic
            if s.key not in settings.ops:
                raise ProtocolError(Code.NOT_OPERATOR, f"you are not an operator of {room.name}")
            settings.locked = lock
            ops.append(self.registry.save(settings))
            ops.append(
                self._append(
                    room,
                    EventKind.NOTICE,
                    s,
                    f"{s.nick} {'locked' if lock else 'unlocked'} the topic"
                    + (" (operators only)" if lock else ""),
                )
            )
        if text is None:
            yield gather(ops)
            return {"room": room.name, "topic": settings.topic, "locked": settings.locked}
        if settings.locked and s.key not in settings.ops:
            raise ProtocolError(Code.NOT_OPERATOR, f"only operators set the topic of {room.name}")
        if any(ord(c) < 32 for c in text):
            raise ProtocolError(Code.BAD_REQUEST, "a topic is one line of text")
        settings.topic = text
        ops.append(self.registry.save(settings))
        ops.append(
            self._append(
                room,
                EventKind.TOPIC,
                s,
                text,
                locked=settings.locked,
                note=f"{s.nick} set the topic: {text}" if text else f"{s.nick} cleared the topic",
            )
        )
        yield gather(ops)
        return {"room": room.name, "topic": text, "locked": settings.locked}

    def _on_history(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        b = req.body
        if b["with"] is not None:  # a private conversation, which only its two parties read
            if not s.replayable:
                raise ProtocolError(
                    Code.NOT_ALLOWED,
                    "private history needs a proven "
                    "identity: a CURVE key or a resume token of "
                    f"{MIN_REPLAY_TOKEN}+ characters",
                )
            texts = yield self.log.conversation(
                s.ident.owner, m.nick_key(b["with"]), b["since"], b["limit"]
            )
            return {"with": b["with"], "events": _Raw(texts)}
        room = self._member_room(s, b["room"])
        texts = yield self.log.read(
            room.name, after=b["after"], before=b["before"], since=b["since"], limit=b["limit"]
        )
        # Stored JSON goes out as it is: spliced, not re-encoded.
        return {"room": room.name, "seq": self.log.last(room.name), "events": _Raw(texts)}

    def _on_ping(self, s: Session, req: m.Request) -> dict[str, Any]:
        last = self.log.last
        return {"rooms": {name: last(name) for name in s.rooms}}

    def _on_bye(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        log_event(log, "quit", nick=s.nick, sid=s.sid, reason=req.body["reason"] or "")
        yield self._drop(s, req.body["reason"] or "", "quit")
        return {"bye": s.nick}

    def _op_room(self, s: Session, req: m.Request) -> tuple[Room, RoomSettings]:
        room = self._member_room(s, req.body["room"])
        settings = self._settings(room)
        if s.key not in settings.ops:
            raise ProtocolError(Code.NOT_OPERATOR, f"you are not an operator of {room.name}")
        return room, settings

    def _kick(self, s: Session, room: Room, target: Member, reason: str, kind: EventKind) -> Op:
        """Out of the room with a notice (before the removal, so the target sees it), on
        whichever broker it is: ours now, another when that one publishes the notice."""
        verb = "kicked" if kind is EventKind.KICK else "banned"
        text = f"{target.nick} was {verb} by {s.nick}" + (f" ({reason})" if reason else "")
        op = self._append(room, kind, target, text, by=s.nick, reason=reason)
        log_event(
            log,
            "kicked",
            nick=target.nick,
            room=room.name,
            by=s.nick,
            ban=kind is EventKind.BAN,
            reason=reason,
        )
        gone = self.registry.remove_member(room.name, target.key, target.sid)
        local = self.by_sid.get(target.sid)
        if local is not None and local.sid in room.members:
            self._remove(local, room)
            self._push(
                local,
                Reply.KICKED,
                {"room": room.name, "by": s.nick, "reason": reason, "kind": str(kind)},
            )
        return gather([op, gone])

    def _target(self, room: Room, nick: str) -> Member | None:
        member = self.registry.members(room.name).get(m.nick_key(nick))
        return member if member is not None and self._present(member) else None

    def _on_kick(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        room, _ = self._op_room(s, req)
        target = self._target(room, req.body["nick"])
        if target is None:
            raise ProtocolError(Code.NO_SUCH_NICK, f"{req.body['nick']} is not in {room.name}")
        yield self._kick(s, room, target, req.body["reason"] or "", EventKind.KICK)
        return {"room": room.name, "nick": target.nick}

    def _on_ban(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        room, settings = self._op_room(s, req)
        nick, reason = req.body["nick"], req.body["reason"] or ""
        settings.bans.add(m.nick_key(nick))
        saved = self.registry.save(settings)
        target = self._target(room, nick)
        if target is not None:
            yield gather([saved, self._kick(s, room, target, reason, EventKind.BAN)])
        else:
            yield saved
            yield self._store(
                room.name,
                [
                    Draft(
                        EventKind.BAN,
                        nick,
                        f"{nick} was banned by {s.nick}",
                        m.nick_key(nick),
                        None,
                        {"by": s.nick, "reason": reason},
                    )
                ],
            )
        return {"room": room.name, "nick": nick}

    def _on_unban(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        room, settings = self._op_room(s, req)
        settings.bans.discard(m.nick_key(req.body["nick"]))
        yield self.registry.save(settings)
        yield self._append(
            room, EventKind.NOTICE, s, f"{req.body['nick']} was unbanned by {s.nick}"
        )
        return {"room": room.name, "nick": req.body["nick"]}

    # ------------------------------------------------------------------ liveness
    def sweep(self) -> None:
        """Drop the sessions silent for three heartbeats; forget expired grant nonces."""
        now = time.monotonic()
        limit = 3 * self.cfg.heartbeat
        for s in [s for s in self.by_rid.values() if now - s.last_seen > limit]:
            log_event(log, "lost", nick=s.nick, sid=s.sid, why="missed 3 heartbeats")
            self._lose(s)
        wall = time.time()
        for nonce in [n for n, exp in self.used_nonces.items() if exp < wall]:
            del self.used_nonces[nonce]

    def shutdown(self) -> None:
        """Tell every client the broker is going."""
        for s in list(self.by_rid.values()):
            self._push(s, Reply.SHUTDOWN, {"reason": "the broker is shutting down"})

    def sessions(self) -> Iterator[Session]:
        return iter(self.by_rid.values())


def _acks(
    room: str,
    msgs: list[dict[str, Any]],
    known: dict[str, tuple[str, str, int] | None],
    fresh: dict[str, int],
    seqs: list[int],
) -> bytes:
    """A SAY's reply, written directly: {"room": ..., "acks": [[id, seq], ...]}."""
    acks = []
    for item in msgs:
        cmid = item["id"]
        at = fresh.get(cmid)
        seq = seqs[at] if at is not None else known[cmid][2]  # type: ignore[index]
        acks.append(f"[{m.quote(cmid)},{seq}]")
    return f'{{"room":"{room}","acks":[{",".join(acks)}]}}'.encode()


class _Raw(list):  # type: ignore[type-arg]
    """History texts that the reply encoder splices in as JSON without decoding them."""


def _dumps_with_raw(body: dict[str, Any] | bytes) -> bytes:
    if isinstance(body, bytes):  # encoded by its handler already
        return body
    raw = {k: v for k, v in body.items() if isinstance(v, _Raw)}
    if not raw:
        return m.dumps(body)
    plain = m.dumps({k: v for k, v in body.items() if k not in raw})
    parts = [f'"{k}":[{",".join(v)}]' for k, v in raw.items()]
    inner = plain[1:-1].decode("utf-8")
    return ("{" + ",".join(p for p in [inner, *parts] if p) + "}").encode("utf-8")


def leave_text(nick: str, why: str, reason: str) -> str:
    """How a departure reads: 'bob left', 'bob left (quit: tired)', 'bob left (connection lost)'."""
    if why == "lost":
        return f"{nick} left (connection lost)"
    if why == "quit" and reason:
        return f"{nick} left (quit: {reason})"
    return f"{nick} left"
