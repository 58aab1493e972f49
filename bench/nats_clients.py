"""What one NATS receiver costs: the benchmark's own NatsPeer against the nats-py library.

    python bench/nats_clients.py [--count 100000] [--reps 3]

One nats-server, one receiver process at a time subscribed to `room.bench`, and this
process publishing --count events (the benchmark's event, 100-character text) as fast as it
can, 100 PUBs per write. Each receiver checks every event's number (as the benchmark's do)
and reports the CPU it used (user + system) and the time from its subscription to its last
event:
the client with fewer microseconds per event is the one that keeps the benchmark's receivers
from being what W1F measures. `nats-py` gets each message as a Msg in an async callback and
decodes it on its own; `raw` is the benchmark's NatsPeer (bench/peers.py), which decodes all
the events of one read at once.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import HERE, start_nats
from peers import PAD, Loop, NatsPeer, Tally, data_text

import messages as m

CLIENTS = ("raw", "nats-py")


def consume_raw(port: int, count: int) -> Tally:
    """NatsPeer in an epoll loop, as in a receiver process of the benchmark."""
    loop = Loop()
    peer = NatsPeer(loop, "127.0.0.1", port, "r0", "bench")
    peer.start()
    peer.announce()  # back once the SUBs are in effect (the server keeps a connection's order)
    while not peer.tally.own_ns:
        loop.poll(0.1)
    ready()
    while peer.tally.total < count:
        loop.poll(1.0)
    return peer.tally


def consume_nats_py(port: int, count: int) -> Tally:
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
        ready()
        await done.wait()
        await nc.close()

    asyncio.run(run())
    return tally


START: dict[str, float] = {}  # the receiver's CPU time and clock when it said "ready"


def ready() -> None:
    """Subscribed: the publisher may start, and the receiver's costs count from now."""
    START.update(cpu=time.process_time(), ns=time.monotonic_ns())
    print("ready", flush=True)


def receiver(client: str, port: int, count: int) -> None:
    """The receiving process: reports CPU and wall time over the count events, as JSON."""
    tally = (consume_raw if client == "raw" else consume_nats_py)(port, count)
    print(json.dumps({"cpu": time.process_time() - START["cpu"], "received": tally.total,
                      "gaps": tally.gaps, "dups": tally.dups,
                      "secs": (tally.last_ns - START["ns"]) / 1e9}), flush=True)


def publish(port: int, count: int) -> float:
    """count events on room.bench, 100 PUBs per write; returns when the last is written."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
    t0 = time.monotonic()
    for first in range(0, count, 100):
        out = bytearray()
        for seq in range(first + 1, min(count, first + 100) + 1):
            event = m.dumps({"room": "bench", "seq": seq, "id": f"bench:{seq}",
                             "ts": time.time(), "nick": "sender", "kind": "msg",
                             "text": data_text(time.monotonic_ns(), seq), "cmid": f"s.{seq}"})
            out += b"PUB room.bench %d\r\n%s\r\n" % (len(event), event)
        sock.sendall(out)
    sock.close()
    return time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000, help="events per run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--receiver", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    assert len(PAD) == 100
    if a.receiver:
        receiver(a.receiver, a.port, a.count)
        return 0
    logdir = Path(tempfile.mkdtemp(prefix="natsclients-"))
    server, port = start_nats("nats", logdir)
    try:
        for client in CLIENTS:
            per_event, rates = [], []
            for _ in range(a.reps):
                proc = subprocess.Popen([sys.executable, str(HERE / "nats_clients.py"),
                                         "--receiver", client, "--port", str(port),
                                         "--count", str(a.count)], stdout=subprocess.PIPE)
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != b"ready":
                    raise SystemExit(f"{client}: the receiver did not start")
                publish(port, a.count)
                out = json.loads(proc.stdout.readline())
                proc.wait(30)
                if out["received"] != a.count or out["gaps"] or out["dups"]:
                    raise SystemExit(f"{client}: {out}")
                per_event.append(out["cpu"] / a.count * 1e6)
                rates.append(a.count / out["secs"])
            print(f"{client:<8} {statistics.median(per_event):5.2f} µs of CPU per event "
                  f"(runs: {', '.join(f'{v:.2f}' for v in per_event)}), "
                  f"{statistics.median(rates):,.0f} events/s")
    finally:
        server.stop(polite=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
