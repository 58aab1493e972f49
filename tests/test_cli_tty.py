"""End to end: no key typed into the terminal client is lost once the chat is on screen.

Keys are pressed by the terminal's reading thread the moment the text they wait for arrives,
as a quick typist would (issue 14: Ctrl+D pressed as `lobby>` appeared was lost, 1 run in 3).
Many clients run at once, each on its own pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import struct
import subprocess
import termios
import time

import pytest
from cli_helpers import Terminal, joined, watcher

from conftest import wait_for

RUNS = 20
FULL = 4000  # bytes unread: a pseudo-terminal's input buffer (4095) is full, writes wait
CTRL_C, CTRL_D = "\x03", "\x04"


def answer_address(t: Terminal, port: int) -> None:
    """IP and port asked by the client, answered as a person does: Enter, then the port."""
    t.expect("Server IP [127.0.0.1]: ")
    t.type("\r")
    t.expect("Port [9001]: ")
    t.type(f"{port}\r")


def exit_statuses(terminals: list[Terminal], timeout: float = 15.0) -> list[int | None]:
    """Every client's exit status; None for one still running after the deadline."""
    deadline = time.monotonic() + timeout
    for t in terminals:
        try:
            t.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [t.proc.poll() for t in terminals]


def screens(terminals: list[Terminal]) -> str:
    """The end of each screen whose client did not leave with status 0."""
    return "\n\n".join(t.text[-300:] for t in terminals if t.proc.poll() != 0)


def start_pressing(chat, keys: str) -> list[Terminal]:
    """RUNS clients that press `keys` as their greeting (even runs) or prompt (odd) appears."""
    terminals = []
    for i in range(RUNS):
        t = chat("terminal", "-u", f"bob{i}", connect=False)
        shown = f"Welcome, bob{i}!" if i % 2 == 0 else "lobby>"
        t.when_shown(shown, lambda t=t: t.type(keys))
        terminals.append(t)
    for t in terminals:
        answer_address(t, chat.broker.port)
    return terminals


@pytest.mark.parametrize("key", [CTRL_D, CTRL_C], ids=["ctrl-d", "ctrl-c"])
def test_leave_key_pressed_as_the_chat_appears_is_not_lost(chat, key):
    """Ctrl+D or Ctrl+C pressed the instant the greeting or the prompt shows: 20 exits, 0."""
    terminals = start_pressing(chat, key)
    assert exit_statuses(terminals) == [0] * RUNS, screens(terminals)


def test_line_typed_as_the_chat_appears_reaches_the_room(chat):
    """A line and Enter, then Ctrl+D, typed the instant the chat shows: sent, and all leave."""
    w = watcher(chat)
    terminals = start_pressing(chat, "hi there\r" + CTRL_D)
    assert exit_statuses(terminals) == [0] * RUNS, screens(terminals)
    wait_for(
        lambda: sum(e["kind"] == "leave" for e in w.events()) == RUNS, 5, "every client leaving"
    )  # after its line, in the room's order
    said = [(e["nick"], e["text"]) for e in w.events() if e["kind"] == "msg"]
    assert sorted(said) == sorted((f"bob{i}", "hi there") for i in range(RUNS))


def unread(t: Terminal) -> int:
    """Bytes of the client's output that the terminal has not taken yet."""
    return struct.unpack("i", fcntl.ioctl(t.fd, termios.FIONREAD, b"\0" * 4))[0]


def test_leave_key_pressed_while_output_waits_is_not_lost(chat):
    """Ctrl+D pressed while a slow terminal holds up lines printed above the prompt: it leaves.

    prompt_toolkit prints such lines with the terminal in its usual (canonical) mode, where a
    Ctrl+D became an end-of-file mark and was lost; a stalled terminal keeps it there.
    """
    w = watcher(chat, "flood")
    long = "x" * 3000  # 12 of them are more than twice what a pseudo-terminal holds
    terminals = [chat("terminal", "-u", f"tom{i}") for i in range(3)]
    for i, t in enumerate(terminals):
        t.expect("lobby>")
        joined(w, f"tom{i}")
        t.when_shown(long[:100], t.reading.clear)  # the flood is on screen: stop taking it
    w.send(*(f"{n} {long}" for n in range(12)))  # under MAX_FRAME together: one request
    for t in terminals:
        wait_for(
            lambda t=t: not t.reading.is_set() and unread(t) >= FULL,
            10,
            "the terminal to be full of unread output",
        )
        t.type(CTRL_D)
        t.reading.set()
    assert exit_statuses(terminals) == [0] * len(terminals), screens(terminals)
