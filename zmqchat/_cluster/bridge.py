"""The cluster's NATS side: nats-py on the broker's asyncio loop.

In cluster mode the broker's loop runs on asyncio, and this bridge is a task of that same
loop, in the same thread: no lock, no hand-over between threads on a message's path (two
threads sharing the interpreter lock added about 2 ms at each crossing under load). The
broker's side (cluster.py) and this one still talk only in frames, through two queues:
commands go in (append these events, change this key, read that range, route this push),
answers and news come out (an Op done or failed, a room's new events from its stream, a
changed key of a watched bucket, a push routed to us).

What lives in NATS (N is the namespace, `--namespace`, default zmqchat):
    stream N-room-R       subject N.room.R: room R's events; a stream sequence is a seq
    stream N-privates     subjects N.priv.<to>.<to nick>.<from>.<from nick> (hashes of the
                          recipient's and the sender's identity and nick): private messages
    bucket N-sessions     nick -> the session that holds it (sid, broker, token hash, ...)
    bucket N-members      R.nick -> member record
    bucket N-rooms        R (exists), R.topic, R.locked, R.op.nick, R.ban.nick
    bucket N-nickkeys     nick -> the CURVE key that registered it
    bucket N-brokers      broker name -> its heartbeat
    buckets N-accounts, N-marks, N-logins: accounts (see zmqchat/_cluster/accounts.py)
    subject N.push.B      pushes for sessions on broker B
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from zmqchat._cluster import edits
from zmqchat._cluster.accounts import BUCKETS as ACCOUNT_BUCKETS

log = logging.getLogger("zmqchat.cluster")

BUCKETS: Final = ("sessions", "members", "rooms", "nickkeys", "brokers", *ACCOUNT_BUCKETS)
REGISTRY: Final = tuple(b for b in BUCKETS if b != "brokers")  # what a catch-up waits for
OP_TIMEOUT: Final = 2.0  # seconds a publish or a key change may take before UNAVAILABLE
CONNECT_TIMEOUT: Final = 10.0  # seconds to reach the cluster at start
SETUP_PATIENCE: Final = 20.0  # seconds a start retries JetStream calls (a new cluster is still
# electing its leaders; cluster.READY_WAIT, the broker's own limit, is longer)
NOTICE_RETRY: Final = 600.0  # seconds a broker keeps trying to store a notice of its own
READ_BATCH: Final = 500  # messages per direct-get request
PENDING_MSGS: Final = 1 << 20  # messages a stream subscription may hold before dropping
IDLE_HEARTBEAT: Final = 1.0  # seconds: a subscription that hears nothing for two starts over
# (its consumer was on a node that died)


@dataclass
class BridgeConfig:
    servers: list[str]
    namespace: str
    name: str
    rooms: list[str]
    replicas: int  # 0: up to 3, no more than the cluster has


class Batch:
    """Publishes answered together (one APPEND or PRIV): each acknowledgement fills its slot;
    the op is done when all are, and fails (once) at the first error or at its deadline."""

    __slots__ = ("op", "subject", "seqs", "left", "deadline", "tokens", "notices")

    def __init__(self, op: bytes, subject: str, count: int, deadline: float) -> None:
        self.op, self.subject, self.deadline = op, subject, deadline
        self.seqs: list[int] = [0] * count
        self.left = count  # -1: failed
        self.tokens: list[str] = []
        self.notices: list[tuple[dict[str, str], bytes]] = []


def stream_of(ns: str, room: str) -> str:
    return f"{ns}-room-{room}"


def token(text: str) -> str:
    """A subject token for an identity or a nick key (those hold any character)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Bridge:
    """The NATS connection and everything done with it; see the module docstring."""

    def __init__(self, cfg: BridgeConfig, to_broker: Callable[[list[bytes]], None]) -> None:
        self.cfg, self.to_broker = cfg, to_broker
        self.ns = cfg.namespace
        self.kvs: dict[str, Any] = {}
        self.following: dict[str, Any] = {}  # room -> done once we follow its stream
        self.room_subs: dict[str, Any] = {}  # room -> its stream subscription
        self.expect: dict[str, int] = {}  # room -> the next seq to hand over
        self.outgoing: dict[str, list[Any]] = {}  # room -> messages to hand over
        self.tasks: set[asyncio.Task[Any]] = set()
        self.replicas = 1
        self.rooms_seen: list[str] = []  # rooms in the registry at start
        self.acking: dict[str, tuple[Batch, int]] = {}  # publish token -> its batch, slot
        self.tokens = itertools.count()
        self.closing = False
        self.inbox: deque[list[bytes]] = deque()  # commands from the broker, in order
        self.woken: asyncio.Event | None = None
        self.patient_until = 0.0  # while starting: JetStream calls are retried until then

    # ------------------------------------------------------------------ the loop
    def take(self, commands: list[list[bytes]]) -> None:
        """Commands from the broker (same thread, same event loop), handled in order."""
        self.inbox.extend(commands)
        if self.woken is not None:
            self.woken.set()

    async def main(self) -> None:
        """Connect, then carry out the broker's commands until STOP."""
        self.loop = asyncio.get_running_loop()
        self.woken = asyncio.Event()
        step = "connect"
        try:
            await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
            step = "setup"
            self.patient_until = time.monotonic() + SETUP_PATIENCE
            await self._setup()
            self.patient_until = 0.0
        except Exception as exc:  # noqa: BLE001 - anything here means: cannot start
            reason = str(exc) or type(exc).__name__
            servers = ", ".join(self.cfg.servers)
            if step == "connect":
                reason = f"no NATS server answered at {servers}"
            else:
                reason = f"NATS at {servers} answered, but JetStream did not: {reason}"
            self._send([b"FATAL", reason.encode()])
            await self._drop_connection()
            return
        self._send([b"READY", str(self.replicas).encode()])
        handlers: dict[bytes, Callable[[list[bytes]], Awaitable[None]]] = {
            b"APPEND": self._append,
            b"KV": self._kv,
            b"READ": self._read,
            b"PRIV": self._priv,
            b"PRIVREAD": self._privread,
            b"ROUTE": self._route,
            b"ROOM": self._room,
            b"FOLLOW": self._follow_cmd,
            b"SYNC": self._sync,
            **edits.verbs(self, EDITS),  # MSGGET, ERASE (issue 23)
        }
        self._spawn(self._expire_acks())
        try:
            while True:  # one command at a time, in order: appends keep the loop's order
                while not self.inbox:
                    self.woken.clear()
                    await self.woken.wait()
                frames = self.inbox.popleft()
                if frames[0] == b"STOP":
                    break
                try:
                    await handlers[frames[0]](frames)
                except Exception:  # a bug must not end the bridge
                    log.exception("cluster command %r failed", frames[:2])
        finally:
            await self._close()

    async def _close(self) -> None:
        if self.tasks:  # what was asked before STOP (our last beat, say) gets its chance
            await asyncio.wait(list(self.tasks), timeout=1.0)
        for task in list(self.tasks):
            task.cancel()
        await self._drop_connection()
        self._send([b"STOPPED"])

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _send(self, frames: list[bytes]) -> None:
        """To the broker, in call order."""
        self.to_broker(frames)

    def _done(self, op: bytes, value: Any) -> None:
        self._send([b"DONE", op, b"json", json.dumps(value).encode()])

    def _fail(self, op: bytes, code: str, reason: str) -> None:
        self._send([b"FAIL", op, code.encode(), reason.encode()])

    async def _drop_connection(self) -> None:
        self.closing = True
        nc = getattr(self, "nc", None)
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), 2.0)
            except Exception:  # noqa: BLE001 - closing anyway
                pass

    # ------------------------------------------------------------------ start
    async def _connect(self) -> None:
        async def disconnected() -> None:
            if not self.closing:
                log.warning("lost the NATS connection; reconnecting")

        async def reconnected() -> None:
            log.warning(
                "NATS connection back (%s)",
                self.nc.connected_url.netloc if self.nc.connected_url else "?",
            )

        async def error(exc: Exception) -> None:
            log.info("NATS: %s", exc)

        self.nc = await nats.connect(
            self.cfg.servers,
            name=f"zmqchat {self.cfg.name}",
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            ping_interval=5,
            max_outstanding_pings=3,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        self.js = self.nc.jetstream(timeout=OP_TIMEOUT)

    async def _setup(self) -> None:
        info = self.nc._server_info or {}
        url = self.nc.connected_url  # None if the connection dropped since _connect()
        size = len(set(info.get("connect_urls") or []) | ({url.netloc} if url else set()))
        self.replicas = self.cfg.replicas or min(3, max(size, 1))
        for bucket in BUCKETS:
            self.kvs[bucket] = await self._patiently(partial(self._bucket, bucket))
        await self._patiently(
            lambda: self._ensure_stream(f"{self.ns}-privates", [f"{self.ns}.priv.>"])
        )
        initial: dict[str, asyncio.Event] = {}
        for bucket in BUCKETS:
            initial[bucket] = asyncio.Event()
            await self._patiently(partial(self._watch, bucket, initial[bucket]))
        for event in initial.values():
            await event.wait()
        rooms = list(dict.fromkeys([*self.cfg.rooms, *self.rooms_seen]))
        for room in rooms:
            await self._patiently(partial(self._ensure_room, room))
        push = f"{self.ns}.push.{self.cfg.name}"
        await self.nc.subscribe(push, cb=self._routed)
        self.ack_inbox = self.nc.new_inbox()
        await self.nc.subscribe(
            f"{self.ack_inbox}.*",
            cb=self._acked,
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=1 << 30,
        )
        await self._patiently(lambda: edits.follow_privates(self, EDITS))  # search (issue 23)

    async def _patiently(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """A JetStream call made while starting: a cluster that has just started (or is
        loaded) may answer late or "unavailable" while it elects its leaders, so such an
        answer is tried again until `patient_until`."""
        while True:
            try:
                return await call()
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError,
            ) as exc:
                if time.monotonic() > self.patient_until:
                    raise
                log.info("JetStream not ready (%s); trying again", type(exc).__name__)
                await asyncio.sleep(0.25)

    async def _bucket(self, bucket: str) -> Any:
        name = f"{self.ns}-{bucket}"
        try:
            return await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await self.js.create_key_value(
                api.KeyValueConfig(bucket=name, history=1, replicas=self.replicas)
            )
        except nats.js.errors.BadRequestError:  # made by another broker just now
            return await self.js.key_value(name)

    async def _ensure_stream(self, name: str, subjects: list[str]) -> int:
        """Make the stream if it is not there; return its last sequence number."""
        try:
            info = await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                info = await self.js.add_stream(
                    api.StreamConfig(
                        name=name,
                        subjects=subjects,
                        num_replicas=self.replicas,
                        allow_direct=True,
                        storage=api.StorageType.FILE,
                    )
                )
            except nats.js.errors.BadRequestError:  # another broker made it just now
                info = await self.js.stream_info(name)
        return info.state.last_seq

    async def _ensure_room(self, room: str) -> None:
        """The room's stream, and our subscription to it from its end on (once, however
        many ask at the same time)."""
        ready = self.following.get(room)
        if ready is None:
            ready = self.following[room] = self.loop.create_future()
            try:
                await self._subscribe_room(room)
            except BaseException as exc:
                del self.following[room]
                ready.set_exception(exc)
                ready.exception()  # retrieved: whoever waits gets it too
                raise
            ready.set_result(None)
        await ready

    async def _subscribe_room(self, room: str) -> None:
        last = await self._ensure_stream(stream_of(self.ns, room), [f"{self.ns}.room.{room}"])
        self.expect[room] = last + 1
        self._send([b"LAST", room.encode(), str(last).encode()])

        async def arrived(msg: Any) -> None:
            await self._arrived(room, msg)

        self.room_subs[room] = await self.js.subscribe(
            f"{self.ns}.room.{room}",
            stream=stream_of(self.ns, room),
            cb=arrived,
            ordered_consumer=True,
            idle_heartbeat=IDLE_HEARTBEAT,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1
            ),
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=1 << 30,
        )

    # ------------------------------------------------------------------ watching buckets
    async def _watch(self, bucket: str, initial: asyncio.Event) -> None:
        """Follow every key of a bucket (each key's latest value first, then every change),
        handing each over as KVW bucket key revision PUT|DEL value; `initial` is set once
        the latest values are all there."""
        prefix = f"$KV.{self.ns}-{bucket}."
        bname = bucket.encode()

        async def changed(msg: Any) -> None:
            meta = msg.metadata
            key = msg.subject[len(prefix) :]
            headers = msg.headers or {}
            put = (
                headers.get("KV-Operation") not in ("DEL", "PURGE")
                and "Nats-Marker-Reason" not in headers
            )
            if bucket == "rooms" and put and "." not in key:
                if initial.is_set():
                    self._spawn(self._ensure_room(key))
                else:
                    self.rooms_seen.append(key)
            self._send(
                [
                    b"KVW",
                    bname,
                    key.encode(),
                    str(meta.sequence.stream).encode(),
                    b"PUT" if put else b"DEL",
                    msg.data or b"",
                ]
            )
            if meta.num_pending == 0:
                initial.set()

        sub = await self.js.subscribe(
            prefix + ">",
            stream=f"KV_{self.ns}-{bucket}",
            cb=changed,
            ordered_consumer=True,
            idle_heartbeat=IDLE_HEARTBEAT,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=1 << 30,
        )
        info = await sub.consumer_info()
        if info.num_pending == 0 and sub.delivered == 0:  # an empty bucket
            initial.set()

    # ------------------------------------------------------------------ room events
    async def _arrived(self, room: str, msg: Any) -> None:
        """A room event from its stream, in stream order: hand it over (batched)."""
        seq = msg.metadata.sequence.stream
        expect = self.expect[room]
        if seq < expect:
            return
        if seq > expect:  # should not happen with an ordered consumer: fetch the gap
            log.warning(
                "%s: events %d..%d skipped by the stream subscription; fetching",
                room,
                expect,
                seq - 1,
            )
            got = await self._get_range(room, expect, seq - expect)
            # erased messages leave holes: a deleted event in each (issue 23)
            for missing in edits.with_holes_filled(expect, seq, got, _event_ts(msg.data)):
                self._hand_over(room, missing)
        self._hand_over(room, msg)
        sub = self.room_subs.get(room)
        if sub is not None and not sub.pending_msgs:  # the last that came: hand them over
            self._flush_room(room)  # now, not a turn of the loop later

    def _hand_over(self, room: str, msg: Any) -> None:
        seq = msg.metadata.sequence.stream if msg.metadata else int(msg.headers["Nats-Sequence"])
        self.expect[room] = seq + 1
        pending = self.outgoing.get(room)
        if pending is None:
            pending = self.outgoing[room] = []
            self.loop.call_soon(self._flush_room, room)
        pending.append((seq, msg))

    def _flush_room(self, room: str) -> None:
        msgs = self.outgoing.pop(room, [])
        if not msgs:
            return
        first = msgs[0][0]
        departures, ids, frames = [], [], []
        prefix = room.encode()
        for seq, msg in msgs:
            headers = msg.headers or {}
            kind = headers.get("Zc-Kind", "")
            if kind in ("leave", "kick", "ban"):
                departures.append(seq)
            msgid = headers.get("Nats-Msg-Id")
            if msgid and kind in ("msg", "action"):
                ids.append([msgid, seq])
            frames.append(
                b'{"room":"%s","seq":%d,"id":"%s:%d",' % (prefix, seq, prefix, seq) + msg.data
            )
        meta = json.dumps({"departures": departures, "ids": ids}).encode()
        self._send([b"EVENTS", prefix, str(first).encode(), meta, *frames])

    async def _append(self, frames: list[bytes]) -> None:
        """APPEND op room [msgid kind tail]...: publish each; answer with their seqs."""
        op, room = frames[1], frames[2].decode()
        subject = f"{self.ns}.room.{room}"
        batch = Batch(op, subject, (len(frames) - 3) // 3, time.monotonic() + OP_TIMEOUT)
        try:
            for i in range(3, len(frames), 3):
                kind = frames[i + 1].decode()
                headers = {"Nats-Msg-Id": frames[i].decode(), "Zc-Kind": kind}
                if kind not in ("msg", "action"):  # ours: kept trying for if this fails
                    batch.notices.append((headers, frames[i + 2]))
                await self._publish(subject, frames[i + 2], headers, batch, (i - 3) // 3)
        except Exception as exc:  # noqa: BLE001 - the connection's buffer is full
            self._settle(batch, f"the cluster did not store it: {_why(exc)}")

    async def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str], batch: Batch, index: int
    ) -> None:
        """A JetStream publish whose acknowledgement fills slot `index` of `batch`."""
        token = str(next(self.tokens))
        self.acking[token] = (batch, index)
        batch.tokens.append(token)
        await self.nc.publish(subject, payload, reply=f"{self.ack_inbox}.{token}", headers=headers)

    async def _acked(self, msg: Any) -> None:
        """A publish's acknowledgement (or its error), to the inbox of all of them."""
        entry = self.acking.pop(msg.subject.rpartition(".")[2], None)
        if entry is None:
            return
        batch, index = entry
        if batch.left < 0:  # failed already
            return
        try:
            answer = json.loads(msg.data) if msg.data else {}
        except ValueError:
            answer = {}
        if "seq" not in answer:  # an error, or no stream answered (a status, no body)
            error = answer.get("error", {}).get("description") or "no stream answered"
            self._settle(batch, f"the cluster did not store it: {error}")
            return
        batch.seqs[index] = answer["seq"]
        batch.left -= 1
        if batch.left == 0:
            self._done(batch.op, batch.seqs)

    def _settle(self, batch: Batch, why: str) -> None:
        """A batch that will not be acknowledged: its op fails (once); the notices of our
        own that were in it are published again until they are stored."""
        if batch.left < 0:
            return
        batch.left = -1
        for token in batch.tokens:
            self.acking.pop(token, None)
        self._fail(batch.op, "UNAVAILABLE", why)
        for headers, tail in batch.notices:
            self._spawn(self._keep_trying(batch.subject, headers, tail))

    async def _expire_acks(self) -> None:
        """Fail the publishes that were not acknowledged in OP_TIMEOUT."""
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            late = {batch for batch, _ in self.acking.values() if batch.deadline < now}
            for batch in late:
                self._settle(batch, "the cluster did not store it: no answer in time")

    async def _keep_trying(self, subject: str, headers: dict[str, str], tail: bytes) -> None:
        deadline = time.monotonic() + NOTICE_RETRY
        while time.monotonic() < deadline:
            try:
                await self.js.publish(subject, tail, headers=dict(headers))
                return
            except Exception:  # noqa: BLE001 - the cluster is still away
                await asyncio.sleep(1.0)
        log.error("gave up storing a %s notice on %s", headers.get("Zc-Kind"), subject)

    # ------------------------------------------------------------------ reading
    async def _direct(self, stream: str, request: dict[str, Any]) -> list[Any]:
        """One direct-get batch: the messages, up to the end-of-batch marker."""
        inbox = self.nc.new_inbox()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def got(msg: Any) -> None:
            queue.put_nowait(msg)

        sub = await self.nc.subscribe(inbox, cb=got)
        try:
            await self.nc.publish(
                f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
            )
            out: list[Any] = []
            while True:
                msg = await asyncio.wait_for(queue.get(), OP_TIMEOUT)
                status = (msg.headers or {}).get("Status")
                if status is not None:  # 204 end of batch; 404 nothing there
                    return out
                out.append(msg)
        finally:
            await sub.unsubscribe()

    async def _get_range(self, room: str, first: int, count: int) -> list[Any]:
        out: list[Any] = []
        stream = stream_of(self.ns, room)
        while count > 0:
            got = await self._direct(stream, {"seq": first, "batch": min(count, READ_BATCH)})
            if not got:
                break
            out += got
            last = int(got[-1].headers["Nats-Sequence"])
            count -= last - first + 1
            first = last + 1
        return out

    async def _read(self, frames: list[bytes]) -> None:
        """READ op room {after, before, since, limit, last}: stored events as JSON texts."""
        op, room, q = frames[1], frames[2].decode(), json.loads(frames[3])
        self._spawn(self._reading(op, room, q))

    async def _reading(self, op: bytes, room: str, q: dict[str, Any]) -> None:
        try:
            if q["after"] is not None:
                first, count = q["after"] + 1, q["limit"]
            else:
                high = min(q["before"] - 1, q["last"]) if q["before"] is not None else q["last"]
                first = max(1, high - q["limit"] + 1)
                count = high - first + 1
            got = await self._get_range(room, first, count) if count > 0 else []
            found = [(int(msg.headers["Nats-Sequence"]), msg.data) for msg in got]
            # A direct get may be answered by a replica a step behind the quorum that
            # acknowledged what the broker knows is there: the rest from the leader.
            have = found[-1][0] if found else first - 1
            for seq in range(have + 1, min(first + count - 1, q["last"]) + 1):
                try:
                    raw = await self.js.get_msg(stream_of(self.ns, room), seq)
                except nats.js.errors.NotFoundError:  # erased (issue 23): the broker fills it
                    continue
                found.append((seq, raw.data or b""))
        except Exception as exc:  # noqa: BLE001
            self._fail(op, "UNAVAILABLE", f"history not read: {_why(exc)}")
            return
        prefix = room.encode()
        texts = []
        for seq, data in found:
            if q["since"] is not None and _event_ts(data) < q["since"]:
                continue
            texts.append(b'{"room":"%s","seq":%d,"id":"%s:%d",' % (prefix, seq, prefix, seq) + data)
        self._send([b"DONE", op, b"list", *texts])

    # ------------------------------------------------------------------ private messages
    async def _priv(self, frames: list[bytes]) -> None:
        """PRIV op subject-tokens msgid data: keep a private message."""
        op, tokens, msgid, data = frames[1], frames[2].decode(), frames[3].decode(), frames[4]
        subject = f"{self.ns}.priv.{tokens}"
        batch = Batch(op, subject, 1, time.monotonic() + OP_TIMEOUT)
        try:
            await self._publish(subject, data, {"Nats-Msg-Id": msgid}, batch, 0)
        except Exception as exc:  # noqa: BLE001
            self._settle(batch, f"the cluster did not store it: {_why(exc)}")

    async def _privread(self, frames: list[bytes]) -> None:
        """PRIVREAD op filter since limit: the latest private messages whose subject matches
        N.priv.<filter> (wildcards allowed), at or after since."""
        op, pattern = frames[1], frames[2].decode()
        since, limit = float(frames[3]), int(frames[4])
        self._spawn(self._privreading(op, pattern, since, limit))

    async def _privreading(self, op: bytes, pattern: str, since: float, limit: int) -> None:
        stream, subject = f"{self.ns}-privates", f"{self.ns}.priv.{pattern}"
        start = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))
            + f".{int((since % 1) * 1e9):09d}Z"
        )
        request: dict[str, Any] = {
            "start_time": start,
            "next_by_subj": subject,
            "batch": READ_BATCH,
        }
        out: list[bytes] = []
        try:
            while True:
                got = await self._direct(stream, request)
                out = (out + [msg.data for msg in got])[-limit:]
                if len(got) < READ_BATCH:
                    break
                request = {
                    "seq": int(got[-1].headers["Nats-Sequence"]) + 1,
                    "next_by_subj": subject,
                    "batch": READ_BATCH,
                }
        except Exception as exc:  # noqa: BLE001
            self._fail(op, "UNAVAILABLE", f"private messages not read: {_why(exc)}")
            return
        self._send([b"DONE", op, b"list", *out])

    # ------------------------------------------------------------------ keys, rooms, pushes
    async def _kv(self, frames: list[bytes]) -> None:
        """KV op bucket verb key value rev: change a key; answer with its new revision."""
        self._spawn(self._kv_change(*frames[1:7]))

    async def _kv_change(
        self, op: bytes, bucket: bytes, verb: bytes, key: bytes, value: bytes, rev: bytes
    ) -> None:
        kv, k = self.kvs[bucket.decode()], key.decode()
        try:
            if verb == b"create":
                revision = await self._create(bucket.decode(), k, value)
            elif verb == b"update":
                revision = await kv.update(k, value, last=int(rev))
            elif verb == b"put":
                revision = await kv.put(k, value)
            else:
                await kv.delete(k, last=int(rev) or None)
                revision = 0
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            self._fail(op, "CONFLICT", str(exc))
        except Exception as exc:  # noqa: BLE001 - timeout, connection, ...: always answer
            code = getattr(exc, "err_code", None)
            self._fail(op, "CONFLICT" if code in (10071, 10164) else "UNAVAILABLE", _why(exc))
        else:
            self._done(op, revision)

    async def _create(self, bucket: str, key: str, value: bytes) -> int:
        """Make a key that does not exist (or was deleted): KeyWrongLastSequenceError when
        someone has it. Checked against the stream's leader, not a replica that may lag."""
        kv = self.kvs[bucket]
        try:
            return await kv.update(key, value, last=0)
        except nats.js.errors.KeyWrongLastSequenceError:
            stream = f"KV_{self.ns}-{bucket}"
            try:
                last = await self.js.get_msg(stream, subject=f"$KV.{self.ns}-{bucket}.{key}")
            except nats.js.errors.NotFoundError:
                raise nats.js.errors.KeyWrongLastSequenceError(
                    description="made and removed meanwhile"
                ) from None
            if (last.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                raise
            return await kv.update(key, value, last=last.seq)

    async def _sync(self, frames: list[bytes]) -> None:
        """SYNC op: the latest revision of each registry bucket, from its stream's leader."""
        self._spawn(self._syncing(frames[1]))

    async def _syncing(self, op: bytes) -> None:
        try:
            infos = await asyncio.gather(
                *(self.js.stream_info(f"KV_{self.ns}-{bucket}") for bucket in REGISTRY)
            )
        except Exception as exc:  # noqa: BLE001
            self._fail(op, "UNAVAILABLE", f"the registry did not answer: {_why(exc)}")
            return
        self._done(
            op, {bucket: info.state.last_seq for bucket, info in zip(REGISTRY, infos, strict=True)}
        )

    async def _room(self, frames: list[bytes]) -> None:
        """ROOM op room: make a room (its stream, then its record); answer whether we did."""
        self._spawn(self._making_room(frames[1], frames[2].decode()))

    async def _making_room(self, op: bytes, room: str) -> None:
        try:
            await self._ensure_room(room)
            try:
                await self._create("rooms", room, b'{"created":true}')
                created = True
            except nats.js.errors.KeyWrongLastSequenceError:
                created = False
        except Exception as exc:  # noqa: BLE001
            self._fail(op, "UNAVAILABLE", f"the room was not made: {_why(exc)}")
            return
        self._done(op, created)

    async def _follow_cmd(self, frames: list[bytes]) -> None:
        self._spawn(self._ensure_room(frames[1].decode()))

    async def _route(self, frames: list[bytes]) -> None:
        """ROUTE broker data: a push for a session held by another broker."""
        await self.nc.publish(f"{self.ns}.push.{frames[1].decode()}", frames[2])

    async def _routed(self, msg: Any) -> None:
        self._send([b"ROUTED", msg.data])


def _event_ts(tail: bytes) -> float:
    """The time of an event from its stored tail, which starts `"ts":<number>,`."""
    try:
        return float(tail[5 : tail.index(b",", 5)])
    except ValueError:
        return 0.0


def _why(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError)):
        return "no answer in time"
    return str(exc) or type(exc).__name__


EDITS: Final = edits.Means(stream_of, _why, IDLE_HEARTBEAT, PENDING_MSGS)  # issue 23
