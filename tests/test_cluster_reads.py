"""History reads on a cluster broker that is only now following a room.

A client that resumes on another broker holding a gap (events it heard live there, some
missing before them) asks history for the gap as soon as a ping's reply names the room,
which can be while its JOIN still waits for this broker to follow the room. The read must
give the stored events then, not an empty answer that says history lacks them.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from zmqchat._config import Config
from zmqchat._core.state import Draft, Op
from zmqchat.protocol import EventKind, ProtocolError


@pytest.fixture
def cluster_config(nats_nodes) -> Iterator[Config]:
    from scripts.nats_local import delete_namespace

    namespace = "r" + secrets.token_hex(4)
    yield Config(cluster_urls=nats_nodes.urls, namespace=namespace, rooms=("lobby",), heartbeat=0.5)
    delete_namespace(nats_nodes.urls, namespace)


def run(cluster: Any, until: Any, timeout: float) -> None:
    """Run the broker's side of one cluster until until() (at most timeout seconds)."""

    async def go() -> None:
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            cluster.send_pending()
            await cluster.wait(0.05)
            cluster.drain()

    cluster.loop.run_until_complete(go())


def settle(cluster: Any, op: Op, timeout: float = 10.0) -> Any:
    """Run the broker's side of one cluster until op is done: its value, or its error."""
    run(cluster, lambda: op.done, timeout)
    assert op.done, "the cluster did not answer in time"
    if op.error is not None:
        raise op.error
    return op.value


def texts(found: list[str]) -> list[str]:
    return [json.loads(t)["text"] for t in found]


@pytest.fixture
def brokers(cluster_config) -> Iterator[Any]:
    """make(name): a cluster broker's state (the first one is given five messages in
    lobby, m0..m4, seqs 1..5, stored through it)."""
    from zmqchat._cluster.state import Cluster

    started: list[Any] = []

    def make(name: str) -> Any:
        cluster = Cluster(cluster_config)
        cluster.start(name)
        started.append(cluster)
        if len(started) == 1:
            settle(cluster, cluster.log.follow_room("lobby"))
            drafts = [Draft(EventKind.MSG, "ann", f"m{i}", "nick:ann", f"id{i}") for i in range(5)]
            assert settle(cluster, cluster.log.append("lobby", drafts)) == [1, 2, 3, 4, 5]
        return cluster

    yield make
    for cluster in reversed(started):
        cluster.close()


def test_a_read_while_the_room_is_being_followed_gives_the_stored_events(brokers):
    brokers("b1")
    b2 = brokers("b2")
    following = b2.log.follow_room("lobby")  # as a member's join (or resume) here does
    assert not following.done
    read = b2.log.read("lobby", after=2, before=None, since=None, limit=100)
    assert texts(settle(b2, read)) == ["m2", "m3", "m4"]
    assert following.done and b2.log.last("lobby") == 5


def test_a_read_after_the_rooms_follow_failed_follows_it_again(brokers, nats_nodes):
    """While NATS is away the follow fails (and so does a read); once it is back, a read
    follows the room again and gives its events: never an answer without them."""
    brokers("b1")
    b2 = brokers("b2")
    nats_nodes.pause()
    try:
        failed = b2.log.follow_room("lobby")
        with pytest.raises(ProtocolError):
            settle(b2, failed)
    finally:
        nats_nodes.resume()
    deadline = time.monotonic() + 20
    while True:
        try:
            found = settle(b2, b2.log.read("lobby", after=2, before=None, since=None, limit=9))
            break
        except ProtocolError:  # the cluster is settling again
            assert time.monotonic() < deadline, "the room was not followed again"
            run(b2, lambda: False, 0.5)
    assert texts(found) == ["m2", "m3", "m4"]


class LaggingReplica:
    """The bridge, but its direct gets answered by a replica that has the stream only up
    to stream sequence `has` (a follower behind its leader)."""

    def __init__(self, bridge: Any, has: int) -> None:
        self.bridge, self.has = bridge, has
        self.js, self.ns, self.erased = bridge.js, bridge.ns, bridge.erased

    async def direct(self, stream: str, request: dict[str, Any]) -> list[Any]:
        got = await self.bridge.direct(stream, request)
        return [msg for msg in got if int(msg.headers["Nats-Sequence"]) <= self.has]


def test_a_read_from_a_replica_that_lags_gives_every_stored_event(brokers):
    """A direct get may be answered by a replica behind the stream's leader: a history read
    of events the broker knows are stored still gives all of them (the rest from the
    leader); one that asks past the end gives what there is."""
    from zmqchat._cluster.history import History

    b1 = brokers("b1")
    for i in range(5, 9):  # four more stream messages: m5..m8, seqs 6..9
        drafts = [Draft(EventKind.MSG, "ann", f"m{i}", "nick:ann", f"id{i}")]
        assert settle(b1, b1.log.append("lobby", drafts)) == [i + 1]
    history = History(LaggingReplica(b1.bridge, has=2), "lobby", [])

    def read(lo: int, hi: int, known: int) -> list[str]:
        found = b1.loop.run_until_complete(history.read(lo, hi, known))
        assert [seq for seq, _ in found] == list(range(lo, lo + len(found)))
        return [json.loads(b'{"seq":0,' + tail)["text"] for _, tail in found]

    full = read(3, 9, 9)
    assert full == [f"m{i}" for i in range(2, 9)]
    assert read(7, 20, 9) == ["m6", "m7", "m8"]
    lagging = read(3, 9, 0)  # (none known: what the replica has, which is less)
    assert lagging == full[: len(lagging)] and len(lagging) < len(full)


class ReplicasThatDiffer(LaggingReplica):
    """The bridge, its first direct get answered by the stream's leader, the later ones by a
    replica that has the stream only up to stream sequence `has`."""

    def __init__(self, bridge: Any, has: int) -> None:
        super().__init__(bridge, has)
        self.seen, self.answered = bridge.seen, 0

    async def direct(self, stream: str, request: dict[str, Any]) -> list[Any]:
        self.answered += 1
        if self.answered == 1:
            return list(await self.bridge.direct(stream, request))
        return await super().direct(stream, request)


def test_a_broker_that_starts_on_a_room_while_a_replica_lags_knows_all_its_latest_events(
    brokers,
):
    """A broker coming to a room reads its latest events back from the end, a direct get at
    a time, and any replica may answer each: one behind the leader answers short. The
    events it did not give are stored, not erased ones: none may be taken for `deleted`
    (a soak's client was shown 410 stored messages so, by a broker just restarted)."""
    from zmqchat._cluster.streams import RoomStream

    b1 = brokers("b1")  # one stream message holds seqs 1..5
    for i in range(5, 65):  # sixty more, one event each: seqs 6..65
        drafts = [Draft(EventKind.MSG, "ann", f"m{i}", "nick:ann", f"id{i}")]
        assert settle(b1, b1.log.append("lobby", drafts)) == [i + 1]
    host = ReplicasThatDiffer(b1.bridge, has=3)  # (stream messages 1..3: seqs 1..7)
    stream = RoomStream(host, "lobby")
    b1.loop.run_until_complete(stream.loaded())
    assert host.answered > 1, "the window was read in one get: the test shows nothing"
    events = [
        (s.first + i, s.kind(i), json.loads(b'{"seq":0,' + tail)["text"])
        for s in stream.recent
        for i, tail in enumerate(s.tails)
    ]
    assert events == [(seq, "msg", f"m{seq - 1}") for seq in range(1, 66)]
    assert (stream.known_seq, stream.known_room) == (61, 65)


def test_private_messages_read_through_a_replica_that_lags_include_the_latest(brokers):
    """A resuming client's missed private messages are read by direct gets, which a replica
    behind the leader (a NATS node just woken) answers without the latest ones: those are
    the ones a resume is for (sent as its broker died). The leader gives the rest."""
    from zmqchat._cluster.privates import Privates

    b1 = brokers("b1")
    since = time.time() - 1
    for i in range(3):
        event = json.dumps({"kind": "private", "nick": "ann", "text": f"p{i}"}).encode()
        stored = b1.log.append_private(time.time(), "tok:ann", "tok:ben ben", f"p{i}", event, "ann")
        settle(b1, stored)
    answers: list[Any] = []

    class Host(LaggingReplica):
        def __getattr__(self, name: str) -> Any:
            return getattr(self.bridge, name)

        def done_list(self, call: bytes, items: list[bytes]) -> None:
            answers.append([json.loads(item)["text"] for item in items])

        def fail(self, call: bytes, failure: Any, reason: str) -> None:
            answers.append(reason)

    for has in (2, 0):  # (the privates stream's sequences are 1..3: the replica has 1..has)
        host = Host(b1.bridge, has)
        b1.loop.run_until_complete(Privates(host)._reading(b"1", "*.*.*.*", since, 100))
        assert answers.pop() == ["p0", "p1", "p2"], f"read through a replica that has {has}"


def test_a_room_followed_again_is_where_its_stream_is_when_the_follow_is_done(brokers):
    """A broker that stopped following a room (no members of its own for a while) and
    follows it again for a join knows the room's end by the time the follow is done: a
    resuming client's JOIN reply must not say the room is where it was when the broker
    stopped (the client took that for a new history and heard 370 events again)."""
    b1 = brokers("b1")
    b2 = brokers("b2")
    assert settle(b2, b2.log.follow_room("lobby")) is not None and b2.log.last("lobby") == 5
    later = time.monotonic() + 3600
    b2.log.unfollow_idle(lambda room: False, later)  # idle from now...
    b2.log.unfollow_idle(lambda room: False, later + 3600)  # ...for long enough: unfollowed
    run(b2, lambda: False, 0.5)
    drafts = [Draft(EventKind.MSG, "ann", f"n{i}", "nick:ann", f"n{i}") for i in range(4)]
    assert settle(b1, b1.log.append("lobby", drafts)) == [6, 7, 8, 9]
    settle(b2, b2.log.follow_room("lobby"))
    assert b2.log.last("lobby") == 9


def test_events_a_read_did_not_get_to_are_left_out_not_shown_as_deleted():
    """A read from a stream may come back short at its end (a replica behind its leader,
    a message not stored yet): the seqs past what it got are not erased ones, and a client
    shown them as `deleted` would never get them (a soak's client lost 256 so). A hole
    between events read is an erased one."""
    from zmqchat import protocol as m
    from zmqchat._cluster.index import ClusterIndex

    index = ClusterIndex(read=lambda *a: Op(), erase=lambda *a: None, changed=lambda *a: None)
    try:

        def said(seq: int) -> str:
            return m.numbered("lobby", seq, m.encode_event_tail(1.0, "ann", "msg", f"m{seq}"))

        got = [said(1).decode(), said(3).decode()]
        patched = [json.loads(t) for t in index.patch("lobby", got, 1, 5, None)]
        assert [(e["seq"], e["kind"]) for e in patched] == [(1, "msg"), (2, "deleted"), (3, "msg")]
    finally:
        index.close()
