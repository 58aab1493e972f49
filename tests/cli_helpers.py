"""Running `client.py` as people and scripts do: in a pseudo-terminal or through pipes, with
fixtures that start a broker process and clients and always stop them."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator

import pytest

from conftest import ROOT, wait_for

CLIENT = str(ROOT / "client.py")
# Terminal control sequences, to read a terminal's output as the text a person sees.
ANSI = re.compile(
    rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]"
    rb"|\x1b[=>78]"
)


def client_env() -> dict[str, str]:
    env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", PYTHONUNBUFFERED="1")
    env.pop("NO_COLOR", None)
    return env


class Terminal:
    """client.py on a pseudo-terminal: type into it and read its screen, as a person would."""

    def __init__(self, *args: str) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, CLIENT, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env=client_env(),
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )  # Ctrl+C is SIGINT
        os.close(slave)
        self.fd = master
        self.raw = b""
        self.mark = 0  # text before this offset has been matched already
        self._lock = threading.Lock()
        self._when: tuple[str, Callable[[], None]] | None = None
        self.reading = threading.Event()  # cleared: the terminal takes no more output
        self.reading.set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while self.reading.wait():
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the client exited and the terminal closed
                return
            if not chunk:
                return
            with self._lock:
                self.raw += chunk
            if self._when is not None and self._when[0] in self.text:
                then, self._when = self._when[1], None
                then()

    def when_shown(self, wanted: str, then: Callable[[], None]) -> None:
        """Call then() the moment `wanted` is on screen, before reading any further output."""
        self._when = (wanted, then)

    @property
    def text(self) -> str:
        """Everything shown so far, without terminal control sequences."""
        with self._lock:
            raw = self.raw
        return ANSI.sub(b"", raw).replace(b"\r", b"").decode("utf-8", "replace")

    def expect(self, wanted: str, timeout: float = 5.0) -> None:
        """Wait until `wanted` is shown after what earlier expects matched."""

        def found() -> bool:
            at = self.text.find(wanted, self.mark)
            if at >= 0:
                self.mark = at + len(wanted)
            return at >= 0

        try:
            wait_for(found, timeout, repr(wanted))
        except AssertionError:
            raise AssertionError(f"{wanted!r} not shown; the screen had:\n{self.text}") from None

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def ready(self, room: str = "lobby") -> None:
        """Wait for the chat's prompt: from here on, keys go to prompt_toolkit."""
        self.expect(f"{room}>")

    def exit_status(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout)


class Script:
    """client.py with pipes, as a script runs it: lines in, lines (or JSON objects) out."""

    def __init__(self, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, CLIENT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**client_env(), **env},
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        for stream, into in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors)):
            threading.Thread(target=self._collect, args=(stream, into), daemon=True).start()

    @staticmethod
    def _collect(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def send(self, *lines: str) -> None:
        self.proc.stdin.write("".join(line + "\n" for line in lines))
        self.proc.stdin.flush()

    def events(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines)]

    def wait_event(self, cond: Callable[[dict], bool], what: str, timeout: float = 5.0) -> dict:
        try:
            return wait_for(
                lambda: next((e for e in self.events() if cond(e)), None), timeout, what
            )
        except AssertionError:
            raise AssertionError(f"no {what}; got:\n" + "\n".join(self.lines)) from None

    def wait_line(self, wanted: str, timeout: float = 5.0) -> str:
        try:
            return wait_for(
                lambda: next((ln for ln in list(self.lines) if wanted in ln), None),
                timeout,
                repr(wanted),
            )
        except AssertionError:
            raise AssertionError(
                f"{wanted!r} not printed; got:\n"
                + "\n".join(self.lines)
                + "\nstderr:\n"
                + "\n".join(self.errors)
            ) from None

    def end_input(self, timeout: float = 5.0) -> int:
        """Close stdin (end of input) and return the exit status."""
        self.proc.stdin.close()
        return self.proc.wait(timeout)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """Client processes a test starts; any still running afterwards are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def chat(make_broker_process, started) -> Callable[..., object]:
    """A broker process, and a factory for clients connected to it: chat(kind, *args)."""
    broker = make_broker_process()

    def start(kind: str, *args: str, connect: bool = True):
        where = ["-i", "127.0.0.1", "-p", str(broker.port)] if connect else []
        runner = Terminal(*where, *args) if kind == "terminal" else Script(*where, *args)
        started.append(runner.proc)
        return runner

    start.broker = broker
    return start


def watcher(chat, nick: str = "watcher", *args: str) -> Script:
    """A --json client that reports what the others do; ready once its own join is seen."""
    w = chat("script", "--json", "-u", nick, *args)
    w.wait_event(
        lambda e: e["kind"] == "join" and e["nick"] == nick and not e["backlog"],
        f"{nick}'s own join",
    )
    return w


def joined(w: Script, nick: str) -> dict:
    return w.wait_event(
        lambda e: e["kind"] == "join" and e["nick"] == nick and not e["backlog"], f"{nick} joining"
    )


# ---------------------------------------------------------------------------- asking
