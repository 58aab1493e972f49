"""Accounts and catching up (issue 21), through the client library as a bot would use it,
against one broker and against two brokers of a cluster (each new client on the other one:
registered on b1, logged in on b2)."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time

import pytest
import zmq

from conftest import ROOT, BrokerPair, ClusterBroker, RunningBroker
from zmqchat import ChatError, Client
from zmqchat import protocol as m
from zmqchat._bot import Bot

PW = "correct horse"
ITERATIONS = 4096  # SCRAM's least: tests log in often


SHARED = {"scram_iterations": ITERATIONS, "rate": 0, "operators": ("boss", "jo")}


@pytest.fixture(scope="module", params=["one broker", "two brokers"])
def broker(request, tmp_path_factory):
    """For the whole module (each test with nicks of its own): one broker, or two of a
    cluster (conftest.BrokerPair); SCRAM with its least iteration count, no rate limit,
    boss and jo operators."""
    tmp = tmp_path_factory.mktemp("accounts")
    if request.param == "one broker":
        one = RunningBroker(tmp, **SHARED)
        yield one
        one.stop()
        return
    from scripts.nats_local import delete_namespace

    nodes = request.getfixturevalue("nats_nodes")
    namespace = "a" + secrets.token_hex(4)

    def make(name: str, *args: str, wait: bool = True) -> ClusterBroker:
        return ClusterBroker(tmp, nodes.urls, namespace, name, *args, wait=wait)

    pair = BrokerPair(make, **SHARED)
    yield pair
    for b in pair.brokers:
        b.proc.kill()
        b.proc.wait()
    delete_namespace(nodes.urls, namespace)


@pytest.fixture(params=["one broker", "two brokers"])
def make_broker(request, make_local_broker):
    """make(**Config fields): a broker of its own for a test, or two of a cluster."""
    make = make_local_broker if request.param == "one broker" else None
    if make is None:
        make = request.getfixturevalue("make_broker_pair")
    return lambda **cfg: make(**{"scram_iterations": ITERATIONS, **cfg})


def client(broker, nick: str, **kw) -> Client:
    kw.setdefault("timeout", 5.0)
    return Client("127.0.0.1", broker.port, nick, **kw)


async def registered(broker, nick: str, rooms=("lobby",), password: str = PW) -> None:
    """`nick` registered as an account by its own guest session, in `rooms`, gone again."""
    c = client(broker, nick, rooms=list(rooms))
    await c.connect()
    assert (await c.register(password))["account"] == nick
    await c.close()


async def events_until(c: Client, done, timeout: float = 15.0) -> list:
    """The events `c` delivers until done(events) is true."""
    got: list = []
    deadline = time.monotonic() + timeout
    while not done(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {[(e.kind, e.room, e.text) for e in got]}"
        try:
            got.append(await c.next_event(left))
        except TimeoutError:
            pass
    return got


async def settled(broker, room: str, seq: int) -> None:
    """Every broker has published `room` up to `seq`: a cluster's other broker hears what
    was stored through one a moment later (an account counting its unread there would
    count what that broker has heard)."""
    for b in getattr(broker, "brokers", [broker]):
        c = Client("127.0.0.1", b.port, "settler", rooms=[room], backlog=0, timeout=5.0)
        await c.connect()
        assert await c.heard(room, seq, 5), f"{room} not at {seq} on a broker"
        await c.close()


async def refused(c: Client) -> ChatError:
    with pytest.raises(ChatError) as info:
        await c.connect()
    await c.close()
    return info.value


# ---------------------------------------------------------------------------- logging in


def test_a_registered_nick_needs_its_password(broker):
    """After /register the nick is the account's: without a password a HELLO is told to
    log in, a wrong one is refused (and the nick stays free), the right one logs in."""

    async def main() -> None:
        await registered(broker, "alice")
        assert (await refused(client(broker, "alice"))).code == m.Code.AUTH_REQUIRED
        wrong = await refused(client(broker, "alice", password="wrong horse"))
        assert (wrong.code, wrong.reason) == (m.Code.AUTH_FAILED, "wrong password for alice")
        bea = client(broker, "bea")
        await bea.connect()
        assert "alice" not in await bea.who()  # the refused logins took nothing
        alice = client(broker, "Alice", password=PW)
        await alice.connect()
        assert (alice.account, alice.nick) == ("alice", "Alice")
        assert "Alice" in await bea.who()
        with pytest.raises(ChatError) as other:  # a guest cannot take it while she is away
            await bea.set_nick("ALICE")
        assert other.value.code == m.Code.NICK_TAKEN
        await alice.close()
        with pytest.raises(ChatError) as away:
            await bea.set_nick("alice")
        assert away.value.code == m.Code.NICK_TAKEN
        await bea.close()

    asyncio.run(main())


def test_a_password_is_changed_with_the_old_one(broker):
    """change_password proves the old password; afterwards only the new one logs in."""

    async def main() -> None:
        await registered(broker, "ann")
        ann = client(broker, "ann", password=PW)
        await ann.connect()
        with pytest.raises(ChatError) as short:
            await ann.change_password(PW, "short")
        assert short.value.code == "BAD_REQUEST"
        with pytest.raises(ChatError) as wrong:
            await ann.change_password("not the password", "battery staple")
        assert wrong.value.code == m.Code.AUTH_FAILED
        await ann.change_password(PW, "battery staple")
        await ann.close()
        assert (await refused(client(broker, "ann", password=PW))).code == m.Code.AUTH_FAILED
        again = client(broker, "ann", password="battery staple")
        await again.connect()
        assert again.account == "ann"
        await again.close()

    asyncio.run(main())


def test_five_failed_logins_make_the_next_ones_wait_whatever_the_password(broker):
    """Five wrong passwords for one account from one address within a minute: the next
    attempt, even with the right password, gets RATE_LIMITED with retry_after."""

    async def main() -> None:
        await registered(broker, "carl")
        for _ in range(5):
            err = await refused(client(broker, "carl", password="guess guess"))
            assert err.code == m.Code.AUTH_FAILED
        err = await refused(client(broker, "carl", password=PW))
        assert err.code == m.Code.RATE_LIMITED
        assert 50 < err.body["retry_after"] <= 60
        dan = client(broker, "dan")  # other accounts and guests are not held up
        await dan.connect()
        await dan.close()

    asyncio.run(main())


def test_a_login_takes_over_the_accounts_session_at_once(broker):
    """A second login of an account while its first session is held gets in at once, as a
    second session of the account (devices.py): the first goes on, both hear the room, and
    the room sees neither a leave nor a join."""

    async def main() -> None:
        await registered(broker, "eve")
        tom = client(broker, "tom")
        await tom.connect()
        first = client(broker, "eve", password=PW)
        await first.connect()
        second = client(broker, "eve", password=PW, rooms=["lobby"])
        started = time.monotonic()
        await second.connect()
        assert time.monotonic() - started < 2  # no waiting for the first to end
        said = await second.say("lobby", "still me")
        assert await tom.heard("lobby", said, 5)
        assert await first.heard("lobby", said, 5) and first.connected
        seen = [e for e in await tom.history("lobby", limit=50) if e.nick == "eve"]
        assert [e.kind for e in seen] == ["join", "msg"]  # the registration's, then this
        await asyncio.gather(first.close(), second.close(), tom.close())

    asyncio.run(main())


def test_a_guest_waits_for_its_nick_held_by_a_lost_connection(broker):
    """A guest whose nick is held by a connection that went silent is told when it will be
    free and gets it then; a nick whose holder is alive is refused after a short wait."""

    async def main() -> None:
        ctx = zmq.Context()
        lost = ctx.socket(zmq.DEALER)
        lost.linger = 0
        lost.connect(f"tcp://127.0.0.1:{broker.port}")
        lost.send_multipart(m.encode_request("HELLO", b"1", {"version": 1, "nick": "gwen"}))
        assert lost.poll(5000) and lost.recv_multipart()[0] == b"OK"  # then silence
        waits: list[float] = []
        gwen = client(broker, "gwen", on_wait=waits.append)
        started = time.monotonic()
        await gwen.connect()
        assert gwen.nick == "gwen" and waits and 0 < waits[0] <= 4
        assert time.monotonic() - started < waits[0] + 2
        told: list[float] = []
        taken = client(broker, "gwen", wait_for_nick=10, on_wait=told.append)
        started = time.monotonic()
        err = await refused(taken)
        assert err.code == m.Code.NICK_TAKEN and told  # after the wait it was told, not 10 s:
        assert time.monotonic() - started < told[0] + 2  # (a cluster holds a lost nick longer)
        await gwen.close()
        ctx.destroy(linger=0)

    asyncio.run(main())


# ---------------------------------------------------------------------------- catching up


def test_after_a_login_what_is_unread_is_said_then_shown_in_order(broker):
    """Away from work and support, an account is told on login how much is unread in each
    room (mentions apart, folded like nicks) and from whom; then it sees its unread private
    message and the unread events of the room it enters, in order, then live ones."""

    async def main() -> None:
        await registered(broker, "fay", rooms=["work", "support"])
        bob = client(broker, "bob", rooms=["work", "support"])
        await bob.connect()
        await bob.say("work", "morning")
        await bob.say("work", "FAY: the build is red")
        await bob.say("work", "fixed it, thanks fay")
        work = await bob.say("work", "fayette is a town, not a mention")
        last = await bob.say("support", "a ticket")
        await bob.msg("fay", "lunch?")
        await settled(broker, "work", work)
        await settled(broker, "support", last)
        fay = client(broker, "fay", password=PW, rooms=["work"])
        await fay.connect()
        got = await events_until(
            fay,
            lambda got: (
                [e.text for e in got if e.kind == "msg"][-1:]
                == ["fayette is a town, not a mention"]
            ),
        )
        lines = [e.text for e in got if e.kind == "unread"]
        assert sorted(lines[:2]) == ["1 unread in support", "4 unread in work, 2 mention you"]
        assert lines[2:] == ["1 unread from bob"]  # rooms first, then people
        assert [e.text for e in got if e.kind == "private"] == ["lunch?"]
        shown = [e for e in got if e.room == "work" and e.kind == "msg"]
        assert [e.text for e in shown][0] == "morning" and all(e.data["unread"] for e in shown)
        assert [fay.mentions(e) for e in shown] == [False, True, True, False]
        assert set(fay.rooms) == {"work", "support"}  # back in both
        assert fay.unread["support"]["unread"] == 1 and fay.unread_privates["bob"]["unread"] == 1
        assert await fay.heard("support", last, 5)
        live = await bob.say("work", "anyone?")
        got = await events_until(fay, lambda got: any(e.text == "anyone?" for e in got))
        assert not got[-1].backlog and got[-1].seq == live
        await asyncio.gather(fay.close(), bob.close())

    asyncio.run(main())


def test_past_500_unread_the_rest_is_told_and_fetched(broker):
    """With 520 unread in a room, entering it gives the first 500 and a note that 20 more
    are unread; catch_up() after those gives the last 20."""

    async def main() -> None:
        await registered(broker, "gil", rooms=["work"])
        bo5 = client(broker, "bo5", rooms=["work"])
        await bo5.connect()
        for start in range(0, 520, 100):
            sends = (bo5.say("work", f"n{i}") for i in range(start, min(start + 100, 520)))
            seqs = await asyncio.gather(*sends)
        await settled(broker, "work", max(seqs))
        gil = client(broker, "gil", password=PW, rooms=["work"])
        await gil.connect()
        got = await events_until(gil, lambda got: any(e.data.get("more") for e in got))
        texts = [e.text for e in got if e.kind == "msg"]
        assert len(texts) <= 500 and texts[:2] == ["n0", "n1"]
        more = got[-1]
        assert more.text == f"{520 - len(texts)} more unread in work"
        rest = await gil.catch_up("work", more.data["after"])
        assert [e.text for e in rest.events if e.kind == "msg"] == texts_after(texts)
        assert rest.more == 0
        await asyncio.gather(gil.close(), bo5.close())

    def texts_after(texts: list[str]) -> list[str]:
        return [f"n{i}" for i in range(len(texts), 520)]

    asyncio.run(main())


def test_an_accounts_rooms_and_marks_outlast_its_sessions(broker):
    """The rooms an account joined stay its own until it leaves them; it comes back to the
    room it was in last; marks made by one session are what the next one starts from."""

    async def main() -> None:
        await registered(broker, "hal", rooms=["lobby"])
        hal = client(broker, "hal", password=PW)
        await hal.connect()
        await hal.join("work")
        await hal.leave("work")
        await hal.join("team")
        ted = client(broker, "ted", rooms=["team"])
        await ted.connect()
        seqs = [await ted.say("team", f"t{i}") for i in range(4)]
        assert await hal.heard("team", seqs[-1], 5)
        await settled(broker, "team", seqs[-1])
        hal.mark("team", seqs[1])  # read up to t1
        await hal.send_marks()
        await hal.close()
        again = client(broker, "hal", password=PW)
        await again.connect()
        assert again.want_rooms == ["team"] and set(again.rooms) == {"lobby", "team"}
        assert again.unread["team"]["unread"] == 2 and again.marks["team"] == seqs[1]
        got = await events_until(again, lambda got: any(e.text == "t3" for e in got))
        assert [e.text for e in got if e.kind == "msg"] == ["t2", "t3"]
        await asyncio.gather(again.close(), ted.close())

    asyncio.run(main())


# ---------------------------------------------------------------------------- standing


def test_a_ban_follows_the_account_whatever_its_nick(broker):
    """A ban of an account holds when it changes nick, and when it logs in again; a ban of
    the nick it has now bans the account."""

    async def main() -> None:
        await registered(broker, "ivy")
        boss = client(broker, "boss")
        await boss.connect()
        ivy = client(broker, "ivy", password=PW, rooms=["lobby"])
        await ivy.connect()
        await boss.ban("lobby", "ivy")
        await events_until(ivy, lambda got: any("banned" in e.text for e in got))
        await ivy.set_nick("ivan")
        with pytest.raises(ChatError) as banned:
            await ivy.join("lobby")
        assert banned.value.code == m.Code.BANNED
        await boss.unban("lobby", "ivy")
        await ivy.join("lobby")
        await boss.ban("lobby", "ivan")  # her nick now: the account is banned
        await events_until(ivy, lambda got: any("banned" in e.text for e in got))
        await ivy.close()
        back = client(broker, "ivy", password=PW, rooms=[])
        await back.connect()
        with pytest.raises(ChatError) as still:
            await back.join("lobby")
        assert still.value.code == m.Code.BANNED
        await asyncio.gather(back.close(), boss.close())

    asyncio.run(main())


def test_operators_are_accounts_whatever_their_nick(broker):
    """--ops names an account: it operates under another nick too."""

    async def main() -> None:
        await registered(broker, "jo")
        jo = client(broker, "jo", password=PW, rooms=["lobby"])
        await jo.connect()
        await jo.set_nick("joanna")
        kim = client(broker, "kim", rooms=["lobby"])
        await kim.connect()
        await jo.kick("lobby", "kim")
        await events_until(kim, lambda got: any("kicked" in e.text for e in got))
        await asyncio.gather(jo.close(), kim.close())

    asyncio.run(main())


def add_account(broker, nick: str, tmp_path) -> None:
    """`zmqchat-broker accounts add NICK` against the broker's database or cluster."""
    secret = tmp_path / "pw"
    secret.write_text(PW + "\n")
    if hasattr(broker, "brokers"):  # a cluster: its NATS servers and namespace
        args = broker.brokers[0].args
        where = [
            flag for f in ("--cluster", "--namespace") for flag in (f, args[args.index(f) + 1])
        ]
    else:
        where = ["--db", broker.cfg.db]
    command = ["accounts", "add", nick, *where, "--password-file", str(secret)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), *command, "--iterations", str(ITERATIONS)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"added {nick}"


def test_registered_only_refuses_guests_and_admits_accounts(make_broker, tmp_path):
    """With --registered-only a guest is refused with ACCOUNTS_ONLY; an account the
    operator added logs in."""
    broker = make_broker(registered_only=True)
    add_account(broker, "lee", tmp_path)

    async def main() -> None:
        err = await refused(client(broker, "guest"))
        assert err.code == m.Code.ACCOUNTS_ONLY and "accounts only" in err.reason
        lee = client(broker, "lee", password=PW)
        await lee.connect()
        assert lee.account == "lee"
        await lee.close()

    asyncio.run(main())


def test_a_private_message_to_an_account_away_is_kept_for_it(broker):
    """A private message to an account that is not connected is kept, and read at its
    next login; to a guest that is away it is refused as before."""

    async def main() -> None:
        await registered(broker, "max")
        pat = client(broker, "pat")
        await pat.connect()
        event = await pat.msg("max", "for later")
        assert event["to"] == "max"
        with pytest.raises(ChatError) as nobody:
            await pat.msg("nobody", "hello?")
        assert nobody.value.code == m.Code.NO_SUCH_NICK
        maxi = client(broker, "max", password=PW)
        await maxi.connect()
        got = await events_until(maxi, lambda got: any(e.kind == "private" for e in got))
        assert got[-1].text == "for later" and got[-1].data["unread"]
        assert json.loads(json.dumps(maxi.unread_privates))["pat"]["unread"] == 1
        await asyncio.gather(maxi.close(), pat.close())

    asyncio.run(main())


def test_a_bot_logs_in_with_its_password(broker):
    """A bot with an account logs in with password= and answers as usual."""
    from zmqchat import Bot

    async def setup() -> None:
        await registered(broker, "echobot")

    asyncio.run(setup())
    bot = Bot(prefix="!")

    @bot.command("echo")
    def echo(ctx, text: str):
        ctx.reply(text)

    bot.start("127.0.0.1", broker.port, "echobot", ["lobby"], password=PW)
    try:
        assert bot.client is not None and bot.client.account == "echobot"

        async def ask() -> str:
            me = client(broker, "nell")
            await me.connect()
            await me.say("lobby", "!echo hi")
            got = await events_until(
                me, lambda got: any(e.nick == "echobot" and e.kind == "msg" for e in got)
            )
            await me.close()
            return got[-1].text

        assert asyncio.run(ask()) == "hi"
    finally:
        bot.stop()


def test_an_account_added_by_the_operator_takes_its_nick_from_a_guest(broker, tmp_path):
    """A guest who holds a nick the operator then registers loses it to the account's
    login at once, and is told so."""

    async def main() -> None:
        guest = client(broker, "olga")
        await guest.connect()
        add_account(broker, "olga", tmp_path)
        owner = client(broker, "olga", password=PW)
        await owner.connect()
        assert owner.account == "olga"
        told = await events_until(guest, lambda got: any(e.kind == "status" for e in got))
        assert "logged in from another connection" in told[-1].text
        await asyncio.gather(owner.close(), guest.close())

    asyncio.run(main())


def test_a_password_changed_on_one_device_ends_the_other_devices_sessions(broker):
    """An account on two devices (on two brokers of a cluster); one changes the password:
    the other's session ends within seconds and its client says it cannot log in again
    (a leaked password, changed, locks out whoever else holds it, at once); the device
    that changed it stays."""

    async def main() -> None:
        await registered(broker, "rae")
        one, other = client(broker, "rae", password=PW), client(broker, "rae", password=PW)
        await one.connect()
        await other.connect()
        await one.change_password(PW, "a new password")
        got = await events_until(other, lambda got: any("cannot log in" in e.text for e in got))
        assert got[-1].text == "cannot log in again: the password for rae was changed"
        assert await one.say("lobby", "still here") > 0
        assert one.connected and not other.connected
        assert other.login_refused is not None and one.login_refused is None
        assert other.login_refused.code == "AUTH_FAILED"
        await one.close()
        await other.close()

    asyncio.run(main())


def test_a_bot_whose_password_changed_stops_and_says_why(broker):
    """A bot logged in to an account whose password is changed (on another device, here;
    the operator's passwd alike) stops instead of running on with a closed client:
    `arun` raises the refusal (and `run()` exits with it)."""

    async def main() -> None:
        await registered(broker, "botty")
        bot = Bot()
        running = asyncio.create_task(bot.arun("127.0.0.1", broker.port, "botty", password=PW))
        deadline = time.monotonic() + 15
        while bot.client is None or not bot.client.connected:
            assert time.monotonic() < deadline and not running.done(), "the bot did not log in"
            await asyncio.sleep(0.02)
        owner = client(broker, "botty", password=PW)
        await owner.connect()
        await owner.change_password(PW, "a new password")
        with pytest.raises(ChatError) as refused:
            await asyncio.wait_for(running, 15)
        assert refused.value.code == m.Code.AUTH_FAILED
        assert refused.value.reason == "the password for botty was changed"
        await owner.close()

    asyncio.run(main())


def test_a_client_whose_password_changed_meanwhile_stops_reconnecting(make_local_broker, tmp_path):
    """When the broker comes back and the account's password is not the one the client
    has (the operator changed it meanwhile), the client says so and stops, instead of
    counting failed logins forever."""
    broker = make_local_broker(scram_iterations=ITERATIONS)

    async def main() -> None:
        await registered(broker, "quinn")
        quinn = client(broker, "quinn", password=PW)
        await quinn.connect()
        secret = tmp_path / "new"
        secret.write_text("a new password\n")
        command = ["accounts", "passwd", "quinn", "--db", broker.cfg.db]
        done = subprocess.run(
            [sys.executable, str(ROOT / "broker.py"), *command, "--password-file", str(secret)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        await asyncio.to_thread(broker.restart)
        got = await events_until(quinn, lambda got: any("cannot log in" in e.text for e in got))
        assert got[-1].text == "cannot log in again: wrong password for quinn"
        await quinn.close()

    asyncio.run(main())
