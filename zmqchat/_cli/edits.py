"""The terminal client's commands to fix, answer and find messages (issue 23), a part of
`Chat` (chat.py):

    s/old/new/          edit your last message in this room (`s/old/new/g`: every `old`)
    /edit TEXT          replace your last message in this room
    /delete             delete it
    /purge NICK [N]     operators: remove NICK's last N messages (default 1)
    /reply NICK TEXT    answer NICK's last message in this room, quoting it
    /search [-a] WORDS  this room (-a: every room you are in, and your private messages)

It remembers what it has seen of each room (the latest messages, who said what last, what
you said), so that a reply shows what it answers without asking the broker, and asks the
broker's history only for what it has not seen.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

from zmqchat import protocol as m
from zmqchat._cli.errors import UsageError
from zmqchat._cli.render import DIM, MENTION, clock, escape
from zmqchat._client.library import ChatError, Client, Event

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from zmqchat._cli.render import Screen

REMEMBERED: Final = 2000  # messages kept per room to quote and to find "NICK's last"
QUOTE_WORDS: Final = 6  # words of a quoted message shown with a reply
QUOTE_CHARS: Final = 40  # ... and at most this many characters of them
SUBSTITUTE: Final = re.compile(r"s/((?:\\.|[^\\/])*)/((?:\\.|[^\\/])*)/(g?)\s*")
# s/old/new without its closing slash (each a word): an edit only if old is in our last line
SUBSTITUTE_OPEN: Final = re.compile(r"s/((?:\\.|[^\\/\s])+)/((?:\\.|[^\\/\s])*)()")
MESSAGE_KINDS: Final = ("msg", "action")
ACK_WAIT: Final = 5.0  # seconds an edit waits for the lines typed before it to be stored
# Rows of the chat's commands (chat.py: /help and the README's table are made from them).
COMMANDS: Final = (
    (
        "s/OLD/NEW/",
        "edit your last message in the room: its first OLD becomes NEW (`s/OLD/NEW/g`: every one)",
    ),
    ("/edit TEXT", "replace your last message in the room; everyone sees it `(edited)`"),
    ("/delete", "delete your last message in the room: its text is gone from the history"),
    ("/purge NICK [N]", "remove NICK's last N messages in the room, default 1 (operators)"),
    ("/reply NICK TEXT", "answer NICK's last message in the room (shown with a short quote of it)"),
    (
        "/search [-a] WORDS",
        "find messages in the room (`-a`: in all your rooms and private messages); "
        '`deploy*` finds words that start so, `"build failed"` a phrase',
    ),
)


def quote_of(nick: str, text: str) -> str:
    """A short quote: the sender and the first words of what they said."""
    return f"{nick}: {first_words(text)}"


def first_words(text: str) -> str:
    words = text.split()
    short = " ".join(words[:QUOTE_WORDS])
    if len(short) > QUOTE_CHARS:
        short = short[: QUOTE_CHARS - 1].rstrip()
    if short != " ".join(words):
        short += "…"
    return short


def _int(value: Any) -> int:
    """A seq from an event's field (0, which no event has, if it is not a number)."""
    return value if type(value) is int else 0


async def _stored(sends: set[asyncio.Task[Any]]) -> None:
    """Wait a while for these sends to be acknowledged (or refused)."""
    if sends:
        await asyncio.wait(sends, timeout=ACK_WAIT)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


class EditCommands:
    """What Chat does for edits, replies and search; see the module docstring."""

    if TYPE_CHECKING:  # what it uses of Chat
        client: Client
        screen: Screen
        room: str

        def send(self, start: Callable[[], Awaitable[Any]], text: str, room: str = "") -> None: ...

        sends: set[asyncio.Task[Any]]

    def edit_commands(self) -> dict[str, Callable[[str], Awaitable[None]]]:
        self.seen: dict[str, OrderedDict[int, tuple[str, str]]] = {}  # room -> seq -> said
        self.said: dict[str, OrderedDict[int, str]] = {}  # room -> seq -> our text
        self.last_by: dict[str, dict[str, int]] = {}  # room -> nick key -> its last message
        self.edits_under_way: set[asyncio.Future[None]] = set()  # s/// waiting for acks
        return {
            "edit": self.cmd_edit,
            "delete": self.cmd_delete,
            "purge": self.cmd_purge,
            "reply": self.cmd_reply,
            "search": self.cmd_search,
        }

    # ------------------------------------------------------------------ what was said
    def sent(self, room: str, seq: int, text: str) -> None:
        """Our message was stored as seq (its acknowledgement may come before its echo)."""
        said = self.said.setdefault(room, OrderedDict())
        said[seq] = text
        while len(said) > REMEMBERED:
            said.popitem(last=False)

    def remember(self, ev: Event) -> None:
        """Keep track of the messages of a room as its events are shown."""
        room, seq = ev.room, ev.seq
        if room is None or not isinstance(seq, int):
            return
        seen = self.seen.setdefault(room, OrderedDict())
        if ev.kind in MESSAGE_KINDS:
            seen[seq] = (ev.nick, ev.text)
            while len(seen) > REMEMBERED:
                seen.popitem(last=False)
            self.last_by.setdefault(room, {})[m.nick_key(ev.nick)] = seq
            if ev.mine:
                self.sent(room, seq, ev.text)
        elif ev.kind == "edit":
            ref = _int(ev.data.get("ref"))
            if ref in seen:
                seen[ref] = (seen[ref][0], ev.text)
            if ref in self.said.get(room, {}):
                self.said[room][ref] = ev.text
        elif ev.kind in ("delete", "deleted"):
            gone = _int(ev.data.get("ref")) if ev.kind == "delete" else seq
            seen.pop(gone, None)
            self.said.get(room, OrderedDict()).pop(gone, None)
            last = self.last_by.get(room, {})
            for key in [k for k, s in last.items() if s == gone]:
                del last[key]

    def was(self, ev: Event) -> str | None:
        """For an edit of a message shown here (before remember() takes the edit in): the
        first words it said before, so that the edit says which message it changed."""
        if ev.kind != "edit" or ev.room is None or ev.backlog:
            return None
        known = self.seen.get(ev.room, OrderedDict()).get(_int(ev.data.get("ref")))
        return first_words(known[1]) if known is not None and known[1] != ev.text else None

    async def quote(self, ev: Event) -> str | None:
        """The short quote a reply is shown with ("bob: is the deploy…"), asked of history
        when the message is not one we have seen; None for anything but a reply."""
        ref = ev.data.get("re")
        if ev.room is None or type(ref) is not int:
            return None
        known = self.seen.get(ev.room, OrderedDict()).get(ref)
        if known is None and ev.room in self.client.rooms:
            try:
                original = await self.client.message(ev.room, ref)
            except ChatError:
                original = None
            if original is not None and original.kind in MESSAGE_KINDS:
                known = (original.nick, original.text)
        if known is None:
            return f"{ev.data.get('re_nick', '?')}: a deleted message"
        return quote_of(*known)

    def listing(self, events: list[Event]) -> list[Event]:
        """Of a listing (/history, a catch-up), the events a person is shown: a message
        once, as it reads now (its edits and what is left of it deleted folded in); an
        edit of a message before the listing as that message: its last edit only."""
        if self.screen.json_mode:
            return list(events)
        listed = {int(ev.seq or 0) for ev in events if ev.kind in MESSAGE_KINDS}
        last_edit = {ev.data.get("ref"): ev.seq for ev in events if ev.kind == "edit"}
        return [
            ev
            for ev in events
            if not self.hidden(ev, listed)
            and not (ev.kind == "edit" and last_edit[ev.data.get("ref")] != ev.seq)
        ]

    def hidden(self, ev: Event, listed: set[int] | None = None) -> bool:
        """Events a person is not shown: what is left of a deleted message, and an edit
        whose message is shown already (edited) in the same listing or backlog."""
        if ev.kind == "deleted":
            return True
        if ev.kind != "edit" or ev.room is None:
            return False
        ref = ev.data.get("ref")
        if listed is not None:
            return ref in listed
        return ev.backlog and ref in self.seen.get(ev.room, {})

    # ------------------------------------------------------------------ commands
    async def _last_mine(self, verb: str) -> tuple[int, str]:
        """Our last message in the room (seq, text): one sent from this client; an
        account's nick is its alone, so for an account also the last one under its nick
        in the room's history (sent before it logged in again, or from another device:
        the broker checks it is ours)."""
        room, said = self.room, self.said.get(self.room)
        if said:
            seq = max(said)
            return seq, said[seq]
        if self.client.acct.account:
            me = m.nick_key(self.client.nick)
            for ev in reversed(await self.client.history(room, limit=m.MAX_HISTORY)):
                if ev.kind in MESSAGE_KINDS and m.nick_key(ev.nick) == me and ev.seq:
                    return int(ev.seq), ev.text
        raise ChatError(  # typed right, nothing to act on: not a usage error
            m.Code.NO_SUCH_MESSAGE,
            f"you have no message in {room} to {verb} "
            + (
                f"(in its last {m.MAX_HISTORY} events)"
                if self.client.acct.account
                else "(only those sent from this client count)"
            ),
        )

    def substitution(self, line: str) -> bool:
        """`s/old/new/` on its own line: edit our last message in the room. Whether the
        line was one."""
        found = SUBSTITUTE.fullmatch(line) or self._open_substitution(line)
        if found is None or not self.room:
            return False
        old, new, every = _unescape(found[1]), _unescape(found[2]), bool(found[3])
        if not old:
            self.screen.error("usage: s/OLD/NEW/", "USAGE")
            return True
        typed_after = set(self.sends)
        task = asyncio.ensure_future(self._substitute(self.room, old, new, every, typed_after))
        self.edits_under_way.add(task)
        task.add_done_callback(self.edits_under_way.discard)
        return True

    def _open_substitution(self, line: str) -> re.Match[str] | None:
        """`s/old/new` without its closing slash: an edit too when old is in our last
        message here (as sent from this client); else it is text ("s/he/it will do")."""
        found = SUBSTITUTE_OPEN.fullmatch(line)
        said = self.said.get(self.room)
        if found is None or not said or _unescape(found[1]) not in said[max(said)]:
            return None
        return found

    async def _substitute(
        self, room: str, old: str, new: str, every: bool, after: set[asyncio.Task[Any]]
    ) -> None:
        """s/old/new/ once the lines typed before it are stored: the last of them is the
        one to fix (in a cluster the room may show a line before its acknowledgement)."""
        await _stored(after)
        if room != self.room:
            return
        try:
            seq, text = await self._last_mine("edit")
        except ChatError as err:
            self.screen.error(err.reason, err.code)
            return
        if room != self.room:
            return
        if old not in text:
            self.screen.error(f"{old!r} is not in your last message: nothing was changed", "USAGE")
            return
        fixed = text.replace(old, new) if every else text.replace(old, new, 1)
        self._edit(seq, fixed)

    def _edit(self, seq: int, text: str) -> None:
        room = self.room
        self.send(lambda: self._edited(room, seq, text), text)

    async def _edited(self, room: str, seq: int, text: str) -> None:
        await self.client.edit(room, seq, text)
        self.said.setdefault(room, OrderedDict())[seq] = text

    async def cmd_edit(self, arg: str) -> None:
        if not arg:
            raise UsageError("/edit TEXT   (replaces your last message in this room)")
        await _stored(set(self.sends))  # the lines typed before it: the last is the one
        self._edit((await self._last_mine("edit"))[0], arg)

    async def cmd_delete(self, arg: str) -> None:
        if arg:
            raise UsageError("/delete   (deletes your last message in this room)")
        await _stored(set(self.sends))
        room = self.room
        seq, _ = await self._last_mine("delete")
        await self.client.delete(room, seq)
        self.said.get(room, OrderedDict()).pop(seq, None)

    async def cmd_purge(self, arg: str) -> None:
        words = arg.split()
        if not 1 <= len(words) <= 2 or (len(words) == 2 and not words[1].isdigit()):
            raise UsageError("/purge NICK [N]   (removes NICK's last N messages; operators)")
        count = int(words[1]) if len(words) == 2 else 1
        removed = await self.client.purge(self.room, words[0], count)
        if not removed:
            self.screen.note(
                f"no message of {words[0]} to remove in {self.room}", command="purge", seqs=[]
            )

    async def cmd_reply(self, arg: str) -> None:
        nick, _, text = arg.partition(" ")
        if not nick or not text.strip():
            raise UsageError("/reply NICK TEXT")
        seq = await self._last_by(nick)
        room = self.room
        self.send(lambda: self.client.reply(room, seq, text), text, room)

    async def _last_by(self, nick: str) -> int:
        """The seq of nick's last message in our room: seen, or found in its history."""
        key = m.nick_key(nick)
        seq = self.last_by.get(self.room, {}).get(key)
        if seq is not None:
            return seq
        for ev in reversed(await self.client.history(self.room, limit=m.MAX_HISTORY)):
            if ev.kind in MESSAGE_KINDS and m.nick_key(ev.nick) == key and ev.seq:
                return int(ev.seq)
        raise ChatError(
            m.Code.NO_SUCH_MESSAGE,
            f"{nick} has said nothing in {self.room} lately (the last {m.MAX_HISTORY} events)",
        )

    async def cmd_search(self, arg: str) -> None:
        everywhere = arg.startswith("-a ") or arg == "-a"
        words = arg[2:].strip() if everywhere else arg
        if not words:
            raise UsageError('/search [-a] WORDS   (deploy* for prefixes, "a phrase")')
        found = await self.client.search(words, room=None if everywhere else self.room)
        where = "your rooms and private messages" if everywhere else self.room
        n = len(found.events)
        head = (
            f"{n} {'match' if n == 1 else 'matches'} for {words} in {where}, newest first:"
            if n
            else f"nothing found for {words} in {where}"
        )
        if self.screen.json_mode:
            results = [{**ev.data, "backlog": True} for ev in found.events]
            self.screen.note(head, command="search", query=words, results=results, more=found.more)
            return
        self.screen.note(head)
        for ev in found.events:
            self.screen.write(self.result_line(ev))
        if found.more:
            self.screen.note(f"and {found.more} more: add words to narrow it down")

    def result_line(self, ev: Event) -> str:
        """A search result: time, where, who, and the text with its matches marked."""
        render = self.screen.render
        text, out, at = ev.text, [], 0
        for start, end in ev.data.get("marks", []):
            word = escape(text[start:end])
            out += [
                escape(text[at:start]),
                render.paint(word, MENTION) if render.colour else f"**{word}**",
            ]
            at = end
        out.append(escape(text[at:]))
        where = (
            f"[private -> {escape(str(ev.data.get('to', '?')))}]"
            if ev.kind == "private"
            else f"[{escape(str(ev.room))}]"
        )
        who = f"* {escape(ev.nick)}" if ev.kind == "action" else f"<{escape(ev.nick)}>"
        edited = " (edited)" if ev.data.get("edited") else ""
        return f"   {render.paint(clock(ev.ts), DIM)} {where} {who} {''.join(out)}{edited}"
