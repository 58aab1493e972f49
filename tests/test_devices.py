"""An account on several devices at once (issue 21: "marks shared by two sessions of one
account"), through the client library as a user's two clients would use it, against one
broker and against two brokers of a cluster (the fixtures of test_accounts.py: each new
client on the other broker, so a laptop and a desktop are on different brokers)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from types import SimpleNamespace

import test_accounts
from test_accounts import PW, client, events_until, registered

from conftest import ROOT
from zmqchat import Client
from zmqchat._cli.catchup import Reading

broker = test_accounts.broker  # one broker, and two of a cluster


async def devices(broker, nick: str, rooms=("lobby",)) -> tuple[Client, Client]:
    """Two logged-in sessions of `nick`'s account (registered here), both connected."""
    await registered(broker, nick, rooms)
    laptop = client(broker, nick, password=PW, rooms=list(rooms))
    await laptop.connect()
    desktop = client(broker, nick, password=PW, rooms=list(rooms))
    await desktop.connect()
    assert laptop.connected and desktop.connected
    return laptop, desktop


def test_two_sessions_of_an_account_both_receive_room_and_private_messages(broker):
    """Both sessions hear the room and get a private message to the account; what one
    sends privately the other is shown too (as its own); /who names the account once."""

    async def main() -> None:
        laptop, desktop = await devices(broker, "ivy")
        tom = client(broker, "tomi")
        await tom.connect()
        said = await tom.say("lobby", "hello ivy")
        assert await laptop.heard("lobby", said, 5) and await desktop.heard("lobby", said, 5)
        await tom.msg("ivy", "psst")
        for c in (laptop, desktop):
            got = await events_until(c, lambda g: any(e.kind == "private" for e in g))
            assert [(e.nick, e.text, e.mine) for e in got if e.kind == "private"] == [
                ("tomi", "psst", False)
            ]
        await laptop.msg("tomi", "on my laptop")
        got = await events_until(desktop, lambda g: any(e.kind == "private" for e in g))
        echo = [e for e in got if e.kind == "private"][0]
        assert (echo.nick, echo.text, echo.mine, echo.data["to"]) == (
            "ivy",
            "on my laptop",
            True,
            "tomi",
        )
        got = await events_until(
            tom, lambda g: any(e.kind == "private" and e.nick == "ivy" for e in g)
        )
        assert [e.text for e in got if e.kind == "private" and e.nick == "ivy"] == ["on my laptop"]
        assert (await tom.who("lobby")).count("ivy") == 1
        assert (await tom.who()).count("ivy") == 1
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


def test_a_private_message_sent_on_one_device_is_the_others_own_whatever_the_case(broker):
    """The account logged in as `Ivo` on the laptop and `ivo` on the desktop (one nick: case
    is folded): what the laptop sends privately is shown on the desktop as its own, not as
    a message from someone called `Ivo`."""

    async def main() -> None:
        await registered(broker, "ivo")
        laptop = client(broker, "Ivo", password=PW)
        await laptop.connect()
        desktop = client(broker, "ivo", password=PW)
        await desktop.connect()
        tom = client(broker, "tomv")
        await tom.connect()
        await laptop.msg("tomv", "from the laptop")
        got = await events_until(desktop, lambda g: any(e.kind == "private" for e in g))
        echo = [e for e in got if e.kind == "private"][0]
        assert (echo.nick, echo.text, echo.data["to"], echo.mine) == (
            "Ivo",
            "from the laptop",
            "tomv",
            True,
        )
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


def test_a_file_offered_privately_on_one_device_is_shown_on_the_other(broker, tmp_path):
    """The laptop offers a file to tom privately: the desktop is shown the offer too, as
    its own (a conversation reads the same on both), and tom gets it once."""

    async def main() -> None:
        laptop, desktop = await devices(broker, "ida")
        tom = client(broker, "tomf")
        await tom.connect()
        path = tmp_path / "notes.txt"
        path.write_bytes(b"the minutes\n" * 100)
        offer = await laptop.send_file("@tomf", str(path))
        got = await events_until(desktop, lambda g: any(e.kind == "file" for e in g))
        echo = [e for e in got if e.kind == "file"][0]
        assert (echo.nick, echo.data["to"], echo.data["file"], echo.mine) == (
            "ida",
            "tomf",
            offer["file"],
            True,
        )
        got = await events_until(tom, lambda g: any(e.kind == "file" for e in g))
        assert [e.data["file"] for e in got if e.kind == "file"] == [offer["file"]]
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


def test_a_mark_on_one_session_drops_the_unread_count_of_the_other(broker):
    """The laptop reads the room: the desktop is told, and its unread count drops to 0."""

    async def main() -> None:
        laptop, desktop = await devices(broker, "jem")
        tom = client(broker, "tomj")
        await tom.connect()
        seqs = [await tom.say("lobby", f"news {i}") for i in range(3)]
        assert await laptop.heard("lobby", seqs[-1], 5)
        assert await desktop.heard("lobby", seqs[-1], 5)
        counted = await desktop.unread_counts("lobby")
        assert counted["rooms"][0]["unread"] == 3 and desktop.unread["lobby"]["unread"] == 3
        laptop.mark("lobby", seqs[-1])
        await laptop.send_marks()
        got = await events_until(desktop, lambda g: any(e.kind == "marked" for e in g))
        marked = [e for e in got if e.kind == "marked"][0]
        assert (marked.room, marked.data["seq"], marked.data["unread"]) == ("lobby", seqs[-1], 0)
        assert desktop.unread["lobby"]["unread"] == 0
        assert desktop.marks["lobby"] == seqs[-1]
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


def test_what_one_session_reads_comes_off_the_other_clis_unread_count(broker):
    """The command-line client's count of unread messages in its other rooms (its prompt's
    `lobby (+2)>` and toolbar) drops when another session of the account reads them."""

    async def main() -> None:
        laptop, desktop = await devices(broker, "oli", rooms=("lobby", "support"))
        reading = Reading(desktop)  # the desktop's CLI, reading lobby
        tom = client(broker, "tomo", rooms=["support"])
        await tom.connect()
        said = [await tom.say("support", text) for text in ("one", "two")]

        async def take_until(done) -> None:
            deadline = time.monotonic() + 5
            while not done():
                reading.take(await desktop.next_event(deadline - time.monotonic()), "lobby")

        await take_until(lambda: reading.elsewhere("lobby") == 2)
        assert reading.toolbar("lobby") == "unread: support 2"
        assert await laptop.heard("support", said[-1], 5)
        laptop.mark("support", said[-1])
        await laptop.send_marks()
        await take_until(lambda: reading.elsewhere("lobby") == 0)
        assert reading.toolbar("lobby") == ""
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


def test_a_join_and_a_leave_on_one_session_are_followed_by_the_other(broker):
    """The laptop joins a room: the desktop is in it too (it hears it), with one join notice
    in the room; the laptop leaves it: the desktop is out, with one leave notice."""

    async def main() -> None:
        laptop, desktop = await devices(broker, "kit")
        tom = client(broker, "tomk", rooms=["lobby", "support"])
        await tom.connect()
        await laptop.join("support")
        got = await events_until(desktop, lambda g: any("joined support" in e.text for e in g))
        assert "support" in desktop.rooms and got[-1].kind == "status"
        said = await tom.say("support", "for kit")
        assert await desktop.heard("support", said, 5) and await laptop.heard("support", said, 5)
        await laptop.leave("support")
        await events_until(desktop, lambda g: any("left support" in e.text for e in g))
        assert "support" not in desktop.rooms
        kit = [e.kind for e in await tom.history("support", limit=50) if e.nick == "kit"]
        assert kit == ["join", "leave"]
        assert "kit" not in await tom.who("support")
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


def test_a_room_joined_and_left_at_once_on_one_device_stays_left(broker):
    """The laptop joins a room and leaves it straight away: the desktop, told JOINED, asks
    to follow when the account has left again; that is refused, and the account stays out
    (no second join notice, neither device in it)."""

    async def main() -> None:
        laptop, desktop = await devices(broker, "kip")
        tom = client(broker, "tomp", rooms=["lobby", "team"])
        await tom.connect()
        await asyncio.gather(laptop.join("team"), laptop.leave("team"))
        # a MARKED pushed after that JOINED: once the desktop shows it, it has answered
        # the JOINED (its JOIN went before the UNREAD that its `marked` event waits for)
        said = await tom.say("lobby", "mark me")
        assert await laptop.heard("lobby", said, 5)
        laptop.mark("lobby", said)
        await laptop.send_marks()
        await events_until(desktop, lambda g: any(e.kind == "marked" for e in g))
        kip = [e.kind for e in await tom.history("team", limit=50) if e.nick == "kip"]
        assert kip == ["join", "leave"]
        assert "team" not in desktop.rooms and "team" not in laptop.rooms
        assert "kip" not in await tom.who("team")
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


KILLED = """
import asyncio, sys
from zmqchat import Client
from zmqchat._cli.catchup import Reading

async def main():
    c = Client("127.0.0.1", int(sys.argv[1]), sys.argv[2], password=sys.argv[3])
    await c.connect()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


class Lines(logging.Handler):
    """The broker's log lines (an in-process broker's)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(record.getMessage())


LINES = Lines()


async def logged(broker, name: str, timeout: float = 10.0) -> None:
    """Wait until a broker has logged the event `name` (a cluster's in its log file)."""
    deadline = time.monotonic() + timeout
    while True:
        if hasattr(broker, "brokers"):
            if any(f"zmqchat.broker {name} " in b.log_text() for b in broker.brokers):
                return
        elif name in LINES.names:
            return
        assert time.monotonic() < deadline, f"no {name} logged"
        await asyncio.sleep(0.05)


def test_a_killed_session_of_an_account_ends_quietly_while_another_is_on(broker):
    """kill -9 of one of the account's clients: the other session goes on, hears the room
    and gets private messages; nobody sees a leave (nor a join), also after the killed
    session's heartbeats ran out; a new login after that is quiet too."""

    log = logging.getLogger("zmqchat.broker")
    log.addHandler(LINES)
    level = log.level
    log.setLevel(logging.INFO)

    async def main() -> None:
        await registered(broker, "lux")
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED, str(broker.port), "lux", PW],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            live = client(broker, "lux", password=PW)
            await live.connect()
            proc.kill()
            proc.wait()
            await logged(broker, "device-lost")  # its 3 heartbeats ran out: it is ended
            tom = client(broker, "toml")
            await tom.connect()
            said = await tom.say("lobby", "still there?")
            assert await live.heard("lobby", said, 5) and "lux" in await tom.who("lobby")
            await tom.msg("lux", "hi")
            got = await events_until(live, lambda g: any(e.kind == "private" for e in g))
            assert not [e for e in got if e.kind in ("leave", "join") and e.nick == "lux"]
            again = client(broker, "lux", password=PW)
            await again.connect()
            await again.close()
            lux = [e.kind for e in await tom.history("lobby", limit=200) if e.nick == "lux"]
            assert lux == ["join"]  # the registration's only
            assert live.connected
            await asyncio.gather(live.close(), tom.close())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    try:
        asyncio.run(main())
    finally:
        log.removeHandler(LINES)
        log.setLevel(level)


def test_a_ban_takes_every_session_of_the_account_out(broker):
    """An operator bans the account: both its sessions are out of the room, and told."""

    async def main() -> None:
        laptop, desktop = await devices(broker, "max")
        boss = client(broker, "boss")
        await boss.connect()
        await boss.ban("lobby", "max", "spam")
        for c in (laptop, desktop):
            await events_until(c, lambda g: any("banned from lobby" in e.text for e in g))
            assert "lobby" not in c.rooms
        assert "max" not in await boss.who("lobby")
        await asyncio.gather(laptop.close(), desktop.close(), boss.close())

    asyncio.run(main())


def test_a_nick_change_is_refused_while_the_account_is_on_elsewhere(broker):
    """A nick change would leave the account's other sessions under the old nick: it is
    refused with a clear error while they are on, and allowed once alone."""

    async def main() -> None:
        laptop, desktop = await devices(broker, "ned")
        try:
            await laptop.set_nick("neddy")
        except Exception as err:  # noqa: BLE001
            assert "other connection" in str(err)
        else:
            raise AssertionError("the nick change was allowed")
        assert laptop.nick == "ned"
        await desktop.close()
        assert await laptop.set_nick("neddy") == "neddy"
        await laptop.close()

    asyncio.run(main())


def test_a_login_while_the_account_is_on_under_another_nick_joins_it_there(broker):
    """The laptop took another nick (alone then: allowed); the desktop logs in to the
    account under its own name: it is the account's second device under the laptop's
    nick, not a second person (one name in /who, a private message reaches both, a nick
    change refused on either)."""

    async def main() -> None:
        await registered(broker, "nia")
        laptop = client(broker, "nia", password=PW)
        await laptop.connect()
        assert await laptop.set_nick("nina") == "nina"
        desktop = client(broker, "nia", password=PW)
        await desktop.connect()
        assert (desktop.account, desktop.nick) == ("nia", "nina")
        tom = client(broker, "tomas")
        await tom.connect()
        who = await tom.who()
        assert (who.count("nina"), who.count("nia")) == (1, 0)
        await tom.msg("nina", "psst")
        for c in (laptop, desktop):
            got = await events_until(c, lambda g: any(e.kind == "private" for e in g))
            assert [(e.nick, e.text) for e in got if e.kind == "private"] == [("tomas", "psst")]
        for c in (laptop, desktop):
            try:
                await c.set_nick("nia")
            except Exception as err:  # noqa: BLE001
                assert "other connection" in str(err)
            else:
                raise AssertionError("a nick change was allowed")
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


def test_the_accounts_session_on_a_broker_that_died_ends_quietly(make_cluster_broker):
    """Two brokers of a cluster, the account's first session on b1, its second on b2: b1 is
    killed; once b2 has settled b1's sessions, the account's nick is its b2 session's (it
    gets private messages, WHO names it), and nobody saw the account leave."""

    async def main() -> None:
        b1 = make_cluster_broker("b1", "--scram-iterations", "4096")
        b2 = make_cluster_broker("b2", "--scram-iterations", "4096")
        one, two = SimpleNamespace(port=b1.port), SimpleNamespace(port=b2.port)
        await registered(one, "nan")
        laptop = client(one, "nan", password=PW, reconnect=False)
        await laptop.connect()
        desktop = client(two, "nan", password=PW)
        await desktop.connect()
        tom = client(two, "tomn")
        await tom.connect()
        b1.proc.kill()
        b1.proc.wait()
        await logged(SimpleNamespace(brokers=[b2]), "device-heir", 15)  # b1's session settled
        said = await tom.say("lobby", "after b1")
        assert await desktop.heard("lobby", said, 5)
        assert "nan" in await tom.who("lobby") and "nan" in await tom.who()
        await tom.msg("nan", "still there?")
        got = await events_until(desktop, lambda g: any(e.kind == "private" for e in g))
        assert [e.text for e in got if e.kind == "private"] == ["still there?"]
        nan = [e.kind for e in await tom.history("lobby", limit=200) if e.nick == "nan"]
        assert nan == ["join"]  # the registration's only
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


def test_a_login_on_one_broker_as_the_holder_ends_on_another_keeps_the_nick(make_cluster_broker):
    """The account's only session (on b1) ends just as a new one logs in on b2 (a race: the
    test tries it at a series of moments): whichever way it falls, the new session holds the
    account's nick (WHO names it), and no session under it is left without its holder."""

    async def main() -> None:
        b1 = make_cluster_broker("b1", "--scram-iterations", "4096")
        b2 = make_cluster_broker("b2", "--scram-iterations", "4096")
        one, two = SimpleNamespace(port=b1.port), SimpleNamespace(port=b2.port)
        await registered(one, "oda")
        tom = client(one, "tomd")
        await tom.connect()
        for i in range(20):
            laptop = client(one, "oda", password=PW, reconnect=False)
            await laptop.connect()
            desktop = client(two, "oda", password=PW, reconnect=False)

            await asyncio.gather(ends_after(laptop, 0.002 * i), desktop.connect())
            deadline = time.monotonic() + 5
            while "oda" not in await tom.who():
                assert time.monotonic() < deadline, f"try {i}: the nick has no holder"
                await asyncio.sleep(0.05)
            await desktop.close()
            while "oda" in await tom.who():  # free again for the next try
                assert time.monotonic() < deadline, f"try {i}: the nick is still held"
                await asyncio.sleep(0.05)
        await tom.close()

    asyncio.run(main())


async def ends_after(c: Client, delay: float) -> None:
    await asyncio.sleep(delay)  # the moment the race is tried at, not a wait for a state
    await c.close()


def test_a_session_whose_record_another_broker_settled_is_told_to_come_back(
    make_cluster_broker, nats_nodes
):
    """The desktop's session on b2 is settled by another broker (its record deleted, as b1
    does when it takes b2 for dead: b2 cut off from NATS past its grace while its clients
    stay connected): b2 ends it and tells the client, which says so, comes back on its own
    and gets the account's private messages again (it is not left connected, hearing
    nothing)."""

    async def main() -> None:
        b1 = make_cluster_broker("b1", "--scram-iterations", "4096")
        b2 = make_cluster_broker("b2", "--scram-iterations", "4096")
        one, two = SimpleNamespace(port=b1.port), SimpleNamespace(port=b2.port)
        await registered(one, "zoe")
        laptop = client(one, "zoe", password=PW)
        await laptop.connect()
        desktop = client(two, "zoe", password=PW)
        await desktop.connect()
        tom = client(one, "tomz")
        await tom.connect()
        assert await delete_companions(nats_nodes.urls, make_cluster_broker.namespace) == 1
        deadline = time.monotonic() + 10
        seen = []
        for i in range(1000):
            await tom.msg("zoe", f"ping {i}")
            try:
                ev = await desktop.next_event(0.2)
            except TimeoutError:
                ev = None
            seen.append(ev)
            if ev is not None and ev.kind == "private" and ev.nick == "tomz":
                break
            assert time.monotonic() < deadline, "the desktop gets nothing for the account"
        said = [e.text for e in seen if e is not None and e.kind == "status"]
        assert "your session was ended, reconnecting..." in said, said  # told, not silent
        await asyncio.gather(laptop.close(), desktop.close(), tom.close())

    asyncio.run(main())


async def delete_companions(urls: str, namespace: str) -> int:
    """Delete the companion records of the namespace's sessions bucket, as another broker
    settling them does; how many there were."""
    import nats
    import nats.js.errors

    nc = await nats.connect(urls.split(","), connect_timeout=2)
    try:
        kv = await nc.jetstream(timeout=5).key_value(f"{namespace}-sessions")
        deadline = time.monotonic() + 10
        while True:  # a listing may come from a replica that has not got them yet
            try:
                companions = [k for k in await kv.keys() if "." in k]
            except nats.js.errors.NoKeysError:
                companions = []
            if companions or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        for key in companions:
            await kv.delete(key)
        return len(companions)
    finally:
        await nc.close()
