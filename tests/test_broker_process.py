"""The broker as a user runs it: its console line, a port in use, a clean shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

from conftest import ROOT
from zmqchat import Client


def test_sigterm_tells_clients_and_exits_zero_within_two_seconds(make_broker_process):
    """SIGTERM: every client hears the broker is shutting down; exit 0 within 2 s."""
    proc = make_broker_process()

    async def scenario() -> None:
        async with Client("127.0.0.1", proc.port, "alice") as a:
            proc.proc.send_signal(signal.SIGTERM)
            t = time.monotonic()
            while True:
                ev = await a.next_event(3)
                if ev.kind == "status" and "shutting down" in ev.text:
                    break
            assert await asyncio.to_thread(proc.proc.wait, 3) == 0
            assert time.monotonic() - t < 2.0

    asyncio.run(scenario())


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
