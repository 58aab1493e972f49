"""The command-line chat client: `python client.py [-i IP] [-p PORT] [-u NICK] [-r ROOM]`.

`-i` may name several brokers, `-i h1:9001,h2:9001`: the client connects to the first that
answers and, when its connection is lost, goes on to the next one in turn.

A thin front end over `client.Client`: every command goes through the library a bot uses.
It runs in one of three ways:
    terminal  stdin and stdout are terminals: prompt_toolkit keeps the typed line intact while
              messages arrive; colours, tab completion, a toolbar that shows pending messages
    plain     otherwise: one line per event on stdout; every stdin line is sent
    --json    one JSON object per event; at the end of stdin it waits for the acknowledgements
Exit status: 0 left normally, 1 could not connect (or messages were left undelivered),
2 usage (no nickname and no terminal to ask for one; a nickname that can never be valid, told
before connecting; an unreadable --server-key or --password-file), 3 nickname refused by the
broker (taken), 4 not let in as an account: a wrong or missing password, too many failed
logins, no such account, or a broker for accounts only (catchup.py, passwords.py); or let out
for good while it ran (the account's password changed elsewhere, or the account was removed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import getpass
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import zmq

from zmqchat import _passwords as passwords
from zmqchat import protocol as m
from zmqchat._cli import edits
from zmqchat._cli.catchup import Reading, account_commands
from zmqchat._cli.errors import UsageError
from zmqchat._cli.files import COMMANDS as FILE_COMMANDS
from zmqchat._cli.files import FileCommands, Transfer, default_downloads
from zmqchat._cli.render import Screen, escape, escape_lines
from zmqchat._client.library import (
    Address,
    ChatError,
    Client,
    Status,
    broker_addresses,
    curve_keys,
    show_address,
    split_addresses,
)
from zmqchat._usage import Parser, command_help, program
from zmqchat.protocol import EventKind

DEFAULT_IP: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9001
DEFAULT_ROOM: Final = "lobby"
TIMEOUT: Final = 5.0  # seconds: a broker that has not answered by then is not there
QUIT_WAIT: Final = 2.0  # seconds /quit waits for unacknowledged messages before leaving
HISTORY: Final = 50  # events shown by /history without a number (as on joining)
LEAVE_WORDS: Final = (".exit", "bye")

# The chat's commands: /help and the README's table are both made from this (_usage.py).
COMMANDS: Final = (
    ("/rooms", "every room with its member count; yours is marked"),
    (
        "/join ROOM",
        "leave your room and enter ROOM (an unknown room gets the list of rooms; an account "
        "stays in its rooms and sees what is unread in ROOM: see Accounts)",
    ),
    ("/who [ROOM|*]", "who is in your room (or ROOM; `*`: everyone online)"),
    ("/msg NICK TEXT", "a private message to one person (never published to a room)"),
    ("/me ACTION", "an action: `* alice waves`"),
    ("/nick NEW", "change your nickname (`alice is now known as alicia`)"),
    ("/topic [TEXT]", "show or set the room's topic"),
    ("/history [N]", f"the room's last N events (default {HISTORY})"),
    (
        "/history NICK [N]",
        "your private conversation with NICK, both ways (only its two parties can read it)",
    ),
    ("/kick NICK [REASON]", "remove someone from the room (operators)"),
    ("/ban NICK [REASON]", "remove someone and keep them out of the room (operators)"),
    ("/unban NICK", "let someone banned join again (operators)"),
    ("/lock, /unlock", "only operators may set the topic, or everyone again (operators)"),
    ("/register", "make your nickname an account: a password keeps it yours (see Accounts)"),
    ("/password", "change your account's password (the old one once, the new one twice)"),
    ("/leave [ROOM]", "an account: leave this room (or ROOM) for good"),
    ("/more", "an account: the next 500 unread events of this room, past the first 500"),
    *FILE_COMMANDS,
    *edits.COMMANDS,
    ("/help [WORD]", "this list; with WORD, the commands about it (`/help edit`, `/help /join`)"),
    (
        "/quit [REASON]",
        "leave, and the room sees `alice left (quit: REASON)` (an account's rooms see "
        "nothing: it stays in them); so do `.exit`, `bye`, Ctrl+D and Ctrl+C (on an empty "
        "line: it clears a typed one)",
    ),
    ("//TEXT", "say TEXT, which starts with `/` (`//etc/hosts` says `/etc/hosts`)"),
)
HELP: Final = command_help(COMMANDS)

# Kinds of event that show their nick is here (completion offers it).
PRESENT: Final = frozenset({EventKind.MSG, EventKind.ACTION, EventKind.JOIN, EventKind.PRIVATE})


# ---------------------------------------------------------------------------- settings


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1 to 65535)")
    return port


def nick_problem(nick: str) -> str | None:
    """Why the broker would refuse this nickname whoever is online (its own rule), or None.

    Checked before connecting, so that a nickname that can never be valid is refused at once
    with the rule; the broker still decides (a taken nickname, a broker with other rules).
    """
    try:
        m.check_nick(nick)
    except m.ProtocolError as err:
        return err.reason
    return None


def nickname(text: str) -> str:
    """-u NICK: refused as a usage error (status 2) if it can never be valid."""
    problem = nick_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def parser() -> Parser:
    """The client's flags, in the README's table (tests/test_readme.py checks it)."""
    p = Parser(
        "zmqchat",
        "ZeroMQ chat client. Settings not given are asked for when stdin is a terminal; "
        "otherwise the IP and port take their defaults.",
    )
    flag = p.table()
    flag(
        "-i",
        "--ip",
        metavar="HOST",
        shown=f"`{DEFAULT_IP}`, asked for on a terminal",
        help="the broker's address, or several brokers to try in turn: `h1:9001,h2:9001`",
    )
    flag(
        "-p",
        "--port",
        type=port_number,
        metavar="PORT",
        shown=f"`{DEFAULT_PORT}`, asked for on a terminal",
        help="the broker's command port, for addresses given without one",
    )
    flag(
        "-u",
        "--user",
        type=nickname,
        metavar="NICK",
        shown="asked for on a terminal; needed otherwise",
        help="your nickname",
    )
    flag(
        "-r",
        "--room",
        type=m.room_as_typed,
        metavar="ROOM",
        shown=f"`{DEFAULT_ROOM}`; an account: the room it was in last",
        help="the room to start in",
    )
    flag(
        "--json",
        action="store_true",
        help="one JSON object per event on stdout; stdin lines are sent",
    )
    flag(
        "--no-color",
        "--no-colour",
        dest="no_color",
        action="store_true",
        shown="colours on a terminal, unless `NO_COLOR` is set",
        help="plain text, no colours",
    )
    flag(
        "--downloads",
        metavar="DIR",
        shown="`~/Downloads` if it exists, else the current folder",
        help="where `/get` saves files",
    )
    flag(
        "--server-key",
        metavar="FILE",
        shown="no encryption",
        help="the broker's public CURVE key file: encrypt and authenticate (see Security)",
    )
    flag(
        "--password-file",
        metavar="FILE",
        shown=f"`{passwords.ENV}`, else asked for on a terminal when needed",
        help="your account's password: this file's first line (see Accounts)",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.downloads is not None and not os.path.isdir(os.path.expanduser(args.downloads)):
        p.error(f"--downloads {args.downloads}: no such folder")  # (said now, not at a /get)
    return args


def tell(text: str) -> None:
    """A line for the person answering questions (stderr when stdout is a pipe)."""
    out = sys.stdout if sys.stdout.isatty() else sys.stderr
    print(text, file=out, flush=True)


def ask(question: str) -> str:
    """One answer from the person at the terminal; EOFError on Ctrl+D."""
    out = sys.stdout if sys.stdout.isatty() else sys.stderr
    out.write(question)
    out.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.strip()


def ask_address(args: argparse.Namespace) -> list[Address]:
    """The brokers to try: -i, or asked; the port is asked only for addresses without one."""
    given = split_addresses(args.ip) if args.ip is not None else None
    while given is None:
        try:
            given = split_addresses(ask(f"Server IP [{DEFAULT_IP}]: ") or DEFAULT_IP)
        except ValueError as err:
            tell(str(err))
    port = args.port
    while port is None and any(p is None for _, p in given):
        answer = ask(f"Port [{DEFAULT_PORT}]: ")
        try:
            port = port_number(answer) if answer else DEFAULT_PORT
        except argparse.ArgumentTypeError as err:
            tell(str(err))
    return [(h, p if p is not None else port or DEFAULT_PORT) for h, p in given]


def addresses_given(args: argparse.Namespace) -> list[Address]:
    """The brokers to try without asking: -i (default 127.0.0.1), -p (default 9001)."""
    return broker_addresses(args.ip or DEFAULT_IP, args.port or DEFAULT_PORT)


def ask_nick() -> str:
    """A nickname from the person at the terminal, asked again until it could be valid."""
    while True:
        nick = ask("Nickname: ")
        if not nick:  # no default: asked again
            continue
        problem = nick_problem(nick)
        if problem is None:
            return nick
        tell(f"Sorry, {escape(problem)}. Please choose another nickname.")


def last(n: int, thing: str) -> str:
    """`last 3 events`, `last event`."""
    return f"last {thing}" if n == 1 else f"last {n} {thing}s"


def fail(text: str) -> None:
    print(f"{program('zmqchat')}: {text}", file=sys.stderr, flush=True)


def waiting(nick: str, seconds: float) -> None:
    tell(
        f"The nickname {nick} is in use; if that was you and your connection was just lost, "
        f"it is free within {seconds:.0f} s: waiting to see..."
    )


def resolves(host: str) -> bool:
    """Whether a host name (or address) names a machine: a typo is said at once, not as a
    broker that does not answer within the timeout."""
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):  # socket.gaierror is an OSError
        return False
    return True


PASSWORD_TRIES: Final = 3  # passwords asked for at the prompt before the client gives up
AUTH_CODES: Final = frozenset(
    {m.Code.AUTH_FAILED, m.Code.NO_ACCOUNT, m.Code.ACCOUNTS_ONLY, m.Code.RATE_LIMITED}
)


def refused_login(
    err: ChatError, nick: str, password: str | None, asked: int, may_ask: bool, interactive: bool
) -> str | int:
    """A login refused: the password to try next (asked for at the prompt: the first, or
    again after a typo, PASSWORD_TRIES in all; "" when Enter alone was typed: another
    nickname is asked for), or the exit status."""
    reason = escape(err.reason)
    if err.code == m.Code.AUTH_REQUIRED:
        if may_ask and password is None:
            tell(f"{nick} is a registered account (Enter alone: choose another nickname).")
            return getpass.getpass(f"Password for {nick}: ")
        fail(
            f"{reason}; give it with --password-file FILE or {passwords.ENV}"
            + ("" if may_ask else " (--json never asks)" if interactive else "")
        )
        return 4
    if err.code == m.Code.AUTH_FAILED and 0 < asked < PASSWORD_TRIES:
        tell(f"Sorry, {reason}. Try again.")  # a typo does not end the session
        return getpass.getpass(f"Password for {nick}: ")
    tries = asked > 1 and err.code == m.Code.AUTH_FAILED
    fail(reason + (f" ({asked} tries)" if tries else ""))
    return 4


def connect(
    runner: asyncio.Runner,
    addresses: list[Address],
    nick: str,
    room: str | None,
    interactive: bool,
    curve: dict[str, Any],
    password: str | None = None,
    may_ask: bool = False,
) -> Client | int:
    """A connected Client, or the exit status; a refused nick is asked again if we can,
    and a registered nick's password if we may (`may_ask`: a terminal, not --json)."""
    where = ", ".join(show_address(h, p) for h, p in addresses)
    unknown = [h for h, _ in addresses if not resolves(h)]
    if len(unknown) == len(addresses):  # none of them could ever answer
        fail(f"cannot reach the broker at {where}: no such host: {escape(', '.join(unknown))}")
        return 1
    announced = ""  # the nick "Connecting ..." was said for (not again after the password)
    asked = 0  # passwords asked for at the prompt (for this nick)
    while True:
        nick = nick or ask_nick()
        client = Client(
            addresses,
            nick=nick,
            rooms=[room] if room else None,
            timeout=TIMEOUT,
            password=password,
            on_wait=functools.partial(waiting, nick),
            **curve,
        )
        if interactive and nick != announced:
            tell(f"Connecting to {where} as {nick}...")
            announced = nick
        try:
            runner.run(client.connect())
            return client
        except ChatError as err:
            runner.run(client.close())
            reason = escape(err.reason)
            if err.code == m.Code.AUTH_REQUIRED or err.code in AUTH_CODES:
                again = refused_login(err, nick, password, asked, may_ask, interactive)
                if isinstance(again, int):
                    return again
                if not again:  # Enter alone: not this account, another nickname
                    nick, password, asked = "", None, 0
                    continue
                password, asked = again, asked + 1
                continue
            if err.code in (m.Code.NICK_TAKEN, m.Code.NICK_INVALID):
                if interactive:
                    tell(f"Sorry, {reason}. Please choose another nickname.")
                    nick, password, asked = "", None, 0
                    continue
                fail(
                    f"cannot use the nickname {escape(nick)!r}: {reason}; "
                    f"pass another one with -u NICK"
                )
                return 3
            if err.code == "TIMEOUT":
                fail(
                    f"cannot reach the broker at {where} (no answer within "
                    f"{TIMEOUT:g} s); is it running, and is that its command port"
                    + (
                        "; is --server-key its key; does it let your key in (--allow-keys: "
                        "yours is ~/.config/zmqchat/client.key)?"
                        if curve
                        else "? (a broker with encryption needs --server-key)"
                    )
                )
            else:
                fail(reason)
            return 1
        except zmq.ZMQError as err:
            runner.run(client.close())
            fail(f"cannot connect to {where}: {err}")
            return 1


# ---------------------------------------------------------------------------- the session


class Chat(FileCommands, edits.EditCommands):
    """One session's state and commands, shared by the terminal and the line front ends
    (the file commands: files.py; those that edit, answer and find messages: edits.py)."""

    def __init__(
        self,
        client: Client,
        screen: Screen,
        room: str,
        *,
        leave_words: bool,
        downloads: str | None = None,
    ) -> None:
        self.client, self.screen, self.room = client, screen, room
        self.downloads = downloads or default_downloads()
        self.transfers: dict[asyncio.Task[Any], Transfer] = {}
        self.joining = ""  # the room a /join is entering (its reply not in yet)
        self.leave_words = leave_words
        self.nicks: set[str] = set()  # for tab completion
        self.rooms: list[str] = [str(r) for r in client.welcome.get("rooms", [])]
        self.sends: set[asyncio.Task] = set()  # messages on their way, until acknowledged
        self.echoes: dict[str, int] = {}  # room -> the number of our latest message
        self.quitting = False
        self.unsent: list[tuple[str, str]] = []  # what was still unacknowledged at the end
        self.finished = asyncio.Event()
        self.commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "rooms": self.cmd_rooms,
            "join": self.cmd_join,
            "who": self.cmd_who,
            "msg": self.cmd_msg,
            "me": self.cmd_me,
            "nick": self.cmd_nick,
            "topic": self.cmd_topic,
            "history": self.cmd_history,
            "help": self.cmd_help,
            "kick": self.cmd_kick,
            "ban": self.cmd_ban,
            "unban": self.cmd_unban,
            "lock": self.cmd_lock,
            "unlock": self.cmd_unlock,
            "quit": self.cmd_quit,
            "send": self.cmd_send,
            "files": self.cmd_files,
            "get": self.cmd_get,
            "rmfile": self.cmd_rmfile,
            **account_commands(self),  # register, password, more, leave (catchup.py)
        }
        self.commands.update(self.edit_commands())
        # an account reads one of its rooms and counts the others'
        self.reading: Reading | None = Reading(client) if client.account else None
        # how a secret is asked for here: set by the front end (no echo on a terminal)
        self.ask_secret: Callable[[str], Awaitable[str]] = self._no_secret
        self.secret_typed = False  # asked at a terminal's prompt (not the next line of a pipe)

    async def _no_secret(self, prompt: str) -> str:
        raise ChatError("USAGE", "no way to ask for a password here")

    def waiting(self) -> str:
        """An account's other rooms with unread messages, for the toolbar."""
        return self.reading.toolbar(self.room) if self.reading is not None else ""

    def unread_elsewhere(self) -> int:
        return self.reading.elsewhere(self.room) if self.reading is not None else 0

    async def greet(self) -> None:
        """The broker's banner and who and where we are."""
        c = self.client
        try:
            topic = await c.topic(self.room)
        except ChatError:
            topic = ""
        motd = str(c.welcome.get("motd") or "")
        others = [r for r in c.rooms if r != self.room] if c.account else []
        if self.screen.json_mode:
            self.screen.note(
                f"connected as {c.nick} in {self.room}",
                kind="welcome",
                nick=c.nick,
                room=self.room,
                topic=topic,
                rooms=self.rooms,
                motd=motd,
                **({"account": c.account, "joined": list(c.rooms)} if c.account else {}),
            )
            return
        if motd.strip():
            self.screen.write(escape_lines(motd.strip("\n")))
        via = f" (via {escape(c.broker)})" if len(c.addresses) > 1 else ""  # which of them
        also = f"; your other rooms: {', '.join(others)}" if others else ""
        been = c.account and (c.welcome.get("joined") or c.welcome.get("last_room"))
        self.screen.write(
            f"Welcome{' back' if been else ''}, {escape(c.nick)}! You are in "
            f"{self.room}{via}{also}. Type /help for the commands, /quit to leave."
        )
        if topic:
            self.screen.note(f"topic of {self.room}: {topic}")

    async def show_events(self) -> None:
        """Print every event as it comes, until the client is closed."""
        async for ev in self.client:
            if ev.kind == Status.KIND and ev.text == "closed":
                continue
            if ev.kind == EventKind.PRIVATE and not ev.mine and ev.data.get("to") == ev.nick:
                continue  # a note to self: the broker's copy of our own send is shown
            if self.reading is not None and not self.reading.take(ev, self.room):
                continue  # another room's: counted (or one shown already)
            if ev.kind == Status.MARKED and not self.screen.json_mode:
                continue  # read on another device: the counts changed, nothing to show
            self.track(ev)
            hidden = not self.screen.json_mode and self.hidden(ev)
            was = self.was(ev)  # an edit: what its message said before
            self.remember(ev)
            if not hidden:
                quote = was if was is not None else await self.quote(ev)
                self.screen.event(ev, me=self.client.nick, room=self.room, quote=quote)
            if (
                ev.kind == Status.KIND
                and ev.room
                and ev.room == self.room
                and ev.room not in self.client.rooms
            ):  # kicked, banned, or room gone
                asyncio.create_task(self.fall_back(ev.room))
            if self.screen.closed and not self.quitting:  # nobody reads our output any more
                asyncio.create_task(self.quit(None))
        if not self.quitting:  # the client stopped by itself: our account logged in elsewhere
            asyncio.create_task(self.quit(None, wait=0))

    async def fall_back(self, room: str) -> None:
        """Out of our room against our will: back to lobby, or nowhere if that was lobby
        (unless we are elsewhere by now: kicked from a room as /join entered it, say)."""
        if self.room != room or room in self.client.rooms or room == self.joining:
            return  # elsewhere, back in, or still joining it: cmd_join decides where we stay
        lost, self.room = self.room, ""
        others = [r for r in self.client.rooms if r != lost] if self.client.account else []
        if others:  # an account's other room (it left this one on another device, say)
            await self.cmd_join(others[0])
            return
        if lost != DEFAULT_ROOM:
            try:
                await self.cmd_join(DEFAULT_ROOM)
                return
            except ChatError as err:
                self.screen.error(f"could not join {DEFAULT_ROOM}: {err.reason}", err.code)
        self.screen.note("you are in no room now: /join ROOM to go on", command="join", room="")

    def track(self, ev: Any) -> None:
        """Remember nicks seen, for completion."""
        if (
            ev.kind in (EventKind.MSG, EventKind.ACTION, EventKind.JOIN, EventKind.PRIVATE)
            and ev.nick
        ):
            self.nicks.add(ev.nick)
        elif ev.kind in (EventKind.LEAVE, EventKind.KICK, EventKind.BAN):
            self.nicks.discard(ev.nick)
        elif ev.kind == EventKind.NICK:
            self.nicks.discard(ev.nick)
            self.nicks.add(str(ev.data.get("new", "")))

    async def handle(self, line: str) -> None:
        """One typed (or piped) line: a leave word, a /command, or a message to the room."""
        line = line.rstrip("\r\n")
        if not line.strip() or self.quitting:
            return
        if self.leave_words and line.strip().lower() in LEAVE_WORDS:
            await self.quit(None)
            return
        if line.startswith("/") and not line.startswith("//"):
            name, _, arg = line[1:].partition(" ")
            command = self.commands.get(name.lower())
            if command is None:
                self.screen.error(
                    f"unknown command /{name}: nothing was sent; type /help for the commands",
                    "UNKNOWN_COMMAND",
                )
                return
            if command not in (self.cmd_msg, self.cmd_me, self.cmd_quit):  # sends: queued in
                # order; /quit waits for them itself (QUIT_WAIT)
                # Let earlier messages land first: a script's "hi", "/join work" must not
                # leave the room before "hi" is in it.
                await self.acknowledged(TIMEOUT)
            try:
                await command(arg.strip())
            except UsageError as err:
                self.screen.error(f"usage: {err}", "USAGE")
            except ChatError as err:
                if err.code == m.Code.ROOM_INVALID and not self.room:  # our room was "": none
                    self.screen.error(f"/{name}: you are in no room: /join ROOM first", err.code)
                else:
                    self.screen.error(err.reason, err.code)
            except (KeyError, TypeError, ValueError) as err:  # a reply we did not expect
                self.screen.error(f"/{name} failed: {err!r}", "INTERNAL")
            return
        if line.startswith("s/") and self.substitution(line):  # s/old/new/: a fix
            return
        text = line[1:] if line.startswith("//") else line
        if not self.room:
            self.screen.error(
                "you are in no room: /join ROOM first (nothing was sent)", "NOT_MEMBER"
            )
            return
        self.send(lambda: self.client.say(self.room, text), text, self.room)

    def send(self, start: Callable[[], Awaitable[Any]], text: str, room: str = "") -> None:
        """Start a send without waiting for it: the line is shown when the broker echoes it."""
        limit = int(self.client.welcome.get("max_text", m.MAX_TEXT))
        if len(text) > limit:
            self.screen.error(
                f"not sent: {len(text)} characters, the limit is {limit}", "TOO_LARGE"
            )
            return
        task = asyncio.ensure_future(self._deliver(start(), text, room))
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)

    async def _deliver(self, sending: Awaitable[Any], text: str, room: str) -> None:
        try:
            seq = await sending
            if room and isinstance(seq, int):  # its echo is what shows it was said
                self.echoes[room] = max(seq, self.echoes.get(room, 0))
                self.sent(room, seq, text)  # ours to edit
        except ChatError as err:
            short = text if len(text) <= 30 else text[:29] + "…"
            self.screen.error(f'not sent ("{short}"): {err.reason}', err.code)

    async def acknowledged(self, timeout: float) -> bool:
        """Wait up to timeout s until every message sent so far is acknowledged (or refused).

        Not Client.flush(timeout): when its timeout expires it cancels the sends it waited
        for, and they would no longer be tracked.
        """
        deadline = time.monotonic() + timeout
        while True:  # an s/// waiting for the lines before it sends its edit afterwards
            waiting = self.sends | self.edits_under_way
            left = deadline - time.monotonic()
            if not waiting:
                return True
            if left <= 0:
                return False
            await asyncio.wait(waiting, timeout=left)

    async def quit(self, reason: str | None, wait: float | None = QUIT_WAIT) -> None:
        """Leave cleanly: wait (up to `wait` s, None = as long as it takes) for acks, say BYE."""
        self.quitting = True
        if wait is None:  # the end of a script's input: its transfers finish first
            await asyncio.gather(*self.transfers, return_exceptions=True)
        else:
            self.cancel_transfers()
        if wait is not None:
            await self.acknowledged(wait)
        elif not await self.acknowledged(TIMEOUT):
            fail(
                f"waiting for {len(self.client.pending())} message(s) to be "
                f"acknowledged by the broker (Ctrl+C gives up)"
            )
            await self.client.flush()
        for room, seq in self.echoes.items():  # shown back too (a cluster may ack first)
            await self.client.heard(room, seq, QUIT_WAIT)
        self.unsent = self.unsent or self.client.pending()  # (closing fails them)
        await self.client.close(reason or None)
        self.finished.set()

    # ------------------------------------------------------------------ commands
    async def cmd_help(self, arg: str) -> None:
        word = arg.strip().lstrip("/").lower()
        if not word:
            self.screen.note(HELP, command="help")
            return
        named = [  # /help /join: that command (not those whose text mentions joining)
            (u, what) for u, what in COMMANDS if u.split()[0].lower() == "/" + word
        ]
        about = (
            named
            if named and arg.strip().startswith("/")
            else [
                (u, what)  # (not /help itself: its example would match)
                for u, what in COMMANDS
                if (word in u.lower() or word in what.lower())
                and (not u.startswith("/help") or word == "help")
            ]
        )
        if not about:
            self.screen.note(f"no command about {word!r}: /help lists them all", command="help")
            return
        self.screen.note(command_help(about), command="help")

    async def cmd_rooms(self, arg: str) -> None:
        rooms = await self.client.list_rooms()
        self.rooms = [str(r["name"]) for r in rooms]
        width = max((len(name) for name in self.rooms), default=0)
        lines = ["rooms (* = you are here):"]
        for r in rooms:
            n = int(r.get("members", 0))
            mark = "*" if r["name"] == self.room else " "
            topic = f"  {r['topic']}" if r.get("topic") else ""
            lines.append(
                f"{mark} {r['name']:<{width}}  {n} {'member' if n == 1 else 'members'}{topic}"
            )
        self.screen.note("\n".join(lines), command="rooms", rooms=rooms)

    async def cmd_join(self, arg: str) -> None:
        if not arg or " " in arg:
            raise UsageError("/join ROOM")
        arg = m.room_as_typed(arg)
        if arg == self.room and arg in self.client.rooms:
            self.screen.note(f"you are already in {arg}")
            return
        # Join first, then leave: a refused join (no such room) leaves you where you were.
        old, self.room = self.room, arg  # the new room's backlog shows as this room's
        self.joining = arg
        back = self.reading is not None and arg in self.client.rooms  # an account's room
        try:
            reply = await self.client.join(arg)
        except ChatError:
            self.room = old
            raise
        finally:
            self.joining = ""
        if arg not in self.client.rooms:  # kicked as we came in (that was said): stay put
            self.room = old
            return
        self.nicks.update(reply.get("members", []))
        if arg not in self.rooms:
            self.rooms.append(arg)
        topic = reply.get("topic") or ""
        self.screen.note(  # said before what is unread there, as the header of it
            f"you are now in {arg}" + (f"; topic: {topic}" if topic else ""),
            command="join",
            room=arg,
            topic=topic,
        )
        if self.reading is not None:  # an account stays in the room it was in
            self.reading.entered(arg)
            if back:
                await self.reading.catch_up(self, arg)
        elif old != arg and old in self.client.rooms:
            try:
                await self.client.leave(old)
            except ChatError as err:
                self.screen.error(f"could not leave {old}: {err.reason}", err.code)

    async def cmd_who(self, arg: str) -> None:
        room = None if arg == "*" else m.room_as_typed(arg) or self.room
        members = await self.client.who(room)
        self.nicks.update(members)
        where = f"in {room}" if room else "online"
        self.screen.note(
            f"{len(members)} {where}: {', '.join(members) or 'nobody'}",
            command="who",
            room=room,
            members=members,
        )

    async def cmd_msg(self, arg: str) -> None:
        nick, _, text = arg.partition(" ")
        if not nick or not text.strip():
            raise UsageError("/msg NICK TEXT")
        self.send(lambda: self.client.msg(nick, text), text)

    async def cmd_me(self, arg: str) -> None:
        if not arg:
            raise UsageError("/me ACTION")
        self.send(lambda: self.client.me(self.room, arg), arg, self.room)

    async def cmd_nick(self, arg: str) -> None:
        if not arg or " " in arg:
            raise UsageError("/nick NEW")
        nick = await self.client.set_nick(arg)
        if not self.client.rooms:  # in a room, the broker's notice says so
            self.screen.note(f"you are now known as {nick}", command="nick", nick=nick)

    async def cmd_topic(self, arg: str) -> None:
        topic = await self.client.topic(self.room, arg or None)
        if not arg:  # setting it is announced by the broker to everyone, us included
            self.screen.note(
                f"topic of {self.room}: {topic}" if topic else f"{self.room} has no topic",
                command="topic",
                topic=topic,
            )

    async def cmd_history(self, arg: str) -> None:
        words = arg.split()
        number = words and words[0].lstrip("+-").isdigit()  # (-5: a bad N, not a nick)
        nick = words.pop(0) if words and not number else None
        if len(words) > 1 or (words and not (words[0].isdigit() and int(words[0]) > 0)):
            raise UsageError("/history [NICK] [N]   (N a number of events, 1 or more)")
        limit = min(int(words[0]) if words else HISTORY, m.MAX_HISTORY)
        if nick is not None:
            events = await self.client.private_history(nick, limit=limit)
            self.screen.note(
                f"your {last(len(events), 'private message')} with {nick}:"
                if events
                else f"no private messages with {nick}",
                command="history",
                nick=nick,
            )
            for ev in events:
                self.screen.event(ev, me=self.client.nick, room=self.room)
            return
        events = await self.client.history(self.room, limit=limit)
        shown = self.listing(events)
        folded = len(events) - len(shown)  # edits and the like, shown in the lines they change
        self.screen.note(
            f"the {last(len(events), 'event')} of {self.room}"
            + (f" ({folded} not shown on their own: edits, deleted messages):" if folded else ":")
            if events
            else f"no history in {self.room}",
            command="history",
        )
        for ev in events:
            self.remember(ev)
        for ev in shown:
            quote = await self.quote(ev)
            self.screen.event(ev, me=self.client.nick, room=self.room, quote=quote)

    async def cmd_kick(self, arg: str) -> None:
        nick, _, reason = arg.partition(" ")
        if not nick:
            raise UsageError("/kick NICK [REASON]")
        await self.client.kick(self.room, nick, reason.strip())

    async def cmd_ban(self, arg: str) -> None:
        nick, _, reason = arg.partition(" ")
        if not nick:
            raise UsageError("/ban NICK [REASON]")
        await self.client.ban(self.room, nick, reason.strip())

    async def cmd_unban(self, arg: str) -> None:
        if not arg or " " in arg:
            raise UsageError("/unban NICK")
        await self.client.unban(self.room, arg)
        self.screen.note(f"{arg} may join {self.room} again", command="unban", nick=arg)

    async def cmd_lock(self, arg: str) -> None:
        await self.client.topic(self.room, lock=True)

    async def cmd_unlock(self, arg: str) -> None:
        await self.client.topic(self.room, lock=False)

    async def cmd_quit(self, arg: str) -> None:
        await self.quit(arg or None)


# ---------------------------------------------------------------------------- front ends


async def stdin_lines() -> AsyncIterator[str]:
    """Lines of stdin without blocking the loop: a thread reads, the loop splits lines.

    A daemon thread with os.read (not sys.stdin) so that exiting never waits for, or trips
    over, a read that is still blocked (a pipe from `tail -f`, a terminal nobody types in).
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()

    def pump() -> None:
        while True:
            try:
                chunk = os.read(0, 65536)
            except OSError:
                chunk = b""
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            except RuntimeError:  # the loop is gone: we are exiting
                return
            if not chunk:
                return

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    buf = b""
    while chunk := await chunks.get():
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")
    if buf:
        yield buf.decode("utf-8", "replace")


async def read_lines(chat: Chat) -> None:
    """Plain and JSON mode: send every stdin line; at its end, wait for acks and leave. A
    password a command asks for (/register, /password) is the next line."""
    lines = stdin_lines()

    async def secret(prompt: str) -> str:
        try:
            return await anext(lines)
        except StopAsyncIteration:
            raise ChatError("USAGE", f"no line for {prompt.strip(': ')}: input ended") from None

    chat.ask_secret = secret
    async for line in lines:
        await chat.handle(line)
        if chat.quitting:
            return
    await chat.quit(None, wait=None)


async def chat_session(client: Client, args: argparse.Namespace, terminal: bool) -> int:
    """Run the chat until the user leaves; returns the exit status."""
    colour = terminal and not args.no_color and not os.environ.get("NO_COLOR")
    screen = Screen(json_mode=args.json, colour=colour)
    room = (client.want_rooms or [DEFAULT_ROOM])[0]  # -r, or an account's last room
    chat = Chat(client, screen, room, leave_words=not args.json, downloads=args.downloads)
    loop, me = asyncio.get_running_loop(), asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGTERM, signal.SIGHUP):  # leave cleanly, as on Ctrl+C
        loop.add_signal_handler(sig, me.cancel)
    if terminal:
        try:
            chat.nicks.update(await client.who(room))
        except ChatError:
            pass
    await chat.greet()
    shower = asyncio.create_task(chat.show_events())
    if terminal:
        from zmqchat._cli import (
            terminal as cli_terminal,  # prompt_toolkit is loaded only for a terminal
        )

        patching: Any = cli_terminal.patch_stdout(raw=True)  # lines print above the prompt
        reading = cli_terminal.read_terminal(chat, colour)
    else:
        patching, reading = contextlib.nullcontext(), read_lines(chat)
    with patching:
        reader = asyncio.create_task(reading)
        finished = asyncio.create_task(chat.finished.wait())
        try:  # until the user leaves (the reader returns) or stdout goes away (finished)
            await asyncio.wait([reader, finished], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # Ctrl+C outside the prompt, SIGTERM, SIGHUP
            me.uncancel()
        finally:
            finished.cancel()
            reader.cancel()  # stops a wait for acknowledgements too: Ctrl+C gives up on it
            await asyncio.gather(reader, return_exceptions=True)
            await chat.quit(None, wait=0)  # done already, unless interrupted
            await asyncio.wait([shower], timeout=1.0)
            shower.cancel()
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    error = None if reader.cancelled() else reader.exception()
    if error is not None:
        raise error  # a bug: show it, now that the client has left
    lost = chat.unsent or client.pending()
    if lost:
        fail(
            f"{len(lost)} message(s) were not delivered: "
            + " | ".join(escape(text) for _, text in lost[:5])
        )
        return 1
    return 4 if client.login_refused is not None else 0  # (the status line said why)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interactive = sys.stdin.isatty()
    terminal = interactive and sys.stdout.isatty() and not args.json
    try:
        try:
            addresses = ask_address(args) if interactive else addresses_given(args)
        except ValueError as err:  # a malformed -i
            fail(f"-i {args.ip}: {err}")
            return 2
        if not args.user and not interactive:
            fail(
                "no nickname given and stdin is not a terminal to ask for one: pass it with -u NICK"
            )
            return 2
        curve: dict[str, Any] = {}
        if args.server_key:
            if not os.path.isfile(args.server_key):
                fail(f"--server-key {args.server_key}: no such file")
                return 2
            try:
                server_key, keypair = curve_keys(args.server_key)
            except (OSError, ValueError) as err:
                fail(f"--server-key {args.server_key}: {err}")
                return 2
            curve = {"server_key": server_key, "keypair": keypair}
        try:
            password = passwords.given(args.password_file)
        except passwords.PasswordError as err:
            fail(str(err))
            return 2
        may_ask = interactive and not args.json
        with asyncio.Runner() as runner:
            client = connect(
                runner, addresses, args.user or "", args.room, interactive, curve, password, may_ask
            )
            if isinstance(client, int):
                return client
            if not terminal:
                return runner.run(chat_session(client, args, terminal))
            from zmqchat._cli import (
                terminal as cli_terminal,  # prompt_toolkit is loaded only for a terminal
            )

            with cli_terminal.keys_kept():  # from here on every key waits for the prompt
                return runner.run(chat_session(client, args, terminal))
    except KeyboardInterrupt:  # Ctrl+C at a question, or a second Ctrl+C while leaving
        print(file=sys.stderr)
        return 130
    except EOFError:  # Ctrl+D at a question
        print(file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
