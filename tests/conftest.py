"""Shared fixtures: a real broker on ephemeral ports, in-process or as a process."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import broker as broker_mod  # noqa: E402

HEARTBEAT = 0.3  # seconds: short, so expiry and reconnect tests finish quickly


def wait_for(cond: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    """Poll cond() until it is truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RunningBroker:
    """An in-process broker on its own thread; `restart()` keeps the ports and the database."""

    def __init__(self, tmp: Path, **cfg) -> None:
        cfg.setdefault("heartbeat", HEARTBEAT)
        cfg.setdefault("db", str(tmp / "chat.db"))
        cfg.setdefault("port", 0)
        cfg.setdefault("pub_port", 0)
        self.cfg = broker_mod.Config(**cfg)
        self.start()

    def start(self) -> None:
        self.broker = broker_mod.Broker(self.cfg, ctx=zmq.Context())
        self.port, self.pub_port = self.broker.port, self.broker.pub_port
        self.cfg.port, self.cfg.pub_port = self.port, self.pub_port
        self.thread = threading.Thread(target=self.broker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "broker did not stop"
        self.broker.ctx.term()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., RunningBroker]]:
    """Start in-process brokers with the given Config fields; all are stopped afterwards."""
    started: list[RunningBroker] = []

    def make(**cfg) -> RunningBroker:
        b = RunningBroker(tmp_path, **cfg)
        started.append(b)
        return b

    yield make
    for b in started:
        if b.thread.is_alive():
            b.stop()


@pytest.fixture
def broker(make_broker) -> RunningBroker:
    """One in-process broker with the default rooms and a short heartbeat."""
    return make_broker()


def free_ports(n: int = 2) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class BrokerProcess:
    """`python broker.py` as a real process, as a user would start it."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.port, self.pub_port = free_ports()
        self.args = ["--port", str(self.port), "--pub-port", str(self.pub_port),
                     "--db", str(tmp / "chat.db"), *args]
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "broker.py"), *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        assert line.startswith("Broker started"), line + self.proc.stderr.read()
        self.started_line = line.rstrip("\n")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def make_broker_process(tmp_path: Path):
    """Start `broker.py` processes with extra flags; all are stopped afterwards."""
    procs: list[BrokerProcess] = []

    def make(*args: str) -> BrokerProcess:
        p = BrokerProcess(tmp_path, *args)
        procs.append(p)
        return p

    yield make
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait()
