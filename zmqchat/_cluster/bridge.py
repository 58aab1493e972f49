"""The cluster's NATS side: nats-py on the broker's asyncio loop.

In cluster mode the broker's loop runs on asyncio, and this bridge is a task of that same
loop, in the same thread: no lock, no hand-over between threads on a message's path (two
threads sharing the interpreter lock added about 2 ms at each crossing under load). The
broker's side (state.py) and this one still talk only in frames, through two queues:
commands go in (append these events, change this key, read that range, route this push),
answers and news come out (a command done or failed, a room's new events from its stream,
a changed key of a watched bucket, a push routed to us); names.py has their verbs. A
handler per verb (`Bridge.handlers`), a function per kind of key change (`Bridge.changes`);
a room's stream is a streams.RoomStream, private messages are privates.py's.

What lives in NATS (N is the namespace, `--namespace`, default zmqchat; names.py):
    stream N-room-R       subject N.room.R: room R's events, a stream message holding the
                          events numbered a..b (streams.py)
    stream N-privates     subjects N.priv.<to>.<to nick>.<from>.<from nick> (hashes of the
                          recipient's and the sender's identity and nick): private messages
    bucket N-sessions     nick -> the session that holds it (sid, broker, token hash, ...)
    bucket N-members      R.nick -> member record
    bucket N-rooms        R (exists), R.topic, R.locked, R.op.nick, R.ban.nick
    bucket N-nickkeys     nick -> the CURVE key that registered it
    bucket N-brokers      broker name -> its heartbeat
    buckets N-accounts, N-marks, N-logins: accounts (accounts.py)
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
import nats.js.errors
from nats.js import api

from zmqchat._cluster import edits
from zmqchat._cluster.history import History
from zmqchat._cluster.names import (
    ACCOUNT_BUCKETS,
    REGISTRY,
    Answer,
    Bucket,
    Change,
    Failure,
    News,
    SeenIds,
    Verb,
    room_stream,
    room_subject,
    why,
)
from zmqchat._cluster.privates import Privates
from zmqchat._cluster.streams import PROBE_AFTER, Call, RoomStream

logger = logging.getLogger("zmqchat.cluster")

PROBE_WAIT: Final = 1.0  # seconds our server has to answer a probe's PING (or send anything)
PROBE_PATIENCE: Final = 30  # seconds the probe's PING is left to be answered after that
OP_TIMEOUT: Final = 2.0  # seconds a command may take before UNAVAILABLE (the client retries)
CONNECT_TIMEOUT: Final = 3.0  # seconds a start waits for NATS before it says it waits
PING_INTERVAL: Final = 1.0  # seconds between pings of our NATS server, and
PINGS_UNANSWERED: Final = 3  # how many may go unanswered before we use another: a server
# that is stopped (SIGSTOP, a frozen VM) keeps its TCP connection open, and only its silence
# says it is gone (nats-py's default, 2 minutes x 2, was 16 s here with ours of 5 x 3)
PROBE_TIMEOUT: Final = 0.5  # seconds the first JetStream request waits (then it is asked again)
# seconds a bucket's key lives: failed logins count for FAILURES_KEPT (accounts.py), no more
BUCKET_TTL: Final[dict[str, float]] = {Bucket.LOGINS: 600.0}
SETUP_PATIENCE: Final = 60.0  # seconds a start waits for a cluster that is still settling
# (electing its leaders, placing replicas); state.READY_WAIT, the broker's own limit, is longer
NOTICE_RETRY: Final = 600.0  # seconds a broker keeps trying to store a notice of its own
TICK: Final = 0.1  # seconds between looks at deadlines and messages in flight
READ_BATCH: Final = 500  # messages per direct-get request
PENDING_MSGS: Final = 1 << 20  # messages a subscription may hold before dropping
IDLE_HEARTBEAT: Final = 1.0  # seconds: a subscription that hears nothing for two starts over
# (its consumer was on a node that died)
JS_NOT_ENABLED: Final = frozenset({10039, 10076})  # JetStream off: waiting will not help
STREAM_NAME_IN_USE: Final = 10058  # a stream (or bucket) of that name exists already
WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})  # a compare-and-set lost
ERASED: Final = "erased"  # the bucket of what erased stream messages held besides (history.py)


@dataclass
class BridgeConfig:
    servers: list[str]
    namespace: str
    name: str
    rooms: list[str]
    replicas: int  # 0: 3 on a cluster, 1 on a single server


class SetupFailed(Exception):
    """A start that cannot go on: what it was doing, and why."""


Handler = Callable[[list[bytes]], Awaitable[None]]


class Bridge:
    """The NATS connection and everything done with it; see the module docstring."""

    def __init__(
        self, cfg: BridgeConfig, to_broker: Callable[[list[bytes]], None], seen: SeenIds
    ) -> None:
        self.cfg, self.to_broker, self.seen = cfg, to_broker, seen
        self.ns = cfg.namespace
        self.kvs: dict[Bucket, Any] = {}
        self.streams: dict[str, RoomStream] = {}
        self.erased: Any = None  # the NS-erased bucket
        self.made: dict[str, asyncio.Future[None]] = {}  # room -> done once its stream is
        self.calls: dict[bytes, Call] = {}  # APPENDs under way
        self.privates = Privates(self)
        self.tasks: set[asyncio.Future[Any]] = set()
        self.watchdog: asyncio.Future[Any] | None = None
        self.replicas = 1
        self.replies: dict[str, Callable[[Any], None]] = {}  # reply id -> who takes it
        self.reply_ids = itertools.count()
        self.closing = False
        self.probing = False
        self.inbox: deque[list[bytes]] = deque()  # commands from the broker, in order
        self.woken: asyncio.Event | None = None
        self.patient_until = 0.0  # while starting: JetStream calls are retried until then
        # (SETUP_PATIENCE from the start on; what the broker sets up after it shares it)
        self.handlers: dict[bytes, Handler] = {
            Verb.APPEND: self._append,
            Verb.KV: self._kv,
            Verb.READ: self._read,
            Verb.PRIV: self.privates.store,
            Verb.PRIVREAD: self.privates.read,
            Verb.ROUTE: self._route,
            Verb.ROOM: self._room,
            Verb.FOLLOW: self._follow,
            Verb.UNFOLLOW: self._unfollow,
            Verb.SYNC: self._sync,
            **edits.verbs(self),  # MSGGET, ERASE (issue 23)
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
            self.patient_until = time.monotonic() + SETUP_PATIENCE
            await self._first_connect(servers)
            await self._setup()
        except Exception as exc:  # noqa: BLE001 - anything here means: cannot start
            reason = str(exc) or type(exc).__name__
            if not isinstance(exc, SetupFailed):
                reason = f"NATS at {servers} answered, but JetStream did not: {reason}"
            self.send([News.FATAL, reason.encode()])
            await self._drop_connection()
            return
        self.send([News.READY, str(self.replicas).encode()])
        self.watchdog = asyncio.ensure_future(self._watchdog())  # until we stop: not one of
        self.watchdog.add_done_callback(self._finished)  # the tasks _close gives time to end
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
        if self.watchdog is not None:
            self.watchdog.cancel()
        await self._drop_connection()
        self.send([News.STOPPED])

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug: say so
            logger.error("cluster task failed: %r", task.exception(), exc_info=task.exception())

    def send(self, frames: list[bytes]) -> None:
        """To the broker, in call order."""
        self.to_broker(frames)

    def done(self, call: bytes, value: Any) -> None:
        self.send([News.DONE, call, Answer.JSON, json.dumps(value).encode()])

    def done_list(self, call: bytes, items: list[bytes]) -> None:
        self.send([News.DONE, call, Answer.LIST, *items])

    def fail(self, call: bytes, failure: Failure, reason: str) -> None:
        self.send([News.FAIL, call, failure.encode(), reason.encode()])

    def reply_to(self, handler: Callable[[Any], None]) -> tuple[str, str]:
        """A reply subject of our inbox whose message goes to handler: (its id, subject)."""
        reply_id = str(next(self.reply_ids))
        self.replies[reply_id] = handler
        return reply_id, f"{self.ack_inbox}.{reply_id}"

    def forget_reply(self, reply_id: str) -> None:
        self.replies.pop(reply_id, None)

    async def _replied(self, msg: Any) -> None:
        handler = self.replies.get(msg.subject.rpartition(".")[2])
        if handler is not None:
            handler(msg)

    async def _drop_connection(self) -> None:
        self.closing = True
        nc = getattr(self, "nc", None)
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), 2.0)
            except Exception:  # noqa: BLE001 - closing anyway
                pass

    async def _watchdog(self) -> None:
        """Every TICK: fail the commands past their deadline, publish again what went
        unanswered, and ask our server whether it is there when something waits too long.
        (A process that was stopped for a while does not count that against anyone.)"""
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            lost, last = now - last - TICK, now
            if lost > 1.0:
                for call in self.calls.values():
                    call.deadline += lost
                for private in self.privates.storing:
                    private.deadline += lost
                for stream in self.streams.values():
                    stream.woke(lost)
            for call in [c for c in self.calls.values() if c.deadline < now]:
                call.done = True
                del self.calls[call.id]
                self.fail(call.id, Failure.UNAVAILABLE, "the cluster did not store it in time")
            self.privates.expire(now)
            waited = 0.0
            for stream in self.streams.values():
                stream.expire(now)
                if stream.retry_due(now):
                    stream.retry()
                waited = max(waited, stream.waiting(now))
            if waited > PROBE_AFTER and not self.probing:
                self.spawn(self._probe())

    async def _probe(self) -> None:
        """A publish waits: is our server still there? (A stopped one keeps the TCP
        connection open; the pings would say so only after a few seconds.) One that sends
        us anything while we wait for its PONG is there: we are only behind in reading
        what it sent (after a pause of ours, on a busy machine), and the PONG comes after."""
        self.probing = True
        heard = self.nc.stats["in_msgs"]
        # (nats-py's flush, timed out, leaves its PONG's future cancelled in its queue, and
        # the late PONG then fails its read loop: the flush is given long and not cancelled)
        pong = asyncio.ensure_future(self.nc.flush(timeout=PROBE_PATIENCE))
        pong.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            await asyncio.wait_for(asyncio.shield(pong), PROBE_WAIT)
        except Exception:  # noqa: BLE001 - no PONG in time: another server, if it is silent
            silent = self.nc.stats["in_msgs"] == heard
            if silent and not self.closing and self.nc.is_connected:
                logger.warning("our NATS server does not answer; moving to another")
                await self.nc.force_reconnect()
        finally:
            await asyncio.sleep(1.0)  # once a second at most
            self.probing = False

    # ------------------------------------------------------------------ start
    async def _first_connect(self, servers: str) -> None:
        """Connect, for up to `patient_until`: a broker may start before its NATS servers
        (containers brought up together). nats-py tries the servers again and again itself
        (max_reconnect_attempts -1 counts for a first connection too); the wait is said
        once, after CONNECT_TIMEOUT."""
        connecting = asyncio.ensure_future(self._connect())
        try:
            done, _ = await asyncio.wait({connecting}, timeout=CONNECT_TIMEOUT)
            if not done:
                logger.warning(
                    "no NATS server answers at %s yet; trying for up to %.0f s more",
                    servers,
                    self.patient_until - time.monotonic(),
                )
            await asyncio.wait_for(connecting, max(0.0, self.patient_until - time.monotonic()))
        except Exception:  # noqa: BLE001 - whatever it was, nobody answered
            connecting.cancel()
            raise SetupFailed(
                f"no NATS server answered at {servers} (tried for {SETUP_PATIENCE:g} s)"
            ) from None

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
        # Each stream or bucket made is a round of the cluster's consensus: made one after
        # another, a fresh namespace's fourteen took a second; made at once, half of it.
        made = await self.together(
            {f"making the bucket {self.ns}-{b}": partial(self._bucket, b) for b in Bucket}
            | {
                f"making the bucket {self.ns}-{ERASED}": partial(self._bucket, ERASED),
                f"making the stream {self.ns}-privates": partial(
                    self._ensure_stream, f"{self.ns}-privates", [f"{self.ns}.priv.>"]
                ),
            }
        )
        self.kvs.update(zip(Bucket, made, strict=False))
        self.erased = made[len(Bucket)]
        for bucket in Bucket:  # one after another: each is quick, and its keys come in order
            await self.patiently(
                f"reading the bucket {self.ns}-{bucket}", partial(self._watch, bucket)
            )
        await self.together(
            {
                f"making the stream {room_stream(self.ns, room)}": partial(self._ensure_room, room)
                for room in self.cfg.rooms
            }
        )
        push = f"{self.ns}.push.{self.cfg.name}"
        await self.nc.subscribe(push, cb=self._routed)
        self.ack_inbox = self.nc.new_inbox()
        await self.nc.subscribe(
            f"{self.ack_inbox}.*",
            cb=self._replied,
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=1 << 30,
        )
        await self.patiently(  # for the search index (issue 23)
            "following the private messages",
            lambda: edits.follow_privates(self, IDLE_HEARTBEAT),
        )

    async def together(self, steps: dict[str, Callable[[], Awaitable[Any]]]) -> list[Any]:
        """Setup steps that do not wait on each other, at once (patiently, each); their
        values in order. The first to fail for good fails the setup and ends the others."""
        told: list[str] = []  # the cluster is not ready: said once for them all
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.patiently(w, c, told)) for w, c in steps.items()]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # SetupFailed, say: what main() reports
        return [task.result() for task in tasks]

    async def patiently(
        self, what: str, call: Callable[[], Awaitable[Any]], told: list[str] | None = None
    ) -> Any:
        """A JetStream call made while starting. A cluster that has just started (or is
        loaded, or lost a node) answers late, "unavailable", "no suitable peers", "not
        found" for what another broker made a moment ago, ... while it elects its leaders
        and places replicas: whatever the error, the call is tried again until
        `patient_until`, and the first failure of each step says what we wait for. Only a
        JetStream that is not enabled at all fails at once. (What the broker sets up after
        the bridge, its files say, gets SETUP_PATIENCE of its own.) Steps taken together
        share `told`, so that the wait is said once for them."""
        if self.patient_until < time.monotonic():
            self.patient_until = time.monotonic() + SETUP_PATIENCE
        told = [] if told is None else told
        while True:
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - see above
                reason = why(exc)
                if getattr(exc, "err_code", None) in JS_NOT_ENABLED:
                    raise SetupFailed(f"{what}: {reason} (is JetStream enabled?)") from None
                if time.monotonic() > self.patient_until:
                    raise SetupFailed(
                        f"{what}: {reason} (still so after waiting {SETUP_PATIENCE:g} s for "
                        f"the cluster to settle)"
                    ) from None
                if not told:
                    told.append(what)
                    logger.warning(
                        "the NATS cluster is not ready yet (%s: %s); waiting up to %.0f s "
                        "for it to settle",
                        what,
                        reason,
                        max(0.0, self.patient_until - time.monotonic()),
                    )
                await asyncio.sleep(0.25)

    async def _bucket(self, bucket: str) -> Any:
        name, ttl = f"{self.ns}-{bucket}", BUCKET_TTL.get(bucket)
        try:
            kv = await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        else:
            if ttl is not None:  # (a bucket made before it had one)
                await self._keep_for(f"KV_{name}", ttl)
            return kv
        try:
            return await self.js.create_key_value(
                api.KeyValueConfig(bucket=name, history=1, replicas=self.replicas, ttl=ttl)
            )
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            return await self.js.key_value(name)  # made by another broker just now

    async def _keep_for(self, stream: str, ttl: float) -> None:
        """A stream's messages expire after `ttl` seconds."""
        info = await self.js.stream_info(stream)
        if info.config.max_age != ttl:
            info.config.max_age = ttl
            await self.js.update_stream(info.config)

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
        """The room's stream exists (once, however many ask at the same time)."""
        made = self.made.get(room)
        if made is None:
            made = self.made[room] = self.loop.create_future()
            try:
                await self._ensure_stream(room_stream(self.ns, room), [room_subject(self.ns, room)])
            except BaseException as exc:
                del self.made[room]
                made.set_exception(exc)
                made.exception()  # retrieved: whoever waits gets it too
                raise
            made.set_result(None)
        await asyncio.shield(made)

    def stream(self, room: str) -> RoomStream:
        stream = self.streams.get(room)
        if stream is None:
            stream = self.streams[room] = RoomStream(self, room)
        return stream

    def history(self, room: str) -> History:
        return self.stream(room).history

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
            self.send(
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
    async def _append(self, frames: list[bytes]) -> None:
        """APPEND id room heard [msgid kind tail]...: into the room's next stream message;
        answered with their seqs once it is stored (`heard`: the room's seq its client had
        when it first sent them, or empty)."""
        call_id, room = frames[1], frames[2].decode()
        heard = int(frames[3]) if frames[3] else None
        events = [
            (frames[i].decode(), frames[i + 1].decode(), frames[i + 2])
            for i in range(4, len(frames), 3)
        ]
        now = time.monotonic()
        call = Call(call_id, room, [0] * len(events), len(events), now + OP_TIMEOUT)
        self.calls[call_id] = call
        self.stream(room).append(call, events, now + NOTICE_RETRY, heard)

    def answer(self, call: Call) -> None:
        """An APPEND whose events all have their seqs: answered."""
        if call.left == 0 and not call.done:
            call.done = True
            self.calls.pop(call.id, None)
            self.done(call.id, call.seqs)

    async def _follow(self, frames: list[bytes]) -> None:
        """FOLLOW id room: follow a room's stream (its first local member joins)."""
        self.spawn(self._following(frames[1], frames[2].decode()))

    async def _following(self, call: bytes, room: str) -> None:
        try:
            await self._ensure_room(room)
            await self.stream(room).follow()
        except Exception as exc:  # noqa: BLE001
            self.fail(call, Failure.UNAVAILABLE, f"the room's history did not answer: {why(exc)}")
            return
        self.done(call, True)

    async def _unfollow(self, frames: list[bytes]) -> None:
        """UNFOLLOW room: stop following a room (nobody here is in it any more)."""
        stream = self.streams.get(frames[1].decode())
        if stream is not None:
            self.spawn(stream.unfollow())

    async def direct(self, stream: str, request: dict[str, Any]) -> list[Any]:
        """One direct-get request: the messages, up to the end-of-batch marker (any
        replica answers: one may lag behind the leader)."""
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
                if "batch" not in request:  # one message, no end marker
                    return out
        finally:
            await sub.unsubscribe()

    async def _read(self, frames: list[bytes]) -> None:
        """READ id room {after, before, since, limit, last}: stored events as JSON texts."""
        call, room, q = frames[1], frames[2].decode(), json.loads(frames[3])
        self.spawn(self._reading(call, room, q))

    async def _reading(self, call: bytes, room: str, q: dict[str, Any]) -> None:
        if q["after"] is not None:
            lo, hi = q["after"] + 1, q["after"] + q["limit"]
        else:
            hi = min(q["before"] - 1, q["last"]) if q["before"] is not None else q["last"]
            lo = max(1, hi - q["limit"] + 1)
        try:
            found = await self.history(room).read(lo, hi, q["last"])
        except Exception as exc:  # noqa: BLE001
            self.fail(call, Failure.UNAVAILABLE, f"history not read: {why(exc)}")
            return
        prefix = room.encode()
        texts = []
        for seq, data in found:
            if q["since"] is not None and _event_ts(data) < q["since"]:
                continue
            texts.append(b'{"room":"%s","seq":%d,"id":"%s:%d",' % (prefix, seq, prefix, seq) + data)
        self.done_list(call, texts)

    # ------------------------------------------------------------------ keys, rooms, pushes
    async def _kv(self, frames: list[bytes]) -> None:
        """KV id bucket Change key value revision: change a key; answer with its revision."""
        call, bucket, change, key, value, rev = frames[1:7]
        self.spawn(
            self._kv_change(call, Bucket(bucket.decode()), change, key.decode(), value, int(rev))
        )

    async def _kv_change(
        self, call: bytes, bucket: Bucket, change: bytes, key: str, value: bytes, rev: int
    ) -> None:
        try:
            revision = await self.changes[change](bucket, key, value, rev)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            self.fail(call, Failure.CONFLICT, str(exc))
        except Exception as exc:  # noqa: BLE001 - timeout, connection, ...: always answer
            code = getattr(exc, "err_code", None)
            failure = Failure.CONFLICT if code in WRONG_LAST_SEQUENCE else Failure.UNAVAILABLE
            self.fail(call, failure, why(exc))
        else:
            self.done(call, revision)

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
        """SYNC id [accounts]: the latest revision of each registry bucket (and the
        accounts' buckets), from its stream's leader."""
        buckets = (*REGISTRY, *ACCOUNT_BUCKETS) if frames[2:] == [b"accounts"] else REGISTRY
        self.spawn(self._syncing(frames[1], buckets))

    async def _syncing(self, call: bytes, buckets: tuple[Bucket, ...]) -> None:
        try:
            infos = await asyncio.gather(
                *(self.js.stream_info(f"KV_{self.ns}-{bucket}") for bucket in buckets)
            )
        except Exception as exc:  # noqa: BLE001
            self.fail(call, Failure.UNAVAILABLE, f"the registry did not answer: {why(exc)}")
            return
        revs = {bucket: info.state.last_seq for bucket, info in zip(buckets, infos, strict=True)}
        self.done(call, revs)

    async def _room(self, frames: list[bytes]) -> None:
        """ROOM id room: make a room (its stream, then its record); answer whether we did."""
        self.spawn(self._making_room(frames[1], frames[2].decode()))

    async def _making_room(self, call: bytes, room: str) -> None:
        try:
            await self._ensure_room(room)
            try:
                await self._create(Bucket.ROOMS, room, b'{"created":true}')
                created = True
            except nats.js.errors.KeyWrongLastSequenceError:
                created = False
        except Exception as exc:  # noqa: BLE001
            self.fail(call, Failure.UNAVAILABLE, f"the room was not made: {why(exc)}")
            return
        self.done(call, created)

    async def _route(self, frames: list[bytes]) -> None:
        """ROUTE broker data: a push for a session held by another broker."""
        await self.nc.publish(f"{self.ns}.push.{frames[1].decode()}", frames[2])

    async def _routed(self, msg: Any) -> None:
        self.send([News.ROUTED, msg.data])


def _event_ts(tail: bytes) -> float:
    """The time of an event from its stored tail, which starts `"ts":<number>,`."""
    try:
        return float(tail[5 : tail.index(b",", 5)])
    except ValueError:
        return 0.0
