"""What JetStream alone costs on this machine: the floor under the cluster's latency.

    python bench/jetstream_floor.py [--rate 2000] [--seconds 5]

Starts 3 local NATS nodes (scripts/nats_local.py), and for a stream of 1 and of 3 replicas
publishes 100-byte messages at a steady rate (W2's 2,000 a second) with nats-py, each
publish awaited for its acknowledgement as the broker does, while an ordered push consumer
(as each broker has on each room) hears them. Prints, per replica count, the publish-to-
acknowledgement and the publish-to-delivery latency (p50, p99) and the CPU the three
nats-server processes used per message. No broker, no ZeroMQ, no receivers: what remains
of the cluster's W2 latency above these figures is ours.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js import api

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.nats_local import LocalNats  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(nodes: LocalNats, replicas: int, rate: int, seconds: float) -> str:
    nc = await nats.connect(nodes.urls.split(","))
    js = nc.jetstream(timeout=5)
    name = f"floor{replicas}"
    await js.add_stream(api.StreamConfig(name=name, subjects=[f"{name}.x"], num_replicas=replicas))
    sent: dict[int, float] = {}
    delivered: list[float] = []
    count = int(rate * seconds)
    done = asyncio.Event()

    async def heard(msg: nats.aio.msg.Msg) -> None:
        now = time.perf_counter()
        number = int(msg.data[:10])
        delivered.append(now - sent[number])
        if len(delivered) == count:
            done.set()

    await js.subscribe(f"{name}.x", cb=heard, ordered_consumer=True)
    acked: list[float] = []

    async def publish(number: int) -> None:
        sent[number] = start = time.perf_counter()
        await js.publish(f"{name}.x", b"%010d" % number + b"x" * 90)
        acked.append(time.perf_counter() - start)

    cpu0 = sum(cpu_seconds(n.proc.pid) for n in nodes.nodes if n.proc)
    begin = time.perf_counter()
    tasks = []
    for number in range(count):
        due = begin + number / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(publish(number)))
    await asyncio.gather(*tasks)
    await asyncio.wait_for(done.wait(), 30)
    cpu = sum(cpu_seconds(n.proc.pid) for n in nodes.nodes if n.proc) - cpu0
    await js.delete_stream(name)
    await nc.close()
    ms = 1000
    return (
        f"R={replicas}: publish->ack p50 {pct(acked, 0.5) * ms:.2f} ms, "
        f"p99 {pct(acked, 0.99) * ms:.2f} ms; publish->delivery p50 "
        f"{pct(delivered, 0.5) * ms:.2f} ms, p99 {pct(delivered, 0.99) * ms:.2f} ms; "
        f"nats-server CPU {cpu / count * 1e6:.0f} µs per message "
        f"({cpu / seconds * 100:.0f} % of a core)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=2000, help="messages a second")
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="jsfloor-")
    nodes = LocalNats(folder, 3)
    nodes.start()
    try:
        for replicas in (1, 3):
            print(asyncio.run(measure(nodes, replicas, a.rate, a.seconds)), flush=True)
    finally:
        nodes.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
