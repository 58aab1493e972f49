"""The state interfaces' contract (zmqchat._core.state), run against both implementations:
one broker (memory and a real SQLite store) and a cluster (NATS JetStream, on the session's
3-node cluster). Where the interface promises the same, both must behave the same: the
core never learns which one it has.

A feature that adds shared state adds its promises here, for both."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import wait_for
from zmqchat import protocol as m
from zmqchat._config import Config
from zmqchat._core import search
from zmqchat._core.accounts_state import FAILURES_KEPT, Account, AccountStore
from zmqchat._core.state import (
    Delivery,
    Draft,
    Identity,
    Member,
    Op,
    Registry,
    RoomLog,
    RoomSettings,
)
from zmqchat._scram import make_keys
from zmqchat.protocol import Code, EventKind, ProtocolError

ROOMS = ("lobby", "work")


@dataclass
class State:
    """One implementation, and how to wait for what it does."""

    log: RoomLog
    registry: Registry
    settle: Any  # settle(op) -> op's value, or raises its error
    follow: Any  # follow() -> the deliveries that have become durable (waits for some)
    broker: str
    accounts: AccountStore  # issue 21
    other: Any  # other() -> the same shared state as another broker (a restart) sees it


def _local(tmp_path) -> Iterator[State]:
    from zmqchat._local.accounts import LocalAccounts
    from zmqchat._local.state import LocalLog, LocalRegistry
    from zmqchat._local.store import Store

    store = Store(str(tmp_path / "chat.db"))
    log = LocalLog(store)
    registry = LocalRegistry(store, ROOMS, ("boss",), False)
    stores = [store]

    def other() -> AccountStore:  # one broker: the same database, after a restart
        stores[-1].close()
        stores.append(Store(str(tmp_path / "chat.db")))
        return LocalAccounts(stores[-1])

    def settle(op: Op) -> Any:
        assert op.done, "one broker answers at once"
        if op.error is not None:
            raise op.error
        return op.value

    try:
        yield State(log, registry, settle, log.follow, "b1", LocalAccounts(store), other)
    finally:
        stores[-1].close()


def _cluster(nats_nodes) -> Iterator[State]:
    from scripts.nats_local import delete_namespace
    from zmqchat._cluster.state import Cluster

    namespace = "c" + secrets.token_hex(4)
    cfg = Config(
        cluster_urls=nats_nodes.urls,
        namespace=namespace,
        rooms=ROOMS,
        operators=("boss",),
        heartbeat=0.5,
    )
    cluster = Cluster(cfg)
    cluster.start("b1")
    clusters = [cluster]

    def run_until(done: Any, timeout: float = 10.0) -> None:
        async def go() -> None:
            deadline = time.monotonic() + timeout
            while not done():
                assert time.monotonic() < deadline, "the cluster did not answer in time"
                for c in clusters:
                    c.send_pending()
                await clusters[-1].wait(0.05)
                for c in clusters:
                    c.drain()

        clusters[-1].loop.run_until_complete(go())

    def other() -> AccountStore:  # a cluster: another broker on the same buckets
        b2 = Cluster(cfg)
        b2.start("b2")
        clusters.append(b2)
        return b2.accounts

    def settle(op: Op) -> Any:
        run_until(lambda: op.done)
        if op.error is not None:
            raise op.error
        return op.value

    def follow() -> list[Delivery]:
        out: list[Delivery] = []
        run_until(lambda: bool(out.extend(cluster.log.follow()) or out))
        return out

    for room in ROOMS:  # as a broker does from its rooms' first local members on
        settle(cluster.log.follow_room(room))
    try:
        yield State(cluster.log, cluster.registry, settle, follow, "b1", cluster.accounts, other)
    finally:
        for c in clusters:
            c.close()
        delete_namespace(nats_nodes.urls, namespace)


@pytest.fixture(params=["one broker", "cluster"])
def state(request, tmp_path) -> Iterator[State]:
    if request.param == "one broker":
        yield from _local(tmp_path)
    else:
        yield from _cluster(request.getfixturevalue("nats_nodes"))


def draft(text: str, owner: str = "nick:ann", cmid: str | None = None, **kw: Any) -> Draft:
    return Draft(kw.pop("kind", EventKind.MSG), "ann", text, owner, cmid, kw or None)


def ident(nick: str, sid: str, broker: str = "b1") -> Identity:
    return Identity(sid, nick, m.nick_key(nick), "", "", False, broker)


# ---------------------------------------------------------------------------- the room log


def test_appends_are_numbered_in_order_and_delivered_once(state):
    """A room's events get the numbers after its last one, in order, and become durable
    deliveries of that room in that order; the departures among them are named."""
    first = state.log.last("lobby") + 1
    seqs = state.settle(
        state.log.append("lobby", [draft("one"), draft("bye", kind=EventKind.LEAVE), draft("two")])
    )
    assert seqs == [first, first + 1, first + 2]
    (delivery,) = [d for d in state.follow() if d.room == "lobby"]
    assert delivery.first == first
    assert [json.loads(e)["text"] for e in delivery.events] == ["one", "bye", "two"]
    assert [json.loads(e)["seq"] for e in delivery.events] == seqs
    assert delivery.departures == [first + 1]
    assert state.log.last("lobby") == first + 2


def test_message_ids_are_per_sender(state):
    """A stored client message id is known for its sender, with its room and number; the
    same id from another sender is not theirs (ids never collide across senders)."""
    (seq,) = state.settle(state.log.append("work", [draft("hi", "nick:ann", "id-1")]))
    state.follow()
    assert state.log.known_ids("nick:ann", ["id-1", "id-2"]) == {
        "id-1": ("nick:ann", "work", seq),
        "id-2": None,
    }
    assert state.log.known_ids("nick:bob", ["id-1"]) == {"id-1": None}
    (other,) = state.settle(state.log.append("work", [draft("mine too", "nick:bob", "id-1")]))
    state.follow()
    assert other == seq + 1
    assert state.log.known_ids("nick:bob", ["id-1"]) == {"id-1": ("nick:bob", "work", other)}


def test_history_reads_after_before_and_the_latest(state):
    """read() gives the first `limit` after a number, the last `limit` before one, or the
    latest `limit`, oldest first, as JSON texts."""
    state.settle(state.log.append("work", [draft(f"m{i}") for i in range(1, 8)]))
    state.follow()

    def texts(**q: Any) -> list[str]:
        base = {"after": None, "before": None, "since": None}
        return [json.loads(t)["text"] for t in state.settle(state.log.read("work", **base | q))]

    assert texts(limit=3) == ["m5", "m6", "m7"]
    assert texts(after=2, limit=2) == ["m3", "m4"]
    assert texts(before=3, limit=5) == ["m1", "m2"]
    assert texts(after=7, limit=5) == []


def test_private_messages_reach_their_recipient_and_both_parties_history(state):
    """A private message is kept for its recipient (replay) and in the conversation of its
    two parties, seen from either side; its id is known for its sender."""
    ann, bob = ident("ann", "s1"), ident("bob", "s2")
    for i, (frm, to) in enumerate([(ann, bob), (bob, ann), (ann, bob)]):
        ts = time.time()
        event = {"kind": "private", "nick": frm.nick, "to": to.nick, "text": f"p{i}", "ts": ts}
        state.settle(
            state.log.append_private(
                ts, frm.owner, to.recipient, f"pid-{i}", m.dumps(event), frm.key
            )
        )
    got = state.settle(state.log.privates_to(bob.recipient, 0.0, 10))
    assert [json.loads(t)["text"] for t in got] == ["p0", "p2"]
    for me, peer in ((ann, bob), (bob, ann)):
        talk = state.settle(state.log.conversation(me.owner, peer.key, None, 10))
        assert [json.loads(t)["text"] for t in talk] == ["p0", "p1", "p2"]
    assert state.log.known_ids(ann.owner, ["pid-0"])["pid-0"] is not None
    assert state.log.known_ids(bob.owner, ["pid-0"])["pid-0"] is None


# ---------------------------------------------------------------------------- the registry


def test_a_nick_is_held_by_one_session_and_taken_over_only_by_its_own(state):
    """A claimed nick is held; another session's claim fails with NICK_TAKEN (in any case);
    the same client's new session takes it over; a release frees it. (Reads answer from
    what the broker holds: after a change, a catch-up makes it hold everything stored.)"""
    reg = state.registry
    first = ident("ann", "s1")
    state.settle(reg.claim(first, None))
    state.settle(reg.catch_up())
    assert reg.holder(first.key).sid == "s1"
    with pytest.raises(ProtocolError) as err:
        state.settle(reg.claim(ident("ANN", "s2"), None))
        state.settle(reg.catch_up())
    assert err.value.code is Code.NICK_TAKEN
    second = ident("ann", "s3")
    state.settle(reg.claim(second, first))
    state.settle(reg.catch_up())
    assert reg.holder(first.key).sid == "s3"
    state.settle(reg.release(first))
    state.settle(reg.catch_up())  # the old session's release frees nothing
    assert reg.holder(first.key).sid == "s3"
    state.settle(reg.release(second))
    state.settle(reg.catch_up())
    assert reg.holder(first.key) is None


def test_a_rename_moves_the_nick_and_its_memberships(state):
    """After rename the session holds the new nick, the old one is free, and its rooms
    list it under the new nick."""
    reg = state.registry
    ann = ident("ann", "s1")
    state.settle(reg.claim(ann, None))
    state.settle(reg.catch_up())
    state.settle(reg.add_member("lobby", Member("ann", ann.key, "s1", "b1")))
    state.settle(reg.catch_up())
    state.settle(reg.rename(ann, "anna", m.nick_key("anna")))
    state.settle(reg.catch_up())
    assert reg.holder(m.nick_key("ann")) is None
    assert reg.holder(m.nick_key("anna")).sid == "s1"
    assert [mem.nick for mem in reg.members("lobby").values()] == ["anna"]


def test_a_member_is_removed_only_by_the_session_that_holds_it(state):
    """remove_member with a session id removes the member only if that session put it
    there; without one, it removes whoever it is."""
    reg = state.registry
    state.settle(reg.add_member("work", Member("ann", "ann", "s1", "b1")))
    state.settle(reg.catch_up())
    state.settle(reg.remove_member("work", "ann", "s-other"))
    state.settle(reg.catch_up())
    assert "ann" in reg.members("work")
    state.settle(reg.remove_member("work", "ann", "s1"))
    state.settle(reg.catch_up())
    assert "ann" not in reg.members("work")


def test_rooms_and_their_settings(state):
    """The configured rooms exist with their operators; a room is created once; changed
    settings are kept."""
    reg = state.registry
    assert set(ROOMS) <= set(reg.room_names())
    assert reg.settings("lobby").operators == {"boss"}
    made = RoomSettings("den", operators={"ann"}, created=True)
    assert state.settle(reg.create_room(made)) is True
    assert state.settle(reg.create_room(RoomSettings("den"))) is False
    settings = reg.settings("den")
    settings.topic, settings.locked = "plans", True
    settings.bans.add("bob")
    state.settle(reg.save(settings))
    state.settle(reg.catch_up())
    kept = reg.settings("den")
    assert (kept.topic, kept.locked, kept.bans, kept.operators) == (
        "plans",
        True,
        {"bob"},
        {"ann"},
    )


def test_a_nick_is_bound_to_the_first_key(state):
    """bind_nick registers a nick to a CURVE key; nick_owner tells which."""
    reg = state.registry
    assert reg.nick_owner("ann") is None
    state.settle(reg.bind_nick("ann", "KEY-A"))
    state.settle(reg.catch_up())
    assert reg.nick_owner("ann") == "KEY-A"


def test_identities_list_every_held_session(state):
    """identities() lists the sessions that hold nicks, and only those."""
    reg = state.registry
    a, b = ident("ann", "s1"), ident("bob", "s2")
    state.settle(reg.claim(a, None))
    state.settle(reg.catch_up())
    state.settle(reg.claim(b, None))
    state.settle(reg.catch_up())
    assert {i.nick for i in reg.identities()} == {"ann", "bob"}
    state.settle(reg.release(a))
    state.settle(reg.catch_up())
    assert {i.nick for i in reg.identities()} == {"bob"}


def test_an_accounts_further_sessions_are_its_companions(state):
    """attach() adds a session of an account beside the one holding its nick (issue 21:
    several devices); companions() and companion() find it, identities() and holder() do
    not; detach() removes it once."""
    reg = state.registry
    first, second = ident("ann", "s1"), ident("ann", "s2", broker="b2")
    first.account = second.account = "ann"
    state.settle(reg.claim(first, None))
    state.settle(reg.attach(second))
    state.settle(reg.catch_up())
    assert [c.sid for c in reg.companions("ann")] == ["s2"]
    found = reg.companion("s2")
    assert found is not None and (found.nick, found.key, found.broker) == ("ann", "ann", "b2")
    assert reg.companion("s1") is None and reg.companions("bob") == []
    assert [i.sid for i in reg.identities()] == ["s1"] and reg.holder("ann").sid == "s1"
    assert state.settle(reg.detach(second)) is True
    state.settle(reg.catch_up())
    assert reg.companions("ann") == [] and reg.companion("s2") is None
    assert state.settle(reg.detach(second)) is False
    assert reg.holder("ann").sid == "s1"


# ---------------------------------------------------------------------------- accounts (issue 21)


def account(name: str, when: float = 1.0) -> Account:
    return Account(name, m.nick_key(name), make_keys("correct horse", 4096), when)


def test_an_account_is_registered_once_and_its_password_changed(state):
    """A registered account is found by its nick key; a second registration of that name
    fails NICK_TAKEN; new keys replace the old ones; another broker (or a restart) sees the
    account as it was left."""
    acct = account("Ann")
    assert state.accounts.account("ann") is None
    state.settle(state.accounts.register(acct))
    assert state.accounts.account("ann") == acct
    with pytest.raises(ProtocolError) as refused:
        state.settle(state.accounts.register(account("ann", 2.0)))
    assert refused.value.code == Code.NICK_TAKEN
    changed = Account(acct.name, acct.key, make_keys("battery staple", 4096), acct.created)
    state.settle(state.accounts.set_keys(changed))
    assert state.accounts.account("ann") == changed
    other = state.other()
    found = wait_for(lambda: other.account("ann"), 10, "the account on the other broker")
    assert found == changed


def test_an_accounts_rooms_and_marks_are_kept(state):
    """Joining, marking (never backwards), leaving, private marks and the last room are kept
    for the account, and another broker (or a restart) finds them."""
    acct = account("bea")
    state.settle(state.accounts.register(acct))
    state.settle(state.accounts.join(acct, "lobby", 3))
    state.settle(state.accounts.join(acct, "work", 7))
    state.settle(state.accounts.mark(acct, "lobby", 9))
    state.settle(state.accounts.mark(acct, "lobby", 5))  # never back
    state.settle(state.accounts.mark(acct, "team", 5))  # not its room: nothing
    state.settle(state.accounts.part(acct, "work"))
    state.settle(state.accounts.mark_private(acct, "cy", 100.5))
    state.settle(state.accounts.mark_private(acct, "cy", 50.0))
    state.settle(state.accounts.enter(acct, "lobby"))
    kept = state.accounts.kept(acct)
    assert (kept.rooms, kept.privates, kept.last_room) == ({"lobby": 9}, {"cy": 100.5}, "lobby")
    other = state.other()
    wait_for(lambda: other.kept(acct).last_room == "lobby", 10, "the marks on the other broker")
    again = other.kept(acct)
    assert (again.rooms, again.privates) == ({"lobby": 9}, {"cy": 100.5})


@pytest.mark.parametrize("state", ["cluster"], indirect=True)
def test_a_mark_told_by_another_broker_counts_before_its_news(state):
    """Another broker's push saying the account read further (MARKED) can come before the
    marks bucket's news of it: heard_mark counts it at once, forward only, in the account's
    rooms only. (One broker has one database: there a stored mark is seen at once.)"""
    acct = account("hal")
    state.settle(state.accounts.register(acct))
    state.settle(state.accounts.join(acct, "lobby", 3))
    state.settle(state.accounts.mark_private(acct, "cy", 50.0))
    other = state.other()
    wait_for(  # both marks: they are two keys, heard in either order
        lambda: (other.kept(acct).rooms, other.kept(acct).privates) == ({"lobby": 3}, {"cy": 50.0}),
        10,
        "the marks on the other broker",
    )
    state.accounts.mark(acct, "lobby", 9)  # under way: nothing of it drained on the other
    state.accounts.mark_private(acct, "cy", 100.5)
    assert (other.kept(acct).rooms, other.kept(acct).privates) == ({"lobby": 3}, {"cy": 50.0})
    other.heard_mark(acct, "lobby", "", 9)
    other.heard_mark(acct, None, "cy", 100.5)
    other.heard_mark(acct, "work", "", 4)  # not its room: nothing
    other.heard_mark(acct, "lobby", "", 5)  # never back
    other.heard_mark(acct, None, "cy", 60.0)
    kept = other.kept(acct)
    assert (kept.rooms, kept.privates) == ({"lobby": 9}, {"cy": 100.5})


def test_failed_logins_are_counted_by_account_and_address(state):
    """Failed logins count for their account and address only, from the time asked."""
    state.settle(state.accounts.failed("dee", "10.0.0.1", 100.0))
    state.settle(state.accounts.failed("dee", "10.0.0.1", 130.0))
    state.settle(state.accounts.failed("dee", "10.0.0.2", 130.0))
    assert sorted(state.accounts.failures("dee", "10.0.0.1", 90.0)) == [100.0, 130.0]
    assert state.accounts.failures("dee", "10.0.0.1", 120.0) == [130.0]
    assert state.accounts.failures("eve", "10.0.0.1", 0.0) == []


def test_private_messages_to_an_account_are_found_under_any_of_its_nicks(state):
    """privates_to(owner) finds what was kept for that identity whatever its nick was,
    and nothing kept for another."""
    for i, (to, nick) in enumerate([("acct:fay", "fay"), ("acct:fay", "fay2"), ("tok:x", "fay")]):
        data = json.dumps({"kind": "private", "nick": "gus", "text": f"m{i}", "ts": 10.0 + i})
        state.settle(
            state.log.append_private(
                10.0 + i, "tok:g", f"{to} {nick}", f"p{i}", data.encode(), "gus"
            )
        )
    got = state.settle(state.accounts.privates_to("acct:fay", 0.0, 10))
    assert [json.loads(t)["text"] for t in got] == ["m0", "m1"]


# ---------------------------------------------------------------------------- edits, search
# (issue 23: core/edits_state.py's MessageLog: message(), search(), and what an edit or a
# removal appended to the log does to the message it names)

ANN, BEN = "tok:ann-identity", "tok:ben-identity"


def say(state: State, text: str, owner: str = ANN, room: str = "lobby") -> int:
    cmid = secrets.token_hex(8)
    return state.settle(state.log.append(room, [Draft(EventKind.MSG, "ann", text, owner, cmid)]))[0]


def change(state: State, kind: EventKind, ref: int, text: str = "", room: str = "lobby") -> int:
    draft = Draft(kind, "ann", text or f"ann {kind}d a message", ANN, None, {"ref": ref})
    return state.settle(state.log.append(room, [draft]))[0]


def read(state: State, room: str = "lobby") -> dict[int, dict[str, Any]]:
    texts = state.settle(state.log.read(room, after=0, before=None, since=None, limit=500))
    return {e["seq"]: e for e in map(json.loads, texts)}


def find(state: State, query: str, rooms: list[str], me: str | None = None) -> list[str]:
    found = state.settle(state.log.search(search.parse(query), rooms, me, 20))
    return [json.loads(t)["text"] for t in found.texts]


def test_a_message_is_found_with_its_sender(state):
    """message() gives the event and whether the owner asked about sent it; nothing for
    a number with no event."""
    seq = say(state, "hello there")
    stored = state.settle(state.log.message("lobby", seq, ANN))
    assert (stored.event["text"], stored.event["kind"], stored.mine) == ("hello there", "msg", True)
    assert state.settle(state.log.message("lobby", seq, BEN)).mine is False
    assert state.settle(state.log.message("lobby", seq + 5, ANN)) is None


def test_an_edit_changes_the_message_in_history_and_search(state):
    """After an edit, history reads the message with the new text, marked edited at the
    edit's time; search finds the new words, not the old ones."""
    seq = say(state, "the deploy failed")
    edit = change(state, EventKind.EDIT, seq, "the deploy worked")
    events = read(state)
    assert events[seq]["text"] == "the deploy worked"
    assert events[seq]["edited"] == events[edit]["ts"]
    assert (events[edit]["kind"], events[edit]["ref"]) == ("edit", seq)
    assert find(state, "deploy", ["lobby"]) == ["the deploy worked"]
    assert find(state, "failed", ["lobby"]) == []


def test_a_removal_leaves_no_text_of_the_message_or_its_edits(state):
    """A removed message and its edit read as `deleted` events; the removal names it; the
    message is no longer found, by message() or by search."""
    seq = say(state, "my password is swordfish")
    edit = change(state, EventKind.EDIT, seq, "my password is tuna")
    other = say(state, "tuna for lunch")
    removal = change(state, EventKind.DELETE, seq)
    events = read(state)
    for gone in (seq, edit):
        assert events[gone] == json.loads(m.tombstone("lobby", gone, events[gone]["ts"]))
    assert (events[removal]["kind"], events[removal]["ref"]) == ("delete", seq)
    assert events[other]["text"] == "tuna for lunch"
    assert "swordfish" not in json.dumps(events) and "password" not in json.dumps(events)
    assert state.settle(state.log.message("lobby", seq, ANN)) is None
    assert find(state, "tuna", ["lobby"]) == ["tuna for lunch"]
    assert find(state, "password", ["lobby"]) == []


def test_an_edit_of_a_removed_message_keeps_no_text(state):
    """An edit that comes after the removal (two brokers racing) is a deleted event too."""
    seq = say(state, "oops")
    change(state, EventKind.DELETE, seq)
    edit = change(state, EventKind.EDIT, seq, "oops again")
    assert read(state)[edit]["kind"] == "deleted"
    assert find(state, "oops", ["lobby"]) == []


def test_search_keeps_to_the_rooms_and_the_private_messages_asked_for(state):
    """Rooms not asked for are not searched; private messages only for their two parties
    (`me`); newest first; words, prefixes and phrases."""
    say(state, "deploy in lobby")
    say(state, "deployment in work", room="work")
    data = m.dumps({"kind": "private", "nick": "ann", "to": "ben", "text": "deploy key", "ts": 1.0})
    state.settle(state.log.append_private(time.time(), ANN, BEN + " ben", "p1", data, "ann"))
    assert find(state, "deploy", ["lobby"]) == ["deploy in lobby"]
    assert find(state, "deploy*", ["lobby", "work"]) == ["deployment in work", "deploy in lobby"]
    assert find(state, '"in work"', ["lobby", "work"]) == ["deployment in work"]
    deadline = time.monotonic() + 5  # a cluster's index follows the private stream
    while find(state, "key", [], ANN) != ["deploy key"]:
        assert time.monotonic() < deadline, "the private message was never indexed"
        state.settle(state.registry.catch_up())  # a turn of a cluster's loop
    assert find(state, "key", [], BEN) == ["deploy key"]
    assert find(state, "key", [], "tok:someone-else") == []
    assert find(state, "key", ["lobby", "work"]) == []


def test_failed_logins_are_forgotten_once_they_no_longer_count(state):
    """A failed login counts for about a minute (FAILURES_KEPT); failures from addresses
    that stopped long ago are let go as new ones come, so that logins tried from ever new
    addresses do not pile up in memory."""
    for i in range(50):
        state.settle(state.accounts.failed("dee", f"10.0.1.{i}", 100.0))
    assert state.accounts.failures("dee", "10.0.1.7", 0.0) == [100.0]
    state.settle(state.accounts.failed("dee", "10.0.2.1", 100.0 + FAILURES_KEPT + 1))
    assert all(state.accounts.failures("dee", f"10.0.1.{i}", 0.0) == [] for i in range(50))
    assert state.accounts.failures("dee", "10.0.2.1", 0.0) == [100.0 + FAILURES_KEPT + 1]
