"""Bots: the Bot framework and every example in examples/, against a real in-process broker.

People are real clients (BlockingClient); bots run in-process on their own threads
(`Bot.start`) or, for the examples, as the processes a user would start. Nothing sleeps to
synchronise: a bot conversation is over when every bot has handled the room up to its last
sequence number with no handler running and no send unacknowledged (`settle`), and an
example is ready when its join notice has been seen.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import pytest

from conftest import ROOT, RunningBroker, free_ports, wait_for
from zmqchat import BlockingClient, ChatError, Event
from zmqchat._bot import Bot, Command, Context, UsageError, split_args

HOST = "127.0.0.1"
EXAMPLES = ROOT / "examples"


# ---------------------------------------------------------------------------- harness


class Person:
    """Someone at a client: what they have seen, and a way to wait for what they expect."""

    def __init__(self, port: int, nick: str, rooms: tuple[str, ...] = ("lobby",)) -> None:
        self.nick = nick
        self.client = BlockingClient(HOST, port, nick, rooms=rooms, backlog=0)
        self.seen: list[Event] = []

    def say(self, room: str, text: str) -> int:
        return self.client.say(room, text)

    def wait(
        self,
        pred: Callable[[Event], object],
        count: int = 1,
        timeout: float = 5.0,
        what: str = "an event",
    ) -> list[Event]:
        """The events seen so far that match, once there are `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.seen if pred(e)]
            if len(found) >= count:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                texts = [f"{e.kind} {e.room} <{e.nick}> {e.text}" for e in self.seen[-15:]]
                raise AssertionError(
                    f"{self.nick} waited {timeout}s for {count} x {what}; last seen: {texts}"
                )
            ev = self.client.next_event(min(left, 0.2))
            if ev is not None:
                self.seen.append(ev)

    def reply(
        self,
        bot_nick: str,
        pred: Callable[[str], object],
        room: str | None = "lobby",
        timeout: float = 5.0,
    ) -> Event:
        """The first message from bot_nick (in room, or private if room is None) matching."""
        kind = "private" if room is None else "msg"
        return self.wait(
            lambda e: e.kind == kind and e.nick == bot_nick and e.room == room and pred(e.text),
            timeout=timeout,
            what=f"a reply from {bot_nick}",
        )[0]


@pytest.fixture
def people(broker: RunningBroker) -> Iterator[Callable[..., Person]]:
    made: list[Person] = []

    def make(nick: str, rooms: tuple[str, ...] = ("lobby",), port: int | None = None) -> Person:
        made.append(Person(port or broker.port, nick, rooms))
        return made[-1]

    yield make
    for p in made:
        p.client.close()


@pytest.fixture
def bots() -> Iterator[Callable[..., Bot]]:
    """Start bots in-process (connected when returned); all are stopped afterwards."""
    started: list[Bot] = []

    def start(bot: Bot, port: int, nick: str, rooms: tuple[str, ...] = ("lobby",)) -> Bot:
        started.append(bot)
        return bot.start(HOST, port, nick, rooms=rooms)

    yield start
    for b in started:
        b.stop()


def settle(
    broker: RunningBroker, rooms: str | tuple[str, ...], *bots: Bot, timeout: float = 5.0
) -> None:
    """Wait until no bot can say anything more: each has handled every event of the rooms up
    to their latest sequence numbers, none has a handler running or a send unacknowledged,
    and no room moved meanwhile."""
    rooms = (rooms,) if isinstance(rooms, str) else rooms

    def quiet() -> bool:
        seqs = {r: broker.broker.rooms[r].seq for r in rooms}
        done = all(b.idle and b.handled(r) >= seq for b in bots for r, seq in seqs.items())
        return done and seqs == {r: broker.broker.rooms[r].seq for r in rooms}

    wait_for(quiet, timeout, f"the bots in {', '.join(rooms)} to fall silent")


def room_events(person: Person, room: str, after: int = 0) -> list[Event]:
    return person.client.history(room, after=after, limit=500)


class Example:
    """`python examples/NAME --port P ...` as a user starts it, from another directory."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.name = name
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(EXAMPLES / name), *args], stdout=out, stderr=err, cwd=tmp
            )

    def lines(self) -> list[str]:
        return self.out.read_text(encoding="utf-8").splitlines()

    def wait_line(self, pred: Callable[[str], object], what: str, timeout: float = 5.0) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.proc.returncode}: {self.err.read_text()}"
                )
            return next((line for line in self.lines() if pred(line)), None)

        return wait_for(found, timeout, f"{self.name} to print {what}")

    def interrupt(self) -> int:
        """Ctrl+C, as a user stops it; the exit status."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.name} ignored Ctrl+C: {self.err.read_text()}") from None


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Callable[..., Example]]:
    running: list[Example] = []

    def run(name: str, *args: str) -> Example:
        running.append(Example(tmp_path, name, *args))
        return running[-1]

    yield run
    for ex in running:
        if ex.proc.poll() is None:
            ex.proc.kill()
        ex.proc.wait()


def joined(person: Person, nick: str, room: str = "lobby") -> None:
    person.wait(
        lambda e: e.kind == "join" and e.nick == nick and e.room == room,
        timeout=10.0,
        what=f"{nick} to join {room}",
    )


def stop_cleanly(ex: Example, person: Person, nick: str) -> None:
    """Ctrl+C ends the example with status 0, and it says goodbye (BYE, not a lost heartbeat)."""
    assert ex.interrupt() == 0, ex.err.read_text()
    person.wait(
        lambda e: e.kind == "leave" and e.nick == nick and e.data.get("why") == "quit",
        what=f"{nick} to quit",
    )


# ---------------------------------------------------------------------------- the examples


def test_echo_example_answers_in_every_room_it_is_in(broker, people, example):
    """examples/echo_bot.py (plain Client): `!echo TEXT` answered in each of its rooms."""
    ann = people("ann", ("lobby", "work"))
    ex = example("echo_bot.py", "--port", str(broker.port), "--rooms", "lobby,work")
    joined(ann, "echo", "work")
    ann.say("work", "!echo hello   there")
    ann.say("lobby", "!echo  in the lobby ")
    ann.say("lobby", "!echoes nothing")
    ann.say("lobby", "!echo")
    ann.say("lobby", "!echo last")
    got = ann.reply("echo", lambda t: t == "hello   there", room="work")
    assert got.bot and got.data.get("hops") == 1
    ann.reply("echo", lambda t: t == "in the lobby")
    ann.reply("echo", lambda t: t == "last")
    answers = [(e.room, e.text) for e in ann.seen if e.nick == "echo" and e.kind == "msg"]
    assert [t for r, t in answers if r == "lobby"] == ["in the lobby", "last"]  # room order
    assert [t for r, t in answers if r == "work"] == ["hello   there"]
    stop_cleanly(ex, ann, "echo")
    assert len((EXAMPLES / "echo_bot.py").read_text().splitlines()) < 30


def test_dice_example_rolls_echoes_and_explains(broker, people, example):
    """examples/dice_bot.py: !roll NdM adds up, a bad call gets the usage line, !help lists."""
    ann = people("ann")
    ex = example("dice_bot.py", "--port", str(broker.port))
    joined(ann, "dice")
    ann.say("lobby", "!roll 3d6")
    roll = ann.reply("dice", lambda t: t.startswith("ann rolls 3d6:"))
    throws, total = re.fullmatch(r"ann rolls 3d6: (.+) = (\d+)", roll.text).groups()
    dice = [int(x) for x in throws.split(" + ")]
    assert len(dice) == 3 and all(1 <= d <= 6 for d in dice) and sum(dice) == int(total)
    ann.say("lobby", "!roll banana")
    assert "NdM" in ann.reply("dice", lambda t: t.startswith("usage: !roll [DICE]")).text
    ann.say("lobby", "!echo \"two  spaces\" and it's Bob's")
    ann.reply("dice", lambda t: t == "two  spaces and it's Bob's")
    ann.say("lobby", "!help")
    listing = ann.reply("dice", lambda t: t.startswith("commands:")).text
    assert "!roll [DICE] - Roll dice" in listing and "!echo [TEXT...]" in listing
    assert "!help [COMMAND]" in listing
    ann.client.msg("dice", "!roll 1d20")  # privately asked, privately answered
    assert re.fullmatch(r"ann rolls 1d20: \d+", ann.reply("dice", lambda t: True, room=None).text)
    stop_cleanly(ex, ann, "dice")


def test_logger_example_writes_one_json_line_per_event_per_room(broker, people, example, tmp_path):
    """examples/logger_bot.py: DIR/ROOM.jsonl per room, each event once, in order, no holes."""
    ann = people("ann", ("lobby", "work"))
    logs = tmp_path / "logs"
    ex = example(
        "logger_bot.py", "--port", str(broker.port), "--rooms", "lobby,work", "--dir", str(logs)
    )
    joined(ann, "logger", "work")
    ann.say("lobby", "hello lobby")
    ann.client.me("lobby", "waves")
    ann.say("work", "hello work")
    bob = people("bob", ("lobby",))
    bob.say("lobby", "bye all")
    bob.client.close("lunch")

    def lines(room: str) -> list[dict]:
        path = logs / f"{room}.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    wait_for(
        lambda: any(e["kind"] == "leave" and e["nick"] == "bob" for e in lines("lobby")),
        what="bob's leave in lobby.jsonl",
    )
    wait_for(lambda: any(e["text"] == "hello work" for e in lines("work")), what="work.jsonl")
    lobby = lines("lobby")
    assert [e["seq"] for e in lobby] == list(range(lobby[0]["seq"], lobby[-1]["seq"] + 1))
    assert [(e["kind"], e["nick"], e["text"]) for e in lobby] == [
        ("msg", "ann", "hello lobby"),
        ("action", "ann", "waves"),
        ("join", "bob", "bob joined"),
        ("msg", "bob", "bye all"),
        ("leave", "bob", "bob left (quit: lunch)"),
    ]
    assert all(e["room"] == "lobby" and "ts" in e for e in lobby)
    assert [e["text"] for e in lines("work")] == ["hello work"]
    stop_cleanly(ex, ann, "logger")


def test_reminder_example_reminds_after_the_delay(broker, people, example):
    """examples/reminder_bot.py: `!remind 1s tea` is confirmed, then comes back a second later;
    the answers to the commands after it do not wait for that."""
    ann = people("ann")
    ex = example("reminder_bot.py", "--port", str(broker.port))
    joined(ann, "remind")
    ann.say("lobby", "!remind 1s tea and biscuits")
    ann.say("lobby", "!remind soon tea")
    ann.say("lobby", "!remind 5s")
    got = ann.wait(lambda e: e.nick == "remind" and e.kind == "msg", count=4, what="4 replies")
    ack, bad, usage, due = got  # in the order asked: the reminder detached after its "OK"
    assert ack.text == "OK ann, in 1s: tea and biscuits"
    assert "bad WHEN 'soon'" in bad.text and "a duration is like" in bad.text
    assert usage.text.startswith("usage: !remind WHEN [WHAT...]")
    assert "what should I remind you of" in usage.text
    assert due.text == "ann: tea and biscuits"
    assert due.ts - ack.ts >= 0.95
    stop_cleanly(ex, ann, "remind")


def test_bridge_example_copies_both_ways_marked_as_relayed(broker, people, example):
    """examples/bridge_bot.py: lobby <-> work, each copy carries relay="nick@room"."""
    ann, bob = people("ann", ("lobby",)), people("bob", ("work",))
    ex = example("bridge_bot.py", "--port", str(broker.port), "--rooms", "lobby,work")
    joined(bob, "bridge", "work")
    ann.say("lobby", "hi from the lobby")
    copy = bob.reply("bridge", lambda t: t == "<ann> hi from the lobby", room="work")
    assert copy.data["relay"] == "ann@lobby" and copy.bot and copy.data["hops"] == 1
    bob.client.me("work", "waves back")
    copy = ann.reply("bridge", lambda t: t == "* bob waves back")
    assert copy.data["relay"] == "bob@work"
    stop_cleanly(ex, ann, "bridge")


def test_two_bridges_on_the_same_rooms_never_loop(broker, people, bots):
    """Two bridge bots between the same rooms: each copies a person once, nothing comes back."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from bridge_bot import make_bot
    finally:
        sys.path.remove(str(EXAMPLES))
    ann = people("ann", ("lobby", "work"))
    one = bots(make_bot("lobby", "work"), broker.port, "bridge1", ("lobby", "work"))
    two = bots(make_bot("lobby", "work"), broker.port, "bridge2", ("lobby", "work"))
    start = {r: broker.broker.rooms[r].seq for r in ("lobby", "work")}
    ann.say("lobby", "ping")
    settle(broker, ("lobby", "work"), one, two)
    work = [e for e in room_events(ann, "work", start["work"]) if e.kind == "msg"]
    lobby = [e for e in room_events(ann, "lobby", start["lobby"]) if e.kind == "msg"]
    assert sorted((e.nick, e.text) for e in work) == [
        ("bridge1", "<ann> ping"),
        ("bridge2", "<ann> ping"),
    ]
    assert [(e.nick, e.text) for e in lobby] == [("ann", "ping")]


def test_minimal_client_example_speaks_the_protocol(broker, people, example):
    """examples/minimal_client.py (pyzmq only): HELLO, JOIN, grant, SAY and its echo, room
    traffic, re-subscribing on GRANT when the room changes topic, BYE on Ctrl+C."""
    ann = people("ann")
    ex = example("minimal_client.py", "--port", str(broker.port), "--say", "hi from mini")
    ex.wait_line(lambda s: s.startswith("SENT lobby#"), "SENT")
    ex.wait_line(lambda s: s.endswith("mini: hi from mini  (echo)"), "its echo")
    ann.reply("mini", lambda t: t == "hi from mini")
    ann.say("lobby", "hello mini")
    ex.wait_line(lambda s: s.endswith("ann: hello mini"), "ann's message")
    bob = people("bob")
    bob.client.leave("lobby")  # the room changes topic: a GRANT push
    ex.wait_line(lambda s: s == "GRANT lobby: subscribing again", "the GRANT")
    ann.say("lobby", "after the new topic")
    ex.wait_line(lambda s: s.endswith("ann: after the new topic"), "traffic after GRANT")
    assert any(line.endswith("* bob left") for line in ex.lines())  # fetched from history
    shown = [int(m[1]) for line in ex.lines() if (m := re.match(r"<lobby#(\d+)>", line))]
    assert shown == list(range(shown[0], shown[-1] + 1))  # in order, no holes
    assert ex.interrupt() == 0, ex.err.read_text()
    ann.wait(lambda e: e.kind == "leave" and e.nick == "mini" and e.data["why"] == "quit")


def test_minimal_client_survives_heartbeat_cycles(broker, people, example):
    """With a 0.3 s heartbeat the minimal client stays connected well past 4 intervals (where
    a silent one is dropped after 3) and still gets replies and room traffic."""
    assert broker.cfg.heartbeat == 0.3
    ann = people("ann")
    ex = example("minimal_client.py", "--port", str(broker.port), "-v")
    ex.wait_line(lambda s: s.startswith("WELCOME mini: heartbeat 0.3 s"), "the welcome")
    started = time.monotonic()
    wait_for(
        lambda: sum(line.startswith("PONG ") for line in ex.lines()) >= 6, 10.0, "6 PING replies"
    )
    assert time.monotonic() - started > 4 * 0.3
    assert "mini" in ann.client.who("lobby")
    ann.say("lobby", "still there?")
    ex.wait_line(lambda s: s.endswith("ann: still there?"), "traffic after many heartbeats")
    assert not [e for e in room_events(ann, "lobby") if e.kind == "leave" and e.nick == "mini"]
    assert ex.interrupt() == 0


# ---------------------------------------------------------------------------- safe by default


def chatty(tag: str, **options: object) -> Bot:
    """A bot that answers every message it is given: the worst case for loops."""
    bot = Bot(**options)

    @bot.on_message
    async def answer(ctx: Context) -> None:
        await ctx.reply(f"{tag} heard: {ctx.text}")

    return bot


def test_bots_ignore_each_other_by_default(broker, people, bots):
    """Two bots that would answer anything each answer the person once, never each other."""
    ann = people("ann")
    a = bots(chatty("A"), broker.port, "abot")
    b = bots(chatty("B"), broker.port, "bbot")
    start = broker.broker.rooms["lobby"].seq
    ann.say("lobby", "hi")
    settle(broker, "lobby", a, b)
    said = [(e.nick, e.text) for e in room_events(ann, "lobby", start) if e.kind == "msg"]
    assert sorted(said) == [("abot", "A heard: hi"), ("ann", "hi"), ("bbot", "B heard: hi")]


def test_bots_listening_to_bots_stop_at_the_hop_limit(broker, people, bots):
    """listen_to_bots=True: the chain between two answering bots stops after max_hops (3)."""
    ann = people("ann")
    a = bots(chatty("A", listen_to_bots=True), broker.port, "abot")
    b = bots(chatty("B", listen_to_bots=True), broker.port, "bbot")
    start = broker.broker.rooms["lobby"].seq
    ann.say("lobby", "hi")
    settle(broker, "lobby", a, b)
    msgs = [e for e in room_events(ann, "lobby", start) if e.kind == "msg" and e.bot]
    # each bot answers ann (hop 1), the other's answer (hop 2), the answer to that (hop 3)
    assert sorted(e.data["hops"] for e in msgs) == [1, 1, 2, 2, 3, 3]
    assert {e.nick for e in msgs if e.data["hops"] == 3} == {"abot", "bbot"}


def test_private_chain_between_bots_stops_too(broker, people, bots):
    """A chain of private messages between bots stops after max_hops replies too."""
    ann = people("ann")
    got: dict[str, list[str]] = {"abot": [], "bbot": []}
    sent: dict[str, int] = {"abot": 0, "bbot": 0}

    def pen_pal(me: str) -> Bot:
        bot = Bot(listen_to_bots=True)

        @bot.command("poke")
        async def poke(ctx: Context, nick: str) -> None:
            done = await ctx.msg(nick, "psst") is not None
            sent[me] += done  # not `sent[me] += await ...`: that reads sent[me] before waiting

        @bot.on_private
        async def answer(ctx: Context) -> None:
            got[me].append(ctx.text)
            done = await ctx.reply(f"{me} got {ctx.text}") is not None
            sent[me] += done

        return bot

    a = bots(pen_pal("abot"), broker.port, "abot")
    b = bots(pen_pal("bbot"), broker.port, "bbot")
    ann.client.msg("abot", "!poke bbot")
    wait_for(
        lambda: (
            a.idle
            and b.idle
            and sent["abot"] == len(got["bbot"])
            and sent["bbot"] == len(got["abot"])
            and got["bbot"]
        ),
        what="the chain to end",
    )
    assert got == {"bbot": ["psst", "abot got bbot got psst"], "abot": ["bbot got psst"]}
    assert sent == {"abot": 2, "bbot": 1}


def test_bot_never_sees_its_own_messages(broker, people, bots):
    """Own messages, own commands and own join are never input, even when they look like it
    (and even for a bot that listens to bots, which its own messages are from)."""
    seen: list[str] = []
    joins: list[str] = []
    bot = Bot(listen_to_bots=True)

    @bot.on_message
    async def hear(ctx: Context) -> str:
        seen.append(ctx.text)
        return f"!again {ctx.text}"  # a command, if the bot read its own output

    @bot.command("again")
    async def again(ctx: Context, *words: str) -> str:
        """Say it again."""
        return "!again " + " ".join(words)

    @bot.on_join
    def welcome(ctx: Context) -> None:
        joins.append(ctx.nick)

    me = bots(bot, broker.port, "selfish")
    ann = people("ann")
    start = broker.broker.rooms["lobby"].seq
    ann.say("lobby", "hello")
    ann.say("lobby", "!again once")
    settle(broker, "lobby", me)
    said = [(e.nick, e.text) for e in room_events(ann, "lobby", start) if e.kind == "msg"]
    assert sorted(said) == [
        ("ann", "!again once"),
        ("ann", "hello"),
        ("selfish", "!again hello"),
        ("selfish", "!again once"),
    ]
    assert seen == ["hello"] and joins == ["ann"]


# ---------------------------------------------------------------------------- robust by default


def test_flood_of_60_messages_arrives_complete_and_in_order(make_broker, bots):
    """A bot sending 60 messages at a broker allowing 20/s with bursts of 20: RATE_LIMITED
    is waited out, none is lost, none doubled, all arrive in order at another client."""
    b = make_broker(rate=20.0, burst=20)
    bot = Bot()

    @bot.command("flood")
    def flood(ctx: Context) -> None:  # a plain def: blocking sends, on a thread
        for i in range(60):
            ctx.reply(f"flood {i}")

    bots(bot, b.port, "flooder")
    ann = Person(b.port, "ann")
    try:
        began = time.monotonic()
        ann.say("lobby", "!flood")
        got = ann.wait(
            lambda e: e.nick == "flooder" and e.kind == "msg",
            count=60,
            timeout=20.0,
            what="60 messages",
        )
        assert [e.text for e in got] == [f"flood {i}" for i in range(60)]
        assert [e.seq for e in got] == list(range(got[0].seq, got[0].seq + 60))
        assert time.monotonic() - began > 1.9  # (60 - 20) / 20 s: the limit was in force
    finally:
        ann.client.close()


def echo_bot() -> Bot:
    bot = Bot()

    @bot.command("echo")
    async def echo(ctx: Context, *text: str) -> str:
        """Say TEXT back."""
        return " ".join(text)

    return bot


def test_bot_reconnects_after_broker_restart_and_answers(broker, bots):
    """The broker restarts: the bot reconnects, rejoins, and answers the next command."""
    bot = bots(echo_bot(), broker.port, "echo")
    ann = Person(broker.port, "ann")
    try:
        ann.say("lobby", "!echo before")
        ann.reply("echo", lambda t: t == "before")
    finally:
        ann.client.close()
    broker.restart()
    wait_for(
        lambda: any(s.nick == "echo" for s in broker.broker.rooms["lobby"].members.values()),
        10.0,
        "the bot to rejoin",
    )
    bob = Person(broker.port, "bob")
    try:
        bob.say("lobby", "!echo after")
        bob.reply("echo", lambda t: t == "after", timeout=10.0)
        assert bot.client is not None and bot.client.connected
    finally:
        bob.client.close()


def test_handler_exception_is_logged_with_its_event_and_bot_goes_on(broker, people, bots, caplog):
    """A command whose handler raises (async or plain) is logged with the event, whoever
    asked is told it failed (not why: that is for the log), and the bot carries on."""
    caplog.set_level(logging.ERROR, logger="bot")
    bot = echo_bot()

    @bot.command("boom")
    async def boom(ctx: Context) -> None:
        raise RuntimeError("kaboom")

    @bot.command("crash")
    def crash(ctx: Context, *why: str) -> None:
        raise ValueError("crashed on a thread")

    bots(bot, broker.port, "fragile")
    ann = people("ann")
    ann.say("lobby", "!boom")
    ann.say("lobby", "!crash now")
    ann.say("lobby", "!echo still here")
    ann.reply("fragile", lambda t: t == "still here")
    said = [e.text for e in ann.seen if e.nick == "fragile"]
    assert said == ["sorry, !boom failed", "sorry, !crash failed", "still here"], said
    wait_for(lambda: len(caplog.records) >= 2, what="two error records")
    logged = {r.getMessage(): r for r in caplog.records}
    boom_line = next(m for m in logged if "!boom" in m)
    crash_line = next(m for m in logged if "!crash now" in m)
    assert "<ann>" in boom_line and "lobby#" in boom_line
    assert "kaboom" in str(logged[boom_line].exc_info[1])
    assert "crashed on a thread" in str(logged[crash_line].exc_info[1])


def test_an_async_handler_that_blocks_is_named_in_the_log(broker, people, bots, caplog):
    """An `async def` command that calls time.sleep holds the bot's loop: the log says
    how long, which handler started last, and that blocking work belongs in a plain def."""
    caplog.set_level(logging.WARNING, logger="zmqchat.bot")
    bot = Bot()

    @bot.command("block")
    async def block(ctx: Context) -> str:
        time.sleep(1.5)  # the mistake
        return "done"

    bots(bot, broker.port, "blocky")
    ann = people("ann")
    ann.say("lobby", "!block")
    ann.reply("blocky", lambda t: t == "done")
    wait_for(lambda: "held its loop" in caplog.text, 5, "the warning")
    assert "the last one to start: !block" in caplog.text, caplog.text
    assert "belongs in a plain def handler" in caplog.text


def test_plain_handler_runs_on_a_thread_beside_the_others(broker, people, bots):
    """A plain def handler that blocks does not stop the others from running (here, the one
    that unblocks it); their replies still come in the order of the commands."""
    gate = threading.Event()
    bot = Bot()

    @bot.command("wait")
    def wait(ctx: Context) -> str:
        assert gate.wait(5), "the gate was never opened: the handlers ran one at a time"
        return "the gate opened"

    @bot.command("open")
    async def open_gate(ctx: Context) -> str:
        gate.set()
        return "opening"

    @bot.command("who")
    def who(ctx: Context) -> str:  # the client's calls block in a plain def too
        return ", ".join(ctx.client.who("lobby"))

    bots(bot, broker.port, "gatekeeper")
    ann = people("ann")
    ann.say("lobby", "!wait")
    ann.say("lobby", "!open")
    got = ann.wait(lambda e: e.nick == "gatekeeper", count=2, what="two replies")
    assert [e.text for e in got] == ["the gate opened", "opening"]
    ann.say("lobby", "!who")
    got = ann.wait(lambda e: e.nick == "gatekeeper" and "ann" in e.text, what="who is here")
    assert got[-1].text == "ann, gatekeeper"


def weather_bot(gate: threading.Event) -> Bot:
    """The README's weather bot, slow for New York until the gate opens."""
    bot = Bot(prefix="!")

    @bot.command("weather")
    def weather(ctx, city: str):
        """Today's weather in CITY."""
        if city == "New York":
            assert gate.wait(5), "the gate was never opened"
        ctx.reply(f"{city}: sunny, 21 C")

    return bot


def die_bot(prefix: str = "!") -> Bot:
    """A bot with one command, roll."""
    bot = Bot(prefix=prefix)

    @bot.command("roll")
    def roll(ctx: Context) -> str:
        """Roll a die."""
        return "4"

    return bot


def held(bot: Bot, conversation: str) -> int:
    """How many of the bot's handlers have a reply waiting for an earlier one's turn."""
    return sum(turn.waiting for turn in bot._lines.get(conversation, ()))


def test_replies_come_in_the_order_of_the_commands(broker, people, bots):
    """`!weather New York` (a slow plain def), `!help` (async), `!weather` (a usage line):
    the answers come in that order, the two quick ones held back by the slow one."""
    gate = threading.Event()
    bot = bots(weather_bot(gate), broker.port, "weatherbot")
    ann = people("ann")
    ann.say("lobby", "!weather New York")
    ann.say("lobby", "!help")
    last = ann.say("lobby", "!weather")
    wait_for(
        lambda: bot.handled("lobby") >= last and held(bot, "lobby") == 2,
        what="the help and the usage line to wait for the weather",
    )
    assert not [e for e in ann.seen if e.nick == "weatherbot"]
    gate.set()
    got = [e.text for e in ann.wait(lambda e: e.nick == "weatherbot", count=3, what="answers")]
    assert got[0] == "New York: sunny, 21 C"
    assert got[1].startswith("commands: !help [COMMAND]") and "!weather CITY" in got[1]
    assert got[2] == "usage: !weather CITY (CITY is missing)"


def test_help_about_another_bots_command_is_left_to_that_bot(broker, people, bots):
    """Two bots in lobby: `!help weather` is answered by the weather bot alone (the other
    does not say it has no such command), `!help` by both; asked privately, a bot says
    it has no such command."""
    weather = bots(weather_bot(threading.Event()), broker.port, "weatherbot")
    dice = bots(die_bot(), broker.port, "dicebot")
    ann = people("ann")
    ann.say("lobby", "!help weather")
    ann.say("lobby", "!help")
    ann.reply("weatherbot", lambda t: t == "!weather CITY - Today's weather in CITY.")
    ann.reply("dicebot", lambda t: t.startswith("commands: ") and "| !roll - Roll a die." in t)
    settle(broker, "lobby", weather, dice)
    assert [e.text.split(":")[0] for e in ann.seen if e.nick == "dicebot"] == ["commands"]
    ann.client.msg("dicebot", "!help weather")
    assert ann.reply("dicebot", lambda t: True, room=None).text == (
        "no command !weather; !help lists them"
    )


def test_help_speaks_with_the_bots_own_prefix(broker, people, bots):
    """A bot whose prefix is `%`: its help lists `%help [COMMAND]` and says `%help COMMAND`,
    not the default `!`."""
    bots(die_bot(prefix="%"), broker.port, "pctbot")
    ann = people("ann")
    ann.say("lobby", "%help")
    listing = ann.reply("pctbot", lambda t: t.startswith("commands:")).text
    assert "%help [COMMAND] - List the commands, or describe one: %help COMMAND." in listing
    assert "!" not in listing, listing


def test_a_slow_handler_holds_up_only_its_own_conversation(broker, people, bots):
    """While a slow command in lobby waits, commands in another room and from another person
    in private are answered at once; private replies to one person keep their order too."""
    gate = threading.Event()
    bot = bots(weather_bot(gate), broker.port, "weatherbot", ("lobby", "work"))
    ann = people("ann", ("lobby", "work"))
    bob = people("bob", ())
    ann.say("lobby", "!weather New York")
    ann.client.msg("weatherbot", "!weather New York")
    ann.client.msg("weatherbot", "!weather Oslo")
    ann.say("work", "!weather Paris")
    bob.client.msg("weatherbot", "!weather Rome")
    ann.reply("weatherbot", lambda t: t == "Paris: sunny, 21 C", room="work")
    bob.reply("weatherbot", lambda t: t == "Rome: sunny, 21 C", room=None)
    wait_for(lambda: held(bot, "@ann") == 1, what="Oslo to wait for New York")
    assert not [e for e in ann.seen if e.nick == "weatherbot" and e.room != "work"]
    gate.set()
    private = ann.wait(
        lambda e: e.nick == "weatherbot" and e.kind == "private", count=2, what="2 private"
    )
    assert [e.text for e in private] == ["New York: sunny, 21 C", "Oslo: sunny, 21 C"]
    ann.reply("weatherbot", lambda t: t == "New York: sunny, 21 C")


def test_a_handler_that_detaches_lets_later_replies_go(broker, people, bots):
    """A plain def handler that answers, detaches and goes on waiting does not hold back the
    answers to the commands after it."""
    gate = threading.Event()
    bot = Bot()

    @bot.command("later")
    def later(ctx: Context) -> str:
        ctx.reply("soon")
        ctx.detach()
        assert gate.wait(5), "the gate was never opened"
        return "now"

    bots(bot, broker.port, "slowpoke")
    ann = people("ann")
    ann.say("lobby", "!later")
    ann.say("lobby", "!help")
    ann.reply("slowpoke", lambda t: t.startswith("commands:"))
    gate.set()
    got = ann.wait(lambda e: e.nick == "slowpoke", count=3, what="three replies")
    assert [e.text.split(":")[0] for e in got] == ["soon", "commands", "now"]


# ---------------------------------------------------------------------------- what handlers get


def test_handlers_reach_rooms_members_history_and_other_rooms(broker, people, bots):
    """A handler lists rooms and members, reads history, and says things in another room."""
    bot = Bot()

    @bot.command("report")
    async def report(ctx: Context) -> None:
        rooms = {r["name"]: r["members"] for r in await ctx.rooms()}
        who = await ctx.who(ctx.room)
        said = [e.text for e in await ctx.history(ctx.room, limit=10) if e.kind == "msg"]
        await ctx.say(
            "work", f"rooms={rooms['lobby']},{rooms['work']} who={','.join(who)} last={said[-2]}"
        )

    bots(bot, broker.port, "reporter", ("lobby", "work"))
    ann = people("ann", ("lobby", "work"))
    ann.say("lobby", "remember me")
    ann.say("lobby", "!report")
    ann.reply("reporter", lambda t: t == "rooms=2,2 who=ann,reporter last=remember me", room="work")


def test_pattern_room_filters_and_private_replies(broker, people, bots):
    """on_message(room=, pattern=) sees only what it asks for; a private message is answered
    privately; on_leave sees departures; bot.events() yields what comes next."""
    bot = Bot()

    @bot.on_message(room="work", pattern=r"^(\d+) \+ (\d+)$")
    async def add(ctx: Context) -> int:
        return int(ctx.match[1]) + int(ctx.match[2])  # a number is said as its text

    @bot.on_private
    async def secret(ctx: Context) -> str:
        return f"psst, {ctx.nick}: {ctx.text.upper()}"

    @bot.on_leave
    async def bye(ctx: Context) -> None:
        await ctx.say("work", f"{ctx.nick} is gone")

    @bot.command("next")
    async def next_line(ctx: Context) -> str:
        """Repeat the next thing the asker says."""
        async with ctx.bot.events() as events:
            await ctx.reply("go on")
            async for ev in events:
                if ev.kind == "msg" and ev.nick == ctx.nick and ev.room == ctx.room:
                    return f"you said {ev.text}"
        return ""

    @bot.command("pong")
    async def pong(ctx: Context) -> int | None:
        return await ctx.reply("pong")  # its seq: answered already, not said again

    bots(bot, broker.port, "helper", ("lobby", "work"))
    ann = people("ann", ("lobby", "work"))
    ann.say("lobby", "2 + 2")
    ann.say("work", "2 + x")
    ann.say("work", "20 + 22")
    ann.reply("helper", lambda t: t == "42", room="work")
    ann.client.msg("helper", "quiet please")
    ann.reply("helper", lambda t: t == "psst, ann: QUIET PLEASE", room=None)
    ann.say("lobby", "!pong")
    ann.reply("helper", lambda t: t == "pong")
    ann.say("lobby", "!next")
    ann.reply("helper", lambda t: t == "go on")
    ann.say("lobby", "this one")
    ann.reply("helper", lambda t: t == "you said this one")
    bob = people("bob", ("work",))
    bob.client.leave("work")
    ann.reply("helper", lambda t: t == "bob is gone", room="work")
    answers = [e.text for e in ann.seen if e.nick == "helper"]
    assert "4" not in answers and not any(e.room is None and e.kind == "msg" for e in ann.seen)
    assert answers[answers.index("pong") + 1] == "go on"  # (the reply's seq was not said)


def test_every_runs_periodically_with_a_hop_count(broker, people, bots):
    """@bot.every(seconds) runs while connected; what it says starts a chain (hops 1)."""
    bot = Bot()
    ticks: list[int] = []

    @bot.every(0.1)
    async def tick(ctx: Context) -> None:
        ticks.append(len(ticks))
        if len(ticks) <= 2:
            await ctx.say("lobby", f"tick {ticks[-1]}")

    ann = people("ann")
    bots(bot, broker.port, "clock")
    got = ann.wait(lambda e: e.nick == "clock" and e.kind == "msg", count=2, what="2 ticks")
    assert [(e.text, e.data["hops"]) for e in got] == [("tick 0", 1), ("tick 1", 1)]


def test_a_timer_that_overran_is_not_run_again_back_to_back(broker, bots):
    """A run of `@bot.every(0.2)` that takes 0.7 s (or a stall: the broker gone a while)
    is followed by the next run in its turn, not by the missed ones at once."""
    bot = Bot()
    starts: list[float] = []
    gate = threading.Event()

    @bot.every(0.2)
    def tick(ctx: Context) -> None:
        starts.append(time.monotonic())
        if len(starts) == 1:
            assert gate.wait(5), "the gate was never opened"

    bots(bot, broker.port, "clock")
    wait_for(lambda: starts, 5, "the first run")
    wait_for(lambda: time.monotonic() - starts[0] > 0.7, 5, "three periods of the first run")
    gate.set()
    wait_for(lambda: len(starts) >= 4, 5, "three more runs")
    gaps = [b - a for a, b in zip(starts[1:4], starts[2:4], strict=False)]
    assert all(gap >= 0.19 for gap in gaps), gaps  # (a sleep is never shorter than asked)


# ---------------------------------------------------------------------------- commands, offline


def test_usage_is_derived_from_the_signature():
    """The usage line and argument conversion come from the function's signature."""

    def remind(ctx: Context, when: float, what: str, *more: str, loud: bool = False) -> None:
        """Remind you.

        Longer help."""

    cmd = Command.from_function("remind", remind)
    assert cmd.usage == "remind WHEN WHAT [MORE...]"
    assert cmd.summary == "Remind you." and cmd.help == "Remind you. Longer help."
    assert cmd.bind(["1.5", "tea", "and", "cake"]) == [1.5, "tea", "and", "cake"]
    with pytest.raises(UsageError, match="WHAT is missing"):
        cmd.bind(["2"])
    with pytest.raises(UsageError, match="bad WHEN 'soon': not a number"):
        cmd.bind(["soon", "tea"])

    def toggle(ctx: Context, on: bool, times: int = 1) -> None: ...

    cmd = Command.from_function("toggle", toggle)
    assert cmd.usage == "toggle ON [TIMES]"
    assert cmd.bind(["yes"]) == [True, 1] and cmd.bind(["off", "3"]) == [False, 3]
    with pytest.raises(UsageError, match="too many arguments: x"):
        cmd.bind(["on", "2", "x"])
    with pytest.raises(TypeError):
        Command.from_function("bad", lambda: None)

    def double(ctx: Context, n: int | None = None, x: Optional[float] = None) -> None: ...  # noqa: UP045

    cmd = Command.from_function("double", double)  # X | None and Optional[X]: as X
    assert cmd.bind(["4", "2.5"]) == [4, 2.5] and cmd.bind([]) == [None, None]
    with pytest.raises(UsageError) as bad:
        cmd.bind(["four"])
    assert str(bad.value) == "bad N 'four': not a whole number"  # not Python's words
    with pytest.raises(UsageError) as bad:
        cmd.bind(["4", "half"])
    assert str(bad.value) == "bad X 'half': not a number"


def test_arguments_split_like_a_shell_but_apostrophes_are_letters():
    """Double quotes group words; apostrophes in ordinary text are kept as they are."""
    assert split_args('a "b  c" d') == ["a", "b  c", "d"]
    assert split_args("it's Bob's turn") == ["it's", "Bob's", "turn"]
    assert split_args('say "unclosed') == ["say", '"unclosed']


def test_bot_waits_for_an_unreachable_broker_until_stopped():
    """A bot started before its broker keeps trying; stopping it ends the wait at once."""
    port = free_ports(1)[0]
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        Bot().start(HOST, port, "early", timeout=0.5)  # gives up waiting, and stops the bot
    assert time.monotonic() - began < 3.0
    assert not [t for t in threading.enumerate() if t.name == "bot-early"]


def test_restarted_bot_waits_for_its_old_nick(broker, bots):
    """A bot restarted while its previous run still holds its nick (not yet timed out) waits
    for the broker to drop the old session, then connects under the same nick."""
    import zmq

    from zmqchat import protocol as msgs

    old = zmq.Context.instance().socket(zmq.DEALER)  # the previous run: silent from now on
    old.linger = 0
    old.connect(f"tcp://{HOST}:{broker.port}")
    old.send_multipart(msgs.encode_request("HELLO", b"1", {"version": 1, "nick": "phoenix"}))
    assert old.poll(3000) and old.recv_multipart()[0] == b"OK"
    began = time.monotonic()
    bot = bots(Bot(), broker.port, "phoenix")
    assert bot.client.nick == "phoenix"
    assert time.monotonic() - began < 3 * 0.3 + 3.0
    old.close()


def test_a_bot_whose_nick_someone_uses_says_so_at_once(broker, people):
    """A bot started under a nick a live client holds (heard from within its heartbeat) is
    refused within a few seconds, saying the nick is taken (it retried for 35 s)."""
    people("watcher")
    began = time.monotonic()
    with pytest.raises(ChatError) as refused:
        Bot().start(HOST, broker.port, "watcher", timeout=20)
    assert refused.value.code == "NICK_TAKEN"
    assert time.monotonic() - began < 8  # a heartbeat or two to hear the holder, not 35 s


# ---------------------------------------------------------------------------- edits (issue 23)
def test_a_bot_hears_edits_and_removals_and_answers_with_a_quote(broker, people, bots):
    """@bot.on_edit and @bot.on_delete get the events (naming the message they change);
    ctx.reply(quote=True) answers the very message that woke the bot."""
    bot, seen = Bot(), []

    @bot.on_edit
    async def edited(ctx) -> None:
        seen.append(("edit", ctx.nick, ctx.text, ctx.event.data["ref"]))

    @bot.on_delete
    async def deleted(ctx) -> None:
        seen.append(("delete", ctx.nick, ctx.event.data["ref"]))

    @bot.command("ping")
    async def ping(ctx) -> None:
        await ctx.reply("pong", quote=True)

    bots(bot, broker.port, "watchbot")
    ann = people("ann")
    seq = ann.say("lobby", "typo")
    ann.client.edit("lobby", seq, "fixed")
    ann.client.delete("lobby", seq)
    wait_for(lambda: len(seen) == 2, 5, "the bot hearing both")
    assert seen == [("edit", "ann", "fixed", seq), ("delete", "ann", seq)]
    asked = ann.say("lobby", "!ping")
    pong = ann.reply("watchbot", lambda t: t == "pong")
    assert (pong.data["re"], pong.data["re_nick"]) == (asked, "ann")
