"""Load processes for bench/bench.py: many peers of one system in one process, one poll loop.

    python bench/loadgen.py ROLE --system broker|forwarder|thread|nats --addr JSON [options]

Roles:
    send     one sender; binds a PULL on which receivers report progress, so that in a
             "window" run it is never more than `window` messages ahead of the slowest
             receiver (a "rate" run sends at a steady rate instead)
    recv     --count receivers in one room; report progress to the sender
    chat     --count clients spread over --rooms rooms, each sending and receiving (W3)
    idle     --count clients spread over --rooms rooms that only heartbeat (W4); with --on-go
             they connect when told, and report when all are welcomed and joined
    client   one client.Client of the project's library consuming events (broker only)

The process talks to bench.py in JSON lines: commands on stdin, one reply per command on
stdout (see each role's cmd_* methods). It exits on {"cmd": "stop"} or when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import Any, Final

import zmq
from peers import Loop, Peer, data_text, make_peer, new_context, probe_text, readable

PROBE_EVERY: Final = 0.02  # seconds between probes while waiting for receivers to sync
PROGRESS_EVERY: Final = 0.001  # seconds: how often a receiver process reports its slowest
CHECK_EVERY: Final = 0.01  # seconds: how often receivers without reports look at their state
ANNOUNCE_EVERY: Final = 0.02  # seconds between a forwarder client's "I am here" messages


def emit(**msg: Any) -> None:
    """One JSON line to bench.py."""
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def report(push: zmq.Socket, who: int, total: int) -> bool:
    """Tell the sender how many data messages our slowest receiver has; False if it could
    not be sent now (the sender is not reading yet): then it is told next time."""
    try:
        push.send(json.dumps([who, total]).encode(), zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


class Role:
    """Reads commands from stdin, runs the loop, calls tick() whenever it asks to be woken."""

    precise = False  # paced senders sleep for fractions of a millisecond

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.addr = json.loads(args.addr)
        self.loop = Loop()
        self.ctx = new_context(2 * args.count + 8)
        self.peers: list[Peer] = []
        self.done = False
        self._stdin = b""
        self.loop.register(sys.stdin.fileno(), self._on_stdin)
        self.next_ping = 0.0

    def peer(self, nick: str, room: str, **kw: Any) -> Peer:
        p = make_peer(self.args.system, self.loop, self.ctx, self.addr, nick, room, **kw)
        self.peers.append(p)
        return p

    def run(self) -> None:
        while not self.done:
            self.loop.poll(self.tick(time.monotonic()), precise=self.precise)
        self.ctx.destroy(linger=0)  # closes the peers' sockets and ours

    def tick(self, now: float) -> float | None:
        """Periodic work; returns seconds until it wants to run again (None: no need)."""
        return self.heartbeats(now)

    def heartbeats(self, now: float) -> float:
        """Ping every heartbeat interval, spread out: each peer at its own phase."""
        if now >= self.next_ping:
            for p in self.peers:
                if not p.can_ping:
                    continue
                if not p.next_ping:  # the first ping at a random phase within the interval
                    p.next_ping = now + random.uniform(0.1, 1.0) * p.heartbeat
                elif p.next_ping <= now:
                    p.ping()
                    p.next_ping = now + p.heartbeat
            self.next_ping = now + 0.1
        return max(0.0, self.next_ping - now)

    def _on_stdin(self, flags: int) -> None:
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            self.done = True
            return
        *lines, self._stdin = (self._stdin + data).split(b"\n")
        for line in lines:
            cmd = json.loads(line)
            getattr(self, "cmd_" + cmd.pop("cmd"))(**cmd)

    def cmd_stop(self) -> None:
        self.done = True

    def wait_ready(self, deadline: float = 30.0) -> None:
        """Run the loop until every peer has joined (or fail loudly)."""
        end = time.monotonic() + deadline
        while not all(p.ready for p in self.peers):
            if any(p.failed for p in self.peers):
                raise SystemExit(f"{self.args.role}: a peer could not join (see above)")
            if time.monotonic() > end:
                raise SystemExit(f"{self.args.role}: peers not ready after {deadline} s")
            self.loop.poll(self.tick(time.monotonic()) or 0.01)


class Sender(Role):
    """One sender: probes until told to run, then a timed run (window or steady rate)."""

    precise = True

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.me = self.peer(args.nick, args.room, listen=False)
        self.me.start()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.linger = 0
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.loop.register(self.pull, self._on_progress)
        self.progress: dict[int, int] = {}  # receiver process -> its slowest receiver
        self.floor = 0  # data messages the slowest receiver has
        self.sent = 0  # data messages sent, all runs together
        self.probing = 0.0
        self.plan: dict[str, Any] | None = None
        self.acked_before = 0  # messages acknowledged before this run
        self.wait_ready()
        emit(ready=True, progress=f"tcp://127.0.0.1:{port}")

    def _on_progress(self, flags: int) -> None:
        while readable(self.pull):
            who, total = json.loads(self.pull.recv())
            self.progress[who] = max(total, self.progress.get(who, 0))
        if len(self.progress) >= self.args.reporters:
            self.floor = min(self.progress.values())

    def cmd_probe(self) -> None:
        self.probing = time.monotonic()

    def cmd_run(self, mode: str, duration: float, rate: float = 0.0, window: int = 500) -> None:
        self.probing = 0.0
        now = time.monotonic()
        self.plan = {
            "mode": mode,
            "t0": now,
            "end": now + duration,
            "rate": rate,
            "window": window,
            "sent": 0,
            "t0_ns": time.monotonic_ns(),
        }
        self.acked_before = self.me.acknowledged() if self.args.system == "broker" else 0

    def cmd_halt(self) -> None:
        """Stop at once (the broker was killed): which messages did it acknowledge?"""
        assert self.plan is not None and self.args.system == "broker"
        t0_ns, self.plan = self.plan["t0_ns"], None
        self.me.drain()  # acknowledgements that already came in count too
        emit(
            halted=True,
            stored=self.me.stored,
            t0=t0_ns,
            run_acked=self.me.acknowledged() - self.acked_before,
            unanswered=self.me.unacknowledged(),
            errors=self.me.errors,
        )

    def tick(self, now: float) -> float | None:
        wait = self.heartbeats(now)
        if self.probing and now >= self.probing:
            self.me.say([probe_text(self.me.nick)])
            self.probing = now + PROBE_EVERY
            wait = min(wait, PROBE_EVERY)
        plan = self.plan
        if plan is None:
            return wait
        if now >= plan["end"]:
            if self.me.unacknowledged():  # the broker: wait until all is stored and published
                return min(wait, 0.01)
            emit(sent=plan["sent"], total=self.sent, t0=plan["t0_ns"], t1=time.monotonic_ns())
            self.plan = None
            return wait
        if plan["mode"] == "window":
            room = plan["window"] - (self.sent - self.floor)
            if room <= 0:
                return min(wait, plan["end"] - now)  # woken by progress from the receivers
            n = min(room, self.me.max_batch)
        else:
            n = int((now - plan["t0"]) * plan["rate"]) - plan["sent"]
            if n <= 0:
                due = plan["t0"] + (plan["sent"] + 1) / plan["rate"]
                return min(wait, max(0.0, due - now))
        t_ns = time.monotonic_ns()
        self.me.say([data_text(t_ns, self.sent + i) for i in range(n)])
        self.sent += n
        plan["sent"] += n
        return 0.0


class Receivers(Role):
    """--count receivers of one room, reporting their slowest one's progress to the sender."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        for i in range(args.count):
            self.peer(f"{args.nick}{i}", args.room, latency=args.latency).start()
        self.push: zmq.Socket | None = None  # no --progress: a steady-rate run, no reports
        if args.progress:
            self.push = self.ctx.socket(zmq.PUSH)
            self.push.linger = 0
            self.push.connect(args.progress)
        self.every = PROGRESS_EVERY if self.push else CHECK_EVERY
        self.reported = -1
        self.next_report = 0.0
        self.synced = False
        self.finishing: tuple[int, float] | None = None
        self.wait_ready()
        emit(ready=True)

    def tick(self, now: float) -> float | None:
        wait = self.heartbeats(now)
        if now >= self.next_report:
            self.next_report = now + self.every
            if self.push is not None:
                floor = min(p.tally.total for p in self.peers)
                if floor != self.reported and report(self.push, self.args.index, floor):
                    self.reported = floor
            if not self.synced and all(p.tally.synced for p in self.peers):
                self.synced = True
                emit(synced=True)
            if self.finishing is not None:
                expect, deadline = self.finishing
                if now > deadline or all(p.tally.count >= expect for p in self.peers):
                    self.finishing = None
                    emit(**result(self.peers, expect))
        return min(wait, max(0.0, self.next_report - now))

    def cmd_mark(self) -> None:
        for p in self.peers:
            p.tally.mark()
        emit(marked=True)

    def cmd_finish(self, expect: int, timeout: float) -> None:
        self.finishing = (expect, time.monotonic() + timeout)

    def cmd_heard(self) -> None:
        """The highest sequence number any of our receivers heard, per room."""
        heard: dict[str, int] = {}
        for p in self.peers:
            p.drain()  # what already came in counts too
            for stream, seq in p.tally.last.items():
                heard[stream] = max(seq, heard.get(stream, 0))
        emit(heard=heard)


def result(peers: list[Peer], expect: int | dict[str, int]) -> dict[str, Any]:
    """What a process's receivers heard since mark(): bench.py adds the processes up."""
    lat: list[int] = []
    missing = 0
    for p in peers:
        want = expect if isinstance(expect, int) else expect.get(p.room, 0)
        missing += max(0, want - p.tally.count)
        if p.tally.lat is not None:
            lat.extend(p.tally.lat)
    return {
        "result": True,
        "received": sum(p.tally.count for p in peers),
        "missing": missing,
        "gaps": sum(p.tally.gaps for p in peers),
        "dups": sum(p.tally.dups for p in peers),
        "errors": sum(p.errors for p in peers),
        "last_ns": max(p.tally.last_ns for p in peers),
        "lat_ns": lat,
    }


class Chat(Role):
    """W3: --count clients (numbered from --first) in --rooms rooms, all sending and hearing."""

    precise = True

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        for g in range(args.first, args.first + args.count):
            self.peer(f"{args.nick}{g}", room_name(g, args.rooms), latency=True).start()
        self.probers = list({p.room: p for p in self.peers}.values())  # one per room
        self.probing = 0.0
        self.synced = False
        self.plan: dict[str, Any] | None = None
        self.finishing: tuple[dict[str, int], float] | None = None
        self.wait_ready()
        emit(ready=True)

    def cmd_probe(self) -> None:
        self.probing = time.monotonic()

    def cmd_mark(self) -> None:
        for p in self.peers:
            p.tally.mark()
        emit(marked=True)

    def cmd_run(self, duration: float, rate: float) -> None:
        """Every client sends `rate` messages a second; the process's sends are spread evenly."""
        self.probing = 0.0
        now = time.monotonic()
        self.plan = {
            "t0": now,
            "end": now + duration,
            "rate": rate * len(self.peers),
            "sent": 0,
            "rooms": {},
            "t0_ns": time.monotonic_ns(),
        }

    def cmd_finish(self, expect: dict[str, int], timeout: float) -> None:
        self.finishing = (expect, time.monotonic() + timeout)

    def tick(self, now: float) -> float | None:
        wait = self.heartbeats(now)
        if self.probing and now >= self.probing:
            for p in self.probers:
                p.say([probe_text(p.nick)])
            self.probing = now + PROBE_EVERY
        if self.probing:
            wait = min(wait, max(0.0, self.probing - now))
        if not self.synced and all(p.tally.synced for p in self.peers):
            self.synced = True
            emit(synced=True)
        if self.finishing is not None:
            expect, deadline = self.finishing
            if now > deadline or all(p.tally.count >= expect.get(p.room, 0) for p in self.peers):
                self.finishing = None
                emit(**result(self.peers, expect))
            wait = min(wait, 0.002)
        plan = self.plan
        if plan is None:
            return wait
        if now >= plan["end"]:
            emit(sent=plan["rooms"], t0=plan["t0_ns"], t1=time.monotonic_ns())
            self.plan = None
            return wait
        due = int((now - plan["t0"]) * plan["rate"]) - plan["sent"]
        t_ns = time.monotonic_ns()
        for _ in range(due):
            k = plan["sent"]
            p = self.peers[k % len(self.peers)]
            p.say([data_text(t_ns, k)])
            plan["rooms"][p.room] = plan["rooms"].get(p.room, 0) + 1
            plan["sent"] += 1
        next_due = plan["t0"] + (plan["sent"] + 1) / plan["rate"]
        return min(wait, max(0.0, next_due - now))


class Idle(Role):
    """W4: clients that join and then only heartbeat; --on-go: connect when told (a storm)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        for g in range(args.first, args.first + args.count):
            self.peer(f"{args.nick}{g}", room_name(g, args.rooms))
        self.started = False
        self.reported = False
        self.next_announce = 0.0
        emit(ready=True)
        if not args.on_go:
            self.cmd_go()

    def cmd_go(self) -> None:
        for p in self.peers:
            p.start()
        self.started = True

    def tick(self, now: float) -> float | None:
        """Baselines have no join reply: a client is in once its announcement comes back.

        On the thread server that is a line to its room, sent once (the server reads the
        JOIN line first, and TCP loses nothing); the room hears it, as it hears the broker's
        join notices. On NATS it is a message to the client's own subject, sent once (the
        server handles CONNECT, the SUBs and the PUB in order). On the forwarder it is a
        message to the client's own topic, repeated until it comes back, since a SUB's
        subscriptions take effect some time after it connects.
        """
        wait = self.heartbeats(now)
        if not self.started or self.reported:
            return wait
        if self.args.system != "broker" and now >= self.next_announce:
            for p in self.peers:
                if (
                    p.ready
                    and not p.tally.own_ns
                    and (self.args.system in ("forwarder", "fwdack") or "announced" not in p.times)
                ):
                    p.times["announced"] = time.monotonic_ns()
                    p.announce()
            self.next_announce = now + ANNOUNCE_EVERY
        for p in self.peers:
            if "joined" not in p.times and p.tally.own_ns:
                p.times["joined"] = p.tally.own_ns
        live = self.args.system != "broker" or all("live" in p.times for p in self.peers)
        if live and all("joined" in p.times for p in self.peers):
            self.reported = True
            times = {
                k: max(p.times.get(k, 0) for p in self.peers)
                for k in ("start", "welcomed", "joined", "live")
            }
            first = min(p.times["start"] for p in self.peers)
            emit(
                joined=True,
                first_ns=first,
                **{k + "_ns": v for k, v in times.items()},
                errors=sum(p.errors for p in self.peers),
            )
        return min(wait, 0.005)


def room_name(g: int, rooms: int) -> str:
    return f"r{g % rooms:02d}"


# ---------------------------------------------------------------------------- client.Client


async def library_client(args: argparse.Namespace) -> None:
    """One client.Client (the library bots use) consuming a room as fast as it can.

    Events are taken with `async for event in client`, as a bot would; progress goes to the
    sender like a receiver process's, and commands arrive on stdin. {"cmd": "hold"} blocks
    the client (its event loop waits for a "release" line) while a backlog piles up in its
    socket, so that afterwards the library alone sets the pace.
    """
    from zmqchat._client import library as chat

    addr = json.loads(args.addr)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(args.progress)
    c = chat.Client(addr["host"], addr["port"], args.nick, rooms=[args.room], bot=True, backlog=0)
    await c.connect()
    st = {"total": 0, "count": 0, "gaps": 0, "dups": 0, "last_ns": 0}
    finish: list[tuple[int, float]] = []
    stop = asyncio.Event()
    pending = [b""]

    def on_stdin() -> None:
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            stop.set()
            return
        *lines, pending[0] = (pending[0] + data).split(b"\n")
        for line in lines:
            cmd = json.loads(line)
            if cmd["cmd"] == "mark":
                st["count"] = st["gaps"] = st["dups"] = 0
                emit(marked=True)
            elif cmd["cmd"] == "finish":
                finish.append((cmd["expect"], time.monotonic() + cmd["timeout"]))
            elif cmd["cmd"] == "hold":  # block the whole client until told to go on
                emit(held=True)
                while b"release" not in sys.stdin.buffer.readline():
                    pass
                emit(released=time.monotonic_ns())
            elif cmd["cmd"] == "stop":
                stop.set()

    async def consume() -> None:
        """What a bot does with each event (its kind, room, seq and text), and the order
        checked; the counters monitor() reads. The sender needs no progress while it waits
        for the backlog to be consumed, so a report every 1,000 events (and monitor()'s
        every 5 ms) keep the bench's own share of this process small."""
        synced, room, last, now = False, args.room, None, time.monotonic_ns
        async for ev in c:
            if ev.kind != "msg" or ev.room != room:
                continue
            seq = ev.seq
            if last is not None and seq != last + 1:
                st["gaps" if seq > last else "dups"] += 1
            last = seq
            if ev.text.startswith("p"):
                if not synced:
                    synced = True
                    emit(synced=True)
                continue
            st["count"] += 1
            total = st["total"] = st["total"] + 1
            st["last_ns"] = now()
            if total % 1000 == 0:
                report(push, 0, total)

    async def monitor() -> None:
        reported = 0
        while not stop.is_set():
            if reported != st["total"] and report(push, 0, st["total"]):
                reported = st["total"]
            if finish:
                expect, deadline = finish[0]
                if st["count"] >= expect or time.monotonic() > deadline:
                    finish.clear()
                    emit(
                        result=True,
                        received=st["count"],
                        missing=max(0, expect - st["count"]),
                        gaps=st["gaps"],
                        dups=st["dups"],
                        errors=0,
                        last_ns=st["last_ns"],
                        lat_ns=[],
                    )
            try:
                await asyncio.wait_for(stop.wait(), PROGRESS_EVERY * 5)
            except TimeoutError:
                pass

    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), on_stdin)
    emit(ready=True)
    consumer = asyncio.create_task(consume())
    await monitor()
    consumer.cancel()
    await c.close()
    push.close()
    ctx.term()


# ---------------------------------------------------------------------------- main

ROLES: Final = {"send": Sender, "recv": Receivers, "chat": Chat, "idle": Idle}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=[*ROLES, "client"])
    p.add_argument(
        "--system", choices=["broker", "forwarder", "fwdack", "thread", "nats"], default="broker"
    )
    p.add_argument("--addr", required=True, help='JSON: {"host", "port", "pub_port"}')
    p.add_argument("--room", default="bench")
    p.add_argument("--rooms", type=int, default=20, help="chat/idle: rooms r00, r01, ...")
    p.add_argument("--count", type=int, default=1, help="peers in this process")
    p.add_argument("--first", type=int, default=0, help="chat/idle: number of the first peer")
    p.add_argument("--nick", default="bench")
    p.add_argument("--index", type=int, default=0, help="recv: which reporter this is")
    p.add_argument("--reporters", type=int, default=1, help="send: receiver processes")
    p.add_argument("--progress", help="recv/client: the sender's progress endpoint")
    p.add_argument("--latency", action="store_true", help="recv: record latencies")
    p.add_argument("--on-go", action="store_true", help="idle: connect when told")
    args = p.parse_args(argv)
    if args.role == "client":
        asyncio.run(library_client(args))
        return 0
    ROLES[args.role](args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
