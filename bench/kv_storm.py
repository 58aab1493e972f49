"""A join storm in the registry's key-value buckets, JetStream alone: what the cluster model
for many brokers needs (bench/README.md, "How many brokers and NATS nodes").

    python bench/kv_storm.py [--writes 5000] [--watchers 1,10,30] [--in-flight 500]

Starts 3 local NATS nodes (scripts/nats_local.py) and a bucket made as the broker makes the
registry's (history 1, 3 replicas). W watchers, each on a connection of its own, follow
every key as each broker follows the sessions and members buckets (an ordered consumer on
`$KV.<bucket>.>`, the latest value of each key first). Then the storm: N puts of new keys
(a resumed client's session or membership record, ~100 bytes), up to --in-flight of them
awaited at once from 4 connections, as the brokers that take a dead broker's clients write
them. Prints, per W: writes acknowledged per second, the time until every watcher has
heard every write, and the CPU the three nats-server processes used per write with W
watchers (the runs' difference is what each watcher adds). No broker, no ZeroMQ: the
floor under a resume storm's writes.
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

PUBLISHERS = 4


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def nats_cpu(nodes: LocalNats) -> float:
    return sum(cpu_seconds(n.proc.pid) for n in nodes.nodes if n.proc)


async def storm(nodes: LocalNats, watchers: int, writes: int, in_flight: int) -> str:
    urls = nodes.urls.split(",")
    admin = await nats.connect(urls)
    bucket = f"storm{watchers}"
    await admin.jetstream(timeout=10).create_key_value(
        api.KeyValueConfig(bucket=bucket, history=1, replicas=3)
    )
    prefix = f"$KV.{bucket}."
    heard = [0] * watchers
    all_heard = asyncio.Event()
    conns = []
    for w in range(watchers):
        nc = await nats.connect(urls)
        conns.append(nc)

        async def changed(msg: nats.aio.msg.Msg, w: int = w) -> None:
            heard[w] += 1
            if heard[w] == writes and all(h >= writes for h in heard):
                all_heard.set()

        await nc.jetstream(timeout=10).subscribe(
            prefix + ">",
            stream=f"KV_{bucket}",
            cb=changed,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=1 << 20,
            pending_bytes_limit=1 << 30,
        )
    pubs = [await nats.connect(urls) for _ in range(PUBLISHERS)]
    jss = [p.jetstream(timeout=30) for p in pubs]
    limit = asyncio.Semaphore(in_flight)
    record = b'{"nick":"someone_%06d","sid":"0123456789abcdef","broker":"b17","rev":12345}'

    async def put(i: int) -> None:
        async with limit:
            await jss[i % PUBLISHERS].publish(f"{prefix}k{i:06d}", record % i)

    cpu0, begin = nats_cpu(nodes), time.perf_counter()
    await asyncio.gather(*(put(i) for i in range(writes)))
    acked = time.perf_counter() - begin
    if watchers:
        await asyncio.wait_for(all_heard.wait(), 120)
    heard_all = time.perf_counter() - begin
    cpu = nats_cpu(nodes) - cpu0
    for nc in conns + pubs:
        await nc.close()
    await admin.jetstream(timeout=10).delete_key_value(bucket)
    await admin.close()
    return (
        f"W={watchers:>3}: {writes:,} writes acknowledged in {acked:.2f} s "
        f"({writes / acked:,.0f}/s), heard by every watcher after {heard_all:.2f} s; "
        f"nats-server CPU {cpu:.2f} s, {cpu / writes * 1e6:.0f} µs per write "
        f"({writes * watchers:,} deliveries)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writes", type=int, default=5000)
    ap.add_argument("--watchers", default="1,10,30", help="watchers per run, comma-separated")
    ap.add_argument("--in-flight", type=int, default=500, help="writes awaited at once")
    a = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="kvstorm-")
    nodes = LocalNats(folder, 3)
    nodes.start()
    try:
        for w in (int(x) for x in a.watchers.split(",")):
            print(asyncio.run(storm(nodes, w, a.writes, a.in_flight)), flush=True)
    finally:
        nodes.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
