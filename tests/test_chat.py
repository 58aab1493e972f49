"""Integration tests: a real broker in-process on ephemeral ports, the real client library.

What a user or a bot would observe: nick and room rules, who hears what, notices, private
messages, liveness, reconnects, and a broker that answers bad input with labelled errors and
keeps serving. Raw pyzmq sockets stand in for misbehaving peers and for checks on the wire.
Asyncio scenarios run under `asyncio.run` (no pytest-asyncio); nothing sleeps to synchronise:
absence is proven by a later marker that must arrive first.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from conftest import HEARTBEAT
from zmqchat import BlockingClient, ChatError, Client, Event
from zmqchat import protocol as m

HOST = "127.0.0.1"
SCENARIO_TIMEOUT = 20.0  # seconds: a stuck scenario fails with a traceback instead of hanging


# ---------------------------------------------------------------------------- harness


class Raw:
    """A bare DEALER speaking the wire protocol by hand: a bot in another language, or a bad one."""

    def __init__(self, chat: Chat) -> None:
        self.sock = chat.socket(zmq.DEALER)
        self.sock.connect(f"tcp://{HOST}:{chat.broker.port}")
        self.pushes: list[m.Response] = []
        self._labels = 0

    async def send(self, frames: list[bytes]) -> None:
        await self.sock.send_multipart(frames)

    async def reply(self, label: bytes, timeout: float = 5.0) -> m.Response:
        """The reply carrying label; pushes that arrive first are kept in self.pushes."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await self.sock.poll(left * 1000):
                raise AssertionError(f"no reply labelled {label!r} within {timeout}s")
            resp = m.decode_response(await self.sock.recv_multipart())
            if resp.label == label:
                return resp
            assert not resp.label, f"reply to another request: {resp}"
            self.pushes.append(resp)

    async def request(self, kind: str, body: dict[str, Any]) -> m.Response:
        self._labels += 1
        label = f"raw-{self._labels}".encode()
        await self.send(m.encode_request(kind, label, body))
        return await self.reply(label)

    async def ok(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.request(kind, body)
        assert resp.kind == m.Reply.OK, resp
        return resp.body

    async def push(self, kind: str, room: str, timeout: float = 5.0) -> m.Response:
        """Wait for an unsolicited message of this kind about room."""
        deadline = time.monotonic() + timeout
        while True:
            for p in self.pushes:
                if p.kind == kind and p.body.get("room") == room:
                    self.pushes.remove(p)
                    return p
            left = deadline - time.monotonic()
            if left <= 0 or not await self.sock.poll(left * 1000):
                raise AssertionError(f"no {kind} push for {room} within {timeout}s")
            resp = m.decode_response(await self.sock.recv_multipart())
            assert not resp.label, f"unexpected reply {resp}"
            self.pushes.append(resp)


class Chat:
    """The clients and raw sockets of one scenario, on a private context closed at the end."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.ctx = zmq.asyncio.Context()
        self.clients: list[Client] = []
        self.sockets: list[zmq.asyncio.Socket] = []

    def socket(self, kind: int) -> zmq.asyncio.Socket:
        """A raw socket with linger 0, closed with the scenario."""
        sock = self.ctx.socket(kind)
        sock.linger = 0
        self.sockets.append(sock)
        return sock

    async def client(self, nick: str, rooms: tuple[str, ...] = ("lobby",), **kwargs: Any) -> Client:
        """A connected Client (ChatError if the broker refuses it)."""
        c = Client(HOST, self.broker.port, nick, rooms=rooms, ctx=self.ctx, **kwargs)
        self.clients.append(c)
        await c.connect()
        return c

    async def refused(self, nick: str) -> ChatError:
        """The ChatError a client connecting as nick gets."""
        with pytest.raises(ChatError) as info:
            await self.client(nick)
        return info.value

    def raw(self) -> Raw:
        return Raw(self)

    async def hello(self, nick: str, *rooms: str) -> Raw:
        """A raw DEALER that has said HELLO and joined rooms."""
        r = self.raw()
        await r.ok("HELLO", {"version": m.VERSION, "nick": nick})
        for room in rooms:
            await r.ok("JOIN", {"room": room})
        return r

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.destroy(linger=0)


def run(broker: Any, scenario: Callable[[Chat], Awaitable[None]]) -> None:
    """Run an async scenario against broker; every client is closed whatever happens."""

    async def main() -> None:
        chat = Chat(broker)
        try:
            await asyncio.wait_for(scenario(chat), SCENARIO_TIMEOUT)
        finally:
            await chat.close()

    asyncio.run(main())


def show(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.kind, e.text) for e in events]


async def until(
    c: Client, pred: Callable[[Event], bool], what: str, timeout: float = 5.0
) -> list[Event]:
    """c's events up to and including the first one that matches pred."""
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            ev = await c.next_event(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(
                f"{c.nick} timed out waiting for {what}; saw {show(seen)}"
            ) from None
        seen.append(ev)
        if pred(ev):
            return seen


def text(t: str, kind: str | None = None) -> Callable[[Event], bool]:
    return lambda e: e.text == t and (kind is None or e.kind == kind)


async def saw(c: Client, t: str, kind: str | None = None) -> list[Event]:
    return await until(c, text(t, kind), repr(t))


async def marker(sender: Client, room: str, t: str, *observers: Client) -> list[list[Event]]:
    """sender says t in room; each observer's events up to it (whatever came before)."""
    await sender.say(room, t)
    return [await saw(o, t, "msg") for o in observers]


async def own_joins(c: Client) -> None:
    """Wait until c has seen its own join notice in each of its rooms."""
    missing = set(c.rooms)

    def last_one(e: Event) -> bool:
        if e.kind == "join" and e.mine:
            missing.discard(e.room)
        return not missing

    await until(c, last_one, f"own joins in {sorted(c.rooms)}")


def queued(c: Client) -> list[Event]:
    """Events already delivered to c and not yet read (the library has no non-blocking read)."""
    out = []
    while not c._events.empty():
        out.append(c._events.get_nowait())
    return out


# ---------------------------------------------------------------------------- nicks


def test_taken_nick_refused_in_any_case(broker):
    """A second 'alice' and an 'ALICE' are refused with NICK_TAKEN while alice is connected."""

    async def scenario(chat: Chat) -> None:
        await chat.client("alice")
        for nick in ("alice", "ALICE"):
            err = await chat.refused(nick)
            assert err.code == m.Code.NICK_TAKEN, (nick, err)
            assert "alice" in err.reason
        assert await chat.clients[0].who() == ["alice"]

    run(broker, scenario)


@pytest.mark.parametrize(
    "nick, why",
    [
        ("9lives", "digit"),
        ("-x", "'-'"),
        ("a" * 33, "longer than 32"),
        ("a b", "' '"),
        ("bad\x1bnick", r"'\x1b'"),
    ],
    ids=["digit-first", "dash-first", "33-chars", "space", "escape"],
)
def test_invalid_nick_refused_with_reason(broker, nick, why):
    """An invalid nick is refused with NICK_INVALID and a reason naming what is wrong."""

    async def scenario(chat: Chat) -> None:
        err = await chat.refused(nick)
        assert err.code == m.Code.NICK_INVALID
        assert why in err.reason, err.reason
        watcher = await chat.client("watcher")
        assert await watcher.who() == ["watcher"]

    run(broker, scenario)


def test_refused_client_can_retry_with_another_nick(broker):
    """A client refused for a taken nick connects on a second try with another nick."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        second = Client(HOST, broker.port, "alice", ctx=chat.ctx, timeout=2.0)
        chat.clients.append(second)
        with pytest.raises(ChatError) as info:
            await second.connect()
        assert info.value.code == m.Code.NICK_TAKEN
        second.nick = "alice2"
        await second.connect()
        await saw(alice, "alice2 joined", "join")
        await marker(second, "lobby", "second try works", alice)

    run(broker, scenario)


def test_lookalike_nick_refused_and_quit_frees_nick(broker):
    """Cyrillic look-alikes of a connected 'alice' are refused; once she quits, 'alice' is free."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        mixed = await chat.refused("\u0430lice")  # Cyrillic a + Latin lice
        assert mixed.code == m.Code.NICK_INVALID and "scripts" in mixed.reason
        cyrillic = await chat.refused("\u0430\u04cf\u0456\u0441\u0435")  # all Cyrillic
        assert cyrillic.code == m.Code.NICK_TAKEN, cyrillic
        await alice.close()
        again = await chat.client("alice")
        assert again.nick == "alice"
        assert await again.who() == ["alice"]

    run(broker, scenario)


# ---------------------------------------------------------------------------- rooms


def test_default_rooms_listed_with_member_counts(broker):
    """ROOMS lists lobby, work, support and team, each with how many are in it."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice", ("lobby", "work"))
        await chat.client("bob", ("lobby",))
        rooms = {r["name"]: r["members"] for r in await alice.list_rooms()}
        assert rooms == {"lobby": 2, "work": 1, "support": 0, "team": 0}
        assert [r["name"] for r in await alice.list_rooms()] == ["lobby", "work", "support", "team"]

    run(broker, scenario)


def test_join_unknown_room_refused_with_room_list(broker):
    """Joining a room that does not exist gives ROOM_UNKNOWN, and the reason lists the rooms."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        with pytest.raises(ChatError) as info:
            await alice.join("nowhere")
        assert info.value.code == m.Code.ROOM_UNKNOWN
        for room in ("lobby", "work", "support", "team"):
            assert room in info.value.reason
        assert "nowhere" not in [r["name"] for r in await alice.list_rooms()]

    run(broker, scenario)


def test_allow_new_rooms_lets_join_create(make_broker):
    """With allow_new_rooms, joining an unknown room creates it; others can then join and talk."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice", ("brand-new",))
        bob = await chat.client("bob", ("brand-new",))
        rooms = {r["name"]: r["members"] for r in await alice.list_rooms()}
        assert rooms["brand-new"] == 2
        await marker(alice, "brand-new", "first words", bob)

    run(make_broker(allow_new_rooms=True), scenario)


def test_configured_rooms_replace_defaults(make_broker):
    """Config(rooms=("a", "b")) serves exactly rooms a and b."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice", ("a",))
        assert [r["name"] for r in await alice.list_rooms()] == ["a", "b"]
        assert alice.welcome["rooms"] == ["a", "b"]
        with pytest.raises(ChatError) as info:
            await alice.join("lobby")
        assert info.value.code == m.Code.ROOM_UNKNOWN and "a, b" in info.value.reason
        await alice.join("b")

    run(make_broker(rooms=("a", "b")), scenario)


# ---------------------------------------------------------------------------- isolation


async def raw_listener(chat: Chat, nick: str, room: str) -> tuple[Raw, zmq.asyncio.Socket]:
    """A raw member of room whose own XSUB is live for it (and that tried to hear everything)."""
    r = await chat.hello(nick)
    grant = (await r.ok("JOIN", {"room": room}))["grant"]
    sub = chat.socket(zmq.XSUB)
    sub.connect(f"tcp://{HOST}:{chat.broker.pub_port}")
    for greedy in (b"", b"work", b"dev", b"devops\x00"):  # all refused by the broker
        await sub.send(b"\x01" + greedy)
    await sub.send(b"\x01" + grant.encode())
    await r.push(m.Reply.LIVE, room)
    return r, sub


async def frames_until(sub: zmq.asyncio.Socket, needle: bytes) -> list[list[bytes]]:
    """Published frames received up to and including one that contains needle."""
    got = []
    deadline = time.monotonic() + 5
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not await sub.poll(left * 1000):
            raise AssertionError(f"no frame with {needle!r}; got {got}")
        frames = await sub.recv_multipart()
        got.append(frames)
        if needle in frames[-1]:
            return got


def test_room_traffic_not_heard_outside_room(broker):
    """A message in work never reaches someone only in lobby: not the client, not its socket."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice", ("lobby", "work"))
        bob = await chat.client("bob", ("lobby",))
        _, sub = await raw_listener(chat, "eve", "lobby")
        await alice.say("work", "work secret")
        [seen] = await marker(alice, "lobby", "lobby marker", bob)
        assert "work secret" not in [e.text for e in seen], show(seen)
        frames = await frames_until(sub, b"lobby marker")
        assert all(f[0].startswith(b"lobby\x00") for f in frames), frames
        assert not any(b"work secret" in f[1] for f in frames)

    run(broker, scenario)


def test_prefix_named_rooms_do_not_leak(make_broker):
    """Rooms dev and devops stay apart although one name is a prefix of the other."""

    async def scenario(chat: Chat) -> None:
        dev = await chat.client("dev1", ("dev",))
        ops = await chat.client("ops1", ("devops",))
        both = await chat.client("both", ("dev", "devops"))
        _, sub = await raw_listener(chat, "eve", "dev")
        await both.say("devops", "devops only")
        [dev_seen, _] = await marker(both, "dev", "dev marker", dev, both)
        assert "devops only" not in [e.text for e in dev_seen], show(dev_seen)
        frames = await frames_until(sub, b"dev marker")
        assert all(f[0].startswith(b"dev\x00") for f in frames), frames
        assert not any(b"devops only" in f[1] for f in frames)
        await both.say("dev", "dev only")
        [ops_seen] = await marker(both, "devops", "devops marker", ops)
        assert "dev only" not in [e.text for e in ops_seen], show(ops_seen)
        assert "devops only" in [e.text for e in ops_seen]

    run(make_broker(allow_new_rooms=True), scenario)


# ---------------------------------------------------------------------------- echo


def test_own_messages_echoed_once_in_room_order(broker):
    """The sender gets each of its messages exactly once, marked mine, in sequence order."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        bob = await chat.client("bob")
        mine = [f"a{i}" for i in range(8)]
        seqs = await asyncio.gather(
            *(alice.say("lobby", t) for t in mine[:4]),
            bob.say("lobby", "from bob"),
            *(alice.say("lobby", t) for t in mine[4:]),
        )
        await alice.say("lobby", "end")
        seen = await saw(alice, "end")
        await alice.who()  # one more round trip: a late duplicate would be queued by now
        events = [e for e in seen + queued(alice) if e.kind == "msg"]
        texts = [e.text for e in events]
        assert sorted(texts) == sorted([*mine, "from bob", "end"]), texts
        assert [e.text for e in events if e.text in mine] == mine
        assert [e.seq for e in events] == sorted(e.seq for e in events)
        assert all(e.mine == (e.nick == "alice") for e in events), events
        by_text = {e.text: e.seq for e in events}
        assert [by_text[t] for t in mine] == list(seqs[:4]) + list(seqs[5:])

    run(broker, scenario)


# ---------------------------------------------------------------------------- notices


def test_join_leave_quit_and_nick_notices(broker):
    """Others see 'X joined', 'X left', 'X is now known as Y' and 'Y left (quit: reason)'."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        bob = await chat.client("bob", ())
        await bob.join("lobby")
        await saw(alice, "bob joined", "join")
        await bob.leave("lobby")
        await saw(alice, "bob left", "leave")
        await bob.join("lobby")
        await saw(alice, "bob joined", "join")
        await bob.set_nick("robert")
        [ev] = (await saw(alice, "bob is now known as robert", "nick"))[-1:]
        assert ev.data["new"] == "robert" and ev.nick == "bob"
        assert await alice.who("lobby") == ["alice", "robert"]
        await bob.close("gone fishing")
        await saw(alice, "robert left (quit: gone fishing)", "leave")
        carol = await chat.client("carol")
        await carol.close()
        await saw(alice, "carol left", "leave")
        assert await alice.who("lobby") == ["alice"]

    run(broker, scenario)


def test_topic_set_is_announced_and_read_back(broker):
    """Setting a topic sends a topic event to the room, and /topic reads it back."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        bob = await chat.client("bob")
        assert await bob.topic("lobby") == ""
        assert await alice.topic("lobby", "release on friday") == "release on friday"
        [ev] = (await saw(bob, "release on friday", "topic"))[-1:]
        assert ev.nick == "alice" and ev.data["note"] == "alice set the topic: release on friday"
        assert await bob.topic("lobby") == "release on friday"
        rooms = {r["name"]: r["topic"] for r in await bob.list_rooms()}
        assert rooms["lobby"] == "release on friday" and rooms["work"] == ""

    run(broker, scenario)


# ---------------------------------------------------------------------------- private


def test_private_message_reaches_only_recipient(broker):
    """A private message reaches its recipient and the sender's copy, and nobody else."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        bob = await chat.client("bob")
        carol = await chat.client("carol")
        copy = await alice.msg("bob", "psst, bob")
        assert copy["to"] == "bob" and copy["nick"] == "alice"
        [got] = (await saw(bob, "psst, bob", "private"))[-1:]
        assert got.nick == "alice" and not got.mine and got.data["to"] == "bob"
        [own] = (await saw(alice, "psst, bob", "private"))[-1:]
        assert own.mine
        [carol_seen] = await marker(alice, "lobby", "public marker", carol)
        await carol.who()  # a round trip on carol's command socket, where privates arrive
        everything = carol_seen + queued(carol)
        assert not [e for e in everything if e.kind == "private" or "psst" in e.text], show(
            everything
        )

    run(broker, scenario)


def test_an_answer_to_a_private_message_comes_after_the_senders_own_copy(broker):
    """A bot that answers a private message at once: the sender sees its own copy first,
    then the answer. (The copy was queued only when the sender's coroutine went on, after
    its reader had read the answer too, if both had come: a busy client, a terminal's, saw
    1 answer in 4 first.) Here the sender's loop is held until the bot, on a thread of its
    own, has answered: both are waiting on its socket."""

    async def scenario(chat: Chat) -> None:
        ann = await chat.client("ann")
        bot = BlockingClient(HOST, broker.port, "bot", rooms=["lobby"])
        answered = threading.Event()

        async def answer() -> None:
            while True:
                ev = await bot._client.next_event()
                if ev.kind == "private" and not ev.mine:
                    await bot._client.msg("ann", "re: " + ev.text)
                    answered.set()

        answering = asyncio.run_coroutine_threadsafe(answer(), bot._loop)
        try:
            for i in range(3):
                answered.clear()
                before = set(ann._waiting)
                sending = asyncio.create_task(ann.msg("bot", f"q{i}"))
                deadline = time.monotonic() + 5
                while set(ann._waiting) <= before and time.monotonic() < deadline:
                    await asyncio.sleep(0)  # until it is sent (its reply is on its way)
                assert answered.wait(5), "the bot did not answer"  # (the loop held meanwhile)
                await sending
                got = await saw(ann, f"re: q{i}", "private")
                privates = [e.text for e in got if e.kind == "private"]
                assert privates == [f"q{i}", f"re: q{i}"], privates
        finally:
            answering.cancel()
            bot.close()

    run(broker, scenario)


def test_a_private_message_to_oneself_is_shown_once(broker):
    """A note to self (/msg with one's own nick) comes to its sender once, not as its copy
    and again as the message received."""

    async def scenario(chat: Chat) -> None:
        bob = await chat.client("bob")
        await bob.msg("bob", "note to self")
        await bob.msg("bob", "second note")
        got = await saw(bob, "second note", "private")
        notes = [(e.text, e.mine) for e in got if e.kind == "private"]
        assert notes == [("note to self", True), ("second note", True)], notes

    run(broker, scenario)


def test_private_message_to_absent_nick_refused(broker):
    """A private message to a nick nobody holds fails with NO_SUCH_NICK and is not retried."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        with pytest.raises(ChatError) as info:
            await alice.msg("nobody", "hello?")
        assert info.value.code == m.Code.NO_SUCH_NICK
        assert alice.pending() == []

    run(broker, scenario)


# ---------------------------------------------------------------------------- liveness


def test_silent_client_dropped_after_three_heartbeats(broker):
    """A peer that goes silent is dropped after ~3 heartbeats: others see it leave, nick is free."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        zed = await chat.hello("zed")
        silent_since = time.monotonic()  # the broker hears zed's JOIN after this: last word
        await zed.ok("JOIN", {"room": "lobby"})
        await saw(alice, "zed joined", "join")
        [ev] = (
            await until(
                alice,
                text("zed left (connection lost)", "leave"),
                "zed to be dropped",
                timeout=10 * HEARTBEAT + 2,
            )
        )[-1:]
        waited = time.monotonic() - silent_since
        assert 3 * HEARTBEAT <= waited <= 3 * HEARTBEAT + 2.0, waited
        assert ev.data["why"] == "lost"
        assert await alice.who("lobby") == ["alice"]
        gone = await zed.request("PING", {})
        assert gone.kind == m.Reply.ERROR and gone.body["code"] == m.Code.NO_HELLO
        again = await chat.client("zed")
        assert again.nick == "zed"
        await saw(alice, "zed joined", "join")

    run(broker, scenario)


def test_client_reconnects_after_broker_restart(make_broker):
    """After a broker restart a client says so, gets back its nick and rooms, and talks again."""
    b = make_broker()

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        bob = await chat.client("bob")
        await saw(alice, "bob joined")
        await own_joins(bob)
        await asyncio.to_thread(b.restart)
        for c in (alice, bob):
            statuses = [e.text for e in await saw(c, "reconnected", "status") if e.kind == "status"]
            assert "connection lost, reconnecting..." in statuses, statuses
            assert statuses.index("connection lost, reconnecting...") < statuses.index(
                "reconnected"
            )
        assert alice.nick == "alice" and list(alice.rooms) == ["lobby"]
        assert await alice.who("lobby") == ["alice", "bob"]
        [seen] = await marker(alice, "lobby", "after the restart", bob)
        assert seen[-1].nick == "alice"
        assert not [e for e in seen if e.kind in ("join", "leave")], show(seen)  # a quiet resume

    run(b, scenario)


# ---------------------------------------------------------------------------- bad input

LABEL = b"bad-1"
SAY_OK = m.dumps({"room": "lobby", "msgs": [{"id": "sneaky-1", "text": "sneaky"}]})


def say(room: Any = "lobby", **body: Any) -> bytes:
    return json.dumps({"room": room, **body}).encode()


def msgs(**item: Any) -> bytes:
    return say(msgs=[{"id": "sneaky-1", "text": "sneaky", **item}])


# (frames after the routing id, expected code, label the reply must carry)
BAD_INPUT = {
    "two-frames": ([b"SAY", LABEL], m.Code.BAD_REQUEST, LABEL),
    "four-frames": ([b"SAY", LABEL, SAY_OK, b"extra"], m.Code.BAD_REQUEST, LABEL),
    "one-frame": ([b"SAY"], m.Code.BAD_REQUEST, b""),
    "empty-frames": ([b"", b"", b""], m.Code.BAD_REQUEST, b""),
    "empty-label": ([b"SAY", b"", SAY_OK], m.Code.BAD_REQUEST, b""),
    "long-label": ([b"SAY", b"l" * 65, SAY_OK], m.Code.BAD_REQUEST, b""),
    "empty-body": ([b"SAY", LABEL, b""], m.Code.BAD_REQUEST, LABEL),
    "not-utf8": (
        [b"SAY", LABEL, b'{"room":"lobby","msgs":[{"id":"x","text":"\xff"}]}'],
        m.Code.BAD_REQUEST,
        LABEL,
    ),
    "not-json": ([b"SAY", LABEL, b"{room: lobby}"], m.Code.BAD_REQUEST, LABEL),
    "json-array": ([b"SAY", LABEL, b'["lobby", "sneaky"]'], m.Code.BAD_REQUEST, LABEL),
    "room-not-string": (
        [b"SAY", LABEL, say(5, msgs=[{"id": "x", "text": "sneaky"}])],
        m.Code.ROOM_INVALID,
        LABEL,
    ),
    "msgs-not-list": ([b"SAY", LABEL, say(msgs="sneaky")], m.Code.BAD_REQUEST, LABEL),
    "text-not-string": ([b"SAY", LABEL, msgs(text=5)], m.Code.BAD_REQUEST, LABEL),
    "id-not-string": ([b"SAY", LABEL, msgs(id=5)], m.Code.BAD_REQUEST, LABEL),
    "unknown-command": ([b"SHOUT", LABEL, SAY_OK], m.Code.UNKNOWN_COMMAND, LABEL),
    "lower-case-command": ([b"say", LABEL, SAY_OK], m.Code.UNKNOWN_COMMAND, LABEL),
    "missing-room": (
        [b"SAY", LABEL, b'{"msgs":[{"id":"x","text":"sneaky"}]}'],
        m.Code.ROOM_INVALID,
        LABEL,
    ),
    "missing-msgs": ([b"SAY", LABEL, say()], m.Code.BAD_REQUEST, LABEL),
    "missing-id": ([b"SAY", LABEL, say(msgs=[{"text": "sneaky"}])], m.Code.BAD_REQUEST, LABEL),
    "missing-text": ([b"SAY", LABEL, say(msgs=[{"id": "x"}])], m.Code.BAD_REQUEST, LABEL),
    "text-too-long": (
        [b"SAY", LABEL, msgs(text="sneaky" + "x" * (m.MAX_TEXT - 5))],
        m.Code.TOO_LARGE,
        LABEL,
    ),
    "not-member": (
        [b"SAY", LABEL, SAY_OK.replace(b'"lobby"', b'"work"')],
        m.Code.NOT_MEMBER,
        LABEL,
    ),
    "before-hello": ([b"SAY", LABEL, SAY_OK], m.Code.NO_HELLO, LABEL),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_request_gets_labelled_error_and_publishes_nothing(make_broker, case):
    """Bad input gets one ERROR with its code and label; nothing is published; all carry on."""
    frames, code, label = BAD_INPUT[case]

    async def scenario(chat: Chat) -> None:
        bob = await chat.client("bob", ("lobby", "work"))
        await own_joins(bob)
        if case == "before-hello":
            mallory = chat.raw()
        else:
            mallory = await chat.hello("mallory", "lobby")
            await saw(bob, "mallory joined", "join")
        await mallory.send(frames)
        err = await mallory.reply(label)
        assert err.kind == m.Reply.ERROR and err.body["code"] == code, err
        assert isinstance(err.body["reason"], str) and err.body["reason"]
        if case == "before-hello":  # the offender itself is served once it behaves
            await mallory.ok("HELLO", {"version": m.VERSION, "nick": "mallory"})
        assert (await mallory.request("PING", {})).kind == m.Reply.OK
        seen = []
        for room in ("lobby", "work"):
            seen += (await marker(bob, room, f"{room} marker", bob))[0]
        assert show(seen) == [("msg", "lobby marker"), ("msg", "work marker")], show(seen)
        assert mallory.pushes == []

    # A long heartbeat: the raw peer does not ping, and must not expire mid-test.
    run(make_broker(heartbeat=5.0), scenario)


def test_longest_text_accepted(broker):
    """A message of exactly MAX_TEXT characters is delivered whole."""

    async def scenario(chat: Chat) -> None:
        alice = await chat.client("alice")
        bob = await chat.client("bob")
        long = "y" * m.MAX_TEXT
        await marker(alice, "lobby", long, bob)

    run(broker, scenario)


def test_oversized_frame_refused_at_socket(make_broker):
    """A frame over MAX_FRAME (1 MiB) drops its sender's connection unread; the broker serves
    others after."""

    async def scenario(chat: Chat) -> None:
        bob = await chat.client("bob")
        await own_joins(bob)
        big = await chat.hello("big", "lobby")
        await saw(bob, "big joined", "join")
        monitor = big.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        await big.send(
            [
                b"SAY",
                b"big",
                m.dumps(
                    {
                        "room": "lobby",
                        "msgs": [{"id": "big-1", "text": "huge " + "z" * m.MAX_FRAME}],
                    }
                ),
            ]
        )
        assert await monitor.poll(5000), "the broker did not drop the connection"
        event = parse_monitor_message(await monitor.recv_multipart())
        assert event["event"] == zmq.EVENT_DISCONNECTED
        big.sock.disable_monitor()
        monitor.close()
        [seen] = await marker(bob, "lobby", "after the big frame", bob)
        assert not [e for e in seen if "huge" in e.text], show(seen)
        assert not await big.sock.poll(0), "the broker answered the oversized request"
        other = await chat.hello("other", "lobby")
        assert (await other.request("PING", {})).kind == m.Reply.OK
        assert "other" in await bob.who("lobby")

    run(make_broker(heartbeat=5.0), scenario)


# ---------------------------------------------------------------------------- scripts


def test_blocking_client_for_simple_scripts(broker):
    """BlockingClient connects, says and reads events with plain calls, no asyncio in sight."""
    ctx = zmq.asyncio.Context()
    reader = BlockingClient(HOST, broker.port, "reader", ctx=ctx)
    script = BlockingClient(HOST, broker.port, "script", ctx=ctx)
    try:
        seq = script.say("lobby", "hello from a script")
        assert isinstance(seq, int) and seq > 0
        deadline = time.monotonic() + 5
        while True:
            ev = reader.next_event(timeout=max(0.0, deadline - time.monotonic()))
            assert ev is not None, "the script's message never arrived"
            if ev.text == "hello from a script":
                break
        assert (ev.kind, ev.nick, ev.seq, ev.mine) == ("msg", "script", seq, False)
        assert reader.who("lobby") == ["reader", "script"]
        script.close("done")
        while ev is not None and ev.text != "script left (quit: done)":
            ev = reader.next_event(timeout=max(0.0, deadline - time.monotonic()))
        assert ev is not None, "the script's quit notice never arrived"
    finally:
        script.close()
        reader.close()
        ctx.destroy(linger=0)


def test_many_long_messages_go_in_batches_the_broker_takes(make_broker):
    """Twenty messages of 3,900 characters sent at once all arrive: the library keeps each
    SAY under the broker's frame limit instead of sending one it would refuse forever."""
    broker = make_broker(rate=0)

    async def scenario(chat: Chat) -> None:
        ann, bob = await chat.client("ann"), await chat.client("bob")
        texts = [f"{i:02d}" + "x" * 3898 for i in range(20)]
        seqs = await asyncio.gather(*(ann.say("lobby", t) for t in texts))
        assert seqs == sorted(seqs)
        got = await until(bob, lambda e: e.text == texts[-1], "the last long message")
        assert [e.text for e in got if e.kind == "msg"] == texts

    run(broker, scenario)


def test_private_history_through_the_library(broker):
    """Client.private_history: the conversation with a nick, both ways, oldest first."""

    async def scenario(chat: Chat) -> None:
        ann, bob = await chat.client("ann"), await chat.client("bob")
        await ann.msg("bob", "one")
        await saw(bob, "one", "private")
        await bob.msg("ann", "two")
        await saw(ann, "two", "private")
        events = await ann.private_history("BOB")
        assert [(e.nick, e.data["to"], e.text, e.mine) for e in events] == [
            ("ann", "bob", "one", True),
            ("bob", "ann", "two", False),
        ]
        assert [e.text for e in await bob.private_history("ann", limit=1)] == ["two"]

    run(broker, scenario)
