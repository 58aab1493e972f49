"""Chat bots on top of the client library: decorators for commands, events and timers.

    from zmqchat._bot import Bot

    bot = Bot()

    @bot.command("echo")
    async def echo(ctx, *text: str) -> str:
        \"\"\"Say TEXT back.\"\"\"
        return " ".join(text)           # a returned string is the reply

    bot.run("127.0.0.1", 9001, "echobot", rooms=["lobby"])   # until Ctrl+C

Safe by default: a bot never sees its own messages as input, its messages carry the bot flag,
it ignores other bots unless made with `listen_to_bots=True`, and a chain of bots answering
each other stops after `max_hops` replies (the hop count travels in the `hops` field).
Robust by default: the library reconnects and rejoins, sends are acknowledged and wait out
RATE_LIMITED, and a handler that raises is logged with the event that caused it while the
bot carries on. Handlers may be `async def`, or plain `def`, which run in a thread each; they
run at the same time, but what they send through their context goes out in the order of the
events that woke them, per room (or per person, in private): a slow handler delays the
replies after it until it returns or calls `ctx.detach()`. The library's stream of events
stays available as `bot.events()` (the bot reads `bot.client` itself: do not iterate that
one too).
PROTOCOL.md describes what goes over the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import re
import shlex
import signal
import threading
import types
import typing
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from zmqchat._client.library import ChatError, Client, Event, Status
from zmqchat.protocol import EventKind

log = logging.getLogger("zmqchat.bot")

MAX_HOPS = 3  # bot replies in one chain: enough for a bridge plus an answer, no ping-pong
MAX_THREADS = 16  # plain-def handlers running at once; more wait their turn
ROOM_KINDS = frozenset(EventKind) - {EventKind.PRIVATE}  # every room event
LOOP_CHECK = 0.5  # seconds between looks at whether the bot's loop runs
LOOP_HELD = 1.0  # seconds late that a look says a handler held the loop

Handler = Callable[..., Any]


class UsageError(Exception):
    """Raise in a command to answer with its usage line (and this message, if any)."""


# ---------------------------------------------------------------------------- commands


@dataclass
class Command:
    """A `!name args` command: its function, and how its arguments are read and shown."""

    name: str
    fn: Handler
    params: list[inspect.Parameter]
    help: str  # the docstring, on one line
    hidden: bool = False
    summary: str = ""  # its first line: what !help lists

    @classmethod
    def from_function(cls, name: str, fn: Handler, hidden: bool = False) -> Command:
        try:
            sig = inspect.signature(fn, eval_str=True)
        except (NameError, TypeError, SyntaxError):  # an annotation we cannot resolve
            sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if not params or params[0].kind not in (
            params[0].POSITIONAL_ONLY,
            params[0].POSITIONAL_OR_KEYWORD,
        ):
            raise TypeError(f"command {name!r}: the first parameter receives the context")
        for p in params[1:]:
            if p.kind is p.KEYWORD_ONLY and p.default is p.empty:
                raise TypeError(f"command {name!r}: keyword-only {p.name!r} needs a default")
        doc = inspect.getdoc(fn) or ""
        return cls(
            name,
            fn,
            params[1:],
            " ".join(line.strip() for line in doc.splitlines() if line.strip()),
            hidden,
            doc.splitlines()[0].strip() if doc else "",
        )

    @property
    def usage(self) -> str:
        """`!roll [DICE]`, `!remind WHEN WHAT...`: derived from the function's signature."""
        parts = []
        for p in self.params:
            label = p.name.upper()
            if p.kind is p.VAR_POSITIONAL:
                parts.append(f"[{label}...]")
            elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                parts.append(label if p.default is p.empty else f"[{label}]")
        return " ".join([self.name, *parts])

    def bind(self, args: list[str]) -> list[Any]:
        """Words typed after the command -> converted positional arguments, or UsageError."""
        out: list[Any] = []
        rest = list(args)
        for p in self.params:
            if p.kind is p.VAR_POSITIONAL:
                out.extend(_convert(p, a) for a in rest)
                rest = []
            elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                if rest:
                    out.append(_convert(p, rest.pop(0)))
                elif p.default is p.empty:
                    raise UsageError(f"{p.name.upper()} is missing")
                else:
                    out.append(p.default)
        if (
            rest
            and out
            and self.params
            and self.params[-1].annotation in (str, "str")
            and self.params[-1].kind is not self.params[-1].VAR_POSITIONAL
        ):
            out[-1] = " ".join([str(out[-1]), *rest])  # a last text argument takes the rest
            rest = []
        if rest:
            raise UsageError(f"too many arguments: {' '.join(rest)}")
        return out


_TRUE = {"1", "yes", "y", "true", "on"}
_FALSE = {"0", "no", "n", "false", "off"}


def _convert(p: inspect.Parameter, word: str) -> Any:
    """Apply a parameter's annotation to one word: int, float, bool or any one-argument
    callable; `X | None` and `Optional[X]` as X (the word is there: it is not None)."""
    kind = p.annotation
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        kind = args[0]
    if kind is p.empty or kind is str or isinstance(kind, str):
        return word
    try:
        if kind is bool:
            if word.lower() in _TRUE | _FALSE:
                return word.lower() in _TRUE
            raise ValueError(word)
        if isinstance(kind, type) or inspect.isfunction(kind):
            return kind(word)
    except (ValueError, TypeError) as err:
        # Python's own words for int and float ("invalid literal for int() with base 10")
        # are for programmers: say what was wanted; a converter of the bot's says its own
        known = {int: ": not a whole number", float: ": not a number", bool: ": yes or no"}
        detail = known.get(kind) or (f": {err}" if str(err) and str(err) != word else "")
        raise UsageError(f"bad {p.name.upper()} {word!r}{detail}") from None
    return word


def split_args(text: str) -> list[str]:
    """Words as a shell splits them, except that only double quotes group words ("two words"
    is one): in chat an apostrophe (don't, Bob's) is a letter, not a quote. A quote left open
    is kept as it is."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split, lexer.quotes, lexer.escape = True, '"', ""
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError:
        return text.split()


# ---------------------------------------------------------------------------- turns


@dataclass(eq=False)
class _Turn:
    """One handler's place in its conversation (a room, or a person in private): what it
    sends waits until every handler woken before it there has ended its turn."""

    line: deque[_Turn]  # the conversation's turns not yet over, oldest first
    over: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: bool = False  # a send of this handler waits for an earlier turn

    async def come(self) -> None:
        """Return once every earlier turn in the conversation is over."""
        while self.line and self.line[0] is not self:
            self.waiting = True
            try:
                await self.line[0].over.wait()
            finally:
                self.waiting = False

    def end(self) -> None:
        if not self.over.is_set():
            self.over.set()
            self.line.remove(self)


def conversation(ev: Event | None) -> str | None:
    """Whose replies keep one order: a room's (`lobby`), a person's in private (`@ann`);
    None for timers and status notices."""
    if ev is None or ev.kind == Status.KIND:
        return None
    if ev.room is None:  # a private message, or a file offered to the bot alone
        return "@" + ev.nick.casefold()  # nicks are unique regardless of case
    return ev.room


# ---------------------------------------------------------------------------- contexts


class Context:
    """What a handler gets: the event that woke it, and a way to answer and to act.

    `reply()` answers where the event came from (the room, or privately for a private
    message). Every send made through a context carries the hop count that stops bot loops,
    and waits for the handlers woken earlier in the same room (or by the same person in
    private) to end their turn: replies go out in the order of the events that asked.
    In a plain `def` handler the same methods block until done and return the same values.
    """

    def __init__(
        self,
        bot: Bot,
        event: Event | None,
        *,
        hops: int = 0,
        command: Command | None = None,
        args: list[str] | None = None,
        argtext: str = "",
        match: re.Match | None = None,
    ) -> None:
        self.bot, self.event, self.hops = bot, event, hops
        self.command, self.args, self.argtext, self.match = command, args or [], argtext, match
        self._turn: _Turn | None = None  # set by the bot when the handler is started

    def detach(self) -> None:
        """End this handler's turn early: the replies to later events no longer wait for it,
        and what it sends from now on goes out when sent (a reminder that answers "OK" at
        once and the reminder itself an hour later detaches after the "OK")."""
        turn, self._turn = self._turn, None
        if turn is None:
            return
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # a plain def handler's thread
            here = None
        loop = self.bot._loop
        if loop is not None and here is not loop:
            loop.call_soon_threadsafe(turn.end)
        else:
            turn.end()

    async def _my_turn(self) -> None:
        if self._turn is not None:
            await self._turn.come()

    @property
    def client(self) -> Client:
        assert self.bot.client is not None
        return self.bot.client

    @property
    def room(self) -> str | None:
        return self.event.room if self.event else None

    @property
    def nick(self) -> str:
        """Who sent the event ("" for timers)."""
        return self.event.nick if self.event else ""

    @property
    def text(self) -> str:
        return self.event.text if self.event else ""

    @property
    def private(self) -> bool:
        """A private message, or a file offered to the bot alone."""
        ev = self.event
        return ev is not None and (
            ev.kind == EventKind.PRIVATE or (ev.kind == EventKind.FILE and bool(ev.data.get("to")))
        )

    @property
    def file(self) -> dict[str, Any]:
        """A file offer's fields (on_file): file (its id), name, size, sha256, nick, ..."""
        return dict(self.event.data) if self.event is not None else {}

    async def download(self, folder: str = ".") -> str:
        """Fetch the offered file (on_file) into folder; returns the path written."""
        return await self.client.download(str(self.file.get("file", "")), folder)

    @property
    def joined(self) -> list[str]:
        """The rooms the bot is in."""
        return list(self.client.rooms)

    def _next_hop(self) -> int | None:
        hops = self.hops + 1
        if hops > self.bot.max_hops:
            log.info(
                "hop limit %d reached: not sending after %s",
                self.bot.max_hops,
                describe(self.event),
            )
            return None
        return hops

    async def reply(self, text: str, *, action: bool = False, quote: bool = False) -> Any:
        """Answer in the event's room, or privately to the sender of a private message;
        `quote=True` answers that very message (people see what it answers)."""
        if self.event is None:
            raise RuntimeError("a timer has no event to reply to: use ctx.say(room, text)")
        if self.private:
            return await self.msg(self.event.nick, text)
        assert self.event.room is not None
        if quote and self.event.kind in ("msg", "action") and self.event.seq:
            return await self.say(self.event.room, text, action=action, re=self.event.seq)
        return await self.say(self.event.room, text, action=action)

    async def say(self, room: str, text: str, *, action: bool = False, **extra: Any) -> int | None:
        """Send to a room the bot is in; returns the sequence number (None if nothing sent).

        Extra fields go in the SAY body (`relay="nick@room"` marks a copied message).
        Text longer than the broker allows is sent as several messages.
        """
        hops = self._next_hop()
        if hops is None:
            return None
        extra.pop("hops", None)  # the chain length is ours to count, not the caller's
        await self._my_turn()
        seq = None
        for chunk in _chunks(text, int(self.client.welcome.get("max_text", 4000))):
            seq = await self.client.say(room, chunk, action=action, hops=hops, **extra)
        return Sent(seq) if seq is not None else None

    async def me(self, room: str, text: str) -> int | None:
        """An action (`* bot waves`) in a room."""
        return await self.say(room, text, action=True)

    async def msg(self, nick: str, text: str) -> dict[str, Any] | None:
        """A private message; returns the broker's copy of it (None if nothing sent)."""
        hops = self._next_hop()
        if hops is None:
            return None
        await self._my_turn()
        sent = None
        for chunk in _chunks(text, int(self.client.welcome.get("max_text", 4000))):
            sent = await self.client.msg(nick, chunk, hops=hops)
        return sent

    async def rooms(self) -> list[dict[str, Any]]:
        """Every room on the broker: name, members (a count), topic, seq."""
        return await self.client.list_rooms()

    async def who(self, room: str | None = None) -> list[str]:
        """The nicks in a room, or everyone connected."""
        return await self.client.who(room)

    async def history(
        self,
        room: str,
        *,
        limit: int = 50,
        before: int | None = None,
        after: int | None = None,
        since: float | None = None,
    ) -> list[Event]:
        """Stored events of a room the bot is in, oldest first."""
        return await self.client.history(room, limit=limit, before=before, after=after, since=since)

    async def join(self, room: str) -> dict[str, Any]:
        return await self.client.join(room, backlog=0)

    async def leave(self, room: str) -> None:
        await self.client.leave(room)

    async def topic(self, room: str, text: str | None = None) -> str:
        return await self.client.topic(room, text)


class Sent(int):
    """The seq of a message the bot said (what ctx.say and ctx.reply return): a handler
    that returns it (`return await ctx.reply(...)`) has answered already."""


class SyncContext:
    """The Context a plain `def` handler gets (on its own thread): its methods block, and
    so do those of its `client` (`ctx.client.search(...)` returns the results)."""

    def __init__(self, ctx: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._ctx, self._loop = ctx, loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ctx, name)
        if isinstance(attr, Client):
            return SyncContext(attr, self._loop)
        if not inspect.iscoroutinefunction(attr):
            return attr

        def blocking(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(attr(*args, **kwargs), self._loop).result()

        return blocking


# ---------------------------------------------------------------------------- handlers


@dataclass
class _Handler:
    fn: Handler
    kinds: frozenset[str] | None  # None: every event except status
    rooms: frozenset[str] | None = None
    pattern: re.Pattern | None = None
    name: str = ""
    sees_commands: bool = False  # on_event: yes; on_message, on_private: no

    def match(self, ev: Event) -> re.Match | bool:
        if self.kinds is None and ev.kind == Status.KIND:
            return False
        if self.kinds is not None and ev.kind not in self.kinds:
            return False
        if self.rooms is not None and ev.room not in self.rooms:
            return False
        if self.pattern is not None:
            return self.pattern.search(ev.text) or False
        return True


def _rooms(room: str | Iterable[str] | None) -> frozenset[str] | None:
    if room is None:
        return None
    return frozenset([room] if isinstance(room, str) else room)


def _pattern(pattern: str | re.Pattern | None) -> re.Pattern | None:
    return re.compile(pattern) if isinstance(pattern, str) else pattern


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), max(1, size))]


def describe(ev: Event | None) -> str:
    """One line naming an event, for logs: `lobby#12 <ann> !roll 2d6`."""
    if ev is None:
        return "(timer)"
    where = f"{ev.room}#{ev.seq}" if ev.room else ev.kind
    text = ev.text if len(ev.text) <= 80 else ev.text[:77] + "..."
    return f"{where} <{ev.nick}> {text!r}"


# ---------------------------------------------------------------------------- the bot


class EventStream:
    """An async iterator over the events from its creation on; close it (or use `async with`)
    when done, or it keeps every event in memory until the bot stops."""

    def __init__(self, taps: list[asyncio.Queue]) -> None:
        self._taps = taps
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        taps.append(self._queue)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        event = await self._queue.get()
        if event is None:
            self.close()
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        if self._queue in self._taps:
            self._taps.remove(self._queue)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class _Timer:
    seconds: float
    fn: Handler


class Bot:
    """Handlers registered with decorators, run against one client connection."""

    ROOM_KINDS = ROOM_KINDS  # `@bot.on_event(*Bot.ROOM_KINDS)`: every kind of room event

    @staticmethod
    def arguments(
        nick: str, rooms: Iterable[str] = ("lobby",), description: str | None = None
    ) -> argparse.ArgumentParser:
        """The flags every bot script shares (see the module function `arguments`)."""
        return arguments(nick, rooms, description)

    @staticmethod
    def setup_logging(level: str = "INFO") -> None:
        """Log lines with a time stamp on stderr: what a bot script wants."""
        setup_logging(level)

    def __init__(
        self,
        *,
        prefix: str = "!",
        listen_to_bots: bool = False,
        max_hops: int = MAX_HOPS,
        max_threads: int = MAX_THREADS,
        help: bool = True,
    ) -> None:
        if not prefix:
            raise ValueError("the command prefix must not be empty")
        self.prefix, self.listen_to_bots, self.max_hops = prefix, listen_to_bots, max_hops
        self.max_threads = max_threads
        self.commands: dict[str, Command] = {}
        self.handlers: list[_Handler] = []
        self.timers: list[_Timer] = []
        self.client: Client | None = None
        self._help = help
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()
        self._slots: asyncio.Semaphore | None = None
        self._taps: list[asyncio.Queue] = []
        self._handled: dict[str, int] = {}
        self._lines: dict[str, deque[_Turn]] = {}  # conversation -> its turns not yet over
        self._streak: dict[str, int] = {}  # private conversation -> bot messages in a row
        self._inflight = 0
        self._on_loop = ""  # the async handler that started last (named if the loop is held)

    # ------------------------------------------------------------------ decorators
    def command(
        self, name: str | Handler | None = None, *, hidden: bool = False
    ) -> Callable[[Handler], Handler] | Handler:
        """Register `!name args`: `fn(ctx, *args)`; its signature gives the usage line, its
        docstring the help. A returned string is sent as the reply."""

        def register(fn: Handler) -> Handler:
            cmd_name = (name if isinstance(name, str) else fn.__name__).lower()
            if not cmd_name or any(c.isspace() for c in cmd_name):
                raise ValueError(f"bad command name {cmd_name!r}")
            self.commands[cmd_name] = Command.from_function(cmd_name, fn, hidden)
            return fn

        if callable(name):
            return register(name)
        return register

    def _on(
        self,
        kinds: frozenset[str] | None,
        fn: Handler | None,
        *,
        sees_commands: bool = False,
        **filters: Any,
    ) -> Any:
        def register(f: Handler) -> Handler:
            self.handlers.append(
                _Handler(
                    f,
                    kinds,
                    _rooms(filters.get("room")),
                    _pattern(filters.get("pattern")),
                    f.__name__,
                    sees_commands,
                )
            )
            return f

        return register(fn) if fn is not None else register

    def on_message(
        self,
        fn: Handler | None = None,
        *,
        room: str | Iterable[str] | None = None,
        pattern: str | re.Pattern | None = None,
    ) -> Any:
        """A message or action in a room (not one of this bot's commands); `ctx.match` holds
        the pattern's match. A plain `def` handler runs on a thread of its own, at the same
        time as the others (the next message's may start first): state they share needs
        a lock; an `async def` handler runs on the bot's loop, between its awaits alone."""
        return self._on(frozenset({"msg", "action"}), fn, room=room, pattern=pattern)

    def on_join(self, fn: Handler | None = None, *, room: str | Iterable[str] | None = None) -> Any:
        """Someone joined a room the bot is in."""
        return self._on(frozenset({"join"}), fn, room=room)

    def on_leave(
        self, fn: Handler | None = None, *, room: str | Iterable[str] | None = None
    ) -> Any:
        """Someone left a room the bot is in: parted, quit, lost, or kicked."""
        return self._on(frozenset({"leave", "kick"}), fn, room=room)

    def on_private(
        self, fn: Handler | None = None, *, pattern: str | re.Pattern | None = None
    ) -> Any:
        """A private message to the bot (not one of its commands); `ctx.reply` answers privately."""
        return self._on(frozenset({"private"}), fn, pattern=pattern)

    def on_edit(self, fn: Handler | None = None, *, room: str | Iterable[str] | None = None) -> Any:
        """Someone edited a message (issue 23): `ctx.text` is its new text, `ctx.event.data`
        has `ref`, the seq of the message edited."""
        return self._on(frozenset({"edit"}), fn, room=room)

    def on_delete(
        self, fn: Handler | None = None, *, room: str | Iterable[str] | None = None
    ) -> Any:
        """A message was deleted (issue 23): `ctx.event.data["ref"]` is its seq, `ctx.nick`
        its sender, and `data["by"]` the operator who removed it, if it was not its sender."""
        return self._on(frozenset({"delete"}), fn, room=room)

    def on_file(self, fn: Handler | None = None, *, room: str | Iterable[str] | None = None) -> Any:
        """A file offered in a room the bot is in, or to the bot alone: `ctx.file` has its
        name, size and id, `await ctx.download(folder)` fetches it."""
        return self._on(frozenset({"file"}), fn, room=room)

    def on_event(self, *kinds: str | Handler, room: str | Iterable[str] | None = None) -> Any:
        """Every event of these kinds (all room and private events if none given; "status"
        for the library's connection notices), commands included."""
        if len(kinds) == 1 and callable(kinds[0]):  # @bot.on_event without parentheses
            return self._on(None, kinds[0], room=room, sees_commands=True)
        return self._on(
            frozenset(str(k) for k in kinds) if kinds else None, None, room=room, sees_commands=True
        )

    def every(self, seconds: float) -> Callable[[Handler], Handler]:
        """Run `fn(ctx)` every `seconds` while connected (ctx.event is None: use ctx.say)."""
        if seconds <= 0:
            raise ValueError("every(seconds) needs seconds > 0")

        def register(fn: Handler) -> Handler:
            self.timers.append(_Timer(seconds, fn))
            return fn

        return register

    # ------------------------------------------------------------------ running
    def run(
        self,
        host: str = "127.0.0.1",
        port: int = 9001,
        nick: str = "bot",
        rooms: Iterable[str] = ("lobby",),
        **options: Any,
    ) -> None:
        """Connect and serve until Ctrl+C (or SIGTERM, or `stop()`); for scripts. A script
        that set up no logging is told what the bot does (connected, reconnecting, a
        handler's error, stopped) on stderr."""
        if not logging.getLogger().handlers:
            logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
            log.setLevel(logging.INFO)
        try:
            asyncio.run(self.arun(host, port, nick, rooms, **options))
        except KeyboardInterrupt:  # where the loop cannot catch signals itself
            pass
        except ChatError as err:
            raise SystemExit(f"{nick}: {err.reason}") from None

    def start(
        self,
        host: str = "127.0.0.1",
        port: int = 9001,
        nick: str = "bot",
        rooms: Iterable[str] = ("lobby",),
        *,
        timeout: float = 10.0,
        **options: Any,
    ) -> Bot:
        """Run on a background thread; returns once connected (raises what connecting raised)."""
        ready, failed = threading.Event(), []

        def main() -> None:
            try:
                asyncio.run(self.arun(host, port, nick, rooms, _ready=ready, **options))
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failed.append(exc)
            finally:
                ready.set()

        self._thread = threading.Thread(target=main, name=f"bot-{nick}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"bot {nick} not connected within {timeout:g} s")
        if failed:
            raise failed[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Leave (BYE) and stop; safe to call from any thread, or from a handler."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop has already closed
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    async def arun(
        self,
        host: str = "127.0.0.1",
        port: int = 9001,
        nick: str = "bot",
        rooms: Iterable[str] = ("lobby",),
        *,
        retry: bool = True,
        _ready: threading.Event | None = None,
        **options: Any,
    ) -> None:
        """Connect (retrying while the broker is unreachable) and serve until `stop()`; a
        bot logged in to an account stops, raising the client's ChatError, when it cannot
        log in again (the account's password was changed, or the account removed)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.client = None
        self._slots = asyncio.Semaphore(self.max_threads)
        if self._help and self.commands and "help" not in self.commands:
            helper = Command.from_function("help", self._cmd_help)
            p = self.prefix  # its docstring's example with this bot's prefix
            helper.help = helper.help.replace("!help", f"{p}help")
            helper.summary = helper.summary.replace("!help", f"{p}help")
            self.commands["help"] = helper
        options.setdefault("backlog", 0)  # old commands in the backlog are not answered again
        options.setdefault("unread", 0)  # nor, for a bot's account, those sent while it was away
        signals = self._catch_signals()
        loops: list[asyncio.Task] = []
        try:
            self.client = await self._connect(
                host, port, nick, [rooms] if isinstance(rooms, str) else list(rooms), retry, options
            )
            if self.client is None:  # stopped before the broker answered
                return
            log.info(
                "%s connected to %s:%d, in %s",
                self.client.nick,
                host,
                port,
                ", ".join(self.client.rooms) or "no rooms",
            )
            loops = [asyncio.create_task(self._dispatcher())]
            loops += [asyncio.create_task(self._tick(t)) for t in self.timers]
            loops.append(asyncio.create_task(self._watch_the_loop()))
            if _ready is not None:
                _ready.set()
            await self._stopping.wait()
        finally:
            for sig in signals:
                self._loop.remove_signal_handler(sig)
            await self._shutdown(loops)
        if self.client is not None and self.client.login_refused is not None:  # run(): exit 1
            raise self.client.login_refused

    async def _shutdown(self, loops: list[asyncio.Task]) -> None:
        """Stop the loops and the running handlers, say BYE, end the event iterators."""
        for task in [*loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*loops, *self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close("bot stopped")
            log.info("%s stopped", self.client.nick)
        for q in self._taps:
            q.put_nowait(None)

    async def _connect(
        self,
        host: str,
        port: int,
        nick: str,
        rooms: list[str],
        retry: bool,
        options: dict[str, Any],
    ) -> Client | None:
        delay = 0.5
        assert self._stopping is not None
        while True:
            client = Client(host, port, nick, rooms=rooms, bot=True, **options)
            connecting = asyncio.create_task(client.connect())
            stopped = asyncio.create_task(self._stopping.wait())
            await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not connecting.done():  # stop() while waiting for the broker
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
                await client.close()
                return None
            try:
                connecting.result()
                return client
            except ChatError as err:
                await client.close()
                # A nick our previous run still holds was waited for by connect() (the broker
                # said when it frees it); a taken nick is taken: only the broker is retried.
                if not retry or err.code not in ("TIMEOUT", "DISCONNECTED"):
                    raise
                log.warning(
                    "cannot reach the broker at %s:%d (%s); retrying in %.1f s",
                    host,
                    port,
                    err.reason,
                    delay,
                )
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return None
            except TimeoutError:
                delay = min(delay * 2, 10.0)

    def _catch_signals(self) -> list[signal.Signals]:
        """Ctrl+C and SIGTERM stop the bot cleanly (BYE sent) when it runs on the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return []
        assert self._loop is not None and self._stopping is not None
        caught = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._loop.add_signal_handler(sig, self._stopping.set)
                caught.append(sig)
            except (NotImplementedError, RuntimeError):  # Windows: KeyboardInterrupt instead
                pass
        return caught

    # ------------------------------------------------------------------ observing
    def events(self) -> EventStream:
        """Every event the library delivers from now on (own messages and status notices
        included), until the bot stops: for a handler that waits for what comes next.

            async with ctx.bot.events() as events:
                await ctx.reply("what is your guess?")
                async for ev in events: ...
        """
        return EventStream(self._taps)

    def handled(self, room: str) -> int:
        """The highest sequence number of room that has been dispatched to the handlers."""
        return self._handled.get(room, 0)

    @property
    def idle(self) -> bool:
        """No handler running and no send waiting for its acknowledgement."""
        return self._inflight == 0 and (self.client is None or not self.client.pending())

    # ------------------------------------------------------------------ dispatching
    async def _dispatcher(self) -> None:
        assert self.client is not None
        while True:
            ev = await self.client.next_event()
            for q in self._taps:
                q.put_nowait(ev)
            try:
                self._dispatch(ev)
            except Exception:  # a bug here must not stop the bot
                log.exception("cannot dispatch %s", describe(ev))
            if ev.room is not None and isinstance(ev.seq, int):
                self._handled[ev.room] = max(self._handled.get(ev.room, 0), ev.seq)
            if self.client.stopped:  # by itself: its account's password changed, the account
                assert self._stopping is not None  # went, or another login of it took over
                self._stopping.set()
                return

    def _dispatch(self, ev: Event) -> None:
        if ev.kind == Status.KIND:
            log.info("%s", ev.text)
            for h in self.handlers:
                if h.kinds is not None and "status" in h.kinds:
                    self._spawn(h.fn, Context(self, ev), h.name)
            return
        hops = self._hops_in(ev)
        if self._own(ev) or ev.backlog:
            return
        if ev.bot and not self.listen_to_bots:
            log.debug("ignored bot %s", describe(ev))
            return
        log.debug("<- %s", describe(ev))
        is_command = self._command(ev, hops)
        for h in self.handlers:
            if is_command and not h.sees_commands:
                continue
            found = h.match(ev)
            if found:
                match = found if isinstance(found, re.Match) else None
                self._spawn(h.fn, Context(self, ev, hops=hops, match=match), h.name)

    def _own(self, ev: Event) -> bool:
        assert self.client is not None
        return ev.mine or (
            ev.kind in (EventKind.PRIVATE, EventKind.FILE) and ev.nick == self.client.nick
        )

    def _hops_in(self, ev: Event) -> int:
        """How many bot replies led to this event: the `hops` field (a bot message without
        one counts as 1). For private messages, whose sender may not count hops, bot messages
        in a row count too (our own ones included; anything from a person resets it), and
        the larger of the two is taken."""
        wire = ev.data.get("hops")
        hops = wire if type(wire) is int and wire >= 0 else (1 if ev.bot else 0)
        if ev.kind == EventKind.PRIVATE:
            assert self.client is not None
            own = ev.mine or ev.nick == self.client.nick
            peer = str(ev.data.get("to") if own else ev.nick)
            if ev.bot:
                self._streak[peer] = self._streak.get(peer, 0) + 1
                hops = max(hops, self._streak[peer])
            else:
                self._streak[peer] = 0
        return hops

    def _command(self, ev: Event, hops: int) -> bool:
        """Run the command this message invokes, if it is one of ours."""
        if ev.kind not in ("msg", "private") or not ev.text.startswith(self.prefix):
            return False
        name, _, rest = ev.text[len(self.prefix) :].partition(" ")
        name = name.strip().lower()
        cmd = self.commands.get(name)
        if cmd is None:
            if name and ev.kind == EventKind.PRIVATE and self.commands:
                ctx = Context(self, ev, hops=hops)
                hint = f"; try {self.prefix}help" if "help" in self.commands else ""
                self._spawn(self._say_unknown(name, hint), ctx, "unknown")
                return True
            return False
        args = split_args(rest)
        ctx = Context(self, ev, hops=hops, command=cmd, args=args, argtext=rest.strip())
        self._spawn(cmd.fn, ctx, f"{self.prefix}{cmd.name}", command=cmd)
        return True

    def _say_unknown(self, name: str, hint: str) -> Handler:
        async def unknown(ctx: Context) -> str:
            return f"unknown command {self.prefix}{name}{hint}"

        return unknown

    def _spawn(self, fn: Handler, ctx: Context, what: str, command: Command | None = None) -> None:
        key = conversation(ctx.event)
        if key is not None:  # its place in the order of replies, taken as the event comes
            line = self._lines.setdefault(key, deque())
            ctx._turn = _Turn(line)
            line.append(ctx._turn)
        self._inflight += 1
        task = asyncio.create_task(self._invoke(fn, ctx, what, command))
        self._tasks.add(task)
        task.add_done_callback(lambda task: self._finished(task, ctx, key))

    def _finished(self, task: asyncio.Task, ctx: Context, key: str | None) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        ctx.detach()  # the next handler's replies may go now
        if key is not None and not self._lines.get(key, True):
            del self._lines[key]

    async def _invoke(
        self, fn: Handler, ctx: Context, what: str, command: Command | None = None
    ) -> None:
        """Run one handler; its string (or number) result is the reply; nothing it raises
        escapes."""
        try:
            args = command.bind(ctx.args) if command is not None else []
            if inspect.iscoroutinefunction(fn):
                self._on_loop = what  # (named if it holds the loop: _watch_the_loop)
                result = await fn(ctx, *args)
            else:
                assert self._slots is not None and self._loop is not None
                async with self._slots:
                    result = await _in_thread(fn, SyncContext(ctx, self._loop), *args)
            if isinstance(result, (int, float)) and not isinstance(result, (bool, Sent)):
                result = str(result)  # `return n + 1` answers the number (not a say's seq)
            if isinstance(result, str) and result and ctx.event is not None:
                await ctx.reply(result)
        except asyncio.CancelledError:
            raise
        except UsageError as err:
            if command is None:
                log.error("%s raised UsageError outside a command on %s", what, describe(ctx.event))
                return
            detail = f" ({err})" if str(err) else ""
            await self._safe_reply(ctx, f"usage: {self.prefix}{command.usage}{detail}")
        except Exception:
            log.exception("handler %s failed on %s", what, describe(ctx.event))
            if command is not None and ctx.event is not None:  # whoever asked is told
                await self._safe_reply(ctx, f"sorry, {self.prefix}{command.name} failed")

    async def _safe_reply(self, ctx: Context, text: str) -> None:
        try:
            await ctx.reply(text)
        except ChatError as err:
            log.warning("could not answer %s: %s", describe(ctx.event), err)

    async def _watch_the_loop(self) -> None:
        """Say when the bot's loop was held (an `async def` handler that blocks, with
        time.sleep or a slow call): the bot hears nothing and answers nobody meanwhile,
        and the broker may take it for gone."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(LOOP_CHECK)
            held = loop.time() - asked - LOOP_CHECK
            if held >= LOOP_HELD:
                log.warning(
                    "the bot did nothing for %.1f s: an async handler held its loop (the "
                    "last one to start: %s); blocking work belongs in a plain def handler, "
                    "which runs on a thread",
                    held,
                    self._on_loop or "?",
                )

    async def _tick(self, timer: _Timer) -> None:
        """Call a timer every `seconds` (skipped while disconnected, never two at once; the
        runs a slow run or a stall overlapped are skipped, not made up for back to back)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + timer.seconds
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if self.client is not None and self.client.connected:
                self._inflight += 1
                try:
                    name = getattr(timer.fn, "__name__", "timer")
                    await self._invoke(
                        timer.fn, Context(self, None), f"{name} (every {timer.seconds:g} s)"
                    )
                finally:
                    self._inflight -= 1
            due += (int((loop.time() - due) // timer.seconds) + 1) * timer.seconds

    # ------------------------------------------------------------------ help
    async def _cmd_help(self, ctx: Context, command: str = "") -> str | None:
        """List the commands, or describe one: !help COMMAND."""
        p = self.prefix
        if command:
            cmd = self.commands.get(command.lower().removeprefix(p))
            if cmd is None:  # in a room, maybe another bot's: that one answers
                private = ctx.event is not None and ctx.event.kind == EventKind.PRIVATE
                return f"no command {p}{command}; {p}help lists them" if private else None
            return f"{p}{cmd.usage}" + (f" - {cmd.help}" if cmd.help else "")
        lines = [
            f"{p}{c.usage}" + (f" - {c.summary}" if c.summary else "")
            for name, c in sorted(self.commands.items())
            if not c.hidden
        ]
        return "commands: " + " | ".join(lines)


async def _in_thread(fn: Handler, *args: Any) -> Any:
    """Run a blocking function on a daemon thread of its own (a handler stuck forever must not
    keep the process alive at exit, as a pool's worker would)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def work() -> None:
        try:
            outcome = (True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the loop
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop closed while we ran
            pass

    threading.Thread(
        target=work, name=f"handler-{getattr(fn, '__name__', '?')}", daemon=True
    ).start()
    return await future


# ---------------------------------------------------------------------------- scripts


def arguments(
    nick: str, rooms: Iterable[str] = ("lobby",), description: str | None = None
) -> argparse.ArgumentParser:
    """The options every bot script shares: --host, --port, --nick, --rooms, --log-level.
    After parse_args(), `args.rooms` is a list."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1", help="broker address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9001, help="broker command port (default 9001)")
    p.add_argument("--nick", default=nick, help=f"the bot's nickname (default {nick})")
    p.add_argument(
        "--rooms",
        default=",".join(rooms),
        type=_room_list,
        help=f"comma-separated rooms to join (default {','.join(rooms)})",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    return p


def _room_list(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def setup_logging(level: str = "INFO") -> None:
    """Log lines with a time stamp on stderr: what a bot script wants."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
