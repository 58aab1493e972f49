"""The broker's side of the bridge: commands for it, the answers they wait for, and the
one place where the cluster calls back into the core (`CoreLink`).

The room log, the registry and liveness each hold these two, not the whole Cluster
(state.py), so that each is a module of its own that state.py puts together.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zmqchat._cluster.names import Bucket, Change, Failure, News, Verb, json_answer
from zmqchat._core.state import Identity, Op
from zmqchat.protocol import Code, ProtocolError, Reply

if TYPE_CHECKING:
    from zmqchat._core.state import Listener

logger = logging.getLogger("zmqchat.cluster")

Decode = Callable[[list[bytes]], Any]


class Calls:
    """Commands of this pass for the bridge (sent at the end of the pass, in order), and
    those under way: each answered by News.DONE or News.FAIL with its id."""

    def __init__(self) -> None:
        self.queue: list[list[bytes]] = []
        self.under_way: dict[bytes, tuple[Op, Decode, float]] = {}
        self._ids = itertools.count(1)
        self.take: Callable[[list[list[bytes]]], None] | None = None  # the bridge's
        self.failed = 0  # commands the cluster could not carry out since the last report
        self.last_failure = ""  # the latest one's reason
        self.next_report = 0.0  # (monotonic) when report() may say that again

    def __len__(self) -> int:
        return len(self.under_way)

    def call(self, frames: list[bytes], decode: Decode) -> Op:
        """Send a command whose answer completes the returned Op (value: decode(frames))."""
        call_id = str(next(self._ids)).encode()
        op = Op()
        self.under_way[call_id] = (op, decode, time.monotonic())
        frames.insert(1, call_id)
        self.queue.append(frames)
        return op

    def tell(self, frames: list[bytes]) -> None:
        """A command nobody waits for."""
        self.queue.append(frames)

    def kv(self, change: Change, bucket: Bucket, key: str, value: bytes = b"", rev: int = 0) -> Op:
        """Change a key; the Op's value is its new revision (CONFLICT: a compare-and-set lost)."""
        return self.call(
            [Verb.KV, bucket.encode(), change, key.encode(), value, str(rev).encode()],
            json_answer,
        )

    def put(self, bucket: Bucket, key: str, value: Any) -> Op:
        return self.kv(Change.PUT, bucket, key, json.dumps(value).encode())

    def send_pending(self) -> None:
        if self.queue and self.take is not None:
            self.take(self.queue)
        self.queue.clear()

    def answered(self, frames: list[bytes]) -> None:
        """DONE id Answer value... or FAIL id Failure reason: a command's Op completes."""
        entry = self.under_way.pop(frames[1], None)
        if entry is None:
            return
        op, decode, _ = entry
        if frames[0] == News.FAIL:
            failure = frames[2].decode()
            code = Code.UNAVAILABLE if failure == Failure.UNAVAILABLE else Code.INTERNAL
            reason = frames[3].decode(errors="replace")
            if failure == Failure.UNAVAILABLE:
                self.failed += 1
                self.last_failure = reason
            op.fail(ProtocolError(code, reason, cluster=failure))
            return
        try:
            value = decode(frames[2:])
        except Exception as exc:  # noqa: BLE001 - a reply we cannot read
            op.fail(exc)
        else:
            op.resolve(value)

    def expire(self, now: float, deadline: float) -> None:
        """Fail the commands unanswered for `deadline` seconds (the bridge answers
        everything: this is a bug, or a bridge that is stuck)."""
        for call_id, (op, _, sent) in list(self.under_way.items()):
            if now - sent > deadline:
                logger.error("cluster command %s unanswered after %g s", call_id, deadline)
                self.failed += 1
                self.last_failure = f"no answer in {deadline:g} s"
                del self.under_way[call_id]
                op.fail(ProtocolError(Code.UNAVAILABLE, "the cluster did not answer"))

    def report(self, now: float, every: float) -> None:
        """At most every `every` seconds, say how many commands the cluster failed (or
        left unanswered: expire()) meanwhile: while NATS is away or has lost its majority,
        an operator sees why nothing is acknowledged, not one line and silence."""
        if now < self.next_report:
            return
        if self.failed:
            logger.warning(
                "the NATS cluster is not carrying out what this broker asks: %d commands "
                "failed in the last %.0f s (latest: %s); clients' messages wait "
                "unacknowledged and are sent again",
                self.failed,
                every,
                self.last_failure or "no answer",
            )
        self.failed, self.next_report = 0, now + every

    def woke(self, gap: float) -> None:
        for call_id, (op, decode, sent) in list(self.under_way.items()):
            self.under_way[call_id] = (op, decode, sent + gap)


class CoreLink:
    """Everything the cluster tells the broker's core, in one place (the core's
    state.Listener, once attached): a nick moved, a room appeared, a push arrived, a dead
    broker's session to settle; and which sessions are ours."""

    def __init__(self) -> None:
        self.core: Listener | None = None

    def identity_changed(self, key: str, ident: Identity | None) -> None:
        if self.core is not None:
            self.core.identity_changed(key, ident)

    def room_added(self, room: str) -> None:
        if self.core is not None:
            self.core.room_added(room)

    def routed(self, push: dict[str, Any]) -> None:
        if self.core is not None:
            self.core.routed(push["sid"], Reply(push["kind"]), push["body"])

    def silent_for(self, sid: str) -> float | None:
        return self.core.silent_for(sid) if self.core is not None else None

    def reap(self, ident: Identity) -> None:
        if self.core is not None:
            self.core.reap(ident)

    def local_sids(self) -> set[str]:
        return set(self.core.local_sids()) if self.core is not None else set()
