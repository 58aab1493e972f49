"""The broker as a user runs it: its console line, a port in use, a clean shutdown."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from conftest import ROOT, free_ports
from zmqchat import Client


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_tells_clients_and_exits_zero_within_two_seconds(make_broker_process, sig):
    """SIGTERM, and SIGHUP (the terminal a broker runs in is closed): every client hears
    the broker is shutting down; exit 0 within 2 s."""
    proc = make_broker_process()

    async def scenario() -> None:
        async with Client("127.0.0.1", proc.port, "alice") as a:
            proc.proc.send_signal(sig)
            t = time.monotonic()
            while True:
                ev = await a.next_event(3)
                if ev.kind == "status" and "shutting down" in ev.text:
                    break
            assert await asyncio.to_thread(proc.proc.wait, 3) == 0
            assert time.monotonic() - t < 2.0

    asyncio.run(scenario())


def test_a_broker_under_nohup_outlives_a_hangup(tmp_path):
    """Started with SIGHUP ignored (`nohup`), the broker keeps serving after a SIGHUP (its
    operator logged out); SIGTERM still stops it cleanly."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "broker.py"), "--port", "0", "--pub-port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # as nohup does
    )
    try:
        started = proc.stdout.readline()
        port = int(started.split("tcp://127.0.0.1:")[1].split(" ")[0])
        proc.send_signal(signal.SIGHUP)

        async def visit() -> None:
            async with Client("127.0.0.1", port, "ann") as ann:
                assert await ann.say("lobby", "still here") > 0

        asyncio.run(visit())
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_ctrl_c_exits_zero(make_broker_process):
    """Ctrl+C (SIGINT) stops the broker cleanly with status 0 and no traceback."""
    proc = make_broker_process()
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(3) == 0
    assert "Traceback" not in proc.proc.stderr.read()


def test_port_in_use_is_one_line_error(make_broker_process, tmp_path):
    """A second broker on the same port prints one line and exits 1."""
    first = make_broker_process()
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "broker.py"),
            "--port",
            str(first.port),
            "--pub-port",
            "0",
            "--db",
            str(tmp_path / "other.db"),
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "Address already in use" in run.stderr
    assert "Traceback" not in run.stderr


def test_console_line_and_motd(make_broker_process, tmp_path):
    """The started line names both addresses; --motd replaces the banner clients see."""
    motd = tmp_path / "motd.txt"
    motd.write_text("Welcome to the lab chat\n")
    proc = make_broker_process("--motd", str(motd))
    assert proc.started_line == (
        f"Broker started on tcp://127.0.0.1:{proc.port} (commands) "
        f"and tcp://127.0.0.1:{proc.pub_port} (rooms)"
    )

    async def scenario() -> None:
        async with Client("127.0.0.1", proc.port, "alice") as a:
            assert a.welcome["motd"] == "Welcome to the lab chat\n"

    asyncio.run(scenario())
    assert proc.stop() == 0


@pytest.fixture
def listening() -> Iterator[Callable[[], int]]:
    """Ports held by someone else: a listening socket each, closed afterwards."""
    held: list[socket.socket] = []

    def listen() -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        held.append(s)
        return s.getsockname()[1]

    yield listen
    for s in held:
        s.close()


FAILED_STARTS = {
    "port in use": (
        ["--port", "{busy}"],
        "--port {busy}: cannot bind on 127.0.0.1: Address already in use",
    ),
    "pub-port in use": (
        ["--pub-port", "{busy}"],
        "--pub-port {busy}: cannot bind on 127.0.0.1: Address already in use",
    ),
    "metrics port in use": (
        ["--metrics-port", "{busy}"],
        "--metrics-port {busy}: cannot bind on 127.0.0.1: Address already in use",
    ),
    "missing motd": (["--motd", "/nonexistent"], "--motd: no such file: /nonexistent"),
    "motd a folder": (["--motd", "/"], "--motd: / is a directory, not a file"),
    "missing curve key": (["--curve-key", "nokey"], "--curve-key: no such file: nokey"),
    "unknown host": (
        ["--host", "no-such-host.invalid"],
        "--host no-such-host.invalid: not an address",
    ),
}


@pytest.mark.parametrize("case", FAILED_STARTS)
def test_a_broker_that_cannot_start_says_why_and_leaves_no_files(case, listening, tmp_path):
    """A start that fails (a port in use, a missing --motd, ...) says why in one line that
    names the flag, exits 1, and leaves nothing behind: no database, no lock files."""
    args, said = FAILED_STARTS[case]
    fill = {"busy": listening(), "free": free_ports(1)[0]}
    args = [a.format(**fill) for a in args]
    if "--port" not in args:
        args += ["--port", str(free_ports(1)[0])]
    if "--pub-port" not in args:
        args += ["--pub-port", "0"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), *args],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("broker.py: " + said.format(**fill)), run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


USAGE_ERRORS = {
    "burst 0 with a rate": (
        ["--burst", "0"],
        "--burst: at least 1 (with --rate 0, nobody is limited)",
    ),
    "both ports the same": (
        ["--port", "9555", "--pub-port", "9555"],
        "--pub-port 9555: the same port as --port; give each its own",
    ),
    "metrics on the command port": (
        ["--port", "9555", "--metrics-port", "9555"],
        "--metrics-port 9555: the same port as --port; give each its own",
    ),
    "not a port": (
        ["--port", "99999"],
        "--port 99999: not a port number (1 to 65535, or 0 for any free one)",
    ),
    "allow-keys alone": (
        ["--allow-keys", "."],
        "--allow-keys: only with --curve-key (without it nobody's key is checked)",
    ),
    "heartbeat 0": (["--heartbeat", "0"], "--heartbeat 0: at least 0.1 seconds"),
    "heartbeat below 0": (["--heartbeat", "-1"], "--heartbeat -1: at least 0.1 seconds"),
    "rate below 0": (["--rate", "-1"], "--rate -1: 0 (nobody is limited) or more"),
    "grace below 0": (["--upload-grace", "-5"], "--upload-grace -5: 0 seconds or more"),
    "no rooms": (
        ["--rooms", ""],
        "--rooms: at least one room (or --allow-new-rooms: /join makes them)",
    ),
    "a room twice": (["--rooms", "lobby,work,lobby"], "--rooms: lobby named twice"),
    "an operator nobody can be": (
        ["--ops", "teacher,9bad"],
        "--ops: '9bad' can never be a nickname: ",
    ),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_flags_that_make_no_sense_are_usage_errors(case, tmp_path):
    """A flag value the broker cannot work with (a heartbeat of 0 made every client drop
    and reconnect in a loop; an empty --rooms let no client in) is a usage error: status
    2, one line that names the flag, nothing created."""
    args, said = USAGE_ERRORS[case]
    if "--port" not in args:  # (were the check gone, it would not take the default ports)
        args = [*args, "--port", "0", "--pub-port", "0"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), *args],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=tmp_path,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("broker.py: " + said), run.stderr
    assert run.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())


LOG_LIMIT = 256 * 1024  # bytes a file of the broker may grow to (RLIMIT_FSIZE): a full disk


def test_a_log_that_cannot_be_written_holds_every_acknowledgement_until_it_can(tmp_path):
    """The history log stops taking writes (a full disk; here the file-size limit of the
    broker's process): nothing more is acknowledged, the broker says why and stays up;
    once writes go through again, what waited is acknowledged, stored once; after a kill
    -9 then, history holds every message ever acknowledged."""
    import resource

    port, pub_port = free_ports()
    args = [sys.executable, str(ROOT / "broker.py"), "--port", str(port)]
    args += ["--pub-port", str(pub_port), "--db", str(tmp_path / "chat.db"), "--rate", "0"]

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (LOG_LIMIT, resource.RLIM_INFINITY))

    err = open(tmp_path / "broker.err", "w")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=limited)

    def said() -> str:
        return (tmp_path / "broker.err").read_text()

    async def chat() -> tuple[dict[int, str], list[int]]:
        acked: dict[int, str] = {}
        async with Client(f"127.0.0.1:{port}", nick="filler", timeout=5) as c:
            for i in range(1000):  # ~2 KB each: past the limit within a few hundred
                send = asyncio.ensure_future(c.say("lobby", f"m{i} " + "x" * 2000))
                done, _ = await asyncio.wait({send}, timeout=3)
                if not done:
                    break
                acked[send.result()] = f"m{i}"
            else:
                raise AssertionError("the log never stopped taking writes")
            assert "the history log cannot be written (File too large)" in said(), said()
            assert proc.poll() is None  # up, holding
            for pid in [proc.pid, *children(proc.pid)]:  # the disk has room again
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            held = await asyncio.wait_for(send, 30)  # the held message, now stored
            acked[held] = f"m{i}"
            last = await c.say("lobby", "after")
            acked[last] = "after"
        return acked, sorted(acked)

    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("Broker started")
        acked, seqs = asyncio.run(chat())
        assert "the history log is written again" in said()
        proc.kill()
        proc.wait()
        again = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert again.stdout is not None and again.stdout.readline().startswith("Broker")

            async def read() -> dict[int, str]:
                async with Client(f"127.0.0.1:{port}", nick="reader") as r:
                    kept: dict[int, str] = {}
                    before = None
                    while True:
                        page = await r.history("lobby", before=before, limit=500)
                        msgs = [e for e in page if e.kind == "msg"]
                        kept.update({int(e.seq): e.text.split(" ")[0] for e in msgs})
                        if len(page) < 500:
                            return kept
                        before = min(int(e.seq) for e in page)

            kept = asyncio.run(read())
        finally:
            again.kill()
            again.wait()
        assert {seq: kept.get(seq) for seq in seqs} == acked  # each where it was acknowledged
        assert sorted(kept.values()) == sorted(set(kept.values()))  # and stored once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()


def children(pid: int) -> list[int]:
    """The processes a process started (the broker's history writer)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]
