"""Two brokers measured in one run, alternating: the current checkout against another
(an older commit, say), in W1F and W2, with the ratio of each figure.

    git worktree add /tmp/before <commit>        # or: git archive <commit> | tar -x -C DIR
    python bench/compare.py --before /tmp/before/broker.py [--quick] [--reps 5]
    python bench/compare.py --before ... --system cluster   # both as one cluster broker (the
                                                            # same 3 NATS nodes for both)

Each repetition runs the two brokers back to back (before, after, before, after, ...), so
that whatever else the machine does falls on both alike; the figures are the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import QUICK, ROOT, Bench, Settings  # noqa: E402

FIGURES = (  # (workload, key in a run's result, unit, better when)
    ("W1F-10", "rate", "msg/s", "higher"),
    ("W1F-100", "rate", "msg/s", "higher"),
    ("W2", "p50_ms", "ms", "lower"),
    ("W2", "p99_ms", "ms", "lower"),
    ("W1F-10", "server_us", "µs/message", "lower"),
)


def show(v: float | None) -> str:
    return "-" if v is None else f"{v:,.3g}" if v < 100 else f"{v:,.0f}"


def run(bench: Bench, workload: str, system: str) -> dict[str, Any]:
    if workload == "W2":
        (result,) = bench.latency(system)
    else:
        (result,) = bench.fanout(system, int(workload.split("-")[1]))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the other broker.py")
    p.add_argument("--after", default=str(ROOT / "broker.py"), help="default: this checkout's")
    p.add_argument("--quick", action="store_true", help="short runs")
    p.add_argument("--reps", type=int, default=3, help="alternations (default 3)")
    p.add_argument("--system", default="broker", choices=("broker", "cluster", "cluster2"))
    a = p.parse_args()
    s = replace(QUICK if a.quick else Settings(), reps=1)
    benches = {
        "before": Bench(s, Path(a.before).resolve(), None),
        "after": Bench(s, Path(a.after).resolve(), None),
    }
    benches["after"].nats = benches["before"].nats_cluster() if a.system != "broker" else None
    try:
        got = alternate(benches, a.reps, a.system)
    finally:
        benches["after"].nats = None  # the before's: stopped once
        benches["before"].close()
        for bench in benches.values():  # logs and databases (~170 MB a run), as bench.py does
            shutil.rmtree(bench.tmp, ignore_errors=True)
    table(benches, got)
    return 0


def alternate(
    benches: dict[str, Bench], reps: int, system: str
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    got: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(reps):
        for workload in sorted({w for w, *_ in FIGURES}):
            for name, bench in benches.items():
                result = run(bench, workload, system)
                result["load"] = os.getloadavg()[0]  # other work on the machine
                got.setdefault((name, workload), []).append(result)
                print(
                    f"rep {rep + 1} {workload:<8} {name:<6} {result.get('rate', '')}"
                    f" {result.get('p99_ms', '')} lost {result.get('lost', '-')}"
                    f" dups {result.get('dups', '-')} load {result['load']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    return got


def table(benches: dict[str, Bench], got: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    runs = [r for results in got.values() for r in results]
    loads = [r["load"] for r in runs]
    bad = sum(r.get("lost", 0) + r.get("dups", 0) for r in runs)
    print(
        f"{len(runs)} runs; load average {min(loads):.1f} to {max(loads):.1f} (median"
        f" {statistics.median(loads):.1f}); lost + duplicated in all runs: {bad}"
    )
    print(f"{'figure':<22} {'unit':<12} {'before':>10} {'after':>10} {'after/before':>13}")
    for workload, key, unit, better in FIGURES:
        values = {}
        for name in benches:
            found = [r[key] for r in got[(name, workload)] if key in r]
            values[name] = statistics.median(found) if found else None
        b, c = values["before"], values["after"]
        ratio = f"{c / b:.2f}x" if b and c else "-"
        b, c = (
            f"{v:,.3g}" if v is not None and v < 100 else f"{v:,.0f}" if v else "-" for v in (b, c)
        )
        print(
            f"{workload + ' ' + key:<22} {unit:<12} {b:>10} {c:>10} {ratio:>13}"
            f"  ({better} is better)"
        )


if __name__ == "__main__":
    sys.exit(main())
