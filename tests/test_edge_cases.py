"""Requests at the edges: repeated ids, huge numbers, lurking rejoins, closing mid-send."""

from __future__ import annotations

import asyncio

import pytest
import zmq
from test_security import Collector, call, hello, raw_dealer, until

from zmqchat import ChatError, Client
from zmqchat._local import store


def stored(db: str, room: str = "lobby") -> list[dict]:
    return store.stored_events(db, room)


def test_repeated_id_in_one_batch_is_stored_once(broker):
    """A SAY carrying the same message id twice stores it once and acks both with its seq;
    the room's numbering has no hole."""
    s = raw_dealer(zmq.Context.instance(), broker.port)
    hello(s, "dup")
    call(s, "JOIN", {"room": "lobby"})
    r = call(
        s,
        "SAY",
        {
            "room": "lobby",
            "msgs": [
                {"id": "same", "text": "one"},
                {"id": "same", "text": "two"},
                {"id": "other", "text": "three"},
            ],
        },
        b"2",
    )
    assert r.kind == "OK"
    (a, sa), (b, sb), (c, sc) = r.body["acks"]
    assert sa == sb and sc == sa + 1
    events = stored(broker.cfg.db)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["text"] for e in events if e["kind"] == "msg"] == ["one", "three"]
    s.close()


def test_another_senders_message_id_is_no_collision(broker):
    """Message ids are per sender (as in a cluster): bob reusing ann's id neither touches
    ann's message nor is taken for a retry of it; both are stored, each under its sender."""
    ctx = zmq.Context.instance()
    a, b = raw_dealer(ctx, broker.port), raw_dealer(ctx, broker.port)
    hello(a, "ann")
    hello(b, "bob")
    for s in (a, b):
        call(s, "JOIN", {"room": "lobby"})
    mine = call(a, "SAY", {"room": "lobby", "msgs": [{"id": "ann-1", "text": "mine"}]}, b"2")
    assert mine.kind == "OK"
    r = call(
        b,
        "SAY",
        {
            "room": "lobby",
            "msgs": [{"id": "bob-1", "text": "new"}, {"id": "ann-1", "text": "his own"}],
        },
        b"2",
    )
    assert r.kind == "OK" and r.body["acks"][1][1] != mine.body["acks"][0][1]
    said = [(e["nick"], e["text"]) for e in stored(broker.cfg.db) if e["kind"] == "msg"]
    assert said == [("ann", "mine"), ("bob", "new"), ("bob", "his own")]
    a.close()
    b.close()


def test_huge_numbers_get_an_error_reply(broker):
    """HISTORY with numbers beyond what SQLite stores gets BAD_REQUEST, not silence."""
    s = raw_dealer(zmq.Context.instance(), broker.port)
    hello(s, "big")
    call(s, "JOIN", {"room": "lobby"})
    for field in ("after", "before", "limit"):
        r = call(s, "HISTORY", {"room": "lobby", field: 2**64}, field.encode())
        assert (r.kind, r.body.get("code")) == ("ERROR", "BAD_REQUEST")
    # `since` is a time: any finite number is one (none that far ahead has events); an
    # integer too large even for a float is refused. Found by scripts/fuzz_broker.py.
    r = call(s, "HISTORY", {"room": "lobby", "since": 2**70}, b"since")
    assert (r.kind, r.body["events"]) == ("OK", [])
    r = call(s, "HISTORY", {"room": "lobby", "since": 10**400}, b"since2")
    assert (r.kind, r.body.get("code")) == ("ERROR", "BAD_REQUEST")
    s.close()


def test_resume_join_by_a_non_member_is_announced(broker):
    """Claiming to 'resume' does not let a stranger (or a kicked member) join unannounced."""

    async def scenario() -> None:
        async with Client("127.0.0.1", broker.port, "alice") as alice:
            seen = Collector(alice)
            s = raw_dealer(zmq.Context.instance(), broker.port)
            hello(s, "lurker")
            assert call(s, "JOIN", {"room": "lobby", "resume": True}).kind == "OK"
            await until(lambda: any(e.text == "lurker joined" for e in seen.events))
            s.close()

    asyncio.run(scenario())


def test_join_and_leave_are_rate_limited(make_broker):
    """Joining and leaving in a loop runs into RATE_LIMITED like sending does."""
    b = make_broker(rate=5.0, burst=10)
    s = raw_dealer(zmq.Context.instance(), b.port)
    hello(s, "churn")
    codes = [
        call(s, k, {"room": "work"}, f"{i}".encode()).body.get("code", "OK")
        for i, k in enumerate(["JOIN", "LEAVE"] * 10)
    ]
    assert "RATE_LIMITED" in codes
    s.close()


def test_rejoin_refused_after_restart_still_reconnects(make_broker):
    """A room gone after a broker restart is reported; the client reconnects to the rest."""
    b = make_broker()

    async def scenario() -> None:
        c = Client("127.0.0.1", b.port, "wanderer", rooms=["lobby", "team"], backlog=0)
        await c.connect()
        seen = Collector(c)
        b.stop()
        b.cfg.rooms = ("lobby", "work")
        b.start()
        await until(lambda: "reconnected" in [e.text for e in seen.events], 10)
        assert any(e.text.startswith("could not rejoin team") for e in seen.events)
        assert set(c.rooms) == {"lobby"}
        assert await c.say("lobby", "still here") > 0
        await c.close()

    asyncio.run(scenario())


def test_close_fails_pending_sends_and_refuses_new_ones(broker):
    """After close(), waiting sends fail with CLOSED instead of hanging, and so do new ones."""

    async def scenario() -> None:
        c = Client("127.0.0.1", broker.port, "closer", reconnect=False)
        await c.connect()
        broker.stop()  # nothing will acknowledge from now on
        pending = asyncio.ensure_future(c.say("lobby", "into the void"))
        await until(lambda: c.pending())
        await c.close()
        with pytest.raises(ChatError) as err:
            await asyncio.wait_for(pending, 2)
        assert err.value.code == "CLOSED"
        with pytest.raises(ChatError) as err:
            await c.say("lobby", "after close")
        assert err.value.code == "CLOSED"

    asyncio.run(scenario())


def test_a_broker_that_cannot_bind_creates_no_database(tmp_path):
    """A port taken (even after the flags were checked) stops the broker before it makes
    its history database: nothing is left in the folder, and the port's owner is untouched."""
    from zmqchat._config import Config
    from zmqchat.broker._loop import Broker

    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    taken.linger = 0
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(zmq.ZMQError):
            Broker(Config(port=port, pub_port=0, db=str(tmp_path / "chat.db")), ctx=ctx)
        assert list(tmp_path.iterdir()) == []
        assert taken.getsockopt(zmq.LAST_ENDPOINT).endswith(f":{port}".encode())
    finally:
        taken.close()
        ctx.term()
