"""What the broker has lent to ZeroMQ and ZeroMQ still holds, per connection (issue 24).

A reply handed to the ROUTER waits in its connection's queue until ZeroMQ has written it to
the kernel, for as long as the client does not read: up to the high-water mark, which counts
messages, and a GET's chunk is 1 MiB. So long frames (chunks, long replies) are lent to
ZeroMQ with a MessageTracker, which pyzmq marks done once libzmq has let go of the frame
(written it, or dropped it with its connection), and counted here until then; a GET's chunk
is counted from the moment the core puts it in its outbox. The core refuses a GET that
would take a connection, or all of them, past a bound (_core/files.py); the loop drops
another long reply past it, as ZeroMQ drops a reply at the high-water mark.

The count is a connection's, not a session's: ZeroMQ's queue outlives a BYE (or a session
timed out) for as long as the connection lasts, so a BYE and a HELLO do not start it afresh;
once the connection closes, ZeroMQ drops its queue and the trackers say so.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

__all__ = ["LENT", "Outflow"]

# Frames this long or longer are lent and counted. Shorter ones are copied into ZeroMQ and
# not counted: the ROUTER's SNDHWM (messages) bounds them, to 8 MB a connection at 1000.
LENT: Final = 1 << 13


class Outflow:
    """Bytes of replies queued or lent to ZeroMQ and not yet let go: the core's `Backlog`."""

    __slots__ = ("_lent", "_lent_bytes", "_queued", "total")

    def __init__(self) -> None:
        self.total = 0  # all connections together
        self._queued: dict[bytes, int] = {}  # connection -> bytes of chunks in the outbox
        self._lent: dict[bytes, deque[tuple[Any, int]]] = {}  # connection -> (tracker, bytes)
        self._lent_bytes: dict[bytes, int] = {}  # connection -> bytes in _lent

    def held(self, rid: bytes) -> int:
        """Bytes held for one connection (ZeroMQ's letting go seen at the last prune)."""
        return self._lent_bytes.get(rid, 0) + self._queued.get(rid, 0)

    def queue(self, rid: bytes, n: int) -> None:
        """A chunk of n bytes for this connection is in the core's outbox."""
        self._queued[rid] = self._queued.get(rid, 0) + n
        self.total += n

    def unqueue(self, rid: bytes, n: int) -> None:
        """A chunk queued was not sent after all (its client is gone)."""
        left = self._queued[rid] - n
        if left:
            self._queued[rid] = left
        else:
            del self._queued[rid]
        self.total -= n

    def lend(self, rid: bytes, tracker: Any, n: int, queued: bool = False) -> None:
        """A frame of n bytes (a chunk queued, or a long reply) went to ZeroMQ with this
        tracker."""
        if queued:
            self.unqueue(rid, n)
        lent = self._lent.get(rid)
        if lent is None:
            lent = self._lent[rid] = deque()
        lent.append((tracker, n))
        self._lent_bytes[rid] = self._lent_bytes.get(rid, 0) + n
        self.total += n

    def prune(self) -> None:
        """Forget what ZeroMQ has let go of. A connection's frames leave in the order they
        were sent, so each is looked at from its oldest, up to the first still held: a pass
        costs a look per connection with something lent, however much that is."""
        if not self._lent:
            return
        emptied = []
        for rid, lent in self._lent.items():
            freed = 0
            while lent and lent[0][0].done:
                freed += lent.popleft()[1]
            if freed:
                self.total -= freed
                if lent:
                    self._lent_bytes[rid] -= freed
                else:
                    emptied.append(rid)
        for rid in emptied:
            del self._lent[rid], self._lent_bytes[rid]
