"""The chat broker: one process, one event loop, the authority on who says and hears what.

A ROUTER socket takes commands (see messages.py); an XPUB socket publishes room events under
secret per-room topics that only members are let in on. This module does the I/O only: the
rules and the state of one broker are in core.py, what brokers share behind the interfaces
of state.py (local.py for one broker with SQLite, cluster.py for several on NATS JetStream).
Every pass of the loop drains the ready requests, makes the events they produced durable,
then publishes them (one frame per room) and sends the replies.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Final

import zmq
import zmq.auth

from zmqchat import protocol as m
from zmqchat._blobs import DiskBlobs
from zmqchat._config import Config
from zmqchat._core.core import Core
from zmqchat._core.files import HELD_PER_CONNECTION
from zmqchat._core.files_state import FileIndex
from zmqchat._core.session import Room
from zmqchat._core.stats import Stats
from zmqchat._local.accounts import LocalAccounts
from zmqchat._local.files import LocalFiles
from zmqchat._local.state import LocalLog, LocalPresence, LocalRegistry
from zmqchat._local.store import Store, StoreError
from zmqchat.broker._keys import AllowedKeys, RefusalLog
from zmqchat.broker._outflow import LENT, Outflow

if TYPE_CHECKING:  # imported at run time only with CURVE (see _secure)
    from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("zmqchat.broker")

__all__ = ["Broker"]

DRAIN: Final = 1000  # requests handled per pass before committing: bounds latency
FLUSH_EVENTS: Final = 128  # pending events that make a pass flush early: a pipeline
UNSTORED_EVERY: Final = 10.0  # seconds between errors while the history log cannot be written
LISTEN_BACKLOG: Final = 4096  # connections waiting to be accepted (the kernel caps it)
# Plain ints: pyzmq's flag enums cost microseconds per use, and the loop sends every event.
_NOBLOCK: Final = int(zmq.NOBLOCK)
_MORE: Final = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)
_RCVMORE: Final = int(zmq.RCVMORE)
_AUTH: Final = [b"AUTH"]  # a login: the core is told the client's address (accounts)
# pyzmq's Cython methods, called unbound: they skip its Python layer (a third of a send's
# cost, two fifths of a receive's), which the loop pays several times per request.
_send: Final = zmq.backend.Socket.send
_recv: Final = zmq.backend.Socket.recv
_get: Final = zmq.backend.Socket.get

BANNER: Final = r"""
  ____ _           _     __  __  ___
 / ___| |__   __ _| |_  |  \/  |/ _ \     ZeroMQ chat
| |   | '_ \ / _` | __| | |\/| | | | |    rooms: {rooms}
| |___| | | | (_| | |_  | |  | | |_| |
 \____|_| |_|\__,_|\__| |_|  |_|\__\_\
"""


class Broker:
    """The sockets and the loop around one Core."""

    frame: Any = None  # a frame of the request in hand, a zmq.Frame with its metadata
    frame_of = b""  # the routing id of that request

    def __init__(self, cfg: Config, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.stopping = False
        self.failure = ""  # why it stopped, if not asked to (the exit status is then 1)
        self.unstored_since = self.unstored_told = 0.0  # the log cannot be written (_flush)
        self.auth: ThreadAuthenticator | None = None
        self.allowed = AllowedKeys(cfg.allow_keys) if cfg.allow_keys is not None else None
        self.curve = cfg.curve_key is not None
        self.store: Store | None = None
        self.blobs: DiskBlobs | None = None
        self.cluster: Any = None
        self.metrics: Any = None
        try:
            if cfg.motd:  # read first: an unreadable file is a start error before any work
                self._load_motd()
            self._bind()  # a port in use stops the start before a database is made
        except BaseException:
            self._close_sockets()
            self._close_state()
            raise
        try:
            self._open_state()
            self.name = cfg.name or default_name(self.port)
            if self.cluster is not None:
                self.cluster.start(self.name)  # the rooms are known from here on
            self.motd = self._load_motd()
            self.core = Core(
                cfg.rules(),
                self.log,
                self.registry,
                self.presence,
                name=self.name,
                pub_port=self.pub_port,
                motd=self.motd,
                accounts=self.accounts,
            )
            self._attach_files()
            self.outflow = self.core.backlog = Outflow()
            if self.cluster is not None:
                self.cluster.attach(self.core)
            if cfg.metrics_port is not None:
                from zmqchat._ops import metrics

                self.metrics = metrics.serve(self, cfg.host, cfg.metrics_port)
        except BaseException:
            self._close_sockets()
            self._close_state()  # the history writer, the database lock, NATS go with it
            raise

    def _open_state(self) -> None:
        """What this broker shares with others: SQLite alone, or a NATS cluster."""
        cfg = self.cfg
        if cfg.cluster_urls:
            from zmqchat._cluster.state import Cluster  # NATS is imported only in cluster mode

            self.cluster = Cluster(cfg)
            self.log, self.registry, self.presence = (
                self.cluster.log,
                self.cluster.registry,
                self.cluster.presence,
            )
            self.accounts: Any = self.cluster.accounts
        else:
            self.store = Store(cfg.db, fsync=cfg.fsync)
            self.log = LocalLog(self.store)
            self.registry = LocalRegistry(self.store, cfg.rooms, cfg.operators, cfg.allow_new_rooms)
            self.presence = LocalPresence()
            self.accounts = LocalAccounts(self.store)

    def _close_sockets(self) -> None:
        for sock in (getattr(self, "router", None), getattr(self, "xpub", None)):
            if sock is not None:
                sock.close()

    def _attach_files(self) -> None:
        """Files (issue 24): contents on disk (a cluster's cache of its Object Store)."""
        folder = self.cfg.files_folder()
        index: FileIndex
        if self.cluster is not None:
            from zmqchat._cluster.files import cluster_files

            index, self.blobs = cluster_files(self.cluster, folder)
        else:
            assert self.store is not None
            index, self.blobs = LocalFiles(self.store), DiskBlobs(folder)
        self.core.attach_files(index, self.blobs, self.cfg.files)

    @property
    def rooms(self) -> dict[str, Room]:
        return self.core.rooms

    # ------------------------------------------------------------------ metrics.Source
    def mode(self) -> str:
        return "cluster" if self.cluster is not None else "single"

    def counters(self) -> Stats:
        return self.core.stats

    def connected(self) -> int:
        return len(self.core.by_rid)

    def room_members(self) -> dict[str, int]:
        return {name: len(room.members) for name, room in list(self.core.rooms.items())}

    def history_lag(self) -> int | None:
        return self.log.lag() if isinstance(self.log, LocalLog) else None

    def commands_pending(self) -> int | None:
        return self.cluster.commands_pending() if self.cluster is not None else None

    # ------------------------------------------------------------------ sockets
    def _bind(self) -> None:
        self.router = self.ctx.socket(zmq.ROUTER)
        self.xpub = self.ctx.socket(zmq.XPUB)
        for s in (self.router, self.xpub):
            s.linger = 0
            s.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)  # ZeroMQ's 100 drops a join storm
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, m.MAX_FRAME)
        # Requests read ahead of the loop, per connection: past this the client's sends wait
        # (TCP pushes back), so a flood of 1 MiB PUTs holds at most 1 GB while the loop is busy.
        self.router.setsockopt(zmq.RCVHWM, 1000)
        # Replies a client has not read: past this many ZeroMQ drops them (the client asks
        # again). Long ones are also counted in bytes (_outflow.py); this bounds the rest.
        self.router.setsockopt(zmq.SNDHWM, 1000)
        self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.xpub.setsockopt(zmq.MAXMSGSIZE, 512)  # subscriptions are tiny; floods stay small
        self.xpub.setsockopt(zmq.SNDHWM, 2000)
        if self.cfg.curve_key is not None:
            self._secure(self.cfg.curve_key)
        try:
            self.port = self._bind_one(self.router, self.cfg.port)
            self.pub_port = self._bind_one(self.xpub, self.cfg.pub_port)
        except zmq.ZMQError:
            self.router.close()
            self.xpub.close()
            raise

    def _secure(self, key_file: str) -> None:
        """CURVE on both sockets, failing closed: no ZAP handler, no connection."""
        public, secret = zmq.auth.load_certificate(key_file)
        if not secret:
            raise OSError(f"{key_file} holds no secret key")
        # Imported only here: asyncio and ssl come with it, 8 MB a plain broker never uses.
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(self.ctx, log=RefusalLog())
        self.auth.start()
        if self.allowed is None:
            self.auth.configure_curve(domain="chat", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            self.auth.certs["chat"] = {}  # nobody, until the folder is read
            self._reload_keys()
        for sock in (self.router, self.xpub):
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_server = True
            sock.zap_domain = b"chat"
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def _reload_keys(self) -> None:
        """A key added to --allow-keys, or removed, counts from the next connection: the
        folder is looked at every half heartbeat (a connection already in keeps going)."""
        if self.auth is None or self.allowed is None:
            return
        keys = self.allowed.changed()
        if keys is None:
            return
        self.auth.certs["chat"] = keys  # (the authenticator's thread reads it per handshake)
        log.info("--allow-keys: %d client keys may connect (%s)", len(keys), self.allowed.folder)

    def _bind_one(self, sock: zmq.Socket, port: int) -> int:
        if port == 0:
            return sock.bind_to_random_port(f"tcp://{self.cfg.host}")
        sock.bind(f"tcp://{self.cfg.host}:{port}")
        return port

    def _load_motd(self) -> str:
        if self.cfg.motd:
            with open(self.cfg.motd, encoding="utf-8") as f:
                return f.read()
        return BANNER.format(rooms=", ".join(self.registry.room_names()))

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Serve until stop(); then tell every client and close."""
        self.core.peer = self._peer
        self.next_sweep = time.monotonic() + self.cfg.heartbeat / 2
        self.last_turn, self.sweep_from = time.monotonic(), 0.0
        try:
            if self.cluster is None:
                self._serve()
            else:
                self.cluster.run(self._serve_cluster())
        finally:
            self._shutdown()

    def _pass(self, subscriptions: bool, requests: bool) -> None:
        """One turn of the loop: read what is there, carry out its effects."""
        now = time.monotonic()
        gap, self.last_turn = now - self.last_turn, now
        if gap > self.cfg.heartbeat:
            self._woke(gap)
        self.outflow.prune()  # first: the GETs about to be read are weighed against it
        if subscriptions:
            self._drain_subscriptions()
        if requests:
            self._drain_requests()
        if self.cluster is not None:
            self.cluster.drain()
        if self.blobs is not None:
            self.blobs.drain()
        self._flush()
        now = time.monotonic()
        if now - self.last_turn > self.cfg.heartbeat:  # stopped during this very pass
            self._woke(now - self.last_turn)
            self.last_turn = now
        if now >= self.next_sweep:
            if now >= self.sweep_from:
                self.core.sweep()
            if self.cluster is not None:
                self.cluster.tick()
                if self.cluster.liveness.replaced:  # another broker of our name took over
                    self.failure = f"broker {self.name} was started again elsewhere"
                    self.stop()
            self._reload_keys()
            self._flush()
            self.next_sweep = time.monotonic() + self.cfg.heartbeat / 2

    def _woke(self, gap: float) -> None:
        """The loop did not run for `gap` seconds (the process was stopped, or starved of
        CPU): our clients' silence meanwhile is ours, not theirs. No session is dropped
        for missed heartbeats until they have had three more to be heard (a client that
        moved to another broker meanwhile ends quietly when the registry says so)."""
        log.warning(
            "the broker did not run for %.1f s (stopped, or starved of CPU): its clients "
            "get %g s to be heard before any is dropped",
            gap,
            3 * self.cfg.heartbeat,
        )
        self.sweep_from = time.monotonic() + 3 * self.cfg.heartbeat
        if self.cluster is not None:
            self.cluster.woke(gap)

    def _serve(self) -> None:
        """One broker: the sockets' poller is the loop."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        if self.blobs is not None:
            poller.register(self.blobs.fd, zmq.POLLIN)  # disk work done: drained each pass
        while not self.stopping:
            ready = dict(poller.poll(100))
            self._pass(self.xpub in ready, self.router in ready)

    async def _serve_cluster(self) -> None:
        """Cluster mode: the same turns, on the asyncio loop that the NATS bridge runs on
        (in this thread: a message crosses no thread on its way). The sockets' descriptors
        only say that something may have come: their EVENTS say what is there."""
        cluster, router, xpub = self.cluster, self.router, self.xpub
        loop = asyncio.get_running_loop()
        fds = [int(_get(sock, zmq.FD)) for sock in (router, xpub)]
        if self.blobs is not None:
            fds.append(self.blobs.fd)
        for fd in fds:
            loop.add_reader(fd, cluster.wake)
        try:
            while not self.stopping:
                # after every pass: its sends may have used up a descriptor's signal
                subs = bool(int(_get(xpub, _EVENTS)) & _POLLIN)
                reqs = bool(int(_get(router, _EVENTS)) & _POLLIN)
                if not (subs or reqs or cluster.inbox):
                    await cluster.wait(0.1)
                    subs = bool(int(_get(xpub, _EVENTS)) & _POLLIN)
                    reqs = bool(int(_get(router, _EVENTS)) & _POLLIN)
                self._pass(subs, reqs)  # idle too: a sweep may be due
                await asyncio.sleep(0)  # the bridge's turn: it publishes what we queued
        finally:
            for fd in fds:
                loop.remove_reader(fd)

    def stop(self) -> None:
        self.stopping = True

    def _drain_requests(self) -> None:
        router, request, log_ = self.router, self.core.request, self.log
        # Logging malformed requests with their sender's address needs the routing id as a
        # Frame (half a microsecond more per request): only when INFO is logged.
        peers = log.isEnabledFor(logging.INFO)
        for _ in range(DRAIN):
            if not int(_get(router, _EVENTS)) & _POLLIN:  # cheaper than a recv that raises Again
                return
            if self.curve:
                parts = router.recv_multipart(_NOBLOCK, copy=False)
                key = parts[-1].get("User-Id")
                frames = [p.bytes for p in parts[:4]] + [p.buffer for p in parts[4:]]
                self.frame, self.frame_of = parts[0], frames[0]
                if not key:  # fail closed: nothing without an authenticated identity
                    continue
            else:
                if peers:
                    frame: Any = _recv(router, _NOBLOCK, False)
                    frames, key, self.frame = [frame.bytes], "", frame
                else:
                    frames, key, self.frame = [_recv(router, _NOBLOCK)], "", None
                while _get(router, _RCVMORE):
                    if frames[1:] == _AUTH:  # a login: its address counts (failed logins)
                        self.frame = _recv(router, _NOBLOCK, False)
                        frames.append(self.frame.bytes)
                    elif len(frames) < 4:
                        frames.append(_recv(router, _NOBLOCK))
                    else:  # a fifth frame is a PUT's chunk: a view of ZeroMQ's own buffer
                        frames.append(memoryview(_recv(router, _NOBLOCK, False)))
                self.frame_of = frames[0]
            try:
                request(frames[0], frames[1:], key)
            except Exception:  # a bug must not take the broker down for everyone
                log.exception("error handling %r", frames[:2])
            if getattr(log_, "backlog", 0) >= FLUSH_EVENTS:
                self._flush()  # publish now: receivers start on these while we read on

    def _peer(self, rid: bytes) -> str:
        """The address of the client that sent the request in hand ("" if unknown)."""
        frame = self.frame
        if frame is None or self.frame_of != rid:
            return ""
        try:
            return str(frame.get("Peer-Address"))
        except zmq.ZMQError:  # a transport that gives none
            return ""

    def _drain_subscriptions(self) -> None:
        xpub, approve = self.xpub, self.core.subscription
        for _ in range(DRAIN):
            try:
                frame = xpub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = frame.bytes
            if msg[:1] != b"\x01":
                continue
            # Approve now: XPUB_MANUAL applies it to the pipe just read.
            old, topic = approve(msg[1:], frame.get("User-Id") if self.curve else "")
            if old is not None:
                xpub.setsockopt(zmq.UNSUBSCRIBE, old)
            if topic is not None:
                xpub.setsockopt(zmq.SUBSCRIBE, topic)

    def _flush(self) -> None:
        """Durable, then published, then replied: nothing is acknowledged before it is
        stored, and the events of a pass reach subscribers before the replies."""
        core = self.core
        try:
            deliveries = self.log.follow()
        except StoreError as exc:  # a full disk, say: nothing goes out until it is stored
            self._unstored(exc)
            return
        if self.unstored_since:
            log.warning("the history log is written again: %s", self.cfg.db)
            self.unstored_since = 0.0
        for delivery in deliveries:
            core.deliver(delivery)
        if core.pubs:
            xpub = self.xpub
            for topic, batch in core.pubs:
                _send(xpub, topic, _MORE)
                _send(xpub, batch, _NOBLOCK)
            core.pubs.clear()
        if core.outbox:
            self._send_replies(core.outbox)
            core.outbox.clear()
        if core.ack_starts:
            now, acknowledged = time.perf_counter(), core.stats.acknowledged
            for started in core.ack_starts:
                acknowledged(now - started)
            core.ack_starts.clear()

    def _unstored(self, exc: StoreError) -> None:
        """The log cannot be written: this pass's events, publications and replies (its
        acknowledgements) wait, kept in order, and every pass tries again; said at once,
        then every UNSTORED_EVERY seconds."""
        now = time.monotonic()
        if not self.unstored_since or now - self.unstored_told >= UNSTORED_EVERY:
            log.error(
                "%s; nothing is stored, published or acknowledged until it can be (%d "
                "replies wait): free some space, or see to the disk",
                exc,
                len(self.core.outbox),
            )
            self.unstored_told = now
        self.unstored_since = self.unstored_since or now

    def _send_replies(self, outbox: list[list[bytes]]) -> None:
        """Frames of LENT bytes or more (a GET's chunk, a long reply) are lent to ZeroMQ,
        not copied, and counted until it lets go of them (see _outflow.py)."""
        router, outflow = self.router, self.outflow
        for frames in outbox:
            rid, last = frames[0], frames[-1]
            chunk = len(frames) == 5  # a GET's: its bytes after the body, counted when queued
            lent = chunk or len(last) >= LENT
            if lent and not chunk and outflow.held(rid) >= HELD_PER_CONNECTION:
                # a long reply to a client that reads none: dropped, as at the high-water
                # mark (one past the bound goes: a client busy with downloads gets its HISTORY)
                log.debug("reply to %s dropped: %d bytes wait for it", rid.hex(), outflow.held(rid))
                continue
            try:  # the first frame decides: ROUTER_MANDATORY refuses a peer that is gone
                _send(router, rid, _MORE)
            except zmq.ZMQError as exc:  # peer gone or its queue full: it will retry
                log.debug("reply to %s dropped: %s", rid.hex(), exc)
                if chunk:
                    outflow.unqueue(rid, len(last))
                continue
            _send(router, frames[1], _MORE)
            _send(router, frames[2], _MORE)
            if chunk:
                _send(router, frames[3], _MORE)
            if lent:
                outflow.lend(rid, _lend(router, last), len(last), chunk)
            else:
                _send(router, last, _NOBLOCK)

    def _shutdown(self) -> None:
        self.core.shutdown()
        try:
            self._flush()
        finally:
            self.router.linger = 500
            self.router.close()
            self.xpub.close()
            self._close_state()

    def _close_state(self) -> None:
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics.server_close()
        if self.blobs is not None:
            self.blobs.close()
        if self.store is not None:
            self.store.close()
        if self.cluster is not None:
            self.cluster.close()
        if self.auth is not None:
            self.auth.stop()


def _lend(sock: zmq.Socket, data: bytes) -> zmq.MessageTracker:
    """Send the last frame of a message without copying it (even under pyzmq's copy
    threshold); its tracker is done once ZeroMQ has let go of the bytes. The Frame holds
    them too, so it must not outlive this call."""
    frame = zmq.Frame(data, copy=False, track=True)
    _send(sock, frame, _NOBLOCK)
    return frame.tracker


def default_name(port: int) -> str:
    """A name unique among brokers and readable in logs: this host and the command port."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host or 'broker'}-{port}"
