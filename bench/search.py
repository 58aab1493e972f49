"""Search (issue 23): how fast a search answers over a big history, and what keeping the
full-text index costs the broker.

    python bench/search.py [--messages 1000000] [--rooms 100] [--searches 200] [--pairs 5]

1. W1F (one sender, 10 receivers, as bench.py runs it) through the broker with its index and
   through the same broker without it (bench/noindex_broker.py), alternated `--pairs` times
   in this one run: the throughput of each, and their ratio.
2. The history writer applying interleaved room events with and without the index (events/s).
3. A history of `--messages` messages in `--rooms` rooms, written by the writer's own code in
   batches as it gathers them (random words, Zipf-distributed as in chat), then `broker.py`
   started on it and a client in 5 of its rooms asking `--searches` searches of each kind:
   a common word, a rare word, a prefix, a phrase, two words (in one room) and a common word
   in all 5 rooms; the latency of each (request to reply, at the client), p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from zmqchat import Client  # noqa: E402
from zmqchat import protocol as m  # noqa: E402
from zmqchat._local import store  # noqa: E402

BATCH: Final = 5000  # events the writer applies in one transaction under load (~20 ms)
SYLLABLES: Final = "ka lo mi ra te su no vi de pa ro ti ne bu sa go".split()


def vocabulary(rng: random.Random, size: int = 20000) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 5))))
    return sorted(words, key=lambda w: rng.random())


class Corpus:
    """Messages of 3 to 15 words drawn from a vocabulary with Zipf's frequencies."""

    def __init__(self, seed: int = 23) -> None:
        self.rng = random.Random(seed)
        self.words = vocabulary(self.rng)
        self.weights = list(itertools.accumulate(1 / (i + 1) for i in range(len(self.words))))

    def text(self) -> str:
        n = self.rng.randint(3, 15)
        return " ".join(self.rng.choices(self.words, cum_weights=self.weights, k=n))

    def events(self, n: int, rooms: int, start: float) -> Any:
        """(room, seq, ts, sender, cmid, data) as the log holds them, rooms interleaved."""
        seqs: dict[str, int] = {}
        for i in range(n):
            room = f"r{self.rng.randrange(rooms):02d}"
            seq = seqs[room] = seqs.get(room, 0) + 1
            ts, nick, cmid = start + i * 0.01, f"user{i % 300}", f"c{i}"
            data = m.encode_event(room, seq, ts, nick, "msg", self.text(), cmid).decode()
            yield ("event", room, seq, ts, f"tok:{nick}", cmid, data)


def write_history(path: str, corpus: Corpus, n: int, rooms: int, index: bool) -> float:
    """A history database of n messages, applied as the writer does; events applied per
    second of CPU (SQLite works in this process: CPU time, not the busy host's wall time)."""
    store.Store(path).close()  # the schema, as a broker makes it
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=NORMAL")
    if not index:
        for trigger in ("search_added", "search_changed", "search_private"):
            db.execute(f"DROP TRIGGER {trigger}")
    spent, batch = 0.0, []
    for op in corpus.events(n, rooms, time.time() - n * 0.01):
        batch.append(op)
        if len(batch) == BATCH:
            t = time.process_time()
            store.apply(db, batch)
            spent += time.process_time() - t
            batch = []
    if batch:
        t = time.process_time()
        store.apply(db, batch)
        spent += time.process_time() - t
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return n / spent


def w1f_pairs(pairs: int, secs: float) -> dict[str, Any]:
    import bench as b

    settings = replace(b.Settings(), reps=1, fanout_secs=secs)
    rates: dict[str, list[float]] = {"index": [], "no index": []}
    brokers = {"index": ROOT / "broker.py", "no index": HERE / "noindex_broker.py"}
    for i in range(pairs):
        order = ["index", "no index"] if i % 2 == 0 else ["no index", "index"]
        for which in order:
            runner = b.Bench(settings, brokers[which], None)
            try:
                runs = runner.fanout("broker", 10)
            finally:
                runner.close()
                shutil.rmtree(runner.tmp, ignore_errors=True)
            rates[which].append(runs[0]["rate"])
            print(f"  W1F R=10 {which:<8} {runs[0]['rate']:>10,.0f} msg/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"rates": rates, "median": med, "ratio": med["index"] / med["no index"]}


def queries(corpus: Corpus, rng: random.Random) -> dict[str, list[str]]:
    words = corpus.words
    kinds: dict[str, list[str]] = {
        "common word": [rng.choice(words[:20]) for _ in range(50)],
        "rare word": [rng.choice(words[3000:8000]) for _ in range(50)],
        "prefix": [rng.choice(words[50:500])[:3] + "*" for _ in range(50)],
        "two words": [
            f"{rng.choice(words[20:200])} {rng.choice(words[20:200])}" for _ in range(50)
        ],
    }
    phrases = []
    while len(phrases) < 50:
        said = corpus.text().split()
        if len(said) >= 2:
            at = rng.randrange(len(said) - 1)
            phrases.append(f'"{said[at]} {said[at + 1]}"')
    kinds["phrase"] = phrases
    return kinds


async def measure(port: int, kinds: dict[str, list[str]], searches: int) -> dict[str, Any]:
    rooms = [f"r{i:02d}" for i in range(5)]
    out: dict[str, Any] = {}
    async with Client("127.0.0.1", port, "searcher", rooms=rooms, backlog=0, timeout=30) as c:
        plan = [(k, q, rooms[0]) for k, qs in kinds.items() for q in qs] + [
            ("common word, 5 rooms", q, None) for q in kinds["common word"]
        ]
        await c.search(plan[0][1], plan[0][2])  # the first one warms the page cache
        times: dict[str, list[float]] = {}
        found: dict[str, list[int]] = {}
        for _ in range(max(1, searches // 50)):
            for kind, query, room in plan:
                t = time.perf_counter()
                result = await c.search(query, room)
                times.setdefault(kind, []).append((time.perf_counter() - t) * 1000)
                found.setdefault(kind, []).append(len(result.events) + result.more)
    every = sorted(x for v in times.values() for x in v)
    for kind, values in [*times.items(), ("all", every)]:
        values = sorted(values)
        out[kind] = {
            "n": len(values),
            "p50_ms": values[len(values) // 2],
            "p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))],
            "matches_median": statistics.median(found[kind]) if kind in found else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--searches", type=int, default=200, help="searches of each kind")
    p.add_argument("--pairs", type=int, default=5, help="W1F runs with and without the index")
    p.add_argument("--w1f-secs", type=float, default=5.0)
    p.add_argument(
        "--parts", default="w1f,writer,search", help="what to measure (w1f, writer, search)"
    )
    a = p.parse_args(argv)
    parts = set(a.parts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="searchbench-"))
    apply_rates: dict[str, float] = {}
    latency: dict[str, Any] = {}
    w1f: dict[str, Any] = {}
    built = build_rate = size = index_bytes = None
    corpus = Corpus()
    try:
        if "w1f" in parts:
            print("W1F R=10, with and without the index, alternated:", file=sys.stderr)
            w1f = w1f_pairs(a.pairs, a.w1f_secs)
        if "writer" in parts:
            print("the writer, 200,000 events, with and without the index:", file=sys.stderr)
            apply_rates = {
                which: write_history(str(tmp / f"apply-{which}.db"), Corpus(7), 200_000, 100, i)
                for which, i in (("index", True), ("no index", False))
            }
        if "search" in parts:
            print(f"a history of {a.messages:,} messages in {a.rooms} rooms:", file=sys.stderr)
            built, build_rate, size, index_bytes, latency = history_and_searches(tmp, corpus, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(a, parts, w1f if "w1f" in parts else {}, apply_rates, latency, locals())
    return 0


def history_and_searches(tmp: Path, corpus: Corpus, a: argparse.Namespace) -> tuple[Any, ...]:
    """The big history, then broker.py on it and the searches: (seconds to write it,
    events/CPU s, bytes on disk, bytes of the index, latencies)."""
    path = str(tmp / "big.db")
    t = time.monotonic()
    build_rate = write_history(path, corpus, a.messages, a.rooms, True)
    built = time.monotonic() - t
    size = sum(f.stat().st_size for f in tmp.glob("big.db*"))
    con = sqlite3.connect(path)
    try:
        row = con.execute("SELECT sum(pgsize) FROM dbstat WHERE name LIKE 'search_text%'")
        index_bytes = row.fetchone()[0]
    except sqlite3.Error:  # an SQLite without the dbstat table
        index_bytes = None
    con.close()
    rooms = ",".join(f"r{i:02d}" for i in range(a.rooms))
    argv = [sys.executable, str(ROOT / "broker.py"), "--port", "0", "--pub-port", "0"]
    argv += ["--db", path, "--rooms", rooms, "--rate", "0"]
    broker = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=tmp)
    try:
        line = broker.stdout.readline() if broker.stdout else ""
        port = int(line.split("tcp://")[1].split()[0].rsplit(":", 1)[1])
        latency = asyncio.run(measure(port, queries(corpus, random.Random(5)), a.searches))
    finally:
        broker.terminate()
        broker.wait(30)
    return built, build_rate, size, index_bytes, latency


def report(
    a: argparse.Namespace,
    parts: set[str],
    w1f: dict[str, Any],
    apply_rates: dict[str, float],
    latency: dict[str, Any],
    found: dict[str, Any],
) -> None:
    print(f"\nSearch benchmark ({os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f})\n")
    if "w1f" in parts:
        i, n = w1f["median"]["index"], w1f["median"]["no index"]
        print(f"W1F R=10, median of {a.pairs} runs each, alternated:")
        print(f"  with the index     {i:>10,.0f} msg/s   runs: {_runs(w1f['rates']['index'])}")
        print(f"  without the index  {n:>10,.0f} msg/s   runs: {_runs(w1f['rates']['no index'])}")
        verdict = "met" if w1f["ratio"] >= 0.9 else "missed"
        print(f"  ratio {w1f['ratio']:.2f}x (target >= 0.9x: {verdict})\n")
    if apply_rates:
        print("the history writer applying 200,000 interleaved events (100 rooms):")
        for which, rate in apply_rates.items():
            print(f"  {which:<9} {rate:>10,.0f} events per CPU second ({1e6 / rate:.1f} us each)")
    if latency:
        built, build_rate, size, index_bytes = (
            found["built"],
            found["build_rate"],
            found["size"],
            found["index_bytes"],
        )
        print(
            f"\nhistory: {a.messages:,} messages in {a.rooms} rooms, written in {built:.0f} s "
            f"({build_rate:,.0f} events per CPU second), {size / 1e6:.0f} MB on disk"
            + (f" (index {index_bytes / 1e6:.0f} MB)" if index_bytes else "")
        )
        print("search latency, request to reply at the client (ms):")
        print(f"  {'kind':<22} {'n':>5} {'p50':>7} {'p99':>7}  matches (median)")
        for kind, r in latency.items():
            matches = "" if r["matches_median"] is None else f"{r['matches_median']:,.0f}"
            print(f"  {kind:<22} {r['n']:>5} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}  {matches}")
        p99 = latency["all"]["p99_ms"]
        print(f"  target p99 < 50 ms: {'met' if p99 < 50 else 'missed'} ({p99:.1f} ms)")


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
