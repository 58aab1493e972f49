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
from zmqchat.protocol import EventKind


@pytest.fixture
def cluster_config(nats_nodes) -> Iterator[Config]:
    from scripts.nats_local import delete_namespace

    namespace = "r" + secrets.token_hex(4)
    yield Config(cluster_urls=nats_nodes.urls, namespace=namespace, rooms=("lobby",), heartbeat=0.5)
    delete_namespace(nats_nodes.urls, namespace)


def settle(cluster: Any, op: Op, timeout: float = 10.0) -> Any:
    """Run the broker's side of one cluster until op is done: its value, or its error."""

    async def go() -> None:
        deadline = time.monotonic() + timeout
        while not op.done:
            assert time.monotonic() < deadline, "the cluster did not answer in time"
            cluster.send_pending()
            await cluster.wait(0.05)
            cluster.drain()

    cluster.loop.run_until_complete(go())
    if op.error is not None:
        raise op.error
    return op.value


def texts(found: list[str]) -> list[str]:
    return [json.loads(t)["text"] for t in found]


def test_a_read_while_the_room_is_being_followed_gives_the_stored_events(cluster_config):
    from zmqchat._cluster.state import Cluster

    b1 = Cluster(cluster_config)
    b1.start("b1")
    b2 = None
    try:
        settle(b1, b1.log.follow_room("lobby"))
        drafts = [Draft(EventKind.MSG, "ann", f"m{i}", "nick:ann", f"id{i}") for i in range(5)]
        assert settle(b1, b1.log.append("lobby", drafts)) == [1, 2, 3, 4, 5]

        b2 = Cluster(cluster_config)
        b2.start("b2")
        following = b2.log.follow_room("lobby")  # as a member's join (or resume) here does
        assert not following.done
        read = b2.log.read("lobby", after=2, before=None, since=None, limit=100)
        assert texts(settle(b2, read)) == ["m2", "m3", "m4"]
        assert following.done and b2.log.last("lobby") == 5
    finally:
        for cluster in (b2, b1):
            if cluster is not None:
                cluster.close()
