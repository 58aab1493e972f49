"""How the command-line client shows things: one line per event, escaped, optionally coloured.

Text from the network never reaches the terminal raw: control characters (ESC, BEL, CR, C1,
bidi overrides, ...) are shown as `\\x1b`-style escapes, so a message cannot move the cursor,
recolour the screen or disguise itself. `Screen` writes the lines: human-readable (coloured in
a terminal) or, with --json, one JSON object per line.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import zlib
from typing import Any, Final

from zmqchat import protocol
from zmqchat._client.library import Event, Status
from zmqchat.protocol import EventKind

# C0 and C1 controls, DEL, line/paragraph separators and the bidi controls that can make a line
# read differently from what it holds.
_CONTROL: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
# Nick colours: the bright and normal ANSI colours that read well on dark and light backgrounds
# (no black, white or dark blue).
PALETTE: Final = ("31", "32", "33", "35", "36", "91", "92", "93", "94", "95", "96")
DIM: Final = "2"
BOLD: Final = "1"
MENTION: Final = "30;43"  # black on yellow
ERROR: Final = "31"
SPOKEN: Final = frozenset(  # may mention someone
    {EventKind.MSG, EventKind.ACTION, EventKind.PRIVATE, EventKind.EDIT}
)
NOTICE_KINDS: Final = frozenset(
    {EventKind.JOIN, EventKind.LEAVE, EventKind.NICK, EventKind.TOPIC}
    | {EventKind.KICK, EventKind.BAN, EventKind.NOTICE, EventKind.DELETE}
)


def escape(text: str) -> str:
    """Text with every control character made visible: ESC becomes the four characters \\x1b."""
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def nick_colour(nick: str) -> str:
    """The same colour for a nick in every session (crc32: Python's hash() is salted)."""
    return PALETTE[zlib.crc32(nick.encode("utf-8", "replace")) % len(PALETTE)]


def mentions(text: str, nick: str) -> bool:
    """Does text name nick as a word (folded as nicks are: any case, look-alike letters)?"""
    return protocol.mentions(text, nick)


def clock(ts: float) -> str:
    """HH:MM in local time; with the date when it is not today (old history)."""
    when = time.localtime(ts or time.time())
    if time.strftime("%Y-%m-%d", when) != time.strftime("%Y-%m-%d"):
        return time.strftime("%Y-%m-%d %H:%M", when)
    return time.strftime("%H:%M", when)


def event_json(ev: Event, quote: str | None = None, me: str = "") -> str:
    """One event as a JSON line: the broker's fields plus the client's view (mine, backlog;
    for a reply, `quote`: what it answers, as shown; for an edit, what its message said
    before, when this client had shown it; `mention` when it names `me`)."""
    data: dict[str, Any] = dict(ev.data)
    if quote is not None:
        data["quote"] = quote
    if me and not ev.mine and ev.kind in SPOKEN and mentions(ev.text, me):
        data["mention"] = True
    data.update(
        kind=ev.kind,
        room=ev.room,
        seq=ev.seq,
        ts=ev.ts,
        nick=ev.nick,
        text=ev.text,
        bot=ev.bot,
        mine=ev.mine,
        backlog=ev.backlog,
    )
    return json_line(data)


def json_line(data: dict[str, Any]) -> str:
    """Compact JSON, readable Unicode, and no raw control character even outside C0."""
    return _CONTROL.sub(
        lambda mt: f"\\u{ord(mt.group()):04x}", json.dumps(data, ensure_ascii=False, default=str)
    )


class Render:
    """Formats events and local lines; `colour` adds ANSI colours (terminal mode only)."""

    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and code else text

    def event(self, ev: Event, *, me: str, room: str | None, quote: str | None = None) -> str:
        """One line for one event; `me` is our nick (mentions), `room` the current room,
        `quote` what a reply answers."""
        # a dimmed line keeps no inner colours: a reset would end the dim; what an account
        # had not read yet (caught up with on entering a room) is not dimmed
        dimmed = ev.backlog and not ev.data.get("unread")
        nick = escape(ev.nick)
        if not dimmed:
            nick = self.paint(
                nick, BOLD + ";" + nick_colour(ev.nick) if ev.mine else nick_colour(ev.nick)
            )
        text = escape(ev.text)
        if not dimmed and not ev.mine and ev.kind in SPOKEN and mentions(ev.text, me):
            text = self.paint(text, MENTION)
        if ev.kind == EventKind.EDIT or ev.data.get("edited"):  # a fixed message (issue 23)
            text += " (edited)"
        if quote is not None and ev.kind == EventKind.EDIT:  # what the message said before
            text += f" [was: {escape(quote)}]"
        elif quote is not None:  # what a reply answers (issue 23)
            text = f"[re {escape(quote)}] {text}"
        body = self.body(ev, nick, text)
        if ev.bot:
            body = "[bot] " + body
        if ev.room and room and ev.room != room and ev.kind != Status.UNREAD:
            body = f"[{escape(str(ev.room))}] {body}"
        if dimmed:
            body = "[earlier] " + body
        if dimmed:
            return self.paint(f"{clock(ev.ts)} {body}", DIM)
        if ev.kind in NOTICE_KINDS:  # no inner colours in a notice: the whole line is muted
            body = self.paint(body, DIM)
        elif ev.kind in (Status.KIND, Status.UNREAD):
            body = self.paint(body, BOLD)
        return self.paint(f"{clock(ev.ts)} ", DIM) + body

    @staticmethod
    def body(ev: Event, nick: str, text: str) -> str:
        """What the event says, with its nick and text as they are to be shown."""
        kind = ev.kind
        if kind in (EventKind.MSG, EventKind.EDIT):
            return f"<{nick}> {text}"
        if kind == EventKind.ACTION:
            return f"* {nick} {text}"
        if kind == EventKind.PRIVATE:
            if ev.mine:
                return f"[private -> {escape(str(ev.data.get('to', '?')))}] {text}"
            return f"[private] {nick}: {text}"
        if kind == EventKind.TOPIC:
            return "-- " + escape(str(ev.data.get("note") or f"topic: {ev.text}"))
        if kind in (Status.KIND, Status.UNREAD):
            return "*** " + text
        if kind == EventKind.FILE and ev.data.get("to"):  # a file offered to one person
            to = escape(str(ev.data["to"]))
            return f"[private -> {to}] {text}" if ev.mine else f"[private] {text}"
        return "-- " + text  # join, leave, nick, kick, ban, notice, and kinds a newer broker adds

    def note(self, text: str) -> str:
        return "\n".join(f"-- {line}" for line in text.split("\n"))

    def error(self, text: str) -> str:
        return self.paint(f"!! {text}", ERROR)


class Screen:
    """Where the client's lines go: stdout, human lines or JSON lines, flushed one by one."""

    def __init__(self, *, json_mode: bool, colour: bool) -> None:
        self.json_mode = json_mode
        self.render = Render(colour and not json_mode)
        self.closed = False  # stdout went away (`client.py | head`): time to leave

    def write(self, line: str) -> None:
        if self.closed:
            return
        try:
            print(line, flush=True)
        except BrokenPipeError:
            self.closed = True
            # Later writes (and the flush at exit) go nowhere instead of raising again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    def event(self, ev: Event, *, me: str, room: str | None, quote: str | None = None) -> None:
        self.write(
            event_json(ev, quote, me)
            if self.json_mode
            else self.render.event(ev, me=me, room=room, quote=quote)
        )

    def note(self, text: str, kind: str = "info", **data: Any) -> None:
        """A local line (a command's answer); in JSON mode an object with `kind` and `text`."""
        if self.json_mode:
            self.write(json_line({"kind": kind, "text": text, **data}))
        else:
            self.write(self.render.note(escape_lines(text)))

    def error(self, text: str, code: str = "") -> None:
        if self.json_mode:
            self.write(json_line({"kind": "error", "code": code, "text": text}))
        else:
            self.write(self.render.error(escape(text)))


def escape_lines(text: str) -> str:
    """Escape each line of a multi-line text (a banner), keeping the line breaks."""
    return "\n".join(escape(line) for line in text.split("\n"))
