"""The client library's side of accounts and catching up (issue 21), a part of `Client`.

With `Client(..., password=...)` every HELLO (the first and each after a reconnect) logs in
with SCRAM-SHA-256: the password never leaves the process. Once logged in, `account` names
the account, the client is back in all the account's rooms, and it says what waits: one
`unread` event per room and person with something unread (`12 unread in work, 2 mention
you`), then the unread private messages, then, for each room it was asked to enter, the
unread events of that room (up to `unread`, flagged `unread` in their data), then live ones.
`mark()` tells the broker how far the account has read (sent at most once a second);
`catch_up()` fetches what is unread in a room; `register()` and `change_password()` do what
they say.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from zmqchat import protocol as m
from zmqchat._scram import DEFAULT_ITERATIONS, Login, ScramError, make_keys, password_problem

Event = Any  # the library's Event (library.py builds on this module, not the other way)
MARK_EVERY: Final = 1.0  # seconds between two MARKs of the same room or person at most


@dataclass
class CaughtUp:
    """What catch_up() found: the unread events (oldest first, up to the limit), how many
    unread messages are after them still (`more`), and the room's last number then."""

    events: list[Event]
    more: int
    last: int


@dataclass
class AccountState:
    """What the client keeps about its account."""

    password: str | None
    name: str | None  # the account to log in to (the nick, if not given)
    unread_limit: int  # unread events delivered when entering a room (0: none)
    account: str | None = None  # the account logged in to, once it is
    marks: dict[str, int] = field(default_factory=dict)  # room -> read up to (seq)
    private_marks: dict[str, float] = field(default_factory=dict)  # nick -> read up to (ts)
    unread: dict[str, dict[str, Any]] = field(default_factory=dict)  # the last UNREAD, by room
    unread_privates: dict[str, dict[str, Any]] = field(default_factory=dict)  # ... by nick
    due: dict[str, int] = field(default_factory=dict)  # room marks not sent yet
    due_privates: dict[str, float] = field(default_factory=dict)
    sent_at: float = 0.0  # when marks went last (monotonic)


def unread_text(line: dict[str, Any], more: bool = False) -> str:
    """`12 unread in work, 2 mention you`, `1 unread from bob`, `734 more unread in work`."""
    n, k = int(line.get("unread", 0)), int(line.get("mentions", 0))
    where = f"in {line['room']}" if line.get("room") else f"from {line.get('with')}"
    text = f"{n} {'more ' if more else ''}unread {where}"
    if k:
        text += f", {k} {'mentions' if k == 1 else 'mention'} you"
    return text


class AccountClient:
    """Mixed into Client: the account, its login, marks and catching up."""

    acct: AccountState

    if TYPE_CHECKING:  # provided by Client
        nick: str
        welcome: dict[str, Any]
        timeout: float
        rooms: dict[str, Any]
        _events: Any

        async def request(
            self,
            kind: m.Kind,
            body: dict[str, Any],
            timeout: float | None = None,
            *,
            on_reply: Callable[[dict[str, Any]], None] | None = None,
        ) -> dict[str, Any]:
            raise NotImplementedError

        async def _request_once(
            self,
            kind: m.Kind,
            body: dict[str, Any],
            timeout: float,
            on_reply: Callable[[dict[str, Any]], None] | None = None,
        ) -> dict[str, Any]:
            raise NotImplementedError

        def _wire_event(self, d: dict[str, Any], backlog: bool) -> Event:
            raise NotImplementedError

        def _unread_event(self, text: str, room: str | None, data: dict[str, Any]) -> Event:
            raise NotImplementedError

        def _error(self, code: str, reason: str) -> Exception:
            raise NotImplementedError

        _leaves: dict[str, int]
        _grants: dict[str, list[str]]
        _repairs: set[asyncio.Task[Any]]  # tasks cancelled at close

        def _device_event(self, text: str, room: str | None, data: dict[str, Any]) -> Event:
            raise NotImplementedError

        async def _join(
            self, room: str, body: dict[str, Any], backlog: int, *, unread: bool = True
        ) -> dict[str, Any]:
            raise NotImplementedError

        def _emit_status(self, text: str, room: str | None = None) -> None:
            raise NotImplementedError

    # ------------------------------------------------------------------ public
    @property
    def account(self) -> str | None:
        """The account this client is logged in to (None: a guest)."""
        return self.acct.account

    @property
    def marks(self) -> dict[str, int]:
        """How far the account has read each of its rooms (a seq), as this client knows."""
        return self.acct.marks

    @property
    def unread(self) -> dict[str, dict[str, Any]]:
        """The last unread counts by room (`unread`, `mentions`, `mark`, `last`)."""
        return self.acct.unread

    @property
    def unread_privates(self) -> dict[str, dict[str, Any]]:
        """The last unread counts of private messages, by person."""
        return self.acct.unread_privates

    def mentions(self, ev: Event) -> bool:
        """Whether an event's text names this client (its nick, or its account's name)."""
        names = {self.nick, self.acct.account or ""}
        return not ev.mine and any(m.mentions(ev.text, name) for name in names if name)

    def mark(self, room: str, seq: int) -> None:
        """The account has read `room` up to `seq`: told to the broker within a second."""
        if self.acct.account and seq > self.acct.marks.get(room, -1):
            self.acct.marks[room] = self.acct.due[room] = seq

    def mark_private(self, nick: str, ts: float) -> None:
        """The account has read its private messages from `nick` up to time `ts`."""
        if self.acct.account and ts > self.acct.private_marks.get(nick, 0.0):
            self.acct.private_marks[nick] = self.acct.due_privates[nick] = ts

    async def unread_counts(
        self, room: str | None = None, after: int | None = None
    ) -> dict[str, Any]:
        """Ask the broker what is unread (one room, or every room and person); the reply's
        `rooms` and `privates` lines are kept in `unread` and `unread_privates` too."""
        reply = await self.request(m.Kind.UNREAD, {"room": room, "after": after})
        for line in reply.get("rooms", []):
            self.acct.unread[line["room"]] = line
            self.acct.marks.setdefault(line["room"], int(line["mark"]))
        if room is None:
            self.acct.unread_privates = {p["with"]: p for p in reply.get("privates", [])}
        return reply

    async def catch_up(
        self, room: str, after: int | None = None, limit: int = m.MAX_HISTORY
    ) -> CaughtUp:
        """The events of `room` after `after` (default: the account's mark), up to `limit`
        (500 at most), flagged `unread`; and how many unread messages come after them."""
        start = self.acct.marks.get(room, 0) if after is None else after
        reply = await self.request(
            m.Kind.HISTORY, {"room": room, "after": start, "limit": min(limit, m.MAX_HISTORY)}
        )
        events = [self._wire_event({**e, "unread": True}, True) for e in reply["events"]]
        seen = int(events[-1].seq or start) if events else start
        last, more = int(reply.get("seq", seen)), 0
        if last > seen:
            counted = await self.request(m.Kind.UNREAD, {"room": room, "after": seen})
            more = int(counted["rooms"][0]["unread"])
        return CaughtUp(events, more, last)

    async def register(self, password: str) -> dict[str, Any]:
        """Register the nick this client holds as an account, with this password."""
        self._check_new(password)
        iterations = int(self.welcome.get("scram_iterations", DEFAULT_ITERATIONS))
        keys = await asyncio.to_thread(make_keys, password, iterations)
        reply = await self.request(m.Kind.REGISTER, keys.to_wire())
        self.acct.account = self.acct.name = str(reply["account"])
        self.acct.password = password
        for room in reply.get("joined", []):
            self.acct.marks[room] = getattr(self.rooms.get(room), "last", 0)
        return reply

    async def change_password(self, old: str, new: str) -> None:
        """Change the account's password (the old one is proven first)."""
        if not self.acct.account:
            raise self._error("NOT_ALLOWED", "you are not logged in to an account")
        self._check_new(new)
        login = Login(self.acct.account, old)
        answer = await self.request(
            m.Kind.AUTH, {"account": self.acct.account, "first": login.first()}
        )
        proof = await asyncio.to_thread(login.proof, str(answer["next"]))
        iterations = int(self.welcome.get("scram_iterations", DEFAULT_ITERATIONS))
        keys = await asyncio.to_thread(make_keys, new, iterations)
        await self.request(m.Kind.PASSWORD, {"proof": proof, **keys.to_wire()})
        self.acct.password = new

    def _check_new(self, password: str) -> None:
        problem = password_problem(password)
        if problem is not None:
            raise self._error("BAD_REQUEST", problem)

    # ------------------------------------------------------------------ for Client
    async def _login(self, body: dict[str, Any], timeout: float) -> Login | None:
        """Before a HELLO with a password: AUTH, and the proof into the HELLO's body."""
        if self.acct.password is None:
            return None
        name = self.acct.name or str(body["nick"])
        try:
            login = Login(name, self.acct.password)
        except ScramError as err:
            raise self._error("BAD_REQUEST", f"this password cannot be used: {err}") from None
        answer = await self._request_once(
            m.Kind.AUTH, {"account": name, "first": login.first()}, timeout
        )
        try:
            body["proof"] = await asyncio.to_thread(login.proof, str(answer["next"]))
        except ScramError as err:  # the broker's answer is not SCRAM's
            raise self._error("BAD_REPLY", f"the broker's login answer: {err}") from None
        return login

    def _logged_in(self, login: Login | None, reply: dict[str, Any]) -> None:
        """After the welcome: the broker proved it holds our keys; we are the account."""
        if login is None:
            return
        try:
            login.check(str(reply.get("verify", "")))
        except ScramError as err:
            raise self._error("AUTH_FAILED", str(err)) from None
        self.acct.account = self.acct.name = str(reply["account"])

    def _start_rooms(self, rooms: list[str] | None) -> list[str]:
        """The rooms to enter (with their backlog or unread) at connect: those asked for;
        else an account's last room; else lobby."""
        if rooms is not None:
            return rooms
        last = str(self.welcome.get("last_room") or "")
        return [last] if self.acct.account and last else ["lobby"]

    async def _summary(self) -> None:
        """After a login: one `unread` event per room and person with unread messages, then
        the unread private messages themselves."""
        reply = await self.unread_counts()
        for line in reply["rooms"]:
            if line["unread"]:
                self._events.put_nowait(self._unread_event(unread_text(line), line["room"], line))
        for line in reply.get("privates", []):
            self._events.put_nowait(self._unread_event(unread_text(line), None, line))
        if not self.acct.unread_limit:
            return
        for line in reply.get("privates", []):
            since, peer = float(line["mark"]), m.nick_key(str(line["with"]))
            got = await self.request(
                m.Kind.HISTORY, {"with": line["with"], "since": since, "limit": m.MAX_HISTORY}
            )
            self._events.extend(
                [
                    self._wire_event({**e, "unread": True}, True)
                    for e in got["events"]
                    if m.nick_key(str(e.get("nick", ""))) == peer and float(e.get("ts", 0)) > since
                ]
            )

    async def _more(self, room: str, mark: int) -> None:
        """Entering an account's room: its unread events, then a note if there are more."""
        caught = await self.catch_up(room, mark, self.acct.unread_limit)
        self._events.extend(caught.events)
        if caught.more:
            after = caught.events[-1].seq if caught.events else mark
            line = {"room": room, "unread": caught.more, "more": True, "after": after}
            self._events.put_nowait(self._unread_event(unread_text(line, True), room, line))

    async def send_marks(self, force: bool = True) -> None:
        """Tell the broker the marks made since the last time (with the heartbeat, not more
        than once a second, unless `force`; and when the client closes)."""
        if not (self.acct.due or self.acct.due_privates):
            return
        now = time.monotonic()
        if not force and now - self.acct.sent_at < MARK_EVERY:
            return
        self.acct.sent_at = now
        due, self.acct.due = self.acct.due, {}
        privates, self.acct.due_privates = self.acct.due_privates, {}
        for room, seq in due.items():
            await self._mark_request({"room": room, "seq": seq})
        for nick, ts in privates.items():
            await self._mark_request({"with": nick, "ts": ts})

    # ------------------------------------------------------------------ other devices
    def _device_news(self, kind: str, body: dict[str, Any]) -> None:
        """What another session of our account did: it joined a room (we join it too,
        which makes no notice), left one (we are out of it already), or read up to a mark
        (our unread counts drop: a `marked` event says them)."""
        room = body.get("room")
        if kind == m.Reply.JOINED and isinstance(room, str) and room not in self.rooms:
            task = asyncio.create_task(self._follow_join(room))
            self._repairs.add(task)
            task.add_done_callback(self._repairs.discard)
        elif kind == m.Reply.LEFT and isinstance(room, str):
            self._leaves[room] = self._leaves.get(room, 0) + 1  # a JOIN under way is undone
            if room in self.rooms:
                self.rooms.pop(room, None)
                self._grants.pop(room, None)
                self._emit_status(f"your account left {room} on another connection", room=room)
        elif kind == m.Reply.MARKED:
            task = asyncio.create_task(self._follow_mark(body))
            self._repairs.add(task)
            task.add_done_callback(self._repairs.discard)

    async def _follow_join(self, room: str) -> None:
        try:  # `follow`: refused if the account has left the room again meanwhile
            await self._join(room, {"room": room, "follow": True}, 0, unread=False)
        except Exception as err:  # noqa: BLE001 - said, and the account goes on without it
            if getattr(err, "code", None) == m.Code.NOT_MEMBER:
                return  # it left again: a LEFT said so (or says so next)
            self._emit_status(f"could not follow your account into {room}: {err}")
            return
        if room in self.rooms:
            self._emit_status(f"your account joined {room} on another connection", room=room)

    async def _follow_mark(self, body: dict[str, Any]) -> None:
        room, peer = body.get("room"), body.get("with")
        if isinstance(room, str) and isinstance(body.get("seq"), int):
            seq = int(body["seq"])
            self.acct.marks[room] = max(seq, self.acct.marks.get(room, 0))
            if self.acct.due.get(room, seq + 1) <= seq:  # read there already: not ours to send
                del self.acct.due[room]
            try:  # counted from the mark as told: on a cluster our broker may not have
                # heard of it yet (the push can come before the marks bucket's news)
                reply = await self.unread_counts(room, after=self.acct.marks[room])
            except Exception:  # noqa: BLE001 - counted again at the next mark or login
                return
            line = reply["rooms"][0] if reply.get("rooms") else {}
            text = f"read up to {seq} in {room} on another connection"
        elif isinstance(peer, str) and isinstance(body.get("ts"), (int, float)):
            ts = float(body["ts"])
            self.acct.private_marks[peer] = max(ts, self.acct.private_marks.get(peer, 0.0))
            try:
                await self.unread_counts()
            except Exception:  # noqa: BLE001
                return
            line = self.acct.unread_privates.get(peer, {"with": peer, "unread": 0, "mentions": 0})
            text = f"read up to {ts} from {peer} on another connection"
        else:
            return
        data = {**line, **body, "unread": int(line.get("unread", 0))}
        data.setdefault("mentions", 0)
        self._events.put_nowait(self._device_event(text, room, data))

    async def _mark_request(self, body: dict[str, Any]) -> None:
        try:
            await self._request_once(m.Kind.MARK, body, self.timeout)
        except Exception:  # noqa: BLE001 - a mark lost is made again by the next one
            pass
