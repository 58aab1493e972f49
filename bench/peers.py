"""Benchmark participants: one class per system under test, all driven by one poll loop.

A peer connects, joins one room, sends texts when told to, and hands every event it hears to
its Tally, which decodes it and checks its sequence number. The four systems carry the same
event (room, seq, id, ts, nick, kind, text, cmid) so that receivers do the same work for each:

    broker     the project's protocol (messages.py): HELLO, JOIN, a grant on an XSUB, LIVE,
               SAY batches on a DEALER; the broker numbers events per room
    forwarder  bench/raw_forwarder.py: [topic, event batch] in on a DEALER, out on a SUB; the
               sender numbers its own events (the forwarder adds nothing)
    thread     bench/thread_server.py: "JOIN room" then one JSON event per line over TCP; the
               sender numbers its own events
    nats       a nats-server (core pub/sub, no JetStream), spoken to in the NATS client protocol
               over a plain TCP socket: CONNECT, SUB to the room's subject, one PUB per event;
               the sender numbers its own events

Message texts are 100 characters and carry their send time (time.monotonic_ns(), a clock
every process on the machine shares), so any receiver can compute the end-to-end latency.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zmqchat import protocol as m  # noqa: E402  (the project's own protocol module)

TEXT_SIZE: Final = 100  # bytes of message text, as the issue asks
SEND_BATCH: Final = m.MAX_BATCH  # messages a sender writes per request (SAY) or per wake-up
PAD: Final = "x" * TEXT_SIZE
PROBE: Final = "probe"  # texts starting with "p" are probes, not counted as data
FORWARDER_PING: Final = b"\x00ping"  # a topic nobody subscribes to: the forwarder drops it

Handler = Callable[[int], None]


def data_text(t_ns: int, i: int) -> str:
    """A 100-character text: send time (ns, fixed width), message number, padding."""
    head = f"{t_ns:019d} {i:09d} "
    return head + PAD[len(head) :]


def probe_text(nick: str) -> str:
    return f"{PROBE} {nick} ".ljust(TEXT_SIZE, "x")


# ---------------------------------------------------------------------------- the loop


class Loop:
    """An epoll loop over zmq sockets and plain descriptors (stdin, TCP sockets).

    zmq_poll costs time in proportion to the sockets it watches (0.14 ms for 200 on the
    benchmark machine), which a process with hundreds of peers pays on every wake-up, so the
    loop uses epoll on each zmq socket's ZMQ_FD instead. That descriptor only means "look
    again": a zmq handler drains its socket while `readable(sock)`, and a socket sent on
    outside its own handler is looked at again (the send may have taken the signal).
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.again: set[int] = set()  # zmq sockets to look at whatever epoll says

    def register(self, sock: Any, handler: Handler) -> int:
        """Call handler(epoll flags) when sock may be readable; returns its descriptor."""
        if isinstance(sock, zmq.Socket):
            fd = sock.get(zmq.FD)
            self.again.add(fd)  # it may hold messages already
        else:
            fd = sock if isinstance(sock, int) else sock.fileno()
        self.epoll.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler
        return fd

    def want_write(self, fd: int, on: bool) -> None:
        self.epoll.modify(fd, select.EPOLLIN | (select.EPOLLOUT if on else 0))

    def unregister(self, fd: int) -> None:
        self.epoll.unregister(fd)
        self.handlers.pop(fd, None)

    def poll(self, timeout: float | None, *, precise: bool = False) -> None:
        """Run what is ready, waiting at most `timeout` seconds (None: until something is).

        epoll counts whole milliseconds; `precise` (a paced sender) sleeps for a fraction.
        """
        if self.again:
            timeout = 0.0
        if precise and timeout is not None and 0 < timeout < 0.001:
            events = self.epoll.poll(0)
            if not events:
                time.sleep(timeout)
        else:
            events = self.epoll.poll(-1 if timeout is None else timeout)
        todo, self.again = self.again, set()
        for fd, flags in events:
            todo.discard(fd)
            handler = self.handlers.get(fd)
            if handler is not None:
                handler(flags)
        for fd in todo:
            handler = self.handlers.get(fd)
            if handler is not None:
                handler(select.EPOLLIN)


_EVENTS: Final = int(zmq.EVENTS)  # plain ints: pyzmq's enums cost microseconds per use
_POLLIN: Final = int(zmq.POLLIN)


_NOBLOCK: Final = int(zmq.NOBLOCK)


def readable(sock: zmq.Socket) -> bool:
    """Whether a message is waiting (cheaper than a NOBLOCK recv that raises zmq.Again)."""
    return sock.get(_EVENTS) & _POLLIN != 0


def publications(sock: zmq.Socket) -> Iterator[list[bytes]]:
    """Every [topic, batch] waiting on a subscriber, until zmq.Again: one exception per
    wake-up costs less than asking ZMQ_EVENTS before each message, and two recv() calls
    less than recv_multipart (a publication is always two frames)."""
    recv = sock.recv
    try:
        while True:
            topic = recv(_NOBLOCK)
            yield [topic, recv()]
    except zmq.Again:
        return


# ---------------------------------------------------------------------------- receiving


class Tally:
    """What one receiver heard: data messages in order, sequence gaps, repeats, latencies.

    Streams are numbered independently: per room on the broker (the broker numbers them), per
    sender on the baselines (each sender numbers its own). A stream's first event sets where it
    starts, unless start() said so first (the broker's LIVE).
    """

    __slots__ = (
        "nick",
        "stream_key",
        "last",
        "total",
        "count",
        "gaps",
        "dups",
        "lat",
        "last_ns",
        "synced",
        "own_ns",
    )

    def __init__(self, nick: str, stream_key: str, latency: bool) -> None:
        self.nick = nick
        self.stream_key = stream_key  # "room" or "nick": which field names the stream
        self.last: dict[str, int] = {}
        self.total = 0  # data messages since the start (the sender's window counts these)
        self.count = 0  # data messages since the last mark()
        self.gaps = 0  # events missing in a stream
        self.dups = 0  # events heard twice (or out of order)
        self.lat: list[int] | None = [] if latency else None
        self.last_ns = 0  # when the last data message arrived
        self.synced = False  # heard a probe: the path from the senders is open
        self.own_ns = 0  # when it first heard its own probe: joined, as the room sees it

    def start(self, stream: str, seq: int) -> None:
        self.last[stream] = seq

    def mark(self) -> None:
        self.count = self.gaps = self.dups = 0
        if self.lat is not None:
            self.lat = []

    def ingest(self, events: list[dict[str, Any]], now_ns: int) -> None:
        """Check and count decoded events (the hot path of every receiver)."""
        last, key, lat = self.last, self.stream_key, self.lat
        data = 0
        for ev in events:
            stream, seq = ev[key], ev["seq"]
            prev = last.get(stream)
            if prev is None:
                prev = seq - 1
            if seq != prev + 1:
                if seq <= prev:
                    self.dups += 1
                    continue
                self.gaps += seq - prev - 1
            last[stream] = seq
            if ev["kind"] != "msg":
                continue  # joins and other notices: numbered, so checked, but not data
            text = ev["text"]
            if text[0] == "p":
                self.synced = True
                if ev["nick"] == self.nick and not self.own_ns:
                    self.own_ns = now_ns
                continue
            data += 1
            if lat is not None:
                lat.append(now_ns - int(text[:19]))
        if data:
            self.total += data
            self.count += data
            self.last_ns = now_ns


# ---------------------------------------------------------------------------- peers


class Peer:
    """One participant of one system; `ready` once it has joined (and is subscribing).

    listen=False: a sender that does not subscribe (the thread server's echoes are read and
    thrown away, since its protocol sends every line to the sender too).
    """

    stream_key = "nick"
    heartbeat = 0.0  # seconds between keep-alives; 0: the system has none
    max_batch = SEND_BATCH  # messages per request (the broker's welcome may say fewer)

    def __init__(
        self, loop: Loop, nick: str, room: str, *, listen: bool = True, latency: bool = False
    ) -> None:
        self.loop, self.nick, self.room, self.listen = loop, nick, room, listen
        self.tally = Tally(nick, self.stream_key, latency)
        self.ready = False
        self.failed = False  # could not join: the run cannot go on
        self.errors = 0
        self.times: dict[str, int] = {}  # "start", "welcomed", "joined", "live" -> ns
        self.seq = 0  # own numbering (baselines) / cmid counter
        self.next_ping = 0.0  # monotonic seconds; 0: not scheduled yet

    @property
    def can_ping(self) -> bool:
        return bool(self.heartbeat) and "start" in self.times

    def start(self) -> None:
        self.times["start"] = time.monotonic_ns()

    def say(self, texts: list[str]) -> None:
        raise NotImplementedError

    def ping(self) -> None:
        """Keep-alive as the system defines it (nothing, for the thread server)."""

    def unacknowledged(self) -> int:
        """Requests sent that the server has not acknowledged (only the broker acknowledges)."""
        return 0

    def drain(self) -> None:
        """Handle whatever is waiting in the sockets now, without waiting for the loop."""

    def announce(self) -> None:
        """W4 on a baseline: a message that comes back once this peer is in (own_ns is set)."""
        self.say([probe_text(self.nick)])

    def _event(self, text: str) -> bytes:
        """The same event the broker would publish, numbered by this sender."""
        self.seq += 1
        return m.dumps(
            {
                "room": self.room,
                "seq": self.seq,
                "id": f"{self.room}:{self.seq}",
                "ts": time.time(),
                "nick": self.nick,
                "kind": "msg",
                "text": text,
                "cmid": f"{self.nick}.{self.seq}",
            }
        )


class BrokerPeer(Peer):
    """A lean client of the real broker: the protocol's own messages, no asyncio, no repair."""

    stream_key = "room"

    def __init__(
        self, loop: Loop, ctx: zmq.Context, host: str, port: int, nick: str, room: str, **kw: Any
    ) -> None:
        super().__init__(loop, nick, room, **kw)
        self.host = host
        self.heartbeat = 2.0  # until the welcome says
        self.live = False
        self.early: list[dict[str, Any]] = []  # events heard before LIVE said where to start
        self.said: deque[tuple[int, int]] = deque()  # each SAY under way: its first, last id
        self.stored: list[list[int]] = []  # ids the broker acknowledged, as [first, last]
        self.ctx, self.port = ctx, port  # start() connects: W4's storm times that too

    @property
    def can_ping(self) -> bool:
        return "welcomed" in self.times

    def start(self) -> None:
        super().start()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.connect(f"tcp://{self.host}:{self.port}")
        self.dealer_fd = self.loop.register(self.dealer, self._on_dealer)
        self.sub = self.ctx.socket(zmq.XSUB)
        self.sub.linger = 0
        self.sub.setsockopt(zmq.RCVHWM, 10000)  # as client.py does
        self.sub_fd = self.loop.register(self.sub, self._on_sub)
        self._request(
            m.Kind.HELLO,
            b"hello",
            {
                "version": m.VERSION,
                "nick": self.nick,
                "bot": True,
                "resume": False,
                "token": secrets.token_hex(8),
            },
        )

    def _request(self, kind: m.Kind, label: bytes, body: dict[str, Any]) -> None:
        self.dealer.send_multipart(m.encode_request(kind, label, body))
        self.loop.again.add(self.dealer_fd)

    def _subscribe(self, grant: str) -> None:
        self.sub.send(b"\x01" + grant.encode("ascii"))
        self.loop.again.add(self.sub_fd)

    def say(self, texts: list[str]) -> None:
        for i in range(0, len(texts), self.max_batch):
            msgs, first = [], self.seq + 1
            for text in texts[i : i + self.max_batch]:
                self.seq += 1
                msgs.append({"id": f"{self.nick}.{self.seq}", "text": text})
            self._request(m.Kind.SAY, b"say", {"room": self.room, "msgs": msgs})
            self.said.append((first, self.seq))

    def _stored(self) -> None:
        """The oldest SAY under way was acknowledged (replies come in the order sent)."""
        first, last = self.said.popleft()
        if self.stored and self.stored[-1][1] + 1 == first:
            self.stored[-1][1] = last
        else:
            self.stored.append([first, last])

    def acknowledged(self) -> int:
        """Messages the broker has acknowledged so far."""
        return sum(last - first + 1 for first, last in self.stored)

    def unacknowledged(self) -> int:
        return len(self.said)

    def drain(self) -> None:
        self._on_dealer(0)
        if self.listen:
            self._on_sub(0)

    def ping(self) -> None:
        self._request(m.Kind.PING, b"ping", {})

    def _on_dealer(self, flags: int) -> None:
        while readable(self.dealer):
            try:
                kind, label, body = self.dealer.recv_multipart()
            except ValueError:  # not three frames
                self.errors += 1
                continue
            if kind == b"OK":
                if label == b"hello":
                    self._welcomed(json.loads(body))
                elif label == b"join":
                    self.times["joined"] = time.monotonic_ns()
                    if self.listen:
                        self._subscribe(json.loads(body)["grant"])
                    self.ready = True
                elif label == b"say":  # stored and published: no need to decode the acks
                    self._stored()
                continue
            if kind == b"LIVE":
                self._on_live(m.decode_response([kind, label, body]).body)
            elif kind == b"GRANT":  # the room was re-keyed (someone left): resubscribe
                self._subscribe(json.loads(body)["grant"])
            elif kind == b"ERROR":
                self.errors += 1
                print(f"{self.nick}: {label.decode()} -> {body.decode()}", file=sys.stderr)
                if label in (b"hello", b"join"):
                    self.failed = True
                elif label == b"say":  # answered, if not stored: counted as an error
                    self.said.popleft()

    def _welcomed(self, welcome: dict[str, Any]) -> None:
        self.times["welcomed"] = time.monotonic_ns()
        self.heartbeat = float(welcome["heartbeat"])
        self.max_batch = min(SEND_BATCH, int(welcome.get("max_batch", SEND_BATCH)))
        if self.listen:
            self.sub.connect(f"tcp://{self.host}:{welcome['pub_port']}")
        self._request(m.Kind.JOIN, b"join", {"room": self.room})

    def _on_live(self, body: dict[str, Any]) -> None:
        if self.live or body.get("room") != self.room:
            return  # a re-key after someone left: numbering goes on
        self.live = True
        self.times["live"] = time.monotonic_ns()
        self.tally.start(self.room, int(body["seq"]))
        if self.early:
            events, self.early = self.early, []
            self.tally.ingest([e for e in events if e["seq"] > body["seq"]], time.monotonic_ns())

    def _on_sub(self, flags: int) -> None:
        sub, tally = self.sub, self.tally
        for frames in publications(sub):
            events = m.decode_batch(frames)
            if self.live:
                tally.ingest(events, time.monotonic_ns())
            else:
                self.early.extend(events)


class ForwarderPeer(Peer):
    """A client of bench/raw_forwarder.py: DEALER in, SUB out on the room's plain topic."""

    def __init__(
        self,
        loop: Loop,
        ctx: zmq.Context,
        host: str,
        port: int,
        pub_port: int,
        nick: str,
        room: str,
        acked: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(loop, nick, room, **kw)
        self.heartbeat = 2.0  # as the broker's default: a message to a topic nobody hears
        self.acked = acked
        self.topic = m.room_topic(room, "0")
        self.own_topic = b"\x00me\x00" + nick.encode()  # for announce(): heard by us alone
        self.ctx, self.host, self.port, self.pub_port = ctx, host, port, pub_port

    def start(self) -> None:
        """Connect (W4's storm times this too) and subscribe."""
        super().start()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.connect(f"tcp://{self.host}:{self.port}")
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.linger = 0
        if self.listen:
            self.sub.setsockopt(zmq.SUBSCRIBE, self.topic)
            self.sub.setsockopt(zmq.SUBSCRIBE, self.own_topic)
            self.sub.connect(f"tcp://{self.host}:{self.pub_port}")
            self.loop.register(self.sub, self._on_sub)
        if self.acked:  # fwd+ack: read each acknowledgement, as a broker client does
            self.loop.register(self.dealer, self._on_dealer)
        self.ready = True  # the subscription takes effect some time later: probes show when

    def say(self, texts: list[str]) -> None:
        send, topic = self.dealer.send_multipart, self.topic
        for text in texts:
            send([topic, b"[" + self._event(text) + b"]"])

    def ping(self) -> None:
        self._try_send([FORWARDER_PING, b""])

    def announce(self) -> None:
        """To our own topic: when it comes back, our SUB's subscriptions are in effect."""
        self._try_send([self.own_topic, b"[]"])

    def _on_dealer(self, flags: int) -> None:
        """fwd+ack: the forwarder's acknowledgements, read and decoded (and dropped)."""
        dealer = self.dealer
        while readable(dealer):
            m.decode_response(dealer.recv_multipart())

    def _try_send(self, frames: list[bytes]) -> None:
        """A DEALER blocks until it is connected: never wait for that, just try again later."""
        try:
            self.dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _on_sub(self, flags: int) -> None:
        sub, tally = self.sub, self.tally
        for frames in publications(sub):
            if frames[0] == self.own_topic:
                tally.own_ns = tally.own_ns or time.monotonic_ns()
                continue
            tally.ingest(m.decode_batch(frames), time.monotonic_ns())


class StreamPeer(Peer):
    """A peer on one plain TCP connection (the thread server's, NATS's).

    The socket is non-blocking and written only when the poller says it can be, so a peer
    never blocks the server (or itself) while it has something to read.
    """

    def __init__(self, loop: Loop, host: str, port: int, nick: str, room: str, **kw: Any) -> None:
        super().__init__(loop, nick, room, **kw)
        self.addr = (host, port)
        self.sock: socket.socket | None = None
        self.fd = -1
        self.out = bytearray()
        self.partial = b""
        self.writing = False

    def start(self) -> None:
        """Connect (W4's storm times this too) and send what the protocol opens with."""
        super().start()
        self.sock = socket.create_connection(self.addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.fd = self.loop.register(self.sock, self._on_io)
        self._send(self._opening())
        self.ready = True

    def _opening(self) -> bytes:
        raise NotImplementedError

    def _received(self, data: bytes) -> None:
        """Bytes read from the connection (any amount, cut anywhere)."""
        raise NotImplementedError

    def _send(self, data: bytes) -> None:
        self.out += data
        self._flush()

    def _flush(self) -> None:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            sent = 0
        del self.out[:sent]
        want = bool(self.out)
        if want != self.writing:
            self.writing = want
            self.loop.want_write(self.fd, want)

    def _on_io(self, flags: int) -> None:
        if flags & select.EPOLLOUT:
            self._flush()
        if not flags & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        if not data:
            self.errors += 1
            self.loop.unregister(self.fd)
            return
        self._received(data)


class ThreadPeer(StreamPeer):
    """A client of bench/thread_server.py: "JOIN room", then JSON lines both ways."""

    def _opening(self) -> bytes:
        return f"JOIN {self.room}\n".encode()

    def say(self, texts: list[str]) -> None:
        out = bytearray()
        for text in texts:
            out += self._event(text)
            out += b"\n"
        self._send(out)

    def _received(self, data: bytes) -> None:
        if not self.listen:
            return  # a sender hears its own lines too; it just has to keep reading them
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        loads = json.loads
        self.tally.ingest([loads(line) for line in lines], time.monotonic_ns())


NATS_ROOM_SID: Final = b"1"  # our subscription ids: the room's subject, and our own
NATS_OWN_SID: Final = b"2"


class NatsPeer(StreamPeer):
    """A client of nats-server speaking the NATS client protocol itself (no nats-py).

    One connection; CONNECT (no +OK acknowledgements: verbose false), SUB to the room's
    subject `room.<room>` (and to `me.<nick>`, for announce()), one PUB per event, as many
    PUBs in one write as the sender has ready (what a NATS client's write buffer does).
    The server's PINGs are answered; ping() is a PING of ours every heartbeat, as the
    broker's clients PING it (NATS's own clients ping every 2 minutes). A receiver decodes
    all the events one read brought as one JSON array, with messages.decode_batch, as the
    broker's receivers decode a frame of up to 256.
    """

    def __init__(self, loop: Loop, host: str, port: int, nick: str, room: str, **kw: Any) -> None:
        super().__init__(loop, host, port, nick, room, **kw)
        self.heartbeat = 2.0
        self.subject = f"room.{room}".encode()
        self.own_subject = f"me.{nick}".encode()

    def _opening(self) -> bytes:
        options = {
            "verbose": False,
            "pedantic": False,
            "tls_required": False,
            "name": self.nick,
            "lang": "python",
            "version": "bench",
            "protocol": 1,
            "echo": True,
        }
        out = b"CONNECT " + m.dumps(options) + b"\r\n"
        if self.listen:
            out += b"SUB %s %s\r\nSUB %s %s\r\n" % (
                self.subject,
                NATS_ROOM_SID,
                self.own_subject,
                NATS_OWN_SID,
            )
        return out

    def say(self, texts: list[str]) -> None:
        subject, out = self.subject, bytearray()
        for text in texts:
            event = self._event(text)
            out += b"PUB %s %d\r\n%s\r\n" % (subject, len(event), event)
        self._send(out)

    def ping(self) -> None:
        self._send(b"PING\r\n")

    def announce(self) -> None:
        """An empty message to our own subject: it comes back once our SUBs are in effect
        (the server handles a connection's commands in order, so one is enough)."""
        self._send(b"PUB %s 0\r\n\r\n" % self.own_subject)

    def _received(self, data: bytes) -> None:
        """Parse MSG, PING, PONG, INFO, +OK and -ERR; a message cut by the read waits for
        the rest in self.partial."""
        buf = self.partial + data if self.partial else data
        pos, size = 0, len(buf)
        events: list[bytes] = []
        own = False
        while pos < size:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            if buf.startswith(b"MSG ", pos):  # MSG <subject> <sid> [reply-to] <#bytes>
                head = buf[pos + 4 : end].split(b" ")
                stop = end + 2 + int(head[-1])
                if stop + 2 > size:
                    break
                if head[1] == NATS_ROOM_SID:
                    events.append(buf[end + 2 : stop])
                else:
                    own = True
                pos = stop + 2
                continue
            line, pos = buf[pos:end], end + 2
            if line == b"PING":
                self._send(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                self.errors += 1
                print(f"{self.nick}: {line.decode(errors='replace')}", file=sys.stderr)
            # INFO, PONG and +OK need nothing
        self.partial = buf[pos:]
        now = time.monotonic_ns()
        if own and not self.tally.own_ns:
            self.tally.own_ns = now
        if events:
            batch = b"[" + b",".join(events) + b"]"
            self.tally.ingest(m.decode_batch([self.subject, batch]), now)


def make_peer(
    system: str, loop: Loop, ctx: zmq.Context, addr: dict[str, Any], nick: str, room: str, **kw: Any
) -> Peer:
    """A peer for `system`; addr holds host, port (and pub_port for the forwarder)."""
    if system == "broker":
        return BrokerPeer(loop, ctx, addr["host"], addr["port"], nick, room, **kw)
    if system in ("forwarder", "fwdack"):
        return ForwarderPeer(
            loop,
            ctx,
            addr["host"],
            addr["port"],
            addr["pub_port"],
            nick,
            room,
            acked=system == "fwdack",
            **kw,
        )
    if system == "thread":
        return ThreadPeer(loop, addr["host"], addr["port"], nick, room, **kw)
    if system == "nats":
        return NatsPeer(loop, addr["host"], addr["port"], nick, room, **kw)
    raise ValueError(f"unknown system {system!r}")


def new_context(sockets: int) -> zmq.Context:
    """A context allowed `sockets` sockets (the default of 1023 is too few for W4)."""
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, max(1024, sockets + 64))
    return ctx


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (the broker's history writer, say), from /proc."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def private_bytes(pid: int) -> int:
    """Memory only this process holds (Linux /proc: its private clean and dirty pages)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total
