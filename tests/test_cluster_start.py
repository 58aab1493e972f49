"""Starting a cluster: brokers against NATS clusters that have only just started, and
scripts/cluster.py as a new user runs it (real nats-server nodes, brokers as processes)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import zmq

from conftest import ROOT, wait_for
from conftest import port_free as free
from scripts.nats_local import LocalNats
from zmqchat import Client
from zmqchat._config import Config
from zmqchat.broker._loop import Broker

FRESH_CLUSTERS = 10  # each with BROKERS_EACH brokers: 50 starts
BROKERS_EACH = 5
AT_ONCE = 4  # clusters started side by side (each is three nats-server processes)


def start_broker(urls: str, name: str, folder: Path) -> str:
    """Start a broker on a cluster (in this process, as conftest's brokers run: the same
    Broker that broker.py starts) and stop it again; what went wrong, or ""."""
    try:
        cfg = Config(port=0, pub_port=0, cluster_urls=urls, name=name, db=str(folder / "chat.db"))
        broker = Broker(cfg, ctx=zmq.Context())
    except OSError as err:
        return f"{name}: {err}"
    broker.stop()
    broker.run()  # returns at once: stops, says goodbye to NATS, closes its sockets
    broker.ctx.term()
    return ""


def ready(nodes: LocalNats, early: bool) -> bool:
    """Listening (`early`), or one of them says it serves JetStream (a meta leader is
    elected), as a deployment script or a test fixture would wait; or one died."""
    if nodes.died():
        return True
    if early:
        return all(n.listening() for n in nodes.nodes)
    return any(n.healthy() for n in nodes.nodes)


def fresh_nodes(folder: Path, early: bool) -> LocalNats:
    """3 NATS nodes, just started (see ready())."""
    for attempt in range(3):
        nodes = LocalNats(folder / f"try{attempt}", 3)
        for node in nodes.nodes:
            node.start()
        wait_for(partial(ready, nodes, early), 30, "the nodes")
        if not nodes.died():
            return nodes
        for node in nodes.nodes:  # a port taken meanwhile by another process: other ports
            node.kill()
    raise AssertionError(f"no NATS cluster started: {nodes.died()}")


def start_against_a_fresh_cluster(folder: Path, early: bool) -> list[str]:
    """BROKERS_EACH brokers at once on a cluster started just before them; what went wrong."""
    nodes = fresh_nodes(folder, early)
    names = [f"b{i + 1}" for i in range(BROKERS_EACH)]
    try:
        with ThreadPoolExecutor(BROKERS_EACH) as each:
            started = each.map(lambda n: start_broker(nodes.urls, n, folder), names)
            return [problem for problem in started if problem]
    finally:
        for node in nodes.nodes:
            node.kill()


def test_brokers_start_against_fifty_fresh_clusters(tmp_path):
    """50 broker starts (five at once on each of 10 NATS clusters started just before them,
    half of them before the nodes have elected a leader): every one joins its cluster; one
    that meets a cluster still settling waits for it instead of giving up."""
    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(
            pool.map(
                lambda i: start_against_a_fresh_cluster(tmp_path / f"c{i}", early=i % 2 == 0),
                range(FRESH_CLUSTERS),
            )
        )
    failed = [p for problems in results for p in problems]
    assert not failed, (
        f"{len(failed)} of {BROKERS_EACH * FRESH_CLUSTERS} starts failed:\n" + "\n".join(failed)
    )


# ---------------------------------------------------------------------------- scripts/cluster.py


def script_ports() -> tuple[int, int]:
    """Free ports for scripts/cluster.py: NATS base..+2, +2000.., +4000..; brokers port, +1,
    +10, +11. All below the kernel's ephemeral range (32768 and up here), whose ports any
    process may be given at any moment (a test elsewhere binding port 0, a connection)."""
    rng = random.Random()
    while True:
        base, port = rng.randrange(20000, 24000), rng.randrange(29000, 32700)
        wanted = [base + d + i for d in (0, 2000, 4000) for i in range(3)]
        if all(free(p) for p in [*wanted, port, port + 1, port + 10, port + 11]):
            return base, port


def run_script(base: int, port: int, folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "cluster.py"), "--nats-port", str(base)]
        + ["--port", str(port), "--dir", str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )


def read_until(proc: subprocess.Popen[str], start: str, lines: list[str]) -> str:
    """Lines of the script's output up to the first that starts with `start`."""
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if line.startswith(start):
            return line


def test_the_cluster_script_runs_a_cluster_says_what_ends_and_stops_on_ctrl_c(tmp_path):
    """scripts/cluster.py, as the README has a new user run it: 3 NATS nodes and 2 brokers
    on this machine; a client on each broker hears the other; a broker killed is reported,
    and started again when its name is typed; piped into a reader that goes away (`| tee
    log`, Ctrl+C), Ctrl+C still stops everything and frees every port."""
    base, port = script_ports()
    proc = run_script(base, port, tmp_path / "nats")
    lines: list[str] = []
    try:
        read_until(proc, "Try:", lines)
        lines.append(proc.stdout.readline())
        alice = f"127.0.0.1:{port},127.0.0.1:{port + 10}"
        bob = f"127.0.0.1:{port + 10},127.0.0.1:{port}"
        assert f"Try:  python client.py -i {alice} -u alice\n" in lines
        assert f"      python client.py -i {bob} -u bob\n" in lines
        pids = {
            line.split()[0]: int(line.split()[2].rstrip("):"))
            for line in lines
            if line.startswith(("b1 (pid", "b2 (pid"))
        }

        async def chat() -> None:
            async with Client(alice, nick="alice") as a, Client(bob, nick="bob") as b:
                heard: list[str] = []

                async def listen() -> None:
                    async for ev in b:
                        heard.append(ev.text)

                task = asyncio.create_task(listen())
                await a.say("lobby", "across the cluster")
                deadline = time.monotonic() + 10
                while "across the cluster" not in heard:
                    assert time.monotonic() < deadline, "bob never heard alice"
                    await asyncio.sleep(0.02)
                task.cancel()
                assert (a.welcome["broker"], b.welcome["broker"]) == ("b1", "b2")

        asyncio.run(chat())
        os.kill(pids["b1"], signal.SIGKILL)
        said = read_until(proc, f"broker b1 (pid {pids['b1']}) stopped", lines)
        assert "killed by SIGKILL; type b1 and Enter to start it again" in said
        proc.stdin.write("b1\n")  # typed in the script's terminal: b1 again, its own
        proc.stdin.flush()
        again = read_until(proc, "b1 (pid ", lines)
        assert " started again: Broker started on " in again, again
        pids["b1 again"] = int(again.split()[2].rstrip(")"))

        async def back() -> None:
            async with Client(f"127.0.0.1:{port}", nick="carol") as c:
                assert c.welcome["broker"] == "b1"

        asyncio.run(back())
        proc.stdout.close()  # the reader is gone: every line from now on is a broken pipe
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in pids.values():
        wait_for(lambda pid=pid: not alive(pid), 5, f"broker {pid} gone")
    taken = [p for p in [base, base + 1, base + 2, port, port + 1, port + 10] if not free(p)]
    assert not taken, f"ports still held: {taken}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waits for its parent: it is gone
        return f.read().split()[2] != "Z"


def test_the_cluster_script_refuses_ports_an_old_cluster_holds(tmp_path):
    """With an old cluster still running on its ports, scripts/cluster.py says so and stops
    at once, instead of reporting the old cluster as its own and starting brokers on it."""
    base, port = script_ports()
    old = LocalNats(
        tmp_path / "old",
        3,
        [p for i in range(3) for p in (base + i, base + 2000 + i, base + 4000 + i)],
    )
    old.start()
    try:
        proc = run_script(base, port, tmp_path / "new")
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1, out
        assert f"ports {base}, " in out and "in use (an old cluster still running?" in out
        assert "Broker started" not in out
        assert all(n.died() is None for n in old.nodes)  # the old one is left alone
    finally:
        old.stop()


def test_the_cluster_script_says_at_once_when_a_brokers_port_is_taken(tmp_path):
    """A broker (or anything) already on the first broker's port: scripts/cluster.py says
    which port and how to choose others, before it starts any NATS node."""
    base, port = script_ports()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = run_script(base, port, tmp_path / "new")
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert f"the brokers' port {port} is in use" in out and "--port N" in out, out
    assert "NATS" not in out  # nothing was started


def test_a_port_left_in_time_wait_is_free_for_a_new_cluster():
    """Run again at once after Ctrl+C, scripts/cluster.py found its ports `in use`: the
    connections the old nodes had closed were in TIME_WAIT. Only a listener counts."""
    from scripts.nats_local import in_use

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's servers do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert in_use(port)
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the listening side closes first: its end waits in TIME_WAIT
            client.recv(1)  # (the close has arrived)
    with socket.socket() as plain:  # what the check did before: a bind without SO_REUSEADDR
        try:
            plain.bind(("127.0.0.1", port))
            held = False
        except OSError:
            held = True
    assert held, "no socket of the port was left in TIME_WAIT: the test proves nothing"
    assert not in_use(port)


def test_a_broker_started_before_its_nats_servers_waits_for_them(tmp_path, caplog):
    """Brought up together (containers, a deployment script), the broker may start before
    any NATS server listens: it says it waits, and starts once they are there."""
    nodes = LocalNats(tmp_path / "late", 3)
    try:
        with ThreadPoolExecutor(1) as one:
            starting = one.submit(start_broker, nodes.urls, "b1", tmp_path)
            wait_for(lambda: "no NATS server answers at" in caplog.text, 20, "the broker waiting")
            assert not starting.done()
            for node in nodes.nodes:
                node.start()
            assert starting.result(timeout=90) == ""
    finally:
        for node in nodes.nodes:
            node.kill()


@pytest.mark.parametrize(
    ("urls", "said"),
    [
        ("http://127.0.0.1:4222", "not a NATS server's address (nats://HOST:PORT)"),
        ("nats://127.0.0.1:4222 nats://127.0.0.1:4223", "separate the NATS servers with commas"),
    ],
)
def test_what_cannot_be_a_nats_address_is_said_at_once(urls, said, tmp_path):
    """A wrong scheme or a list with spaces is refused before any wait for an answer."""
    assert said in start_broker(urls, "b1", tmp_path)  # (no NATS server was asked)
