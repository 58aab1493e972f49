"""Nothing lost: every member sees every acknowledged message of its room exactly once, in
order, across broker kills, stops, slow subscribers, lost acknowledgements and late joins."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from conftest import ROOT
from zmqchat import ChatError, Client, Event
from zmqchat import protocol as m
from zmqchat._local import store

HB = "0.3"


def db_events(db: Path, room: str = "lobby") -> list[dict]:
    """What the broker holds on disk for a room: its SQLite file and its log."""
    return store.stored_events(str(db), room)


class Member:
    """A client plus everything it was given, collected by a background task."""

    def __init__(self, port: int, nick: str, room: str = "lobby", **kw) -> None:
        kw.setdefault("backlog", 0)
        self.client = Client("127.0.0.1", port, nick, rooms=[room], **kw)
        self.events: list[Event] = []
        self.room = room

    async def start(self) -> Member:
        await self.client.connect()
        self.task = asyncio.create_task(self._collect())
        return self

    async def _collect(self) -> None:
        async for ev in self.client:
            self.events.append(ev)

    def seqs(self) -> list[int]:
        return [e.seq for e in self.events if e.room == self.room and e.seq is not None]

    def statuses(self) -> list[str]:
        return [e.text for e in self.events if e.kind == "status"]


async def until(cond, timeout: float, what: str) -> None:
    """Wait for cond() with a deadline (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def say_many(member: Member, n: int, tag: str = "", pace: float = 0.002) -> dict[str, int]:
    """Send n distinct messages concurrently (the library batches them), pausing `pace`
    seconds every 10; return text -> acknowledged seq."""
    texts = [f"{member.client.nick}{tag} {i}" for i in range(n)]
    futures = []
    for i, text in enumerate(texts):
        futures.append(asyncio.ensure_future(member.client.say(member.room, text)))
        if i % 10 == 0:
            await asyncio.sleep(pace)
    return dict(zip(texts, await asyncio.gather(*futures), strict=True))


async def caught_up(members: list[Member], db: Path, timeout: float = 20) -> None:
    await until(
        lambda: all(mb.seqs() and mb.seqs()[-1] >= len(db_events(db, mb.room)) for mb in members),
        timeout,
        "every member to catch up",
    )


def assert_complete(members: list[Member], db: Path, acked: dict[str, int]) -> None:
    """Each acknowledged message is stored once under its acked seq, seqs run 1..M, and
    every member received every event from its first to M exactly once, in order."""
    stored = db_events(db, members[0].room)
    assert [e["seq"] for e in stored] == list(range(1, len(stored) + 1))
    msgs = [e for e in stored if e["kind"] == "msg"]
    by_text = {e["text"]: e["seq"] for e in msgs}
    assert len(by_text) == len(msgs), "a message was stored twice"
    for text, seq in acked.items():
        assert by_text.get(text) == seq, f"acknowledged {text!r} not stored as seq {seq}"
    for mb in members:
        seqs = mb.seqs()
        assert seqs == list(range(seqs[0], len(stored) + 1)), f"{mb.client.nick}: gap or dup"
        got = {e.seq: e.text for e in mb.events if e.room == mb.room}
        assert all(got[e["seq"]] == e["text"] for e in stored if e["seq"] >= seqs[0])


async def close_all(members: list[Member]) -> None:
    for mb in members:
        await mb.client.close()


def test_broker_sigkilled_repeatedly_loses_nothing(make_broker_process, tmp_path):
    """Broker SIGKILLed 3 times while 3 bots send 300 messages each: all arrive, once each."""
    proc = make_broker_process("--heartbeat", HB, "--rate", "0")
    db = tmp_path / "chat.db"

    async def scenario() -> None:
        bots = [await Member(proc.port, f"bot{i}").start() for i in range(3)]
        watcher = await Member(proc.port, "watcher").start()
        sends = asyncio.gather(*(say_many(b, 300, pace=0.1) for b in bots))
        for k in range(3):
            mark = len(watcher.seqs())
            await until(lambda mark=mark: len(watcher.seqs()) > mark + 30, 30, "progress")
            proc.proc.kill()
            proc.proc.wait()
            proc.start()
            await until(
                lambda k=k: watcher.statuses().count("reconnected") == k + 1, 15, "the reconnect"
            )
        acked = {t: s for d in await asyncio.wait_for(sends, 60) for t, s in d.items()}
        assert len(acked) == 900
        await caught_up([*bots, watcher], db)
        assert_complete([*bots, watcher], db, acked)
        assert watcher.statuses().count("reconnected") == 3
        await close_all([*bots, watcher])

    asyncio.run(scenario())


def test_broker_sigstopped_past_heartbeat_timeout(make_broker_process, tmp_path):
    """Broker stopped (SIGSTOP) longer than the heartbeat timeout, then continued: clients
    notice, reconnect, and every message sent meanwhile is delivered once."""
    proc = make_broker_process("--heartbeat", HB, "--rate", "0")
    db = tmp_path / "chat.db"

    async def scenario() -> None:
        a, b = [await Member(proc.port, n).start() for n in ("ann", "ben")]
        acked = await say_many(a, 50, "-before")
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            await until(
                lambda: "connection lost, reconnecting..." in b.statuses(),
                3,
                "the stop to be noticed within 3 heartbeats (+ margin)",
            )
            pending = asyncio.gather(say_many(a, 50, "-during"), say_many(b, 20, "-during"))
            await until(lambda: len(a.client.pending()) > 10, 2, "sends queued while stopped")
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        for d in await asyncio.wait_for(pending, 30):
            acked.update(d)
        await caught_up([a, b], db)
        assert_complete([a, b], db, acked)
        assert "reconnected" in b.statuses()
        await close_all([a, b])

    asyncio.run(scenario())


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_paused_subscriber_catches_up_without_slowing_others(make_broker_process, tmp_path):
    """One subscriber process paused while 10,000 messages pass: the broker stays small,
    the other member gets everything at once, and the paused one catches up completely."""
    proc = make_broker_process("--heartbeat", "5", "--rate", "0")
    db = tmp_path / "chat.db"
    slow = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "recorder.py"), str(proc.port), "slowpoke"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert json.loads(slow.stdout.readline())["kind"] == "ready"

        async def scenario() -> None:
            fast = await Member(proc.port, "fast").start()
            sender = await Member(proc.port, "sender").start()
            rss_before = rss_kb(proc.proc.pid)
            os.kill(slow.pid, signal.SIGSTOP)
            started = time.monotonic()
            acked = await say_many(sender, 10_000)
            await caught_up([fast, sender], db, 30)
            fast_time = time.monotonic() - started
            grown = rss_kb(proc.proc.pid) - rss_before
            os.kill(slow.pid, signal.SIGCONT)
            assert_complete([fast, sender], db, acked)
            assert grown < 80_000, f"broker grew by {grown} kB"
            assert fast_time < 25
            await close_all([fast, sender])
            return len(db_events(db))

        last = asyncio.run(scenario())
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while len(seen) < last - 1 and time.monotonic() < deadline:
            ev = json.loads(slow.stdout.readline())
            if ev.get("seq"):
                assert ev["seq"] not in seen, "duplicate delivered"
                seen.add(ev["seq"])
        first = min(seen)
        assert sorted(seen)[: last - first] == list(range(first, last)), "paused member missed"
    finally:
        os.kill(slow.pid, signal.SIGCONT)
        slow.kill()
        slow.wait()


class Relay:
    """A ZeroMQ relay between clients and the broker's command port, one DEALER to the broker
    per client connection: real sockets, with up() and down() deciding what passes."""

    def __init__(self, ctx: zmq.asyncio.Context, broker_port: int) -> None:
        self.front = ctx.socket(zmq.ROUTER)
        self.front.linger = 0
        self.port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.ctx, self.broker_port = ctx, broker_port
        self.backs: dict[bytes, zmq.asyncio.Socket] = {}
        self.task = asyncio.create_task(self.run())

    def up(self, rid: bytes, frames: list[bytes]) -> bool:
        """Whether a request from client connection `rid` goes on to the broker."""
        return True

    def down(self, rid: bytes, frames: list[bytes]) -> list[list[bytes]]:
        """What goes on to client connection `rid` when the broker sends it `frames` (a
        reply or a push): by default just that."""
        return [frames]

    def later_up(self, rid: bytes) -> list[list[bytes]]:
        """Requests of `rid` held back by up(), to send to the broker now (after each
        message to the client)."""
        return []

    def answer(self, rid: bytes, frames: list[bytes]) -> list[bytes] | None:
        """A reply the relay gives the client itself instead of passing the request on."""
        return None

    async def run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.front, zmq.POLLIN)
        while True:
            for sock, _ in await poller.poll():
                if sock is self.front:
                    rid, *frames = await self.front.recv_multipart()
                    reply = self.answer(rid, frames)
                    if reply is not None:
                        await self.front.send_multipart([rid, *reply])
                        continue
                    if not self.up(rid, frames):
                        continue
                    if rid not in self.backs:
                        back = self.backs[rid] = self.ctx.socket(zmq.DEALER)
                        back.linger = 0
                        back.connect(f"tcp://127.0.0.1:{self.broker_port}")
                        poller.register(back, zmq.POLLIN)
                    await self.backs[rid].send_multipart(frames)
                else:
                    frames = await sock.recv_multipart()
                    rid = next(r for r, s in self.backs.items() if s is sock)
                    for out in self.down(rid, frames):
                        await self.front.send_multipart([rid, *out])
                    for out in self.later_up(rid):
                        await sock.send_multipart(out)


class DropFirstAck(Relay):
    """A relay that swallows the first reply to a SAY (or another kind of request): a real
    lost acknowledgement."""

    def __init__(self, ctx: zmq.asyncio.Context, broker_port: int, kind: bytes = b"SAY") -> None:
        self.says: set[bytes] = set()
        self.bodies: list[dict] = []  # every such request's, as sent
        self.dropped = 0
        self.kind = kind
        super().__init__(ctx, broker_port)

    def up(self, rid: bytes, frames: list[bytes]) -> bool:
        if frames[0] == self.kind:
            self.says.add(frames[1])
            self.bodies.append(json.loads(frames[2]))
        return True

    def down(self, rid: bytes, frames: list[bytes]) -> list[list[bytes]]:
        if frames[1] in self.says and not self.dropped:
            self.dropped += 1
            return []
        return [frames]


def test_lost_acknowledgement_is_retried_without_duplicate(broker, tmp_path):
    """The broker's reply to a SAY is lost: the client retries, the message is stored and
    delivered once, and the send completes with its one sequence number. Both sends say
    the room's seq the client had heard when it first sent it (where a broker new to the
    room would look back to for the first copy): below the message's own."""

    async def scenario() -> None:
        relay = DropFirstAck(zmq.asyncio.Context.instance(), broker.port)
        a = await Member(relay.port, "ann").start()
        b = await Member(broker.port, "ben").start()
        await until(lambda: a.client.rooms["lobby"].last >= b.client.rooms["lobby"].last, 5, "ben")
        heard = a.client.rooms["lobby"].last
        seq = await asyncio.wait_for(a.client.say("lobby", "only once"), 10)
        assert relay.dropped == 1
        assert [body["heard"] for body in relay.bodies] == [heard, heard] and heard < seq
        await until(lambda: seq in b.seqs(), 5, "delivery")
        stored = [e for e in db_events(Path(broker.cfg.db)) if e["text"] == "only once"]
        assert [e["seq"] for e in stored] == [seq]
        assert [e.text for e in b.events if e.kind == "msg"] == ["only once"]
        relay.task.cancel()
        await close_all([a, b])

    asyncio.run(scenario())


def test_lost_private_acknowledgement_is_retried_as_a_retry(broker):
    """The broker's reply to a private message is lost: the client sends it again, saying
    how long ago it first sent it (a cluster broker that did not keep the first copy then
    looks back that far for it);
    ben hears it once, and ann sees her own copy once, as she would have."""

    async def scenario() -> None:
        relay = DropFirstAck(zmq.asyncio.Context.instance(), broker.port, b"PRIV")
        a = await Member(relay.port, "ann").start()
        b = await Member(broker.port, "ben").start()
        await asyncio.wait_for(a.client.msg("ben", "only once"), 10)
        assert relay.dropped == 1
        retries = [body.get("retry") for body in relay.bodies]
        assert retries[0] is None and 0 < retries[1] < 10, retries
        await asyncio.wait_for(a.client.msg("ben", "and then"), 10)
        await until(lambda: "and then" in [e.text for e in b.events], 5, "the second")
        assert [e.text for e in b.events if e.kind == "private"] == ["only once", "and then"]
        await until(lambda: "and then" in [e.text for e in a.events], 5, "ann's own copy")
        mine = [(e.text, e.nick, e.data["to"]) for e in a.events if e.kind == "private"]
        assert mine == [("only once", "ann", "ben"), ("and then", "ann", "ben")]
        assert all(e.mine for e in a.events if e.kind == "private")
        relay.task.cancel()
        await close_all([a, b])

    asyncio.run(scenario())


class DeadAfterPrivate(Relay):
    """A relay whose first connection to carry a PRIVATE push dies with it (the push lost
    with it, or delivered just before): from then on nothing passes either way on that
    connection, a cable pulled while the broker still holds the session. A new connection
    from the client works."""

    def __init__(self, ctx: zmq.asyncio.Context, broker_port: int, *, lose: bool) -> None:
        self.lose = lose
        self.dead: set[bytes] = set()
        super().__init__(ctx, broker_port)

    def up(self, rid: bytes, frames: list[bytes]) -> bool:
        return rid not in self.dead

    def down(self, rid: bytes, frames: list[bytes]) -> list[list[bytes]]:
        if rid in self.dead:
            return []
        if frames[0] == b"PRIVATE" and not self.dead:
            self.dead.add(rid)
            return [] if self.lose else [frames]
        return [frames]


class KickedWithJoinReply(Relay):
    """A relay that holds the reply to a JOIN of `room` until a KICKED push comes, then
    delivers both at once, so the client usually reads the push before its join() call is
    back; or, with `kick_later`, passes the reply and holds the KICKED until `let_kick()`."""

    def __init__(
        self, ctx: zmq.asyncio.Context, broker_port: int, room: str, *, kick_later: bool = False
    ) -> None:
        self.room = room.encode()
        self.joins: set[bytes] = set()
        self.held: list[bytes] | None = None
        self.kick_later = kick_later
        self.kick: tuple[bytes, list[bytes]] | None = None
        super().__init__(ctx, broker_port)

    def up(self, rid: bytes, frames: list[bytes]) -> bool:
        if frames[0] == b"JOIN" and json.loads(frames[2]).get("room") == self.room.decode():
            self.joins.add(frames[1])
        return True

    def down(self, rid: bytes, frames: list[bytes]) -> list[list[bytes]]:
        if self.kick_later:
            if frames[0] == b"KICKED":
                self.kick = (rid, frames)
                return []
            return [frames]
        if frames[0] == b"OK" and frames[1] in self.joins:
            self.held = frames
            return []
        if frames[0] == b"KICKED" and self.held is not None:
            held, self.held = self.held, None
            return [held, frames]
        return [frames]

    async def let_kick(self) -> None:
        await until(lambda: self.kick is not None, 5, "the KICKED at the relay")
        assert self.kick is not None
        rid, frames = self.kick
        await self.front.send_multipart([rid, *frames])


@pytest.mark.parametrize("lose", [True, False], ids=["push-lost", "push-delivered"])
def test_private_message_to_a_dying_connection_arrives_once_after_reconnect(broker, lose):
    """A private message the broker pushed to a connection that was dying (acknowledged to
    its sender) reaches the recipient once: sent again after the reconnect if it was lost
    on the way, not shown twice if it had arrived."""

    async def scenario() -> None:
        relay = DeadAfterPrivate(zmq.asyncio.Context.instance(), broker.port, lose=lose)
        a = await Member(broker.port, "ann").start()
        b = await Member(relay.port, "ben").start()
        sent = await a.client.msg("ben", "one")  # pushed to ben as his connection dies
        assert sent["text"] == "one" and sent["to"] == "ben"
        await until(lambda: relay.dead, 5, "the relay to lose the push")
        await until(lambda: "reconnected" in b.statuses(), 10, "ben to reconnect")
        await a.client.msg("ben", "two")
        privates = lambda: [e.text for e in b.events if e.kind == "private"]  # noqa: E731
        await until(lambda: "two" in privates(), 5, "the private after the reconnect")
        assert privates() == ["one", "two"]
        relay.task.cancel()
        await close_all([a, b])

    asyncio.run(scenario())


class JoinAfterKick(Relay):
    """A relay that holds a client's JOIN of `room` until a KICKED from it has gone to the
    client: the broker kicks first, then takes the JOIN (a member joining again)."""

    def __init__(self, ctx: zmq.asyncio.Context, broker_port: int, room: str) -> None:
        self.room = room
        self.hold = False
        self.held: list[list[bytes]] = []
        self.release = False
        super().__init__(ctx, broker_port)

    def up(self, rid: bytes, frames: list[bytes]) -> bool:
        if self.hold and frames[0] == b"JOIN" and json.loads(frames[2]).get("room") == self.room:
            self.held.append(frames)
            return False
        return True

    def down(self, rid: bytes, frames: list[bytes]) -> list[list[bytes]]:
        self.release = self.release or frames[0] == b"KICKED"
        return [frames]

    def later_up(self, rid: bytes) -> list[list[bytes]]:
        if not self.release:
            return []
        held, self.held = self.held, []
        return held


@pytest.mark.parametrize("kick_later", [False, True], ids=["kick-with-reply", "reply-first"])
def test_cli_kicked_as_it_joins_stays_where_it_was(make_broker, capsys, kick_later):
    """The command-line client, kicked from a room as /join enters it, says so and ends in
    the room it was in: its next line goes there (it does not fall back to nowhere). With
    the kick read along with the join's reply it never leaves; with the reply read first it
    enters the room, is kicked out and goes back (the kick sent right behind the reply can
    also come in a read of its own: either way she ends in lobby)."""
    from zmqchat._cli.chat import Chat
    from zmqchat._cli.render import Screen

    broker = make_broker(operators=("boss",))

    async def scenario() -> None:
        ctx = zmq.asyncio.Context.instance()
        relay = KickedWithJoinReply(ctx, broker.port, "work", kick_later=kick_later)
        boss = await Member(broker.port, "boss", "work").start()
        ann = await Member(broker.port, "ann", "lobby").start()
        client = Client("127.0.0.1", relay.port, "carol", rooms=["lobby"], backlog=0)
        await client.connect()
        chat = Chat(client, Screen(json_mode=True, colour=False), "lobby", leave_words=False)
        shown = asyncio.create_task(chat.show_events())
        joining = asyncio.create_task(chat.handle("/join work"))
        await until(
            lambda: any(e.kind == "join" and e.nick == "carol" for e in boss.events),
            5,
            "carol's join notice",
        )
        await boss.client.kick("work", "carol", "not now")
        out: list[str] = []
        await asyncio.wait_for(joining, 5)
        if kick_later:
            assert client.rooms.keys() == {"work"}  # in work, out of lobby
            await relay.let_kick()
        await until(
            lambda: out.append(capsys.readouterr().out) or "kicked from work" in "".join(out),
            5,
            "the kick shown",
        )
        await until(
            lambda: chat.room == "lobby" and "lobby" in client.rooms, 5, "carol in lobby again"
        )
        if kick_later:
            assert "you are now in work" in "".join(out)
        await chat.handle("still here")
        await until(
            lambda: any(e.text == "still here" for e in ann.events), 5, "carol's line in lobby"
        )
        shown.cancel()
        relay.task.cancel()
        await client.close()
        await close_all([boss, ann])

    asyncio.run(scenario())


class SessionGoneAtRejoin(Relay):
    """A relay that answers the first room JOIN of a resumed session with NO_HELLO, as the
    broker does when a late HELLO of ours, from a connection the client had given up on
    while the broker was starting, replaced the session the client had just made."""

    def __init__(self, ctx: zmq.asyncio.Context, broker_port: int) -> None:
        self.answered = 0
        self.hellos_after = 0  # HELLOs after that answer
        super().__init__(ctx, broker_port)

    def answer(self, rid: bytes, frames: list[bytes]) -> list[bytes] | None:
        if frames[0] == b"HELLO" and self.answered:
            self.hellos_after += 1
        if frames[0] == b"JOIN" and json.loads(frames[2]).get("resume") and not self.answered:
            self.answered += 1
            return [
                b"ERROR",
                frames[1],
                json.dumps({"code": "NO_HELLO", "reason": "say HELLO first"}).encode(),
            ]
        return None


def test_session_gone_while_rejoining_is_resumed_again(make_broker):
    """The broker restarts; the client's session is gone again as it rejoins its room: it
    resumes once more and is back in the room, where its next message goes (it used to
    drop the room, and the message failed with NOT_MEMBER). It resumes once: a second
    resume running beside the first (the NO_HELLO read also counted as a lost connection)
    replaced the session the first had just made, and the two went on doing so."""
    broker = make_broker()

    async def scenario() -> None:
        relay = SessionGoneAtRejoin(zmq.asyncio.Context.instance(), broker.port)
        ann = await Member(relay.port, "ann").start()
        broker.restart()
        await until(lambda: "reconnected" in ann.statuses(), 15, "ann to reconnect")
        assert relay.answered == 1
        assert "lobby" in ann.client.rooms
        assert not [s for s in ann.statuses() if s.startswith("could not rejoin")]
        seq = await asyncio.wait_for(ann.client.say("lobby", "still here"), 10)
        assert seq > 0
        watch_until = time.monotonic() + 1.5  # (longer than a second resume's backoff)
        while time.monotonic() < watch_until:  # watched: nothing may happen here
            assert relay.hellos_after == 1, "a second resume said HELLO again"
            await asyncio.sleep(0.05)
        assert ann.statuses().count("reconnected") == 1
        relay.task.cancel()
        await close_all([ann])

    asyncio.run(scenario())


def test_joined_again_after_a_kick_is_in_the_room(make_broker):
    """A member joins its room again while an operator kicks it; the broker takes the kick
    first, then the JOIN: the client is in the room, as the broker says."""
    broker = make_broker(operators=("boss",))

    async def scenario() -> None:
        relay = JoinAfterKick(zmq.asyncio.Context.instance(), broker.port, "work")
        boss = await Member(broker.port, "boss", "work").start()
        carol = await Member(relay.port, "carol", "work").start()
        relay.hold = True
        joining = asyncio.create_task(carol.client.join("work"))
        await until(lambda: relay.held, 5, "the JOIN held")
        await boss.client.kick("work", "carol", "out")
        await asyncio.wait_for(joining, 5)
        assert "carol" in await boss.client.who("work")
        assert "work" in carol.client.rooms
        relay.task.cancel()
        await close_all([boss, carol])

    asyncio.run(scenario())


def test_kicked_before_join_returns_is_out_of_the_room(make_broker):
    """A kick that reaches the client together with its JOIN's reply (an operator quick on
    the join notice) leaves it out of the room, told why, and join() does not fail."""
    broker = make_broker(operators=("boss",))

    async def scenario() -> None:
        relay = KickedWithJoinReply(zmq.asyncio.Context.instance(), broker.port, "work")
        boss = await Member(broker.port, "boss", "work").start()
        carol = await Member(relay.port, "carol", "lobby", backlog=5).start()
        await boss.client.say("work", "something to have history")
        joining = asyncio.create_task(carol.client.join("work"))
        await until(
            lambda: any(e.kind == "join" and e.nick == "carol" for e in boss.events),
            5,
            "carol's join notice",
        )
        await boss.client.kick("work", "carol", "too quick")
        await asyncio.wait_for(joining, 5)
        await until(
            lambda: any("kicked from work" in t for t in carol.statuses()),
            5,
            "carol told of the kick",
        )
        assert "work" not in carol.client.rooms
        relay.task.cancel()
        await close_all([boss, carol])

    asyncio.run(scenario())


def test_leave_and_join_under_way_at_once_end_as_the_broker_says(broker):
    """join() and leave() of the same room under way at once: the broker takes them in the
    order they were sent, and the client ends in or out of the room as the broker says."""

    async def scenario() -> None:
        ann = await Member(broker.port, "ann", "lobby").start()
        carol = await Member(broker.port, "carol", "lobby").start()
        await asyncio.gather(carol.client.join("work"), carol.client.leave("work"))
        assert "work" not in carol.client.rooms
        assert "carol" not in await ann.client.who("work")
        # and the other way round: out, then in again
        await carol.client.join("work")
        await asyncio.gather(carol.client.leave("work"), carol.client.join("work"))
        assert "work" in carol.client.rooms
        assert "carol" in await ann.client.who("work")
        await close_all([ann, carol])

    asyncio.run(scenario())


def test_late_joiner_during_stream_has_no_gap_or_duplicate(broker):
    """A member joining mid-stream gets history then live with no gap and no duplicate."""
    db = Path(broker.cfg.db)
    broker.broker.core.rules.rate = 0

    async def scenario() -> None:
        sender = await Member(broker.port, "sender").start()
        stream = asyncio.ensure_future(say_many(sender, 2000))
        await until(lambda: len(sender.seqs()) > 300, 10, "the stream to start")
        late = Member(broker.port, "late", backlog=50)
        await late.start()
        acked = await stream
        await caught_up([sender, late], db)
        backlog = [e for e in late.events if e.backlog]
        assert len(backlog) == 50
        assert_complete([sender, late], db, acked)
        await close_all([sender, late])

    asyncio.run(scenario())


def test_killed_client_is_announced_and_its_nick_freed(make_broker_process):
    """A client killed with SIGKILL is announced as gone within the heartbeat timeout."""
    proc = make_broker_process("--heartbeat", HB)
    victim = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "recorder.py"), str(proc.port), "victim"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert json.loads(victim.stdout.readline())["kind"] == "ready"

    async def scenario() -> None:
        w = await Member(proc.port, "witness").start()
        victim.kill()
        victim.wait()
        killed = time.monotonic()
        await until(
            lambda: any(e.text == "victim left (connection lost)" for e in w.events),
            5,
            "the leave notice",
        )
        assert time.monotonic() - killed < 3 * float(HB) + 1.0
        again = await Member(proc.port, "victim").start()
        await close_all([w, again])

    asyncio.run(scenario())


def test_corrupted_database_is_refused_at_start(tmp_path):
    """A corrupted or truncated history file stops the broker with a clear error."""
    good = tmp_path / "good.db"
    with sqlite3.connect(good) as con:
        con.execute("CREATE TABLE t (x)")
        con.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
    data = good.read_bytes()
    cases = {
        "truncated.db": data[: len(data) // 2 + 100],
        "garbage.db": b"this is not a database" * 100,
        "scribbled.db": data[:4096] + os.urandom(len(data) - 4096),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        run = subprocess.run(
            [
                sys.executable,
                str(ROOT / "broker.py"),
                "--db",
                str(tmp_path / name),
                "--port",
                "0",
                "--pub-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert run.returncode == 4, (name, run.stdout, run.stderr)
        assert "cannot use the history database" in run.stderr
        assert "Traceback" not in run.stderr


def test_a_request_made_while_reconnecting_waits_for_the_resume(make_broker):
    """The broker goes away and comes back: who() and history() asked while the client is
    reconnecting wait for its resume and answer; one asked with a timeout shorter than the
    outage fails with TIMEOUT, saying so; one waiting when its client is closed fails at
    once with CLOSED."""
    broker = make_broker()

    async def scenario() -> None:
        ann = await Member(broker.port, "ann", timeout=15).start()
        bob = await Member(broker.port, "bob", timeout=15).start()
        seq = await ann.client.say("lobby", "before the outage")
        broker.stop()
        for m_ in (ann, bob):
            await until(lambda m_=m_: any("reconnecting" in s for s in m_.statuses()), 10, "loss")
        closed = asyncio.create_task(bob.client.who("lobby"))
        assert not (await asyncio.wait({closed}, timeout=0.3))[0]  # waiting for the resume
        await bob.client.close()
        with pytest.raises(ChatError) as gone:
            await asyncio.wait_for(closed, 2)
        assert gone.value.code == "CLOSED"
        who = asyncio.create_task(ann.client.who("lobby"))
        history = asyncio.create_task(ann.client.history("lobby", after=seq - 1))
        with pytest.raises(ChatError) as short:
            await ann.client.request(m.Kind.ROOMS, {}, timeout=0.3)
        assert short.value.code == "TIMEOUT" and "not reconnected" in short.value.reason
        assert not who.done() and not history.done()
        broker.start()
        assert "ann" in await asyncio.wait_for(who, 20)
        assert [e.text for e in await history][:1] == ["before the outage"]
        assert "lobby" in ann.client.rooms
        await close_all([ann])

    asyncio.run(scenario())


class SilentAfterHello(Relay):
    """A relay whose first client connection goes silent once its HELLO is answered: the
    JOIN after it, and everything else both ways, lost (a broker stalled past the client's
    heartbeats just as it joins its rooms). Later connections pass."""

    def __init__(self, ctx: zmq.asyncio.Context, broker_port: int) -> None:
        self.first: bytes | None = None
        self.hello = b""
        super().__init__(ctx, broker_port)

    def up(self, rid: bytes, frames: list[bytes]) -> bool:
        if self.first is None:
            self.first = rid
        if rid == self.first and frames[0] == b"HELLO":
            self.hello = frames[1]
        return rid != self.first or frames[0] == b"HELLO"

    def down(self, rid: bytes, frames: list[bytes]) -> list[list[bytes]]:
        return [frames] if rid != self.first or frames[1] == self.hello else []


def test_a_connection_lost_while_joining_the_starting_rooms_is_not_a_failed_connect(broker):
    """The broker answers HELLO, then nothing (its JOIN lost): connect() does not fail with
    DISCONNECTED; the client resumes and joins its room, and talks there."""

    async def scenario() -> None:
        relay = SilentAfterHello(zmq.asyncio.Context.instance(), broker.port)
        b = await Member(broker.port, "ben").start()
        a = await asyncio.wait_for(Member(relay.port, "ann").start(), 10)
        assert "lobby" in a.client.rooms and a.client.connected
        seq = await a.client.say("lobby", "here after all")
        await until(lambda: seq in b.seqs(), 5, "ann's message at ben")
        assert any(text.startswith("reconnected") for text in a.statuses())
        relay.task.cancel()
        await close_all([a, b])

    asyncio.run(scenario())
