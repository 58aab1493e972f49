"""The cluster's NATS side: nats-py on the broker's asyncio loop.

In cluster mode the broker's loop runs on asyncio, and this bridge is a task of that same
loop, in the same thread: no lock, no hand-over between threads on a message's path (two
threads sharing the interpreter lock added about 2 ms at each crossing under load). The
broker's side (state.py) and this one still talk only in frames, through two queues:
commands go in (append these events, change this key, read that range, route this push),
answers and news come out (a command done or failed, a room's new events from its stream,
a changed key of a watched bucket, a push routed to us); names.py has their verbs. A
handler per verb (`Bridge.handlers`), a function per kind of key change (`Bridge.changes`).

What lives in NATS (N is the namespace, `--namespace`, default zmqchat; names.py):
    stream N-room-R       subject N.room.R: room R's events; a stream sequence is a seq
    stream N-privates     subjects N.priv.<to>.<to nick>.<from>.<from nick> (hashes of the
                          recipient's and the sender's identity and nick): private messages
    bucket N-sessions     nick -> the session that holds it (sid, broker, token hash, ...)
    bucket N-members      R.nick -> member record
    bucket N-rooms        R (exists), R.topic, R.locked, R.op.nick, R.ban.nick
    bucket N-nickkeys     nick -> the CURVE key that registered it
    bucket N-brokers      broker name -> its heartbeat
    subject N.push.B      pushes for sessions on broker B
"""

from __future__ import annotations

import asyncio
import contextlib
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

from zmqchat._cluster.names import (
    REGISTRY,
    Answer,
    Bucket,
    Change,
    Failure,
    News,
    Verb,
    room_stream,
    room_subject,
)

logger = logging.getLogger("zmqchat.cluster")

OP_TIMEOUT: Final = 2.0  # seconds a publish or a key change may take before UNAVAILABLE
CONNECT_TIMEOUT: Final = 10.0  # seconds to reach the cluster at start
PING_INTERVAL: Final = 1.0  # seconds between pings of our NATS server, and
PINGS_UNANSWERED: Final = 3  # how many may go unanswered before we use another: a server
# that is stopped (SIGSTOP, a frozen VM) keeps its TCP connection open, and only its silence
# says it is gone (nats-py's default, 2 minutes x 2, was 16 s here with ours of 5 x 3)
PROBE_TIMEOUT: Final = 0.5  # seconds the first JetStream request waits (then it is asked again)
SETUP_PATIENCE: Final = 20.0  # seconds a start waits for a cluster that is still settling
# (electing its leaders, placing replicas); state.READY_WAIT, the broker's own limit, is longer
NOTICE_RETRY: Final = 600.0  # seconds a broker keeps trying to store a notice of its own
DUPLICATE_RETRY: Final = 0.05  # seconds before asking again for a duplicate's number
READ_BATCH: Final = 500  # messages per direct-get request
PENDING_MSGS: Final = 1 << 20  # messages a stream subscription may hold before dropping
IDLE_HEARTBEAT: Final = 1.0  # seconds: a subscription that hears nothing for two starts over
# (its consumer was on a node that died)
JS_NOT_ENABLED: Final = frozenset({10039, 10076})  # JetStream off: waiting will not help
STREAM_NAME_IN_USE: Final = 10058  # a stream (or bucket) of that name exists already
WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})  # a compare-and-set lost


@dataclass
class BridgeConfig:
    servers: list[str]
    namespace: str
    name: str
    rooms: list[str]
    replicas: int  # 0: 3 on a cluster, 1 on a single server


class Batch:
    """Publishes answered together (one APPEND or PRIV): each acknowledgement fills its slot;
    the call is done when all are, and fails (once) at the first error or at its deadline.
    What each slot published is kept until it is acknowledged, to publish it again."""

    __slots__ = ("call", "subject", "seqs", "left", "deadline", "reply_ids", "sent", "notices")

    def __init__(self, call: bytes, subject: str, count: int, deadline: float) -> None:
        self.call, self.subject, self.deadline = call, subject, deadline
        self.seqs: list[int] = [0] * count
        self.left = count  # -1: failed
        self.reply_ids: list[str] = []
        self.sent: list[tuple[bytes, dict[str, str]]] = []  # each slot's payload, headers
        self.notices: list[tuple[dict[str, str], bytes]] = []


class SetupFailed(Exception):
    """A start that cannot go on: what it was doing, and why."""


Handler = Callable[[list[bytes]], Awaitable[None]]


class Bridge:
    """The NATS connection and everything done with it; see the module docstring."""

    def __init__(self, cfg: BridgeConfig, to_broker: Callable[[list[bytes]], None]) -> None:
        self.cfg, self.to_broker = cfg, to_broker
        self.ns = cfg.namespace
        self.kvs: dict[Bucket, Any] = {}
        self.following: dict[str, asyncio.Future[None]] = {}  # room -> done once followed
        self.room_subs: dict[str, Any] = {}  # room -> its stream subscription
        self.expect: dict[str, int] = {}  # room -> the next seq to hand over
        self.outgoing: dict[str, list[tuple[int, Any]]] = {}  # room -> messages to hand over
        self.tasks: set[asyncio.Future[Any]] = set()
        self.replicas = 1
        self.rooms_seen: list[str] = []  # rooms in the registry at start
        self.acking: dict[str, tuple[Batch, int]] = {}  # reply id -> its batch, slot
        self.reply_ids = itertools.count()
        self.closing = False
        self.inbox: deque[list[bytes]] = deque()  # commands from the broker, in order
        self.woken: asyncio.Event | None = None
        self.patient_until = 0.0  # while starting: JetStream calls are retried until then
        # (SETUP_PATIENCE from the start on; what the broker sets up after it shares it)
        self.handlers: dict[bytes, Handler] = {
            Verb.APPEND: self._append,
            Verb.KV: self._kv,
            Verb.READ: self._read,
            Verb.PRIV: self._priv,
            Verb.PRIVREAD: self._privread,
            Verb.ROUTE: self._route,
            Verb.ROOM: self._room,
            Verb.FOLLOW: self._follow,
            Verb.SYNC: self._sync,
        }
        self.changes: dict[bytes, Callable[[Bucket, str, bytes, int], Awaitable[int]]] = {
            Change.CREATE: lambda bucket, key, value, rev: self._create(bucket, key, value),
            Change.UPDATE: lambda bucket, key, value, rev: self.kvs[bucket].update(
                key, value, last=rev
            ),
            Change.PUT: lambda bucket, key, value, rev: self.kvs[bucket].put(key, value),
            Change.DELETE: self._delete,
        }

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
        servers = ", ".join(self.cfg.servers)
        try:
            try:
                await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
            except Exception:  # noqa: BLE001 - whatever it was, nobody answered
                raise SetupFailed(f"no NATS server answered at {servers}") from None
            self.patient_until = time.monotonic() + SETUP_PATIENCE
            await self._setup()
        except Exception as exc:  # noqa: BLE001 - anything here means: cannot start
            reason = str(exc) or type(exc).__name__
            if not isinstance(exc, SetupFailed):
                reason = f"NATS at {servers} answered, but JetStream did not: {reason}"
            self._send([News.FATAL, reason.encode()])
            await self._drop_connection()
            return
        self._send([News.READY, str(self.replicas).encode()])
        self._spawn(self._expire_acks())
        try:
            while True:  # one command at a time, in order: appends keep the loop's order
                while not self.inbox:
                    self.woken.clear()
                    await self.woken.wait()
                frames = self.inbox.popleft()
                if frames[0] == Verb.STOP:
                    break
                try:
                    await self.handlers[frames[0]](frames)
                except Exception:  # a bug must not end the bridge
                    logger.exception("cluster command %r failed", frames[:2])
        finally:
            await self._close()

    async def _close(self) -> None:
        if self.tasks:  # what was asked before STOP (our last beat, say) gets its chance
            await asyncio.wait(list(self.tasks), timeout=1.0)
        for task in list(self.tasks):
            task.cancel()
        await self._drop_connection()
        self._send([News.STOPPED])

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug: say so
            logger.error("cluster task failed: %r", task.exception(), exc_info=task.exception())

    def _send(self, frames: list[bytes]) -> None:
        """To the broker, in call order."""
        self.to_broker(frames)

    def _done(self, call: bytes, value: Any) -> None:
        self._send([News.DONE, call, Answer.JSON, json.dumps(value).encode()])

    def _done_list(self, call: bytes, items: list[bytes]) -> None:
        self._send([News.DONE, call, Answer.LIST, *items])

    def _fail(self, call: bytes, failure: Failure, reason: str) -> None:
        self._send([News.FAIL, call, failure.encode(), reason.encode()])

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
                logger.warning("lost the NATS connection; reconnecting")

        async def reconnected() -> None:
            logger.warning(
                "NATS connection back (%s)",
                self.nc.connected_url.netloc if self.nc.connected_url else "?",
            )

        async def error(exc: Exception) -> None:
            logger.info("NATS: %s", exc)

        self.nc = await nats.connect(
            self.cfg.servers,
            name=f"zmqchat {self.cfg.name}",
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            ping_interval=PING_INTERVAL,
            max_outstanding_pings=PINGS_UNANSWERED,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        self.js = self.nc.jetstream(timeout=OP_TIMEOUT)

    async def _setup(self) -> None:
        probe = self.nc.jetstream(timeout=PROBE_TIMEOUT)  # a cluster still electing: ask often
        await self.patiently("asking JetStream for this account's limits", probe.account_info)
        # Three copies on a cluster, one on a single server. (The servers a node lists are
        # no measure of the cluster: a node back from a restart, or a new cluster still
        # connecting its routes, lists fewer, and a stream made with fewer copies keeps them.)
        clustered = bool((self.nc._server_info or {}).get("cluster"))
        self.replicas = self.cfg.replicas or (3 if clustered else 1)
        for bucket in Bucket:
            self.kvs[bucket] = await self.patiently(
                f"making the bucket {self.ns}-{bucket}", partial(self._bucket, bucket)
            )
        await self.patiently(
            f"making the stream {self.ns}-privates",
            lambda: self._ensure_stream(f"{self.ns}-privates", [f"{self.ns}.priv.>"]),
        )
        for bucket in Bucket:
            await self.patiently(
                f"reading the bucket {self.ns}-{bucket}", partial(self._watch, bucket)
            )
        rooms = list(dict.fromkeys([*self.cfg.rooms, *self.rooms_seen]))
        for room in rooms:
            await self.patiently(
                f"making the stream {room_stream(self.ns, room)}",
                partial(self._ensure_room, room),
            )
        push = f"{self.ns}.push.{self.cfg.name}"
        await self.nc.subscribe(push, cb=self._routed)
        self.ack_inbox = self.nc.new_inbox()
        await self.nc.subscribe(
            f"{self.ack_inbox}.*",
            cb=self._acked,
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=1 << 30,
        )

    async def patiently(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """A JetStream call made while starting. A cluster that has just started (or is
        loaded, or lost a node) answers late, "unavailable", "no suitable peers", "not
        found" for what another broker made a moment ago, ... while it elects its leaders
        and places replicas: whatever the error, the call is tried again until
        `patient_until`, and the first failure of each step says what we wait for. Only a
        JetStream that is not enabled at all fails at once."""
        said = False
        while True:
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - see above
                why = _why(exc)
                if getattr(exc, "err_code", None) in JS_NOT_ENABLED:
                    raise SetupFailed(f"{what}: {why} (is JetStream enabled?)") from None
                if time.monotonic() > self.patient_until:
                    raise SetupFailed(
                        f"{what}: {why} (still so after waiting {SETUP_PATIENCE:g} s for "
                        f"the cluster to settle)"
                    ) from None
                if not said:
                    logger.warning(
                        "the NATS cluster is not ready yet (%s: %s); waiting up to %.0f s "
                        "for it to settle",
                        what,
                        why,
                        max(0.0, self.patient_until - time.monotonic()),
                    )
                    said = True
                await asyncio.sleep(0.25)

    async def _bucket(self, bucket: Bucket) -> Any:
        name = f"{self.ns}-{bucket}"
        try:
            return await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await self.js.create_key_value(
                api.KeyValueConfig(bucket=name, history=1, replicas=self.replicas)
            )
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            return await self.js.key_value(name)  # made by another broker just now

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
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise
                info = await self.js.stream_info(name)  # another broker made it just now
        last: int = info.state.last_seq
        return last

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
        last = await self._ensure_stream(room_stream(self.ns, room), [room_subject(self.ns, room)])
        self.expect[room] = last + 1
        self._send([News.LAST, room.encode(), str(last).encode()])

        async def arrived(msg: Any) -> None:
            await self._arrived(room, msg)

        self.room_subs[room] = await self.js.subscribe(
            room_subject(self.ns, room),
            stream=room_stream(self.ns, room),
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
    async def _watch(self, bucket: Bucket) -> None:
        """Follow every key of a bucket (each key's latest value first, then every change),
        handing each over as KEY bucket key revision PUT|DEL value; returns once the latest
        values are all there (or fails if they stop coming)."""
        prefix = f"$KV.{self.ns}-{bucket}."
        initial = asyncio.Event()

        async def changed(msg: Any) -> None:
            meta = msg.metadata
            key = msg.subject[len(prefix) :]
            headers = msg.headers or {}
            put = (
                headers.get("KV-Operation") not in ("DEL", "PURGE")
                and "Nats-Marker-Reason" not in headers
            )
            if bucket == Bucket.ROOMS and put and "." not in key:
                if initial.is_set():
                    self._spawn(self._follow_room(key))
                else:
                    self.rooms_seen.append(key)
            self._send(
                [
                    News.KEY,
                    bucket.encode(),
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
        try:
            info = await sub.consumer_info()
            if info.num_pending == 0 and sub.delivered == 0:  # an empty bucket
                initial.set()
            heard = -1
            while not initial.is_set():  # as long as the latest values keep coming
                if sub.delivered == heard:
                    raise TimeoutError("its keys stopped coming")
                heard = sub.delivered
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(initial.wait(), OP_TIMEOUT)
        except BaseException:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            raise

    # ------------------------------------------------------------------ room events
    async def _arrived(self, room: str, msg: Any) -> None:
        """A room event from its stream, in stream order: hand it over (batched)."""
        seq = msg.metadata.sequence.stream
        expect = self.expect[room]
        if seq < expect:
            return
        if seq > expect:  # should not happen with an ordered consumer: fetch the gap
            logger.warning(
                "%s: events %d..%d skipped by the stream subscription; fetching",
                room,
                expect,
                seq - 1,
            )
            for missing in await self._get_range(room, expect, seq - expect):
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
        self._send([News.EVENTS, prefix, str(first).encode(), meta, *frames])

    async def _append(self, frames: list[bytes]) -> None:
        """APPEND id room [msgid kind tail]...: publish each; answer with their seqs."""
        call, room = frames[1], frames[2].decode()
        subject = room_subject(self.ns, room)
        batch = Batch(call, subject, (len(frames) - 3) // 3, time.monotonic() + OP_TIMEOUT)
        try:
            for i in range(3, len(frames), 3):
                kind = frames[i + 1].decode()
                headers = {"Nats-Msg-Id": frames[i].decode(), "Zc-Kind": kind}
                if kind not in ("msg", "action"):  # ours: kept trying for if this fails
                    batch.notices.append((headers, frames[i + 2]))
                batch.sent.append((frames[i + 2], headers))
                await self._publish(batch, (i - 3) // 3)
        except Exception as exc:  # noqa: BLE001 - the connection's buffer is full
            self._settle(batch, f"the cluster did not store it: {_why(exc)}")

    async def _publish(self, batch: Batch, index: int) -> None:
        """A JetStream publish whose acknowledgement fills slot `index` of `batch`."""
        reply_id = str(next(self.reply_ids))
        self.acking[reply_id] = (batch, index)
        batch.reply_ids.append(reply_id)
        payload, headers = batch.sent[index]
        await self.nc.publish(
            batch.subject, payload, reply=f"{self.ack_inbox}.{reply_id}", headers=headers
        )

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
        if not answer["seq"]:
            # A duplicate of a publish still in flight (a retry that overtook it): JetStream
            # does not know its number yet. Asked again, it answers with the number the
            # first one got (or stores it, if the first one failed).
            self.loop.call_later(DUPLICATE_RETRY, self._again, batch, index)
            return
        batch.seqs[index] = answer["seq"]
        batch.left -= 1
        if batch.left == 0:
            self._done(batch.call, batch.seqs)

    def _again(self, batch: Batch, index: int) -> None:
        if batch.left >= 0:
            self._spawn(self._publish_or_settle(batch, index))

    async def _publish_or_settle(self, batch: Batch, index: int) -> None:
        try:
            await self._publish(batch, index)
        except Exception as exc:  # noqa: BLE001 - the connection is gone
            self._settle(batch, f"the cluster did not store it: {_why(exc)}")

    def _settle(self, batch: Batch, why: str) -> None:
        """A batch that will not be acknowledged: its call fails (once); the notices of our
        own that were in it are published again until they are stored."""
        if batch.left < 0:
            return
        batch.left = -1
        for reply_id in batch.reply_ids:
            self.acking.pop(reply_id, None)
        self._fail(batch.call, Failure.UNAVAILABLE, why)
        for headers, tail in batch.notices:
            self._spawn(self._keep_trying(batch.subject, headers, tail))

    async def _expire_acks(self) -> None:
        """Fail the publishes that were not acknowledged in OP_TIMEOUT (of our own running
        time: a process that was stopped for a while does not count that against them)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            lost, last = now - last - 0.2, now
            if lost > 1.0:
                for batch in {batch for batch, _ in self.acking.values()}:
                    batch.deadline += lost
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
        logger.error("gave up storing a %s notice on %s", headers.get("Zc-Kind"), subject)

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
        stream = room_stream(self.ns, room)
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
        """READ id room {after, before, since, limit, last}: stored events as JSON texts."""
        call, room, q = frames[1], frames[2].decode(), json.loads(frames[3])
        self._spawn(self._reading(call, room, q))

    async def _reading(self, call: bytes, room: str, q: dict[str, Any]) -> None:
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
                raw = await self.js.get_msg(room_stream(self.ns, room), seq)
                found.append((seq, raw.data or b""))
        except Exception as exc:  # noqa: BLE001
            self._fail(call, Failure.UNAVAILABLE, f"history not read: {_why(exc)}")
            return
        prefix = room.encode()
        texts = []
        for seq, data in found:
            if q["since"] is not None and _event_ts(data) < q["since"]:
                continue
            texts.append(b'{"room":"%s","seq":%d,"id":"%s:%d",' % (prefix, seq, prefix, seq) + data)
        self._done_list(call, texts)

    # ------------------------------------------------------------------ private messages
    async def _priv(self, frames: list[bytes]) -> None:
        """PRIV id subject-hashes msgid data: keep a private message."""
        call, hashes, msgid, data = frames[1], frames[2].decode(), frames[3].decode(), frames[4]
        batch = Batch(call, f"{self.ns}.priv.{hashes}", 1, time.monotonic() + OP_TIMEOUT)
        batch.sent.append((data, {"Nats-Msg-Id": msgid}))
        try:
            await self._publish(batch, 0)
        except Exception as exc:  # noqa: BLE001
            self._settle(batch, f"the cluster did not store it: {_why(exc)}")

    async def _privread(self, frames: list[bytes]) -> None:
        """PRIVREAD id filter since limit: the latest private messages whose subject matches
        N.priv.<filter> (wildcards allowed), at or after since."""
        call, pattern = frames[1], frames[2].decode()
        since, limit = float(frames[3]), int(frames[4])
        self._spawn(self._privreading(call, pattern, since, limit))

    async def _privreading(self, call: bytes, pattern: str, since: float, limit: int) -> None:
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
            self._fail(call, Failure.UNAVAILABLE, f"private messages not read: {_why(exc)}")
            return
        self._done_list(call, out)

    # ------------------------------------------------------------------ keys, rooms, pushes
    async def _kv(self, frames: list[bytes]) -> None:
        """KV id bucket Change key value revision: change a key; answer with its revision."""
        call, bucket, change, key, value, rev = frames[1:7]
        self._spawn(
            self._kv_change(call, Bucket(bucket.decode()), change, key.decode(), value, int(rev))
        )

    async def _kv_change(
        self, call: bytes, bucket: Bucket, change: bytes, key: str, value: bytes, rev: int
    ) -> None:
        try:
            revision = await self.changes[change](bucket, key, value, rev)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            self._fail(call, Failure.CONFLICT, str(exc))
        except Exception as exc:  # noqa: BLE001 - timeout, connection, ...: always answer
            code = getattr(exc, "err_code", None)
            failure = Failure.CONFLICT if code in WRONG_LAST_SEQUENCE else Failure.UNAVAILABLE
            self._fail(call, failure, _why(exc))
        else:
            self._done(call, revision)

    async def _delete(self, bucket: Bucket, key: str, value: bytes, rev: int) -> int:
        await self.kvs[bucket].delete(key, last=rev or None)
        return 0

    async def _create(self, bucket: Bucket, key: str, value: bytes) -> int:
        """Make a key that does not exist (or was deleted): KeyWrongLastSequenceError when
        someone has it. Checked against the stream's leader, not a replica that may lag."""
        kv = self.kvs[bucket]
        try:
            revision: int = await kv.update(key, value, last=0)
            return revision
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
            revision = await kv.update(key, value, last=last.seq)
            return revision

    async def _sync(self, frames: list[bytes]) -> None:
        """SYNC id: the latest revision of each registry bucket, from its stream's leader."""
        self._spawn(self._syncing(frames[1]))

    async def _syncing(self, call: bytes) -> None:
        try:
            infos = await asyncio.gather(
                *(self.js.stream_info(f"KV_{self.ns}-{bucket}") for bucket in REGISTRY)
            )
        except Exception as exc:  # noqa: BLE001
            self._fail(call, Failure.UNAVAILABLE, f"the registry did not answer: {_why(exc)}")
            return
        revs = {bucket: info.state.last_seq for bucket, info in zip(REGISTRY, infos, strict=True)}
        self._done(call, revs)

    async def _room(self, frames: list[bytes]) -> None:
        """ROOM id room: make a room (its stream, then its record); answer whether we did."""
        self._spawn(self._making_room(frames[1], frames[2].decode()))

    async def _making_room(self, call: bytes, room: str) -> None:
        try:
            await self._ensure_room(room)
            try:
                await self._create(Bucket.ROOMS, room, b'{"created":true}')
                created = True
            except nats.js.errors.KeyWrongLastSequenceError:
                created = False
        except Exception as exc:  # noqa: BLE001
            self._fail(call, Failure.UNAVAILABLE, f"the room was not made: {_why(exc)}")
            return
        self._done(call, created)

    async def _follow(self, frames: list[bytes]) -> None:
        """FOLLOW room: follow a room's stream (a room another broker made)."""
        self._spawn(self._follow_room(frames[1].decode()))

    async def _follow_room(self, room: str) -> None:
        """_ensure_room until it works: a room we do not follow never reaches our members."""
        said = False
        while not self.closing:
            try:
                await self._ensure_room(room)
                return
            except Exception as exc:  # noqa: BLE001 - the cluster is away: again soon
                if not said:
                    logger.warning("cannot follow room %s yet (%s); trying again", room, _why(exc))
                    said = True
                await asyncio.sleep(1.0)

    async def _route(self, frames: list[bytes]) -> None:
        """ROUTE broker data: a push for a session held by another broker."""
        await self.nc.publish(f"{self.ns}.push.{frames[1].decode()}", frames[2])

    async def _routed(self, msg: Any) -> None:
        self._send([News.ROUTED, msg.data])


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
