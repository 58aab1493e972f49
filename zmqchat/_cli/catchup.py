"""The command-line client's side of accounts and catching up (issue 21).

An account is in several rooms at once and reads one of them, the active room: its events
are shown (and marked read as they are); the others' messages are counted, and the bottom
toolbar shows those counts (what the account reads on another device comes off them).
Entering a room (`/join`) shows what is unread there, oldest first, up to 500 (past that,
`/more` shows the next ones), then what comes. `/leave` leaves a room for good. `/register`
makes the nick an account; `/password` changes its password.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from zmqchat import protocol as m
from zmqchat._cli.render import Screen
from zmqchat._client.library import ChatError, Client, Event, Status
from zmqchat._passwords import PasswordError, ask_new, unusable
from zmqchat.protocol import EventKind, room_as_typed

ROOM_KINDS = frozenset({EventKind.MSG, EventKind.ACTION})  # what counts as unread in a room


class Chat(Protocol):
    """What these commands need of the chat session they are part of (chat.py's Chat)."""

    client: Client
    screen: Screen
    room: str
    reading: Reading | None
    ask_secret: Callable[[str], Awaitable[str]]
    secret_typed: bool

    async def cmd_join(self, arg: str) -> None: ...

    def listing(self, events: list[Event]) -> list[Event]:
        """The events of a listing a person is shown (edits.py)."""

    def remember(self, ev: Event) -> None: ...

    async def quote(self, ev: Event) -> str | None: ...


class Reading:
    """What an account's client has shown of each room, and what waits in the others."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.shown: dict[str, int] = {}  # room -> the highest seq shown (or passed over)
        self.held: set[str] = set()  # rooms with unread beyond what was shown: /more
        self.waiting: dict[str, list[int]] = {}  # other rooms -> [unread, mentions]
        self.loading: dict[str, list[Event]] = {}  # rooms being caught up: live events wait

    def take(self, ev: Event, active: str) -> bool:
        """Whether to show an event now; counts and marks what it must."""
        if ev.kind == Status.UNREAD:
            return self._note(ev, active)
        if ev.kind == Status.MARKED:  # read on another device: what waits here is less
            room = ev.data.get("room")
            if room and room != active:
                self.waiting[room] = [int(ev.data["unread"]), int(ev.data.get("mentions", 0))]
            return True
        if ev.kind == EventKind.PRIVATE or (ev.kind == EventKind.FILE and ev.data.get("to")):
            if not self._own(ev):  # a private message or file offer, shown: read
                self.client.mark_private(ev.nick, ev.ts)
            return True
        if not ev.room or not isinstance(ev.seq, int):
            return True  # status lines
        if ev.room in self.loading:  # shown after what is unread before it
            self.loading[ev.room].append(ev)
            return False
        if ev.room != active:
            if ev.kind in ROOM_KINDS and not self._own(ev):
                count = self.waiting.setdefault(ev.room, [0, 0])
                count[0] += 1
                count[1] += self.client.mentions(ev)
            return False
        if ev.room in self.held or ev.seq <= self.shown.get(ev.room, -1):
            return False
        self.shown[ev.room] = ev.seq
        self.client.mark(ev.room, ev.seq)
        return True

    def _own(self, ev: Event) -> bool:
        """Sent by us: from this client, or under the account's nick (its other devices,
        its scripts): not for us to read."""
        return ev.mine or m.nick_key(ev.nick) == m.nick_key(self.client.nick)

    def _note(self, ev: Event, active: str) -> bool:
        """An `unread` line from the library: what waits in a room (counted for the
        toolbar unless it is the active room) or from a person; or, after a room's first
        500, that there is more (the room is held until /more)."""
        data = ev.data
        room = data.get("room")
        if room and data.get("more"):
            self.held.add(room)
            self.shown[room] = int(data.get("after", 0))
        elif room and room != active:
            self.waiting[room] = [int(data.get("unread", 0)), int(data.get("mentions", 0))]
        return True

    def entered(self, room: str) -> None:
        """The client reads `room` from now on: its count goes."""
        self.waiting.pop(room, None)

    def elsewhere(self, active: str) -> int:
        """Unread messages in the account's other rooms."""
        return sum(
            n
            for room, (n, _) in self.waiting.items()
            if room != active and room in self.client.rooms
        )

    def toolbar(self, active: str) -> str:
        """`unread: work 12 (2 @you) · support 3`, or ""."""
        parts = []
        for room, (n, k) in sorted(self.waiting.items()):
            if n and room != active and room in self.client.rooms:
                parts.append(f"{room} {n}" + (f" ({k} @you)" if k else ""))
        return "unread: " + " · ".join(parts) if parts else ""

    async def catch_up(self, chat: Chat, room: str) -> None:
        """Show what is unread in `room` (up to 500 events), after what was shown of it."""
        client = self.client
        after = self.shown.get(room, client.marks.get(room, 0))
        self.loading[room] = []
        try:
            caught = await client.catch_up(room, after)
        finally:
            came = self.loading.pop(room)
        self.held.discard(room)
        self.entered(room)
        shown = {id(ev) for ev in chat.listing(caught.events)}  # each message once, as now
        for ev in caught.events:
            if self.take(ev, room):
                chat.remember(ev)
                if id(ev) in shown:
                    quote = await chat.quote(ev)
                    chat.screen.event(ev, me=client.nick, room=room, quote=quote)
        if caught.more:
            self.held.add(room)
            chat.screen.note(
                f"{caught.more} more unread in {room}: /more shows the next 500",
                kind="unread",
                room=room,
                unread=caught.more,
                more=True,
            )
        else:
            self.shown[room] = max(self.shown.get(room, 0), caught.last)
            client.mark(room, caught.last)
        for ev in came:  # what came meanwhile, after what was fetched (a held room waits)
            if self.take(ev, room):
                chat.screen.event(ev, me=client.nick, room=room)


# ---------------------------------------------------------------------------- commands


def account_commands(chat: Chat) -> dict[str, Callable[[str], Awaitable[None]]]:
    """The slash commands of accounts, for Chat's table."""

    async def cmd_register(arg: str) -> None:
        if chat.client.account:
            chat.screen.note(f"you are logged in to the account {chat.client.account} already")
            return
        password = await _new_password(chat, "Password: ")
        await chat.client.register(password)
        chat.reading = Reading(chat.client)
        chat.screen.note(
            f"{chat.client.nick} is registered: it is yours from now on; log in with "
            f"-u {chat.client.nick} and this password",
            command="register",
            account=chat.client.account,
        )

    async def cmd_password(arg: str) -> None:
        if not chat.client.account:
            raise ChatError("NOT_ALLOWED", "you are not logged in to an account: /register first")
        old = await chat.ask_secret("Old password: ")
        new = await _new_password(chat, "New password: ")
        try:
            await chat.client.change_password(old, new)
        except ChatError as err:  # refused: nothing changed; lost on the way: who knows
            unsure = err.code in ("TIMEOUT", "DISCONNECTED", "CLOSED")
            after = "it may or may not have changed" if unsure else "nothing was changed"
            raise ChatError(err.code, f"{err.reason}; {after}") from None
        chat.screen.note("your password is changed", command="password")

    async def cmd_more(arg: str) -> None:
        if chat.reading is None or chat.room not in chat.reading.held:
            chat.screen.note(
                f"nothing more unread in {chat.room}"
                if chat.room
                else "you are in no room: /join one to read it"
            )
            return
        await chat.reading.catch_up(chat, chat.room)

    async def cmd_leave(arg: str) -> None:
        room = room_as_typed(arg) or chat.room
        if not room or room not in chat.client.rooms:
            raise ChatError("NOT_MEMBER", f"you are not in {room or 'a room'}")
        await chat.client.leave(room)
        chat.screen.note(f"you left {room}", command="leave", room=room)
        if room == chat.room:
            others = [r for r in chat.client.rooms if r != room]
            chat.room = ""
            if others:
                await chat.cmd_join(others[0])
            else:
                chat.screen.note("you are in no room now: /join ROOM to go on", room="")

    return {
        "register": cmd_register,
        "password": cmd_password,
        "more": cmd_more,
        "leave": cmd_leave,
    }


async def _new_password(chat: Chat, first: str) -> str:
    """A new password, asked twice (PasswordError as a ChatError: nothing was sent)."""
    answers: list[str] = []
    for prompt in (first, "Again: "):
        answers.append(await chat.ask_secret(prompt))
        # At a terminal an unusable password is said at once, not after it is typed twice;
        # from a pipe the next two lines are the password's, whatever they hold: both read.
        problem = unusable(answers[0])
        if chat.secret_typed and problem is not None:
            raise ChatError("BAD_REQUEST", f"{problem}; nothing was changed")
    try:
        return ask_new(lambda _prompt: answers.pop(0), first)
    except PasswordError as err:
        raise ChatError("BAD_REQUEST", str(err)) from None
