"""The broker's core without sockets: requests in, replies, pushes and published batches out.

The core runs with its real local state (zmqchat._local) over a real history store in a
temporary folder, with a clock that moves only when a test moves it, and with a room log
whose appends wait, as a cluster's do, to show that a reply waits for its append."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.held_log import HeldLog
from zmqchat import protocol as m
from zmqchat._config import Config
from zmqchat._core.core import Core
from zmqchat._core.state import Delivery
from zmqchat._local.state import LocalLog, LocalPresence, LocalRegistry
from zmqchat._local.store import Store
from zmqchat.protocol import Code, Kind, ProtocolError


class FakeClock:
    """A clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.wall = 1_800_000_000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


_stores: list[Store] = []  # closed after each test


@pytest.fixture(autouse=True)
def _close_stores(tmp_path, monkeypatch):
    monkeypatch.setattr(Harness, "folder", tmp_path)
    yield
    while _stores:
        _stores.pop().close()


class Harness:
    """A core, the effects it produced, and connections that talk to it."""

    folder: Any = None  # the test's temporary folder (set by the fixture above)

    def __init__(self, held: bool = False, **cfg: Any) -> None:
        self.cfg = Config(heartbeat=2.0, **cfg)
        self.store = Store(str(self.folder / f"chat{len(_stores)}.db"))
        _stores.append(self.store)
        self.local = LocalLog(self.store)
        self.log: Any = HeldLog(self.local) if held else self.local
        self.registry = LocalRegistry(
            self.store, self.cfg.rooms, self.cfg.operators, self.cfg.allow_new_rooms
        )
        self.clock = FakeClock()
        self.core = Core(
            self.cfg.rules(),
            self.log,
            self.registry,
            LocalPresence(),
            name="b1",
            pub_port=9002,
            motd="welcome",
            clock=self.clock,
        )
        self.sent: list[list[bytes]] = []  # every ROUTER frame set, in order
        self.published: list[tuple[bytes, list[dict[str, Any]]]] = []

    def flush(self) -> None:
        """What the broker's loop does at the end of a pass."""
        for delivery in self.log.follow():
            self.core.deliver(delivery)
        self.published += [(t, json.loads(b)) for t, b in self.core.pubs]
        self.core.pubs.clear()
        self.sent += self.core.outbox
        self.core.outbox.clear()

    def conn(self, name: str) -> Conn:
        return Conn(self, name.encode())


class Conn:
    def __init__(self, h: Harness, rid: bytes) -> None:
        self.h, self.rid, self.n = h, rid, 0

    def send(self, kind: str, **body: Any) -> bytes:
        self.n += 1
        label = str(self.n).encode()
        data = b"chunk" if kind == "PUT" else None  # a file chunk: its fourth frame
        self.h.core.request(self.rid, m.encode_request(kind, label, body, data))
        self.h.flush()
        return label

    def reply(self, label: bytes) -> tuple[str, dict[str, Any]]:
        found = [f for f in self.h.sent if f[0] == self.rid and f[2] == label]
        assert len(found) <= 1, "more than one reply to one request"
        return (found[0][1].decode(), json.loads(found[0][3])) if found else ("", {})

    def ask(self, kind: str, **body: Any) -> dict[str, Any]:
        got_kind, got = self.reply(self.send(kind, **body))
        assert got_kind == "OK", got
        return got

    def pushes(self, kind: str) -> list[dict[str, Any]]:
        return [
            json.loads(f[3])
            for f in self.h.sent
            if f[0] == self.rid and f[2] == b"" and f[1] == kind.encode()
        ]

    def hello(self, nick: str, **extra: Any) -> dict[str, Any]:
        return self.ask("HELLO", version=1, nick=nick, token=f"{nick}-token-0123456789", **extra)


def events(h: Harness, room: str) -> list[dict[str, Any]]:
    return [
        e
        for topic, batch in h.published
        if topic.startswith(room.encode() + b"\x00")
        for e in batch
    ]


def test_join_say_publishes_in_order_and_acknowledges_after_storing():
    """A member's message is stored, published under the room's topic and acknowledged."""
    h = Harness()
    ann = h.conn("ann")
    welcome = ann.hello("ann")
    assert welcome["broker"] == "b1" and welcome["rooms"] == ["lobby", "work", "support", "team"]
    joined = ann.ask("JOIN", room="lobby")
    assert joined["seq"] == 0 and joined["members"] == ["ann"]
    ack = ann.ask("SAY", room="lobby", msgs=[{"id": "c1", "text": "hi"}])
    assert ack["acks"] == [["c1", 2]]
    assert [(e["seq"], e["kind"], e["nick"]) for e in events(h, "lobby")] == [
        (1, "join", "ann"),
        (2, "msg", "ann"),
    ]
    stored = [
        json.loads(e) for e in h.store.history("lobby", after=0, before=None, since=None, limit=9)
    ]
    assert [(e["seq"], e["text"]) for e in stored] == [(1, "ann joined"), (2, "hi")]


def test_a_retried_message_is_stored_once_with_its_first_number():
    """The same client message id sent twice gets one event and the same number."""
    h = Harness()
    ann = h.conn("ann")
    ann.hello("ann")
    ann.ask("JOIN", room="lobby")
    first = ann.ask(
        "SAY", room="lobby", msgs=[{"id": "c1", "text": "hi"}, {"id": "c1", "text": "hi"}]
    )
    again = ann.ask("SAY", room="lobby", msgs=[{"id": "c1", "text": "hi"}])
    assert first["acks"] == [["c1", 2], ["c1", 2]] and again["acks"] == [["c1", 2]]
    assert [e["seq"] for e in events(h, "lobby")] == [1, 2]


def test_a_reply_waits_for_its_append_and_an_unreachable_log_is_an_error():
    """With a log that answers later (a cluster), nothing is acknowledged until it does;
    when it fails, the one reply is the error."""
    h = Harness(held=True)
    ann = h.conn("ann")
    ann.hello("ann")
    h.log.release()
    label = ann.send("JOIN", room="lobby")
    assert ann.reply(label) == ("", {})  # the join notice is not acknowledged yet
    h.log.release()
    h.flush()
    assert ann.reply(label)[1]["seq"] == 0
    label = ann.send("SAY", room="lobby", msgs=[{"id": "c1", "text": "hi"}])
    assert ann.reply(label) == ("", {})
    h.log.release(ProtocolError(Code.UNAVAILABLE, "no quorum"))
    h.flush()
    assert ann.reply(label) == ("ERROR", {"code": "UNAVAILABLE", "reason": "no quorum"})


def test_a_nick_is_held_once_and_a_resume_takes_it_back_quietly():
    """A second client cannot take a held nick; the same client resuming with its token
    can, and its rejoin is not announced."""
    h = Harness()
    ann = h.conn("ann")
    ann.hello("ann")
    ann.ask("JOIN", room="lobby")
    other = h.conn("other")
    assert other.reply(other.send("HELLO", version=1, nick="ANN"))[1]["code"] == "NICK_TAKEN"
    back = h.conn("ann2")
    back.hello("ann", resume=True)
    back.ask("JOIN", room="lobby", resume=True)
    assert [e["kind"] for e in events(h, "lobby")] == ["join"]
    assert ann.reply(ann.send("PING"))[1]["code"] == "NO_HELLO"  # the old connection is over


def test_leaving_rekeys_the_room_after_the_notice():
    """The leave notice goes out on the old topic; the members who stay get a new grant, and
    the old grants no longer let anyone in."""
    h = Harness()
    ann, bob = h.conn("ann"), h.conn("bob")
    ann.hello("ann")
    bob.hello("bob")
    grant = ann.ask("JOIN", room="lobby")["grant"]
    bob_grant = bob.ask("JOIN", room="lobby")["grant"]
    assert h.core.subscription(bob_grant.encode())[1] is not None
    old_topic = h.published[-1][0]
    bob.ask("LEAVE", room="lobby")
    assert h.published[-1] == (old_topic, [events(h, "lobby")[-1]])
    assert events(h, "lobby")[-1]["kind"] == "leave"
    new_grant = ann.pushes("GRANT")[-1]["grant"]
    assert h.core.subscription(grant.encode()) == (None, None)  # the old epoch
    assert h.core.subscription(bob_grant.encode()) == (None, None)  # used, and bob left
    _, topic = h.core.subscription(new_grant.encode())
    assert topic is not None and topic != old_topic
    ann.ask("SAY", room="lobby", msgs=[{"id": "c1", "text": "after"}])
    assert h.published[-1][0] == topic


def test_a_kick_made_by_another_broker_removes_our_member():
    """A kick notice published from the shared log takes the target out here and tells it."""
    h = Harness()
    bob = h.conn("bob")
    bob.hello("bob")
    bob.ask("JOIN", room="lobby")
    seq = h.local.last("lobby") + 1
    kick = m.encode_event(
        "lobby",
        seq,
        1.0,
        "bob",
        "kick",
        "bob was kicked by op",
        None,
        {"by": "op", "reason": "spam"},
    )
    h.core.deliver(Delivery("lobby", seq, [kick], [seq]))
    h.flush()
    assert bob.pushes("KICKED") == [{"room": "lobby", "by": "op", "reason": "spam", "kind": "kick"}]
    assert (
        bob.reply(bob.send("SAY", room="lobby", msgs=[{"id": "x", "text": "hi"}]))[1]["code"]
        == "NOT_MEMBER"
    )


def test_a_session_resumed_on_another_broker_ends_here_quietly():
    """When the registry says a nick moved elsewhere, our session for it ends without a
    leave notice; when it says the nick was freed, the client is told it expired."""
    h = Harness()
    ann = h.conn("ann")
    ann.hello("ann")
    ann.ask("JOIN", room="lobby")
    moved = h.registry.holder(m.nick_key("ann"))
    assert moved is not None
    elsewhere = type(moved)("other-sid", "ann", moved.key, moved.token_hash, "", False, "b2")
    h.core.identity_changed(moved.key, elsewhere)
    h.flush()
    assert [e["kind"] for e in events(h, "lobby")] == ["join"]
    assert ann.reply(ann.send("PING"))[1]["code"] == "NO_HELLO"


def test_reaping_a_dead_brokers_session_announces_it_once():
    """A session whose broker died is announced as lost in each of its rooms, once."""
    h = Harness()
    ann = h.conn("ann")
    ann.hello("ann")
    ann.ask("JOIN", room="lobby")
    ann.ask("JOIN", room="work")
    ident = h.registry.holder(m.nick_key("ann"))
    h.core.identity_changed(ident.key, type(ident)("x", "ann", ident.key, "", "", False, "b9"))
    h.core.reap(ident)
    h.core.reap(ident)
    h.flush()
    for room in ("lobby", "work"):
        assert [e["text"] for e in events(h, room) if e["kind"] == "leave"] == [
            "ann left (connection lost)"
        ]


VALID: dict[Kind, dict[str, Any]] = {
    Kind.HELLO: {"version": 1, "nick": "ann"},
    Kind.JOIN: {"room": "lobby"},
    Kind.LEAVE: {"room": "lobby"},
    Kind.SAY: {"room": "lobby", "msgs": [{"id": "a", "text": "b"}]},
    Kind.PRIV: {"to": "bob", "text": "hi", "id": "p"},
    Kind.ROOMS: {},
    Kind.WHO: {},
    Kind.NICK: {"nick": "ann2"},
    Kind.TOPIC: {"room": "lobby"},
    Kind.HISTORY: {"room": "lobby"},
    Kind.PING: {},
    Kind.BYE: {},
    Kind.KICK: {"room": "lobby", "nick": "bob"},
    Kind.BAN: {"room": "lobby", "nick": "bob"},
    Kind.UNBAN: {"room": "lobby", "nick": "bob"},
    Kind.UPLOAD: {"room": "lobby", "id": "a" * 32, "name": "x", "size": 1, "sha256": "0" * 64},
    Kind.PUT: {"upload": "b" * 32, "offset": 0},
    Kind.GET: {"file": "0123abcd", "offset": 0},
    Kind.FILES: {"room": "lobby"},
    Kind.FILE: {"file": "0123abcd"},
    Kind.RMFILE: {"file": "0123abcd"},
}
VALID.update(  # edits, removals and search (issue 23)
    {
        Kind.EDIT: {"room": "lobby", "seq": 1, "text": "x"},
        Kind.DELETE: {"room": "lobby", "seq": 1},
        Kind.SEARCH: {"query": "x"},
    }
)


@pytest.mark.parametrize("kind", [k for k in Kind if k is not Kind.HELLO])
def test_every_command_gets_exactly_one_reply_before_hello(kind):
    """Without a session every command but HELLO is refused with one NO_HELLO reply, and
    after HELLO each gets exactly one reply (OK or an error)."""
    h = Harness()
    c = h.conn("x")
    assert c.reply(c.send(kind.value, **VALID[kind]))[1]["code"] == "NO_HELLO"
    c.hello("ann")
    got_kind, _ = c.reply(c.send(kind.value, **VALID[kind]))
    assert got_kind in ("OK", "ERROR")


def test_a_connections_requests_are_answered_in_order_while_others_go_on():
    """While one request of a connection waits for the shared state, that connection's
    next requests wait behind it (a JOIN then a SAY stay in that order); another
    connection's requests are answered meanwhile."""
    h = Harness(held=True)
    ann, bob = h.conn("ann"), h.conn("bob")
    ann.hello("ann")
    bob.hello("bob")
    join = ann.send("JOIN", room="lobby")
    say = ann.send("SAY", room="lobby", msgs=[{"id": "c1", "text": "after the join"}])
    ping = bob.send("PING")
    assert bob.reply(ping)[0] == "OK"  # bob is not held up
    assert ann.reply(join) == ("", {}) and ann.reply(say) == ("", {})
    h.log.release()  # the join notice is stored
    h.flush()
    assert ann.reply(join)[0] == "OK"
    assert ann.reply(say) == ("", {})  # now the SAY waits for its own
    h.log.release()
    h.flush()
    assert ann.reply(say)[1]["acks"] == [["c1", 2]]
    labels = [f[2] for f in h.sent if f[0] == b"ann" and f[2]]
    assert labels.index(join) < labels.index(say)


def test_a_connections_says_overlap_and_keep_their_order():
    """SAYs of one connection do not wait for one another's acknowledgement (the log keeps
    their order), but a request after them waits until they are answered."""
    h = Harness(held=True)
    ann = h.conn("ann")
    ann.hello("ann")
    h.log.release()
    ann.send("JOIN", room="lobby")
    h.log.release()
    h.flush()
    says = [ann.send("SAY", room="lobby", msgs=[{"id": f"c{i}", "text": f"{i}"}]) for i in range(3)]
    topic = ann.send("TOPIC", room="lobby", text="later")
    assert len(h.log.held) == 3  # all three appended at once, in order
    assert all(ann.reply(label) == ("", {}) for label in [*says, topic])
    h.log.release()
    h.flush()
    assert [ann.reply(label)[1]["acks"][0][1] for label in says] == [2, 3, 4]
    h.log.release()  # the topic's own append
    h.flush()
    assert ann.reply(topic)[1]["topic"] == "later"


# ---------------------------------------------------------------------------- time, moved


def test_a_session_silent_for_three_heartbeats_is_dropped_with_a_notice():
    """Moving the clock past three heartbeats without a word from a client ends its
    session at the next sweep: its rooms hear that it left, and its nick is free."""
    h = Harness()
    ann, bob = h.conn("ann"), h.conn("bob")
    ann.hello("ann")
    bob.hello("bob")
    ann.ask("JOIN", room="lobby")
    bob.ask("JOIN", room="lobby")
    h.clock.advance(5.9)  # under 3 x 2 s
    bob.ask("PING")
    h.core.sweep()
    h.flush()
    assert [e["kind"] for e in events(h, "lobby")] == ["join", "join"]
    h.clock.advance(0.2)  # ann: 6.1 s of silence; bob spoke 0.2 s ago
    h.core.sweep()
    h.flush()
    assert [e["text"] for e in events(h, "lobby")][-1] == "ann left (connection lost)"
    assert h.registry.holder(m.nick_key("ann")) is None
    assert h.registry.holder(m.nick_key("bob")) is not None


def test_a_grant_expires_when_the_clock_passes_its_time_to_live():
    """A grant not used within GRANT_TTL seconds no longer lets its holder in."""
    from zmqchat._core.base import GRANT_TTL

    h = Harness()
    ann = h.conn("ann")
    ann.hello("ann")
    fresh = ann.ask("JOIN", room="work")["grant"]
    late = ann.ask("JOIN", room="lobby")["grant"]
    h.clock.advance(GRANT_TTL - 1)
    assert h.core.subscription(fresh.encode())[1] is not None
    h.clock.advance(2)
    assert h.core.subscription(late.encode()) == (None, None)


def test_private_messages_are_replayed_on_resume_only_within_the_window():
    """A resuming client is sent again the private messages of the last REPLAY_WINDOW
    seconds (one may have gone to its dying connection); older ones are not replayed."""
    from zmqchat._core.sessions import REPLAY_WINDOW

    h = Harness()
    ann, bob = h.conn("ann"), h.conn("bob")
    ann.hello("ann")
    bob.hello("bob")
    ann.ask("PRIV", to="bob", text="early", id="p1")
    h.clock.advance(REPLAY_WINDOW - 10)
    ann.ask("PRIV", to="bob", text="late", id="p2")
    h.clock.advance(20)  # "early" is now past the window, "late" within it
    back = h.conn("bob2")
    back.hello("bob", resume=True, privates_since=0)
    assert [p["event"]["text"] for p in back.pushes("PRIVATE")] == ["late"]
