"""Edits, removals and search in a cluster, on the bridge's side (issue 23): the NATS work
that the bridge (bridge.py) does for them, in verbs of its own.

    MSGGET op room seq    a room's message as its stream has it (from the stream's leader):
                          DONE [data, msg id] or DONE [] if there is none (or it was erased)
    ERASE room seq...     delete messages from a room's stream: JetStream overwrites their
                          bytes on every replica (its default for a delete), so a removed
                          text is gone from the cluster, not hidden
    PRIVS seq subject data ...   (to the broker) the private messages, from the first: the
                          broker's own search index follows them

An edit or a removal is an event of the room's stream like any other (kind edit or delete,
its `ref` in the event); every broker applies it to its own index as it arrives
(index.py). Where a stream has a hole (an erased message) the broker is given a `deleted`
event in its place, so a room's numbers never have a gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final

import nats.js.errors
from nats.js import api

from zmqchat import protocol as m

log = logging.getLogger("zmqchat.cluster")

ERASE_PATIENCE: Final = 600.0  # seconds an erasure is tried again while the cluster is away
STREAM_WAIT: Final = 10.0  # seconds a new stream may take to be known to the node we ask


@dataclass(frozen=True)
class Means:
    """What these verbs use of the bridge's module (given, not imported: no cycle)."""

    stream_of: Callable[[str, str], str]  # (namespace, room) -> the room's stream
    why: Callable[[BaseException], str]  # an error as a reason
    idle_heartbeat: float
    pending_msgs: int


def verbs(bridge: Any, means: Means) -> dict[bytes, Callable[[list[bytes]], Any]]:
    """The bridge's verbs for edits and removals (`bridge`: the Bridge)."""

    async def msgget(frames: list[bytes]) -> None:
        bridge._spawn(_msgget(bridge, means, frames[1], frames[2].decode(), int(frames[3])))

    async def erase(frames: list[bytes]) -> None:
        stream = means.stream_of(bridge.ns, frames[1].decode())
        bridge._spawn(_erase(bridge, stream, [int(f) for f in frames[2:]]))

    return {b"MSGGET": msgget, b"ERASE": erase}


async def _msgget(bridge: Any, means: Means, op: bytes, room: str, seq: int) -> None:
    try:
        raw = await bridge.js.get_msg(means.stream_of(bridge.ns, room), seq)
    except nats.js.errors.NotFoundError:
        bridge._send([b"DONE", op, b"list"])
        return
    except Exception as exc:  # noqa: BLE001 - always answer
        bridge._fail(op, "UNAVAILABLE", f"the message was not read: {means.why(exc)}")
        return
    msgid = (raw.headers or {}).get("Nats-Msg-Id", "")
    bridge._send([b"DONE", op, b"list", raw.data or b"", msgid.encode()])


async def _erase(bridge: Any, stream: str, seqs: list[int]) -> None:
    deadline = time.monotonic() + ERASE_PATIENCE
    for seq in seqs:
        while True:
            try:
                await bridge.js.delete_msg(stream, seq)
                break
            except nats.js.errors.NotFoundError:  # erased already (by another broker)
                break
            except Exception as exc:  # noqa: BLE001 - the cluster is away: again soon
                if time.monotonic() > deadline or bridge.closing:
                    log.error("%s: message %d not erased: %s", stream, seq, exc)
                    break
                await asyncio.sleep(1.0)


async def follow_privates(bridge: Any, means: Means) -> None:
    """Every private message, from the first, to the broker's search index (PRIVS)."""
    pending: list[bytes] = []

    def flush() -> None:
        if pending:
            bridge._send([b"PRIVS", *pending])
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
                idle_heartbeat=means.idle_heartbeat,
                config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
                pending_msgs_limit=means.pending_msgs,
                pending_bytes_limit=1 << 30,
            )
            return
        except nats.js.errors.NotFoundError:  # made just now: not known everywhere yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def seq_of(msg: Any) -> int:
    """A stream message's sequence number (subscribed, or read by a direct get)."""
    if msg.metadata is not None:
        return int(msg.metadata.sequence.stream)
    return int(msg.headers["Nats-Sequence"])


def with_holes_filled(first: int, end: int, got: list[Any], ts: float) -> list[Any]:
    """Messages first..end-1 of a room's stream, as read (`got`), with a `deleted` event in
    each place the stream has none (an erased message), timed `ts`."""
    by_seq = {seq_of(msg): msg for msg in got}
    out = []
    for seq in range(first, end):
        msg = by_seq.get(seq)
        if msg is None:
            tail = m.encode_event_tail(ts, "", m.EventKind.DELETED, m.DELETED_TEXT)
            msg = SimpleNamespace(
                metadata=None, headers={"Nats-Sequence": str(seq), "Zc-Kind": "deleted"}, data=tail
            )
        out.append(msg)
    return out
