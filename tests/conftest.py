"""Shared fixtures: a real broker on ephemeral ports, in-process or as a process."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zmqchat._config import Config  # noqa: E402
from zmqchat.broker._loop import Broker  # noqa: E402

HEARTBEAT = 0.3  # seconds: short, so expiry and reconnect tests finish quickly

pytest_plugins = ["cli_helpers"]  # the started and chat fixtures of the end-to-end tests


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
        self.cfg = Config(**cfg)
        self.start()

    def start(self) -> None:
        self.broker = Broker(self.cfg, ctx=zmq.Context())
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
def make_local_broker(tmp_path: Path) -> Iterator[Callable[..., RunningBroker]]:
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
def make_broker(make_local_broker):
    """One broker (tests/test_security.py makes this two brokers of a cluster as well)."""
    return make_local_broker


@pytest.fixture
def broker(make_broker) -> RunningBroker:
    """One in-process broker with the default rooms and a short heartbeat."""
    return make_broker()


def port_free(port: int) -> bool:
    """Whether a server could listen on the port (as servers do, with SO_REUSEADDR: the
    connections a stopped server leaves in TIME_WAIT do not hold it)."""
    from scripts.nats_local import in_use

    return not in_use(port)


PORTS_EACH = 1000  # ports per test process, from PORTS_FROM on (scripts/cluster.py's test
PORTS_FROM = 12000  # takes its own at random in 20000-28002 and 29000-32711)
_next_port = [0]


def free_ports(n: int = 2) -> list[int]:
    """Ports nobody listens on, from this test process's own range below the kernel's
    ephemeral one (32768 and up here): a port the kernel picked for us could be given to
    any outgoing connection (another worker's, NATS's) before our broker binds it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    first = PORTS_FROM + PORTS_EACH * (int(worker[2:] or 0) % 4)
    ports: list[int] = []
    for _ in range(PORTS_EACH):
        port = first + _next_port[0] % PORTS_EACH
        _next_port[0] += 1
        if port_free(port):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"no {n} free ports in {first}..{first + PORTS_EACH - 1}")


class BrokerProcess:
    """`python broker.py` as a real process, as a user would start it."""

    def __init__(self, tmp: Path, *args: str, script: Path = ROOT / "broker.py") -> None:
        self.script = script  # a benchmark's variant of broker.py, or broker.py
        self.port, self.pub_port = free_ports()
        self.args = [
            "--port",
            str(self.port),
            "--pub-port",
            str(self.pub_port),
            "--db",
            str(tmp / "chat.db"),
            *args,
        ]
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
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


# ---------------------------------------------------------------------------- cluster mode

CLUSTER_HEARTBEAT = 0.5  # seconds: a broker is dead after 3 of these, its clients resume


@pytest.fixture(scope="session")
def nats_nodes(tmp_path_factory):
    """A 3-node NATS JetStream cluster on free ports, for the whole session (a fresh one
    takes 4 to 9 s to elect its first leader). Tests that kill or pause nodes restore them."""
    from scripts.nats_local import LocalNats

    nodes = LocalNats(tmp_path_factory.mktemp("nats"), 3)
    nodes.start()
    yield nodes
    nodes.stop()


class ClusterBroker(BrokerProcess):
    """`python broker.py --cluster ...` as a process; its log goes to a file."""

    def __init__(
        self, tmp: Path, urls: str, namespace: str, name: str, *args: str, wait: bool = True
    ) -> None:
        self.log_path = tmp / f"{name}.log"
        self.wait = wait  # for its first start to be said (else: started() does)
        super().__init__(
            tmp,
            "--cluster",
            urls,
            "--namespace",
            namespace,
            "--name",
            name,
            "--heartbeat",
            str(CLUSTER_HEARTBEAT),
            "--log-level",
            "INFO",
            *args,
        )
        self.name = name

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "broker.py"), *self.args],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=ROOT,
            )
        if self.wait:
            self.started()
        self.wait = True

    def started(self) -> None:
        """Wait until the broker says it started."""
        line = self.proc.stdout.readline()
        assert line.startswith("Broker started"), line + self.log_path.read_text()
        self.proc.stdout.readline()  # "In the cluster at ... as NAME"

    def log_text(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def make_cluster_broker(nats_nodes, tmp_path):
    """Start brokers of one cluster (a namespace of their own on the shared NATS nodes);
    all are stopped, and their streams and buckets removed, afterwards."""
    from scripts.nats_local import delete_namespace

    namespace = "t" + secrets.token_hex(4)
    started: list[ClusterBroker] = []

    def make(name: str, *args: str, wait: bool = True) -> ClusterBroker:
        b = ClusterBroker(tmp_path, nats_nodes.urls, namespace, name, *args, wait=wait)
        started.append(b)
        return b

    make.namespace = namespace
    yield make
    for b in started:
        if b.proc.poll() is None:
            b.proc.kill()
        b.proc.wait()
    nats_nodes.resume()
    try:
        delete_namespace(nats_nodes.urls, namespace)
    except Exception:  # a test that broke the cluster: the next one will tell
        pass


class BrokerPair:
    """Two brokers of one cluster, for tests written for one: each read of `.port` hands
    out the other broker's, so a test's clients are spread over both; `.pub_port` is that
    of the broker whose port was handed out last."""

    def __init__(self, make, **cfg) -> None:
        flags: list[str] = []
        for key, value in cfg.items():
            if key == "operators":  # the flag is --ops
                key, value = "ops", ",".join(value)
            flag = f"--{key.replace('_', '-')}"
            flags += [flag] if value is True else [flag, str(value)]  # True: a switch
        self.brokers = [make("b1", *flags, wait=False), make("b2", *flags, wait=False)]
        for b in self.brokers:  # started at once, as an operator's two hosts may be
            b.started()
        self._turn = 0
        self._last = self.brokers[0]

    @property
    def port(self) -> int:
        self._last = self.brokers[self._turn]
        self._turn ^= 1
        return self._last.port

    @property
    def pub_port(self) -> int:
        return self._last.pub_port

    def logged_errors(self) -> list[str]:
        return [
            line
            for b in self.brokers
            for line in b.log_text().splitlines()
            if "Traceback" in line or " ERROR " in line
        ]


@pytest.fixture
def make_broker_pair(make_cluster_broker):
    """make(**Config fields) -> a BrokerPair."""
    return lambda **cfg: BrokerPair(make_cluster_broker, **cfg)
