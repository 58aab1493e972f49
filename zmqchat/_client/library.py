"""The chat client library (used by bots and by the command-line client) and the CLI entry.

    async with Client("127.0.0.1", 9001, "alice") as c:   # connects, joins lobby
        await c.say("lobby", "hello")
        async for event in c:                             # typed events, in room order
            print(event.nick, event.text)

It keeps every room it is in complete and in order: events carry per-room sequence
numbers, and anything missing (a slow subscription, a reconnect, a dropped frame) is fetched
from the broker's history; duplicates are dropped. Sends are retried until acknowledged.
If the broker goes away it reconnects with backoff and re-claims its nick and rooms (given
several brokers, `Client("h1:9001,h2:9001")`, through the next one in turn).
`BlockingClient` wraps it for simple scripts; `python client.py --help` is the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from types import MemberDescriptorType
from typing import Any, Final

import msgspec
import zmq
import zmq.asyncio

from zmqchat import protocol as m
from zmqchat._client import files
from zmqchat._client.accounts import AccountClient, AccountState
from zmqchat._client.errors import ChatError, Progress
from zmqchat._client.messages import Messages
from zmqchat._client.ordering import Fetch, RoomOrder

log = logging.getLogger("zmqchat.client")


BATCH_BYTES = 48 * 1024  # a SAY's body, at most: well under the broker's MAX_REQUEST (96 KiB)
BACKOFF_CAP = 10.0  # seconds: the longest wait between reconnect attempts
HANDSHAKE_MS = 2000  # a ZeroMQ handshake with a stopped broker gives up after this
MINE_MEMORY = 100_000  # message ids of ours remembered, to mark our own echoes
START_JOINS = 3  # tries of a starting room's JOIN that the connection was lost under
PRIVATE_MEMORY = 1_000  # private message ids remembered, to drop one pushed again
# a reconnect refused these: trying again would not help (an account's login)
REFUSED_LOGIN: Final = frozenset(
    {m.Code.AUTH_FAILED, m.Code.NO_ACCOUNT, m.Code.AUTH_REQUIRED, m.Code.ACCOUNTS_ONLY}
)
EVENTS_PER_TURN = 1_000  # room events decoded before the reader yields: a 40,000-event
# backlog read in turns this size goes 1.5 times as fast as in one


def reconnect_delay(tried: int, brokers: int) -> float:
    """The wait before the next reconnect attempt, after `tried` brokers refused or did not
    answer since the last one that let us in: at most a quarter of a second until every
    broker has failed once, doubling with each round in which all of them failed, up to
    BACKOFF_CAP (with one broker, each attempt is a round: 0.5, 1, 2 s...). Jittered, so
    clients do not come back in step."""
    rounds = tried // max(1, brokers)
    return min(BACKOFF_CAP, 0.25 * 2**rounds) * random.uniform(0.5, 1.0)


def failover_order(now: int, count: int) -> list[int]:
    """The order in which to try a lost broker's replacements: the other addresses shuffled
    (so the clients of a lost broker spread over the rest instead of all moving to the same
    one), then the lost one itself."""
    others = [i for i in range(count) if i != now]
    random.shuffle(others)
    return [*others, now]


def remember(memory: OrderedDict[str, None], key: str, limit: int) -> None:
    """Add a key to a bounded memory of recent keys, forgetting the oldest past `limit`."""
    memory[key] = None
    if len(memory) > limit:
        memory.popitem(last=False)


Address = tuple[str, int]  # a broker's host and command port


def split_addresses(text: str) -> list[tuple[str, int | None]]:
    """ "h1:9001,h2" -> [("h1", 9001), ("h2", None)]: broker addresses, each with its port if it
    has one (ValueError if one is malformed). An IPv6 address with a port: "[::1]:9001"."""
    found: list[tuple[str, int | None]] = []
    for part in (p.strip() for p in text.split(",")):
        port: str | None = None
        if part.startswith("["):
            host, bracket, rest = part[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"{part!r} is not an address: [IPV6]:PORT")
            port = rest[1:] if rest else None
        elif part.count(":") == 1:
            host, port = part.split(":")
        else:  # a name, an IPv4 address, or an IPv6 address without a port
            host = part
        if not host:
            raise ValueError(f"{part!r} has no host" if part else f"an empty address in {text!r}")
        if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{part!r}: {port!r} is not a port number (1 to 65535)")
        found.append((host, int(port) if port is not None else None))
    return found


def broker_addresses(host: str | Iterable[str | Address], port: int) -> list[Address]:
    """Client(host=...) -> the brokers it tries in turn: "h1:9001,h2", or a list of such
    strings or of (host, port); a host given without a port has `port`."""
    found: list[Address] = []
    for item in [host] if isinstance(host, str) else host:
        if isinstance(item, str):
            found += [(h, port if p is None else p) for h, p in split_addresses(item)]
        else:
            found.append((str(item[0]), int(item[1])))
    if not found:
        raise ValueError("no broker address given")
    return found


def show_address(host: str, port: int) -> str:
    """host:port as people write it ([host]:port for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Status(StrEnum):
    """The library's own event kind, beside the broker's (protocol.EventKind): news of the
    connection (`connection lost, reconnecting...`, kicked from a room, `closed`)."""

    KIND = "status"
    UNREAD = "unread"  # an account's: what waits in a room or from a person (accounts.py)
    MARKED = "marked"  # an account's: read up to here on another device (its counts now)


class _EventFields(msgspec.Struct, frozen=True, repr_omit_defaults=True, gc=False):
    """Event's fields; a room batch is decoded straight into Events (msgspec, one C call).
    The client's own view (mine, backlog, data) has names no event has on the wire.
    gc=False: the cycle collector does not track events (thousands in a busy room's
    batches). An event is frozen, so it can only be part of a reference cycle through its
    data dict, which the library never puts it into."""

    kind: str
    text: str
    nick: str = ""
    room: str | None = None
    seq: int | None = None
    ts: float = 0.0
    bot: bool = False
    mine: bool = msgspec.field(default=False, name="~mine")  # sent by this client
    backlog: bool = msgspec.field(default=False, name="~backlog")  # earlier, shown on join
    data: Any = msgspec.field(default=None, name="~data")  # a dict, or (batch JSON, index)
    _cmid: str | None = msgspec.field(default=None, name="cmid")  # marks our own echoes


# the slots' own descriptors (the class's attributes, not the fields' values), written on decoding
_DATA: MemberDescriptorType = vars(_EventFields)["data"]
_MINE: MemberDescriptorType = vars(_EventFields)["mine"]
_OBJECT: Final = msgspec.json.Decoder(dict[str, Any])
_RAWS: Final = msgspec.json.Decoder(list[msgspec.Raw])


@functools.lru_cache(maxsize=16)
def _split(batch: bytes) -> list[msgspec.Raw]:
    """A published batch's JSON -> each event's own: done only when an event's data is first
    asked for (a bot that never reads data never pays for it), once for a batch's events."""
    return _RAWS.decode(batch)


class Event(_EventFields, frozen=True, repr_omit_defaults=True, gc=False):
    """Something that happened: a room event, a private message, or a connection status.

    kind is one of msg, action, join, leave, nick, topic, kick, ban, notice, edit, delete,
    deleted, file (room events), private, status (local: "connection lost, reconnecting...",
    "reconnected", "you were kicked from work by boss" with data removed/by/reason, ...), or
    unread and marked (local, for an account: what waits in a room or from a person, and what
    another device read; see accounts.py).
    `data` is every field of the event as the broker sent it (a dict, made on first use).
    """

    # mypy models msgspec Structs as dataclasses, whose fields a property may not override;
    # at run time the property shadows the field's slot, which it reads and fills via _DATA
    @property  # type: ignore[misc]
    def data(self) -> dict[str, Any]:
        value = _DATA.__get__(self)
        if type(value) is not dict:
            value = {} if value is None else _OBJECT.decode(_split(value[0])[value[1]])
            _DATA.__set__(self, value)
        return value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return _public(self) == _public(other)

    __hash__ = None  # type: ignore[assignment]   # as the dataclass it was: data is a dict

    @classmethod
    def from_wire(cls, d: dict[str, Any], *, mine: bool, backlog: bool = False) -> Event:
        return cls(
            str(d.get("kind", "")),
            str(d.get("text", "")),
            str(d.get("nick", "")),
            d.get("room"),
            d.get("seq"),
            float(d.get("ts") or 0.0),
            d.get("bot") is True,
            mine,
            backlog,
            d,
        )


_BATCH: Final = msgspec.json.Decoder(list[Event])  # a room batch, as Events


def _public(ev: Event) -> tuple[Any, ...]:
    return (ev.kind, ev.text, ev.nick, ev.room, ev.seq, ev.ts, ev.bot, ev.mine, ev.backlog, ev.data)


class _Inbox:
    """Events delivered and not read yet, in order: a deque, and one wake-up per batch of
    events for whoever waits (an asyncio.Queue costs a put and a get per event)."""

    def __init__(self) -> None:
        self.items: deque[Event] = deque()
        self._waiters: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return not self.items

    def put_nowait(self, event: Event) -> None:
        self.items.append(event)
        if self._waiters:
            self._wake()

    def extend(self, events: list[Event]) -> None:
        if events:
            self.items.extend(events)
            if self._waiters:
                self._wake()

    def get_nowait(self) -> Event:
        if not self.items:
            raise asyncio.QueueEmpty
        return self.items.popleft()

    async def get(self) -> Event:
        while not self.items:
            await self.wait()
        return self.items.popleft()

    async def wait(self) -> None:
        """Until something is delivered (a waiter of its own: cancelling it wakes no other)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()


@dataclass
class _Send:
    """One message waiting for its acknowledgement."""

    kind: str  # "say" or "priv"
    target: str  # room or nick
    text: str
    action: bool
    cmid: str
    future: asyncio.Future
    extra: dict[str, Any] = field(default_factory=dict)
    heard: int | None = None  # the room's seq we had when it was queued: it is stored after
    first_sent: float | None = None  # when it first left (monotonic): a retry says how long ago


class Client(AccountClient, Messages):
    """A connection to the broker: commands, room events, acknowledged sends, reconnects;
    edits, removals, replies and search (messages.py).

    `host` may name several brokers ("h1:9001,h2", or a list): connect() tries them in turn
    from the first; when the connection is lost, the others are tried in an order of this
    client's own (clients spread over the brokers left), the lost one last.

    With `password`, it logs in to the account `account` (default: the nick) and is back in
    all the account's rooms; `rooms` (default: the account's last room, else lobby) are
    entered with what is unread there, at most `unread` events (see accounts.py). A guest
    whose nick is still held by a connection that was lost waits for it, up to
    `wait_for_nick` seconds (`on_wait(seconds)` is told how long it may take). An account
    session can end for good: its password changed or the account was removed meanwhile;
    the client then stops (a status event says why) and `login_refused` holds the error.
    """

    def __init__(
        self,
        host: str | Iterable[str | Address] = "127.0.0.1",
        port: int = 9001,
        nick: str = "",
        *,
        rooms: Iterable[str] | None = None,
        bot: bool = False,
        backlog: int = 50,
        reconnect: bool = True,
        timeout: float = 5.0,
        server_key: bytes | None = None,
        keypair: tuple[bytes, bytes] | None = None,
        ctx: zmq.asyncio.Context | None = None,
        password: str | None = None,
        account: str | None = None,
        unread: int = m.MAX_HISTORY,
        wait_for_nick: float = 30.0,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.addresses = broker_addresses(host, port)  # connect: in turn, from the first
        self.host, self.port = self.addresses[0]  # the one we use now
        self._at = 0  # its index in addresses
        self._name = ""  # its name, if its welcome says
        self.nick, self.bot = nick, bot
        self.backlog, self.reconnect, self.timeout = backlog, reconnect, timeout
        if isinstance(rooms, str):  # rooms="work": one room, not the letters of its name
            rooms = [rooms]
        self.want_rooms = list(rooms) if rooms is not None else None
        self.acct = AccountState(password, account, unread)
        self.wait_for_nick, self.on_wait = wait_for_nick, on_wait
        self.rooms: dict[str, RoomOrder[Event]] = {}  # the rooms we are in, each in order
        self._heard: list[tuple[str, int, asyncio.Future[bool]]] = []  # heard() waiting
        self.welcome: dict[str, Any] = {}
        self.heartbeat = 2.0
        self.connected = False
        self.login_refused: ChatError | None = None  # why a resume could not log in again
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._curve = (server_key, *(keypair or zmq.curve_keypair())) if server_key else None
        self._token = secrets.token_hex(16)  # proves a reconnect is us, to re-claim the nick
        self._labels = itertools.count(1)
        self._waiting: dict[bytes, asyncio.Future] = {}
        self._events = _Inbox()
        self._outbox: OrderedDict[str, _Send] = OrderedDict()
        self._work = asyncio.Event()
        self._online = asyncio.Event()
        self._dealer: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._behind = False
        self._tasks: list[asyncio.Task] = []
        self._repairs: set[asyncio.Task] = set()  # history fetches and pings under way
        self._closing = False
        self._closed = False
        self._mine: OrderedDict[str, None] = OrderedDict()  # our recent message ids
        self._privates: OrderedDict[str, None] = OrderedDict()  # ids of privates we had
        self._on_reply: dict[bytes, Callable[[dict[str, Any]], None]] = {}
        self._leaves: dict[str, int] = {}  # leave() calls per room, for _join
        self._privates_since: float | None = None  # broker time: ask for privates after it
        self._resuming: asyncio.Task | None = None
        self._last_heard = time.monotonic()

    # ------------------------------------------------------------------ public API
    async def connect(self) -> dict[str, Any]:
        """Say HELLO (ChatError on a taken or invalid nick), then join the starting rooms.
        A broker that does not answer within `timeout` is passed over for the next one;
        ChatError TIMEOUT when none did. A connection lost while the rooms are joined is
        resumed, and the joins go on."""
        for left in range(len(self.addresses) - 1, -1, -1):
            self._open_sockets()
            if not self._tasks:
                self._tasks = [
                    asyncio.create_task(self._reader()),
                    asyncio.create_task(self._sender()),
                ]
            try:
                await self._hello_or_wait()
                break
            except BaseException as exc:
                # The reader dies with the sockets it polls: stop both tasks, so a retry (say
                # with another nick) starts fresh ones instead of waiting on a dead reader.
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                self._tasks = []
                await self._close_sockets()
                if not (left and isinstance(exc, ChatError) and exc.code == "TIMEOUT"):
                    raise
                log.info("no answer from %s; trying the next broker", self.address)
                self._move_on()
        if self.acct.account:
            await self._summary()
        self.want_rooms = self._start_rooms(self.want_rooms)
        for room in self.want_rooms:
            await self._join_at_start(room)
        for room in self.welcome.get("joined", []) if self.acct.account else ():
            if room not in self.rooms:  # the account's other rooms: back in them, quietly
                await self._join(room, {"room": room, "resume": True}, 0, unread=False)
        return self.welcome

    async def _join_at_start(self, room: str) -> None:
        """A starting room, joined even if the connection is lost meanwhile (a broker that
        stalls past our heartbeats as we join): the JOIN is made again once resumed."""
        for attempt in range(START_JOINS):
            try:
                await self.join(room)
                return
            except ChatError as err:
                lost = err.code == "DISCONNECTED" and self.reconnect and not self._closing
                if not lost or attempt == START_JOINS - 1:
                    raise
                # (again even if in it now: a JOIN of a member changes nothing, its backlog comes)

    async def _hello_or_wait(self) -> None:
        """HELLO; for a guest whose nick is held by a connection that has gone silent, ask
        again until the broker frees it (NICK_TAKEN if its holder is heard from meanwhile,
        or it takes longer than the broker said or than `wait_for_nick`)."""
        started = deadline = 0.0
        while True:
            try:
                await self._hello(resume=False)
                return
            except ChatError as err:
                free_in = err.body.get("free_in")
                if err.code != m.Code.NICK_TAKEN or free_in is None or not self.wait_for_nick:
                    raise
                now = time.monotonic()
                silent = err.body.get("silent")
                if started and silent is not None and float(silent) < now - started - 0.05:
                    raise  # heard from since we first asked: it is there
                if not started:
                    started, deadline = now, now + min(float(free_in) + 1.0, self.wait_for_nick)
                    if self.on_wait is not None:
                        self.on_wait(float(free_in))
                if now >= deadline:
                    raise
                await asyncio.sleep(min(float(free_in), 1.0, deadline - now) or 0.05)

    async def join(self, room: str, *, backlog: int | None = None) -> dict[str, Any]:
        """Enter a room: the last `backlog` events arrive first (backlog=True), then live ones.
        An account entering one of its rooms gets what is unread there instead."""
        return await self._join(room, {"room": room}, self.backlog if backlog is None else backlog)

    async def leave(self, room: str) -> None:
        self._leaves[room] = self._leaves.get(room, 0) + 1  # a JOIN sent before is undone
        self.rooms.pop(room, None)
        await self.request(m.Kind.LEAVE, {"room": room})

    async def say(self, room: str, text: str, *, action: bool = False, **extra: Any) -> int:
        """Send to a room; returns its sequence number once the broker has stored it."""
        return await self._queue("say", room, text, action, extra)

    async def me(self, room: str, action: str) -> int:
        return await self.say(room, action, action=True)

    async def msg(self, nick: str, text: str, **extra: Any) -> dict[str, Any]:
        """A private message to one user (never published); returns the broker's copy."""
        return await self._queue("priv", nick, text, False, extra)

    async def list_rooms(self) -> list[dict[str, Any]]:
        return (await self.request(m.Kind.ROOMS, {}))["rooms"]

    async def who(self, room: str | None = None) -> list[str]:
        """The nicks in `room` (one you may see), or with None everyone connected (on
        every broker of a cluster)."""
        return (await self.request(m.Kind.WHO, {"room": room}))["members"]

    async def set_nick(self, nick: str) -> str:
        self.nick = (await self.request(m.Kind.NICK, {"nick": nick}))["nick"]
        return self.nick

    async def topic(self, room: str, text: str | None = None, *, lock: bool | None = None) -> str:
        """Read (text None) or set a room's topic; operators may lock it to operators only."""
        return (await self.request(m.Kind.TOPIC, {"room": room, "text": text, "lock": lock}))[
            "topic"
        ]

    async def history(
        self,
        room: str,
        *,
        limit: int = 50,
        before: int | None = None,
        after: int | None = None,
        since: float | None = None,
    ) -> list[Event]:
        """Stored events of a room you are in: by sequence range, or since a UTC time."""
        reply = await self.request(
            m.Kind.HISTORY,
            {"room": room, "limit": limit, "before": before, "after": after, "since": since},
        )
        return [Event.from_wire(e, mine=self._is_mine(e), backlog=True) for e in reply["events"]]

    async def private_history(
        self, nick: str, *, limit: int = 50, since: float | None = None
    ) -> list[Event]:
        """Your private conversation with nick, both ways, oldest first (the broker gives
        it only to its two parties: it needs this client's resume token or CURVE key)."""
        reply = await self.request(m.Kind.HISTORY, {"with": nick, "limit": limit, "since": since})
        return [
            Event.from_wire(
                e,
                mine=m.nick_key(str(e.get("nick", ""))) == m.nick_key(self.nick)
                or self._is_mine(e),
                backlog=True,
            )
            for e in reply["events"]
        ]

    def _from_wire(self, d: dict[str, Any], *, mine: bool, backlog: bool) -> Event:
        """An Event from a reply's event (for the parts of Client in modules of their own)."""
        return Event.from_wire(d, mine=mine, backlog=backlog)

    async def heard(self, room: str, seq: int, timeout: float | None = None) -> bool:
        """Wait until this client has delivered room's events up to seq (its own message
        echoed back, say): False if that takes longer than timeout or it left the room.
        In a cluster an acknowledgement can come back before the echo."""
        order = self.rooms.get(room)
        if order is None:
            return False
        if order.last >= seq:
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._heard.append((room, seq, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return False

    async def kick(self, room: str, nick: str, reason: str = "") -> None:
        await self.request(m.Kind.KICK, {"room": room, "nick": nick, "reason": reason})

    async def ban(self, room: str, nick: str, reason: str = "") -> None:
        await self.request(m.Kind.BAN, {"room": room, "nick": nick, "reason": reason})

    async def unban(self, room: str, nick: str) -> None:
        await self.request(m.Kind.UNBAN, {"room": room, "nick": nick})

    @property
    def address(self) -> str:
        """The address of the broker we are connected to (or trying), as host:port."""
        return show_address(self.host, self.port)

    @property
    def broker(self) -> str:
        """The broker we are connected to (or trying): its name when its welcome gives one,
        else its address."""
        return self._name or self.address

    @property
    def stopped(self) -> bool:
        """Closed, or stopped by itself for good (`reconnect=False` and the connection
        lost; another login of the account took over; `login_refused`)."""
        return self._closing

    def pending(self) -> list[tuple[str, str]]:
        """(room or nick, text) of every send not yet acknowledged."""
        return [(s.target, s.text) for s in self._outbox.values()]

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every send so far is acknowledged."""
        futures = [s.future for s in self._outbox.values()]
        if futures:  # asyncio.wait, not wait_for: a timeout must not cancel the sends
            await asyncio.wait(futures, timeout=timeout)
            if not all(f.done() for f in futures):
                raise TimeoutError(f"{len(self._outbox)} messages not acknowledged")

    async def next_event(self, timeout: float | None = None) -> Event:
        if timeout is None:
            return await self._events.get()
        return await asyncio.wait_for(self._events.get(), timeout)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        """Every event, until the client is closed and all are read."""
        items = self._events.items
        while True:
            if items:
                yield items.popleft()
            elif self._closing:
                return
            else:
                await self._events.wait()

    async def close(self, reason: str | None = None) -> None:
        """Leave cleanly: the others are told (with the reason), then the sockets close.
        Sends not yet acknowledged fail with ChatError CLOSED (see pending() and flush())."""
        if self._closed:
            return
        if self.connected:
            try:
                await asyncio.wait_for(self.send_marks(), 1.0)  # what was read, counted
                await self._request_once(m.Kind.BYE, {"reason": reason}, 1.0)
            except (TimeoutError, ChatError):
                pass
        self._closing = True
        for task in [*self._tasks, *self._repairs, self._resuming]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._tasks, *self._repairs, return_exceptions=True)
        self._tasks = []
        await self._close_sockets()
        self._closed = True
        for item in self._outbox.values():
            if not item.future.done():
                item.future.set_exception(ChatError("CLOSED", "the client was closed"))
        self._outbox.clear()
        self._events.put_nowait(Event(Status.KIND, "closed"))

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ requests
    async def request(
        self,
        kind: m.Kind,
        body: dict[str, Any],
        timeout: float | None = None,
        *,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Send one command and wait for its reply; RATE_LIMITED is waited out and resent.
        on_reply(body) runs as the OK reply is read, before any message after it. Made
        while the client reconnects, it waits for that first (within the same timeout); one
        under way when the connection is lost fails with DISCONNECTED (it may have been done)."""
        timeout = timeout or self.timeout
        if not self._online.is_set() and kind is not m.Kind.HELLO:
            started = time.monotonic()
            await self._until_resumed(timeout)
            timeout = max(0.1, timeout - (time.monotonic() - started))
        while True:
            if not self.connected and kind is not m.Kind.HELLO:
                raise ChatError("DISCONNECTED", "not connected to the broker")
            try:
                return await self._request_once(kind, body, timeout, on_reply, on_sent)
            except ChatError as err:
                if err.code != m.Code.RATE_LIMITED:
                    raise
                await asyncio.sleep(float(err.body.get("retry_after", 0.2)))

    async def _until_resumed(self, timeout: float) -> None:
        """A request made while the client resumes its session waits until it has (but
        the resume's own requests, and any while it is not reconnecting)."""
        resuming = self._resuming
        if (
            resuming is None
            or resuming.done()
            or asyncio.current_task() is resuming
            or self._closing
            or not self.reconnect
        ):
            return
        online = asyncio.ensure_future(self._online.wait())
        try:
            await asyncio.wait({online, resuming}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            online.cancel()
        if self._online.is_set():
            return
        if self.login_refused is not None:  # the resume ended without a session
            raise self.login_refused
        if self._closing:
            raise ChatError("CLOSED", "the client was closed")
        if resuming.done():
            raise ChatError("DISCONNECTED", "not connected to the broker")
        raise ChatError("TIMEOUT", f"not reconnected within {timeout:g} s")

    async def _request_once(
        self,
        kind: m.Kind,
        body: dict[str, Any],
        timeout: float,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        label, future = self._start(kind, body)
        if on_reply is not None:
            self._on_reply[label] = on_reply
        if on_sent is not None:  # it has left (its reply may still be lost)
            on_sent()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ChatError("TIMEOUT", f"no reply to {kind} within {timeout:g} s") from None
        finally:
            self._waiting.pop(label, None)
            self._on_reply.pop(label, None)

    def _start(
        self, kind: m.Kind, body: dict[str, Any], data: bytes | None = None
    ) -> tuple[bytes, asyncio.Future[dict[str, Any]]]:
        """Send a command now; its reply completes the future (forget() it if unwanted).
        A GET's chunk comes as the reply's "~data"."""
        if self._dealer is None:
            raise ChatError("DISCONNECTED", "not connected to the broker")
        label = str(next(self._labels)).encode()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[label] = future
        plain: zmq.Socket[bytes] = zmq.Socket.shadow(self._dealer.underlying)
        try:
            plain.send_multipart(m.encode_request(kind, label, body, data), zmq.NOBLOCK)
        except zmq.Again:  # the queue to the broker is full: it is not reading
            self._waiting.pop(label, None)
            raise ChatError("TIMEOUT", "the broker is not taking requests") from None
        # A send may take the descriptor's wake-up for replies that came meanwhile (ZeroMQ's
        # descriptor is edge-triggered): reading EVENTS through the asyncio socket wakes the
        # reader if so, as pyzmq's own send does; else they waited for the poll's timeout.
        self._dealer.get(zmq.EVENTS)
        return label, future

    def _forget(self, label: bytes) -> None:
        self._waiting.pop(label, None)
        self._on_reply.pop(label, None)

    async def wait_online(self, timeout: float | None = None) -> None:
        """Until the client is connected (again): ChatError TIMEOUT after `timeout` s,
        DISCONNECTED if it was closed or does not reconnect."""
        if self.connected:
            return
        if self._closing or not self.reconnect:
            raise ChatError("DISCONNECTED", "not connected to the broker")
        try:
            await asyncio.wait_for(self._online.wait(), timeout)
        except TimeoutError:
            raise ChatError("TIMEOUT", "the broker did not come back") from None

    # ------------------------------------------------------------------ files (issue 24)
    async def send_file(
        self,
        room_or_nick: str,
        path: str,
        name: str | None = None,
        *,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Offer a file to a room we are in, or to a person ("@bob", or a nick that is no
        room of ours); returns the offer (its "file" is the id to download). Resumes on its
        own after a lost connection; the broker checks the bytes against their SHA-256."""
        return await files.send_file(self, room_or_nick, path, name, progress)

    async def download(
        self, file_id: str, folder: str = ".", *, progress: Progress | None = None
    ) -> str:
        """Fetch a file offered to a room we are in (or to us) into `folder`, under a safe
        name that overwrites nothing; returns the path written. Checked against the
        sender's SHA-256; resumes on its own after a lost connection."""
        return await files.download(self, file_id, folder, progress)

    async def files(self, room: str | None = None, *, with_nick: str | None = None) -> list[Any]:
        """The offers of a room (or of our private conversation with a nick), oldest first."""
        body = {"with": with_nick} if with_nick else {"room": room}
        return list((await self.request(m.Kind.FILES, body))["files"])

    async def file_info(self, file_id: str) -> dict[str, Any]:
        return await self.request(m.Kind.FILE, {"file": file_id})

    async def remove_file(self, file_id: str) -> dict[str, Any]:
        """Operators: remove a room's file (its bytes are deleted, its offer says removed)."""
        return await self.request(m.Kind.RMFILE, {"file": file_id})

    # ------------------------------------------------------------------ connection
    def _open_sockets(self) -> None:
        dealer = self._socket(zmq.DEALER)
        dealer.connect(self._endpoint(self.port))
        self._dealer = dealer
        self._sub = None
        self._gen = getattr(self, "_gen", 0) + 1

    def _open_sub(self, pub_port: int) -> None:
        sub = self._socket(zmq.XSUB)  # XSUB: we send grants, the broker does the filtering
        sub.setsockopt(zmq.RCVHWM, 10000)
        sub.connect(self._endpoint(pub_port))
        self._sub = sub
        self._behind = False  # room events left waiting on it after the last turn
        self._grants: dict[str, list[str]] = {}
        self._gen += 1

    def _endpoint(self, port: int) -> str:
        return f"tcp://{show_address(self.host, port)}"

    def _move_on(self, at: int | None = None) -> None:
        """Use the broker address at index `at`, by default the next one in turn (with only
        one: the same again)."""
        self._at = (self._at + 1) % len(self.addresses) if at is None else at
        self.host, self.port = self.addresses[self._at]
        self._name = ""

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        """A socket to the broker we use now: no linger, a bounded handshake, IPv6 if its
        address is one, CURVE if we were given its key."""
        sock = self._ctx.socket(kind)
        sock.linger = 0
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        sock.ipv6 = ":" in self.host
        if self._curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
        return sock

    async def _close_sockets(self) -> None:
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._dealer = self._sub = None

    async def _hello(self, *, resume: bool) -> None:
        body = {
            "version": m.VERSION,
            "nick": self.nick,
            "bot": self.bot,
            "resume": resume,
            "token": self._token,
        }
        if resume and self._privates_since is not None:
            body["privates_since"] = self._privates_since  # any pushed to a dying connection
        # A resume gives up sooner, to go on to the next broker: but not so soon that a
        # cluster broker that is slow to answer (its cluster busy) is given up while it
        # takes us in (that session, its client gone, would then hold our nick).
        timeout = self.timeout if not resume else max(2.0, self.heartbeat)
        login = await self._login(body, timeout)  # an account's: AUTH, and the proof
        reply = await self._request_once(m.Kind.HELLO, body, timeout)
        self._logged_in(login, reply)
        if self._privates_since is None and isinstance(reply.get("time"), (int, float)):
            self._privates_since = float(reply["time"])
        self.welcome = reply
        name = reply.get("broker")
        self._name = name if isinstance(name, str) else ""
        self.nick = reply["nick"]
        self.heartbeat = float(reply.get("heartbeat", 2.0))
        self._open_sub(int(reply["pub_port"]))
        self.connected = True
        self._last_heard = time.monotonic()
        if not resume:  # a resume lets the sends go once the rooms are joined again
            self._online.set()

    def _lost(self, why: str) -> None:
        """The broker stopped answering (or said it is going): reconnect in the background."""
        if not self.connected or self._closing:
            return
        self.connected = False
        self._online.clear()
        for fut in list(self._waiting.values()):
            if not fut.done():
                fut.set_exception(ChatError("DISCONNECTED", why))
        self._emit_status(f"{why}, reconnecting..." if self.reconnect else why)
        if self.reconnect:
            if self._resuming is None or self._resuming.done():  # (one under way goes on:
                self._resuming = asyncio.create_task(self._resume())  # what it waits on fails)
        else:
            self._closing = True

    def _failover(self) -> Iterator[int]:
        """The brokers to try from the one we use now, round and round (failover_order)."""
        return itertools.cycle(failover_order(self._at, len(self.addresses)))

    async def _resume(self) -> None:
        before = self._name
        tried = 0  # brokers tried since the last one that let us in
        order = self._failover()
        while not self._closing:
            tried += 1
            self._move_on(next(order))  # another broker (or the only one again)
            self._reset = True  # the reader swaps in fresh sockets
            while self._reset and not self._closing:
                await asyncio.sleep(0.01)
            welcomed = False
            try:
                await self._hello(resume=True)
                welcomed = True
                for room in list(self.rooms):
                    if room not in self.rooms:  # left (or kicked from) meanwhile
                        continue
                    try:
                        await self._join(room, {"room": room, "resume": True}, 0)
                    except ChatError as err:
                        # NO_HELLO: our new session is gone already (a HELLO of ours from an
                        # abandoned connection, read late, replaced it): resume again.
                        if err.code in (
                            "TIMEOUT",
                            "DISCONNECTED",
                            m.Code.NO_HELLO,
                            m.Code.UNAVAILABLE,
                        ):
                            raise
                        self.rooms.pop(room, None)  # gone, or we were banned meanwhile
                        self._emit_status(f"could not rejoin {room}: {err.reason}", room=room)
                if not self.connected:  # lost again while rejoining: once more
                    raise ChatError("DISCONNECTED", "the connection was lost while rejoining")
                moved = self._name and self._name != before  # another broker than before
                self._emit_status(f"reconnected (via {self._name})" if moved else "reconnected")
                self._online.set()  # our pending sends go now, into rooms we are in again
                self._work.set()
                return
            except ChatError as err:
                if err.code in REFUSED_LOGIN:  # the password changed, the account went: stop
                    self.connected, self._closing = False, True
                    self.login_refused = err
                    self._emit_status(f"cannot log in again: {err.reason}")
                    return
                if err.code == m.Code.NICK_TAKEN:
                    self._emit_status(
                        f"{self.nick} was taken while we were away; reconnecting as {self.nick}_"
                    )
                    self.nick = self.nick[: m.MAX_NICK - 1] + "_"
                self.connected = False
                self._online.clear()
                if welcomed and err.code in ("DISCONNECTED", m.Code.NO_HELLO):  # a broker let
                    tried, order = 0, self._failover()  # us in, then was lost: a new outage,
                    # tried again at once (one that let us in but could not rejoin us,
                    # UNAVAILABLE or TIMEOUT, counts as a failure: the wait grows if every
                    # broker is like it)
            await asyncio.sleep(reconnect_delay(tried, len(self.addresses)))

    def _started_over(self, room: str, seq: int) -> None:
        """A room's history started over at seq: what we are sending there is stored, if at
        all, after that now."""
        for item in self._outbox.values():
            if item.kind == "say" and item.target == room and item.heard is not None:
                item.heard = min(item.heard, seq)

    async def _join(
        self, room: str, body: dict[str, Any], backlog: int, *, unread: bool = True
    ) -> dict[str, Any]:
        """JOIN and enter the room: its backlog (for an account's room, what is unread
        there, if `unread`), then the subscription. The room is ours from the moment the
        reply is read, so a KICKED or GRANT right behind it finds it; if it is gone by the
        time we are back (kicked, left), we stay out."""
        fresh: list[bool] = []
        leaves = self._leaves.get(room, 0)

        def entered(reply: dict[str, Any]) -> None:
            if self._leaves.get(room, 0) != leaves:  # left since: the LEAVE comes after us
                return
            seq, order = int(reply["seq"]), self.rooms.get(room)
            if "mark" in reply:
                self.acct.marks[room] = max(int(reply["mark"]), self.acct.marks.get(room, 0))
            if order is None:
                self.rooms[room] = RoomOrder(seq)
                fresh.append(True)
            elif order.joined(seq):  # a broker that started over: a new history
                fresh.append(True)
                self._started_over(room, seq)
            else:
                self._repair_if_missing(room, order)

        reply = await self.request(m.Kind.JOIN, body, on_reply=entered)
        seq = int(reply["seq"])
        if fresh and "mark" in reply and room in self.rooms:
            if unread and self.acct.unread_limit:
                await self._more(room, int(reply["mark"]))
        elif fresh and backlog and seq and room in self.rooms:
            try:
                events = await self.history(room, limit=backlog, before=seq + 1)
            except ChatError:
                if room not in self.rooms:
                    return reply
                raise
            self._events.extend(events)
        if room in self.rooms:
            self._subscribe(room, reply["grant"])
        return reply

    def _subscribe(self, room: str, grant: str) -> None:
        """Ask the broker to let our subscriber hear room; LIVE tells us when it has."""
        if self._sub is not None:
            self._sub.send(b"\x01" + grant.encode("ascii"))
            self._grants.setdefault(room, []).append(grant)

    def _unsubscribe_used(self, room: str) -> None:
        """Forget spent grants, so our subscriber's own table does not grow (LIVE proves the
        broker has read them; the broker ignores the unsubscriptions)."""
        if self._sub is not None:
            for grant in self._grants.pop(room, []):
                self._sub.send(b"\x00" + grant.encode("ascii"))

    # ------------------------------------------------------------------ the reader
    async def _reader(self) -> None:
        """The one task that reads (and swaps) the sockets; also drives heartbeats."""
        self._reset = False
        gen, poller = -1, zmq.asyncio.Poller()
        last_ping = 0.0
        while not self._closing:
            if self._reset:
                await self._close_sockets()
                self._open_sockets()
                self._reset = False
            if gen != self._gen:
                poller = zmq.asyncio.Poller()
                for sock in (self._dealer, self._sub):
                    if sock is not None:
                        poller.register(sock, zmq.POLLIN)
                gen = self._gen
            ready = dict(await poller.poll(100))
            if self._dealer is not None and self._dealer in ready:
                await self._read_dealer()
            if self._sub is not None and self._sub in ready:
                self._read_sub()
            now = time.monotonic()
            if self.connected:
                if now - self._last_heard > 3 * self.heartbeat:
                    self._lost("connection lost")
                elif now - last_ping >= self.heartbeat:
                    last_ping = now
                    ping = asyncio.create_task(self._ping())
                    self._repairs.add(ping)  # (cancelled by close() too)
                    ping.add_done_callback(self._repairs.discard)

    def _ready(self, sock: zmq.asyncio.Socket) -> Iterator[list[Any]]:
        """The messages already waiting on sock (at most 1000 a turn); each proves liveness.
        Read through a plain socket on the same handle: no future per message. A fourth
        frame (a file's chunk) is a view of ZeroMQ's buffer, not a copy."""
        plain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        for _ in range(1000):
            try:
                frames: list[Any] = [plain.recv(zmq.NOBLOCK)]
            except zmq.Again:
                return
            while plain.rcvmore:
                if len(frames) < 3:
                    frames.append(plain.recv(zmq.NOBLOCK))
                else:
                    chunk: Any = plain.recv(zmq.NOBLOCK, copy=False)
                    frames.append(memoryview(chunk))
            self._last_heard = time.monotonic()
            yield frames

    async def _read_dealer(self) -> None:
        assert self._dealer is not None
        for frames in self._ready(self._dealer):
            try:
                resp = m.decode_response(frames)
            except m.ProtocolError as err:
                log.warning("bad frame from broker: %s", err)
                continue
            if resp.label:
                fut = self._waiting.get(resp.label)
                if fut is not None and not fut.done():
                    if resp.kind == m.Reply.OK:
                        hook = self._on_reply.pop(resp.label, None)
                        try:
                            if hook is not None:
                                hook(resp.body)
                        except (KeyError, TypeError, ValueError) as exc:  # not what we asked
                            fut.set_exception(ChatError("BAD_REPLY", f"unusable reply: {exc!r}"))
                            continue
                        if resp.data:
                            resp.body["~data"] = resp.data
                        fut.set_result(resp.body)
                    else:
                        fut.set_exception(
                            ChatError(
                                str(resp.body.get("code")), str(resp.body.get("reason")), resp.body
                            )
                        )
                if resp.kind == m.Reply.ERROR and resp.body.get("code") == m.Code.NO_HELLO:
                    self._lost("connection lost")
                continue
            self._on_push(resp.kind, resp.body)

    def _read_sub(self) -> None:
        """Room batches waiting, up to about EVENTS_PER_TURN events: then the reader lets the
        consumer in, which reads them while they are still in the processor's cache. Once
        none is left waiting, whatever is still missing is fetched from history."""
        assert self._sub is not None
        taken = 0
        for frames in self._ready(self._sub):
            events = self._decode_batch(frames)
            if events:
                self._ingest(events[0].room or "", events)
                taken += len(events)
                if taken >= EVENTS_PER_TURN:
                    break
        behind = bool(int(self._sub.get(zmq.EVENTS)) & zmq.POLLIN)  # typed int | bytes | str
        if self._behind and not behind:
            self._behind = False
            for room, order in list(self.rooms.items()):
                self._repair_if_missing(room, order)
        self._behind = behind

    def _decode_batch(self, frames: list[bytes]) -> list[Event]:
        """A published batch -> its Events, ours marked mine; [] (said) when malformed."""
        body = frames[1] if len(frames) == 2 else b""
        try:
            events = _BATCH.decode(body)
        except msgspec.MsgspecError:  # not the usual shape (or not a batch): the general way
            try:
                return [Event.from_wire(d, mine=self._is_mine(d)) for d in m.decode_batch(frames)]
            except m.ProtocolError as err:
                log.warning("bad room frame: %s", err)
                return []
        mine, nick, set_data, set_mine = self._mine, self.nick, _DATA.__set__, _MINE.__set__
        for index, ev in enumerate(events):
            set_data(ev, (body, index))
            cmid = ev._cmid
            if (cmid in mine) if cmid else ev.nick == nick:  # as _is_mine
                set_mine(ev, True)
        return events

    def _on_push(self, kind: str, body: dict[str, Any]) -> None:
        room = body.get("room")
        if kind == m.Reply.PRIVATE:
            ev = body.get("event", {})
            if self._new_private(ev):  # ours when our account sent it from another device
                mine = m.nick_key(str(ev.get("nick", ""))) == m.nick_key(self.nick)
                self._events.put_nowait(Event.from_wire(ev, mine=mine))
        elif kind in (m.Reply.JOINED, m.Reply.LEFT, m.Reply.MARKED):
            self._device_news(kind, body)  # accounts.py: what another device of ours did
        elif kind == m.Reply.GRANT and room in self.rooms:
            self._subscribe(room, str(body.get("grant")))
        elif kind == m.Reply.LIVE and room in self.rooms:
            self._unsubscribe_used(room)
            self._known(room, int(body.get("seq", 0)))
        elif kind == m.Reply.KICKED and room in self.rooms:
            del self.rooms[room]
            verb = "banned" if body.get("kind") == "ban" else "kicked"
            reason = f" ({body.get('reason')})" if body.get("reason") else ""
            self._emit_status(
                f"you were {verb} from {room} by {body.get('by')}{reason}",
                room=room,
                removed=verb,  # for a bot: what happened, by whom, why
                by=body.get("by"),
                reason=body.get("reason") or "",
            )
        elif kind == m.Reply.SHUTDOWN:
            self._emit_status("the broker is shutting down")
            self._lost("connection lost")
        elif kind == m.Reply.EXPIRED and body.get("replaced"):
            self.reconnect = False  # our account logged in elsewhere: that one goes on
            self._lost(str(body.get("reason") or "logged in from another connection"))
        elif kind == m.Reply.EXPIRED and body.get("refused"):
            reason = str(body.get("reason") or "the account's password was changed")
            self.reconnect = False  # no login with our password would be let in now
            self.login_refused = ChatError(str(body["refused"]), reason)
            self._lost(f"cannot log in again: {reason}")
        elif kind == m.Reply.EXPIRED:  # our broker was taken for dead (it did not run for
            # a while) and another settled our session: we come back now, and say so
            self._lost(str(body.get("reason") or "your session was ended"))

    async def _ping(self) -> None:
        try:
            reply = await self._request_once(m.Kind.PING, {}, 3 * self.heartbeat)
        except ChatError:
            return
        await self.send_marks(force=False)  # an account's marks go with the heartbeat
        for room, seq in reply.get("rooms", {}).items():
            self._known(room, int(seq))

    # ------------------------------------------------------------------ ordering and repair
    def _ingest(self, room: str, events: list[Event]) -> None:
        """A room's events as heard: deliver those now in order; fetch what is missing."""
        order = self.rooms.get(room)
        if order is None:
            return
        self._events.extend(order.receive(events))
        if self._heard:
            self._wake_heard(room, order)
        self._repair_if_missing(room, order)

    def _known(self, room: str, seq: int) -> None:
        """The room has reached seq: fetch from history whatever we lack up to it."""
        order = self.rooms.get(room)
        if order is not None:
            order.reached(seq)
            self._repair_if_missing(room, order)

    def _repair_if_missing(self, room: str, order: RoomOrder[Event]) -> None:
        """Fetch what the room lacks: at once when events wait behind a gap; otherwise only
        once no live event is left to read (a ping reply that says the room is ahead of what
        we read may only be ahead of what waits in our socket)."""
        if (
            self.connected
            and (order.held or not self._behind)
            and (fetch := order.fetch()) is not None
        ):
            task = asyncio.create_task(self._repair(room, order, fetch))
            self._repairs.add(task)
            task.add_done_callback(self._repairs.discard)

    async def _repair(self, room: str, order: RoomOrder[Event], fetch: Fetch | None) -> None:
        """Fetch from history until the room's order has nothing missing (or we left it)."""
        try:
            while fetch is not None and self.rooms.get(room) is order:
                try:
                    reply = await self._request_once(
                        m.Kind.HISTORY,
                        {"room": room, "after": fetch.after, "limit": fetch.limit},
                        self.timeout,
                    )
                    events = [Event.from_wire(e, mine=self._is_mine(e)) for e in reply["events"]]
                    seq = int(reply.get("seq", fetch.after))
                except (ChatError, AttributeError, KeyError, TypeError, ValueError) as err:
                    log.info("history repair of %s stopped: %s", room, err)
                    return
                result = order.fetched(fetch, events, seq)
                fetch = result.next
                if result.skipped:
                    log.warning(
                        "%s: events %d..%d are missing from history; skipped",
                        room,
                        result.skipped[0],
                        result.skipped[-1],
                    )
                if self.rooms.get(room) is order:
                    self._events.extend(result.ready)
                    if self._heard:
                        self._wake_heard(room, order)
        finally:
            if fetch is not None:  # stopped before its reply: a later fetch() asks again
                order.failed(fetch)

    def _wake_heard(self, room: str, order: RoomOrder[Event]) -> None:
        still = []
        for r, seq, future in self._heard:
            if r == room and order.last >= seq:
                if not future.done():
                    future.set_result(True)
            elif not future.done():
                still.append((r, seq, future))
        self._heard = still

    def _new_private(self, ev: dict[str, Any]) -> bool:
        """Whether a pushed private message is news (after a reconnect the broker pushes
        again those sent since the last one we had); moves our privates_since on."""
        cmid = ev.get("cmid")
        if isinstance(cmid, str) and not self._first_time(cmid):
            return False
        ts = ev.get("ts")
        if isinstance(ts, (int, float)) and self._privates_since is not None:
            self._privates_since = max(self._privates_since, float(ts))
        return True

    def _own_private(self, ev: dict[str, Any]) -> bool:
        """Whether our copy of a private message we sent is news: one to ourselves comes
        pushed too (and then the push is the first, or the copy is)."""
        cmid = ev.get("cmid")
        if not isinstance(cmid, str) or m.nick_key(str(ev.get("to", ""))) != m.nick_key(self.nick):
            return True
        return self._first_time(cmid)

    def _first_time(self, cmid: str) -> bool:
        """Whether a private message's id is new here (then it is remembered)."""
        if cmid in self._privates:
            return False
        remember(self._privates, cmid, PRIVATE_MEMORY)
        return True

    def _is_mine(self, ev: dict[str, Any]) -> bool:
        """Ours if it carries one of our message ids, or (joins, nick changes) our nick."""
        cmid = ev.get("cmid")
        if cmid:
            return cmid in self._mine
        return ev.get("nick") == self.nick

    def _wire_event(self, d: dict[str, Any], backlog: bool) -> Event:
        return Event.from_wire(d, mine=self._is_mine(d), backlog=backlog)

    def _unread_event(self, text: str, room: str | None, data: dict[str, Any]) -> Event:
        return Event(Status.UNREAD, text, room=room, ts=time.time(), data=data)

    def _device_event(self, text: str, room: str | None, data: dict[str, Any]) -> Event:
        return Event(Status.MARKED, text, room=room, ts=time.time(), data=data)

    def _error(self, code: str, reason: str) -> Exception:
        return ChatError(code, reason)

    def _emit_status(self, text: str, room: str | None = None, **data: Any) -> None:
        event = Event(Status.KIND, text, room=room, ts=time.time(), data=data or None)
        self._events.put_nowait(event)

    # ------------------------------------------------------------------ acknowledged sends
    async def _queue(
        self, kind: str, target: str, text: str, action: bool, extra: dict[str, Any]
    ) -> Any:
        if self._closing:
            raise ChatError("CLOSED", "the client was closed")
        if not self.welcome:  # (a send while reconnecting waits; one before connect() would not)
            raise ChatError("DISCONNECTED", "not connected to the broker: connect() first")
        _sendable(text, extra)
        cmid = uuid.uuid4().hex
        remember(self._mine, cmid, MINE_MEMORY)
        future = asyncio.get_running_loop().create_future()
        order = self.rooms.get(target) if kind == "say" else None
        heard = max(order.last, order.target) if order is not None else None
        self._outbox[cmid] = _Send(kind, target, text, action, cmid, future, extra, heard)
        self._work.set()
        return await future

    async def _sender(self) -> None:
        """Send the outbox in order, batching a room's messages; retry until acknowledged."""
        while not self._closing:
            await self._work.wait()
            self._work.clear()
            while self._outbox and not self._closing:
                await self._online.wait()
                batch = self._next_batch()
                try:
                    await self._send_batch(batch)
                except ChatError as err:
                    if err.code in ("TIMEOUT", "DISCONNECTED", m.Code.NO_HELLO, m.Code.UNAVAILABLE):
                        await asyncio.sleep(0.05)
                        continue  # resent as it is: the broker drops what it already has
                    self._fail(batch, err)
                except Exception as exc:  # noqa: BLE001 - a bug must not stop every later send
                    log.exception("cannot send %d message(s)", len(batch))
                    self._fail(batch, ChatError("BAD_REQUEST", f"cannot be sent: {exc}"))

    def _fail(self, batch: list[_Send], err: ChatError) -> None:
        for item in batch:
            self._outbox.pop(item.cmid, None)
            if not item.future.done():
                item.future.set_exception(err)

    def _next_batch(self) -> list[_Send]:
        first = next(iter(self._outbox.values()))
        if first.kind == "priv":
            return [first]
        limit = max(
            1,
            min(
                int(self.welcome.get("max_batch", m.MAX_BATCH)),
                int(self.welcome.get("burst", 20)) or m.MAX_BATCH,
            ),
        )
        batch: list[_Send] = []
        size = 0
        for item in self._outbox.values():
            if (
                item.kind != "say"
                or item.target != first.target
                or item.extra != first.extra
                or len(batch) >= limit
            ):
                break
            size += len(m.dumps(item.text)) + 80  # its id and the JSON around it
            if batch and size > BATCH_BYTES:  # the request must stay under MAX_REQUEST
                break
            batch.append(item)
        return batch

    async def _send_private(self, first: _Send) -> None:
        def copy(reply: dict[str, Any]) -> None:  # ours, as its reply is read: before
            event = reply.get("event")  # an answer that came right behind it
            if event and self._own_private(event):
                self._events.put_nowait(Event.from_wire(event, mine=True))

        def sent() -> None:
            if first.first_sent is None:
                first.first_sent = time.monotonic()

        priv = {"to": first.target, "text": first.text, "id": first.cmid, **first.extra}
        if first.first_sent is not None:  # its answer was lost: a broker that did not
            priv["retry"] = round(time.monotonic() - first.first_sent, 3)  # keep it looks
        reply = await self.request(m.Kind.PRIV, priv, on_reply=copy, on_sent=sent)  # back
        if reply.get("duplicate") and not reply.get("event"):  # the first reply was lost,
            event = {  # and with it our copy: made here, as the broker had made it
                "kind": m.EventKind.PRIVATE,
                "nick": self.nick,
                "to": reply.get("to", first.target),
                "text": first.text,
                "ts": time.time(),  # (ours: the broker's is not in a duplicate's reply)
                "cmid": first.cmid,
                "bot": self.bot,
            }
            reply["event"] = event
            if self._own_private(event):
                self._events.put_nowait(Event.from_wire(event, mine=True))
        self._outbox.pop(first.cmid, None)
        if not first.future.done():
            first.future.set_result(reply.get("event") or reply)

    async def _send_batch(self, batch: list[_Send]) -> None:
        first = batch[0]
        if first.kind == "priv":
            await self._send_private(first)
            return
        body: dict[str, Any] = {
            "room": first.target,
            "msgs": [{"id": i.cmid, "text": i.text, "action": i.action} for i in batch],
        }
        heard = [i.heard for i in batch]
        if None not in heard:  # a retry's first copy is after this: a broker new to the room
            body["heard"] = min(h for h in heard if h is not None)  # looks back to there
        body.update(first.extra)
        reply = await self.request(m.Kind.SAY, body, timeout=max(2.0, self.heartbeat))
        for cmid, seq in reply.get("acks", []):
            item = self._outbox.pop(cmid, None)
            if item is not None and not item.future.done():
                item.future.set_result(seq)


def _sendable(text: Any, extra: dict[str, Any]) -> None:
    """ChatError BAD_REQUEST, at the call, for what no broker could be sent: not a str,
    text that is not valid Unicode (a lone surrogate, from os.fsdecode of a name in
    another encoding), fields that are not JSON."""
    if not isinstance(text, str):
        raise ChatError("BAD_REQUEST", f"the text must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
        if extra:
            m.dumps(extra)
    except UnicodeEncodeError as exc:
        raise ChatError(
            "BAD_REQUEST", f"the text is not valid Unicode (at character {exc.start})"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ChatError("BAD_REQUEST", f"a field cannot be sent: {exc}") from None


def curve_keys(
    server_key_file: str, config_dir: str | None = None
) -> tuple[bytes, tuple[bytes, bytes]]:
    """The broker's public key from its file, and our own key pair: kept in the user's config
    directory (mode 600), made on first use. Pass them as Client(server_key=, keypair=)."""
    import os

    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server_key_file)
    base = config_dir or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "zmqchat"
    )
    secret_file = os.path.join(base, "client.key_secret")
    if not os.path.exists(secret_file):
        os.makedirs(base, mode=0o700, exist_ok=True)
        _, secret_file = zmq.auth.create_certificates(base, "client")
    os.chmod(secret_file, 0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    return server_public, (public, secret)


class BlockingClient:
    """The same client for simple scripts: plain calls, an event loop in a background thread;
    `with BlockingClient(...) as c:` closes it, `for event in c:` reads its events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client: Client = self._call(self._make(*args, **kwargs))
        try:
            self._call(self._client.connect())
        except BaseException:  # a refused nick must not leave a thread and a loop behind
            with contextlib.suppress(Exception):  # (nor a session: a JOIN refused after HELLO)
                self._call(self._client.close(), timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
            raise

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Event]:
        """Every event, as `async for` gives them, until the client is closed."""
        events = self._client.__aiter__()
        while self._thread.is_alive():
            try:
                yield self._call(events.__anext__())
            except StopAsyncIteration:
                return

    @staticmethod
    async def _make(*args: Any, **kwargs: Any) -> Client:
        return Client(*args, **kwargs)

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        if not self._thread.is_alive():  # closed: its loop is gone
            coro.close()
            raise ChatError("CLOSED", "the client was closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def nick(self) -> str:
        return self._client.nick

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        return lambda *a, **kw: self._call(attr(*a, **kw))

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds."""
        try:
            return self._call(self._client.next_event(timeout))
        except TimeoutError:
            return None

    def close(self, reason: str | None = None) -> None:
        if not self._thread.is_alive():  # closed already: the loop is gone, nothing would run
            return
        try:
            self._call(self._client.close(reason), timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()  # its selector holds file descriptors
