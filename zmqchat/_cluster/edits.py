"""Edits, removals and search in a cluster, on the bridge's side (issue 23): the NATS work
that the bridge (bridge.py) does for them, in verbs of its own.

    MSGGET id room seq    a room's message as its stream has it: DONE [data, msg id], or
                          DONE [] if there is none (or it was erased)
    ERASE room seq...     erase events from a room's stream: the stream messages that hold
                          them are deleted (JetStream overwrites their bytes on every
                          replica, its default for a delete), what else they held kept as
                          overlays (history.py), so a removed text is gone from the
                          cluster, not hidden
    PRIVS seq subject data ...   (to the broker) the private messages, from the first: the
                          broker's own search index follows them

An edit or a removal is an event of the room's stream like any other (kind edit or delete,
its `ref` in the event); every broker applies it to its own index as it arrives
(index.py). Where a stream lacks events (erased ones) its reads give a `deleted` event in
their place, so a room's numbers never have a gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import nats.js.errors
from nats.js import api

from zmqchat._cluster.history import History
from zmqchat._cluster.names import Failure, News, Verb

logger = logging.getLogger("zmqchat.cluster")

ERASE_PATIENCE: Final = 600.0  # seconds an erasure is tried again while the cluster is away
STREAM_WAIT: Final = 10.0  # seconds a new stream may take to be known to the node we ask
PENDING_MSGS: Final = 1 << 20  # messages the private messages' subscription may hold


class Host(Protocol):
    """What these verbs use of the bridge."""

    js: Any
    ns: str
    loop: asyncio.AbstractEventLoop
    closing: bool

    def spawn(self, coro: Awaitable[Any]) -> None: ...

    def send(self, frames: list[bytes]) -> None: ...

    def done_list(self, call: bytes, items: list[bytes]) -> None: ...

    def fail(self, call: bytes, failure: Failure, reason: str) -> None: ...

    def history(self, room: str) -> History: ...


def verbs(bridge: Host) -> dict[bytes, Callable[[list[bytes]], Awaitable[None]]]:
    """The bridge's verbs for edits and removals."""

    async def msgget(frames: list[bytes]) -> None:
        bridge.spawn(_msgget(bridge, frames[1], frames[2].decode(), int(frames[3])))

    async def erase(frames: list[bytes]) -> None:
        bridge.spawn(_erase(bridge, frames[1].decode(), [int(f) for f in frames[2:]]))

    return {Verb.MSGGET: msgget, Verb.ERASE: erase}


async def _msgget(bridge: Host, call: bytes, room: str, seq: int) -> None:
    try:
        found = await bridge.history(room).message(seq)
    except Exception as exc:  # noqa: BLE001 - always answer
        bridge.fail(call, Failure.UNAVAILABLE, f"the message was not read: {exc!r}")
        return
    bridge.done_list(call, [] if found is None else [found[0], found[1].encode()])


async def _erase(bridge: Host, room: str, seqs: list[int]) -> None:
    deadline = time.monotonic() + ERASE_PATIENCE
    while True:
        try:
            await bridge.history(room).erase(seqs)
            return
        except Exception as exc:  # noqa: BLE001 - the cluster is away: again soon
            if time.monotonic() > deadline or bridge.closing:
                logger.error("%s: messages %s not erased: %r", room, seqs, exc)
                return
            await asyncio.sleep(1.0)


async def follow_privates(bridge: Host, idle_heartbeat: float) -> None:
    """Every private message, from the first, to the broker's search index (PRIVS)."""
    pending: list[bytes] = []

    def flush() -> None:
        if pending:
            bridge.send([News.PRIVS, *pending])
            pending.clear()

    async def arrived(msg: Any) -> None:
        if not pending:
            bridge.loop.call_soon(flush)
        pending.extend([str(msg.metadata.sequence.stream).encode(), msg.subject.encode(), msg.data])

    deadline = time.monotonic() + STREAM_WAIT
    while True:
        try:
            await bridge.js.subscribe(
                f"{bridge.ns}.priv.>",
                stream=f"{bridge.ns}-privates",
                cb=arrived,
                ordered_consumer=True,
                idle_heartbeat=idle_heartbeat,
                config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
                pending_msgs_limit=PENDING_MSGS,
                pending_bytes_limit=1 << 30,
            )
            return
        except nats.js.errors.NotFoundError:  # made just now: not known everywhere yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
