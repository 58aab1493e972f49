"""What one NATS receiver costs: the benchmark's own NatsPeer against the nats-py library.

    python bench/nats_clients.py [--count 100000] [--reps 3]

One nats-server and one receiver process at a time, subscribed to `room.bench`. The
receiver is held (blocked, reading nothing) while this process publishes --count events (the
benchmark's event, 100-character text), so that they all wait for it in the server and the
socket; then it is let go, and it reports how fast it worked through them and the CPU it
used (user + system), checking every event's number as the benchmark's receivers do. So
neither the publisher nor a round trip sets the pace: the figures are the client's own.
`raw` is the benchmark's NatsPeer (bench/peers.py) in an epoll loop, decoding all the events
of one read at once; `nats-py` is the library's client, an async callback per message, each
event decoded on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peers import Loop, NatsPeer, Tally, data_text

from bench import HERE, Child, start_nats
from zmqchat import protocol as m

CLIENTS = ("raw", "nats-py")


def emit(**msg: Any) -> None:
    print(json.dumps(msg), flush=True)


def hold() -> tuple[float, int]:
    """Subscribed: say so, block until told to go; the costs count from then."""
    emit(ready=True)
    sys.stdin.readline()
    return time.process_time(), time.monotonic_ns()


def report(tally: Tally, start: tuple[float, int]) -> None:
    emit(
        cpu=time.process_time() - start[0],
        secs=(tally.last_ns - start[1]) / 1e9,
        received=tally.total,
        gaps=tally.gaps,
        dups=tally.dups,
    )


def consume_raw(port: int, count: int) -> None:
    """NatsPeer in an epoll loop, as in a receiver process of the benchmark."""
    loop = Loop()
    peer = NatsPeer(loop, "127.0.0.1", port, "r0", "bench")
    peer.start()
    peer.announce()  # back once the SUBs are in effect (the server keeps a connection's order)
    while not peer.tally.own_ns:
        loop.poll(0.1)
    start = hold()
    while peer.tally.total < count:
        loop.poll(1.0)
    report(peer.tally, start)


def consume_nats_py(port: int, count: int) -> None:
    """nats-py's client: a callback per message, each event decoded on its own."""
    import nats

    tally = Tally("r0", "nick", latency=False)

    async def run() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            tally.ingest([json.loads(msg.data)], time.monotonic_ns())
            if tally.total >= count:
                done.set()

        await nc.subscribe("room.bench", cb=on_msg)
        await nc.flush()  # a PING answered: the SUB is in effect
        start = hold()  # blocks the event loop itself: nothing is read meanwhile
        await done.wait()
        report(tally, start)
        await nc.close()

    asyncio.run(run())


def publish(port: int, count: int) -> None:
    """count events on room.bench, 100 PUBs per write; returns once the server has them all
    (the answer to a PING after them)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
    for first in range(1, count + 1, 100):
        out = bytearray()
        for seq in range(first, min(count, first + 99) + 1):
            event = m.dumps(
                {
                    "room": "bench",
                    "seq": seq,
                    "id": f"bench:{seq}",
                    "ts": time.time(),
                    "nick": "sender",
                    "kind": "msg",
                    "text": data_text(time.monotonic_ns(), seq),
                    "cmid": f"s.{seq}",
                }
            )
            out += b"PUB room.bench %d\r\n%s\r\n" % (len(event), event)
        sock.sendall(out)
    sock.sendall(b"PING\r\n")
    sock.settimeout(30)
    seen = b""
    while b"PONG\r\n" not in seen:
        data = sock.recv(4096)
        if not data:
            raise SystemExit("nats-server closed the publisher's connection")
        seen = seen[-8:] + data
    sock.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000, help="events per run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--receiver", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.receiver:
        (consume_raw if a.receiver == "raw" else consume_nats_py)(a.port, a.count)
        return 0
    logdir = Path(tempfile.mkdtemp(prefix="natsclients-"))
    server, port = start_nats("nats", logdir)
    try:
        for client in CLIENTS:
            per_event, rates = [], []
            for rep in range(a.reps):
                recv = Child(
                    f"{client}-{rep}",
                    [
                        sys.executable,
                        str(HERE / "nats_clients.py"),
                        "--receiver",
                        client,
                        "--port",
                        str(port),
                        "--count",
                        str(a.count),
                    ],
                    logdir,
                )
                try:
                    recv.expect("ready", 30)
                    publish(port, a.count)
                    assert recv.proc.stdin is not None
                    recv.proc.stdin.write(b"go\n")
                    recv.proc.stdin.flush()
                    out = recv.expect("cpu", 120)
                finally:
                    recv.stop(polite=False)
                if out["received"] != a.count or out["gaps"] or out["dups"]:
                    raise SystemExit(f"{client}: {out}")
                per_event.append(out["cpu"] / a.count * 1e6)
                rates.append(a.count / out["secs"])
            print(
                f"{client:<8} {statistics.median(per_event):5.2f} µs of CPU per event "
                f"(runs: {', '.join(f'{v:.2f}' for v in per_event)}), "
                f"{statistics.median(rates):,.0f} events/s"
            )
    finally:
        server.stop(polite=False)
        shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
