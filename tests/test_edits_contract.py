"""The room log's part for edits, removals and search (core/edits_state.py), checked the
same way against both implementations: one broker's (LocalLog on a real SQLite store) and a
cluster's (ClusterLog on the session's real NATS nodes, driven through its own loop)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from zmqchat import protocol as m
from zmqchat._config import Config
from zmqchat._core import search
from zmqchat._core.state import Draft, Op
from zmqchat.protocol import EventKind

ANN, BEN = "tok:ann-identity", "tok:ben-identity"


class Local:
    def __init__(self, tmp) -> None:
        from zmqchat._local.state import LocalLog
        from zmqchat._local.store import Store

        self.store = Store(str(tmp / "chat.db"))
        self.log = LocalLog(self.store)

    def settle(self, op: Op) -> Any:
        self.log.follow()
        assert op.done
        if op.error is not None:
            raise op.error
        return op.value

    def close(self) -> None:
        self.store.close()


class Clustered:
    def __init__(self, urls: str) -> None:
        from zmqchat._cluster.state import Cluster

        self.cfg = Config(
            cluster_urls=urls, namespace="c" + secrets.token_hex(4), rooms=("lobby", "work")
        )
        self.cluster = Cluster(self.cfg)
        self.cluster.start("c1")
        self.log = self.cluster.log

    def settle(self, op: Op, timeout: float = 10.0) -> Any:
        """Run the broker's side of the cluster until op is done (as the broker's loop would)."""
        deadline = time.monotonic() + timeout
        while not op.done:
            assert time.monotonic() < deadline, "the cluster did not answer"
            self.log.follow()
            self.cluster.loop.run_until_complete(self.cluster.wait(0.02))
            self.cluster.drain()
        self.log.follow()
        if op.error is not None:
            raise op.error
        return op.value

    def close(self) -> None:
        from scripts.nats_local import delete_namespace

        self.cluster.close()
        delete_namespace(self.cfg.cluster_urls or "", self.cfg.namespace)


@pytest.fixture(params=["one broker", "cluster"])
def impl(request, tmp_path) -> Iterator[Any]:
    made = (
        Local(tmp_path)
        if request.param == "one broker"
        else Clustered(request.getfixturevalue("nats_nodes").urls)
    )
    yield made
    made.close()


def say(impl: Any, text: str, owner: str = ANN, room: str = "lobby") -> int:
    cmid = secrets.token_hex(8)
    return impl.settle(impl.log.append(room, [Draft(EventKind.MSG, "ann", text, owner, cmid)]))[0]


def change(impl: Any, kind: EventKind, ref: int, text: str = "", room: str = "lobby") -> int:
    draft = Draft(kind, "ann", text or f"ann {kind}d a message", ANN, None, {"ref": ref})
    return impl.settle(impl.log.append(room, [draft]))[0]


def read(impl: Any, room: str = "lobby") -> dict[int, dict[str, Any]]:
    texts = impl.settle(impl.log.read(room, after=0, before=None, since=None, limit=500))
    return {e["seq"]: e for e in map(json.loads, texts)}


def find(impl: Any, query: str, rooms: list[str], me: str | None = None) -> list[str]:
    found = impl.settle(impl.log.search(search.parse(query), rooms, me, 20))
    return [json.loads(t)["text"] for t in found.texts]


def test_a_message_is_found_with_its_sender(impl):
    """message() gives the event and whether the owner asked about sent it; nothing for
    a number with no event."""
    seq = say(impl, "hello there")
    stored = impl.settle(impl.log.message("lobby", seq, ANN))
    assert (stored.event["text"], stored.event["kind"], stored.mine) == ("hello there", "msg", True)
    assert impl.settle(impl.log.message("lobby", seq, BEN)).mine is False
    assert impl.settle(impl.log.message("lobby", seq + 5, ANN)) is None


def test_an_edit_changes_the_message_in_history_and_search(impl):
    """After an edit, history reads the message with the new text, marked edited at the
    edit's time; search finds the new words, not the old ones."""
    seq = say(impl, "the deploy failed")
    edit = change(impl, EventKind.EDIT, seq, "the deploy worked")
    events = read(impl)
    assert events[seq]["text"] == "the deploy worked"
    assert events[seq]["edited"] == events[edit]["ts"]
    assert (events[edit]["kind"], events[edit]["ref"]) == ("edit", seq)
    assert find(impl, "deploy", ["lobby"]) == ["the deploy worked"]
    assert find(impl, "failed", ["lobby"]) == []


def test_a_removal_leaves_no_text_of_the_message_or_its_edits(impl):
    """A removed message and its edit read as `deleted` events; the removal names it; the
    message is no longer found, by message() or by search."""
    seq = say(impl, "my password is swordfish")
    edit = change(impl, EventKind.EDIT, seq, "my password is tuna")
    other = say(impl, "tuna for lunch")
    removal = change(impl, EventKind.DELETE, seq)
    events = read(impl)
    for gone in (seq, edit):
        assert events[gone] == json.loads(m.tombstone("lobby", gone, events[gone]["ts"]))
    assert (events[removal]["kind"], events[removal]["ref"]) == ("delete", seq)
    assert events[other]["text"] == "tuna for lunch"
    assert "swordfish" not in json.dumps(events) and "password" not in json.dumps(events)
    assert impl.settle(impl.log.message("lobby", seq, ANN)) is None
    assert find(impl, "tuna", ["lobby"]) == ["tuna for lunch"]
    assert find(impl, "password", ["lobby"]) == []


def test_an_edit_of_a_removed_message_keeps_no_text(impl):
    """An edit that comes after the removal (two brokers racing) is a deleted event too."""
    seq = say(impl, "oops")
    change(impl, EventKind.DELETE, seq)
    edit = change(impl, EventKind.EDIT, seq, "oops again")
    assert read(impl)[edit]["kind"] == "deleted"
    assert find(impl, "oops", ["lobby"]) == []


def test_search_keeps_to_the_rooms_and_the_private_messages_asked_for(impl):
    """Rooms not asked for are not searched; private messages only for their two parties
    (`me`); newest first; words, prefixes and phrases."""
    say(impl, "deploy in lobby")
    say(impl, "deployment in work", room="work")
    data = m.dumps({"kind": "private", "nick": "ann", "to": "ben", "text": "deploy key", "ts": 1.0})
    impl.settle(impl.log.append_private(time.time(), ANN, BEN + " ben", "p1", data, "ann"))
    assert find(impl, "deploy", ["lobby"]) == ["deploy in lobby"]
    assert find(impl, "deploy*", ["lobby", "work"]) == ["deployment in work", "deploy in lobby"]
    assert find(impl, '"in work"', ["lobby", "work"]) == ["deployment in work"]
    deadline = time.monotonic() + 5  # a cluster's index follows the private stream
    while find(impl, "key", [], ANN) != ["deploy key"]:
        assert time.monotonic() < deadline, "the private message was never indexed"
    assert find(impl, "key", [], BEN) == ["deploy key"]
    assert find(impl, "key", [], "tok:someone-else") == []
    assert find(impl, "key", ["lobby", "work"]) == []
