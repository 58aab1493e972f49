"""A room's events in sequence order, exactly once: the client's ordering and gap repair.

No I/O here (no asyncio, no zmq): a `RoomOrder` is told what was heard (live batches,
history replies) and what the room has reached (ping replies, LIVE, a JOIN reply), and says
which events are ready to deliver and which range to fetch from history. The client does the
sockets around it, so a client that moves between connections or brokers reuses it as is.

    order = RoomOrder(seq)              # joined when the room was at seq: deliver seq+1 on
    deliver(order.receive(batch))       # a live batch: the events now ready, in order
    order.reached(seq)                  # the broker says the room is at seq
    fetch = order.fetch()               # a range to ask history for, or None
    result = order.fetched(fetch, events, seq)   # its reply: result.ready, .skipped, .next
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Generic, Protocol, TypeVar

MAX_FETCH = 500  # events asked for in one history fetch: the broker's MAX_HISTORY


class Sequenced(Protocol):
    """Anything with a room sequence number (an int; anything else is not ordered)."""

    @property
    def seq(self) -> object: ...


E = TypeVar("E", bound=Sequenced)
_seq = attrgetter("seq")


@dataclass(frozen=True, slots=True, eq=False)
class Fetch:
    """Ask the room's history for the events after `after`, at most `limit` of them."""

    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class Fetched(Generic[E]):
    """What a history reply did: events now ready, numbers the history lacks (given up on,
    never delivered), and the next fetch to make at once (None: done for now)."""

    ready: list[E]
    skipped: range
    next: Fetch | None


class RoomOrder(Generic[E]):
    """One room as a client hears it: delivers 1, 2, 3, ... once each, and asks for gaps.

    Invariants: `last` is the highest number delivered (or passed over); events above it
    wait in a buffer until the ones before them are there; `target` is the highest number
    known to exist. While target > last something is missing, and one fetch at a time is
    under way to get it.
    """

    def __init__(self, seq: int = 0, *, limit: int = MAX_FETCH) -> None:
        self.limit = limit
        self._reset(seq)

    def _reset(self, seq: int) -> None:
        self.last = seq
        self.target = seq
        self._buffer: dict[int, E] = {}
        self._fetch: Fetch | None = None

    @property
    def fetching(self) -> bool:
        """Whether a fetch is under way (told by fetch(), ended by fetched() or failed())."""
        return self._fetch is not None

    @property
    def missing(self) -> bool:
        """Whether the room has events we have not delivered yet."""
        return self.target > self.last

    @property
    def held(self) -> bool:
        """Whether events wait behind a gap: proof that some were lost on the way (while
        missing() alone may only mean they have not arrived yet)."""
        return bool(self._buffer)

    def receive(self, events: Sequence[E]) -> list[E]:
        """Events of the room, heard in any order and maybe again -> those now ready to
        deliver, in order (possibly the list given). Older ones are dropped; ones ahead of a
        gap wait for it, and tell us the room has reached them."""
        n = len(events)
        if not n:
            return self._release() if self._buffer else []
        first = self.last + 1
        if (
            not self._buffer
            and events[0].seq == first
            and events[-1].seq == first + n - 1
            and list(map(_seq, events)) == list(range(first, first + n))
        ):
            self.last += n  # the common case: the next batch, whole and in order
            if self.target < self.last:
                self.target = self.last
            return events if isinstance(events, list) else list(events)
        buffer, last, top = self._buffer, self.last, 0
        for ev in events:
            seq = ev.seq
            if type(seq) is int and seq > last:
                buffer[seq] = ev
                if seq > top:
                    top = seq
        ready = self._release()
        if buffer and top > self.target:
            self.target = top
        return ready

    def _release(self) -> list[E]:
        """Take the buffered events that follow last, in order."""
        ready, buffer = [], self._buffer
        while self.last + 1 in buffer:
            self.last += 1
            ready.append(buffer.pop(self.last))
        if self.target < self.last:
            self.target = self.last
        return ready

    def reached(self, seq: int) -> None:
        """The broker says the room is at seq (a ping reply, LIVE): anything up to it that
        we lack is missing (see fetch())."""
        if seq > self.target:
            self.target = seq

    def joined(self, seq: int) -> bool:
        """A JOIN reply says the room is at seq. Lower than what we delivered means the
        broker started over (a new history): start from seq, forgetting the old numbers
        (a fetch under way is then stale). Returns whether it did."""
        if seq < self.last:
            self._reset(seq)
            return True
        self.reached(seq)
        return False

    def fetch(self) -> Fetch | None:
        """The history range to fetch now: when events are missing and no fetch is under way.
        It is under way until fetched() or failed() is told about it."""
        if self._fetch is not None or self.target <= self.last:
            return None
        self._fetch = Fetch(self.last, self.limit)
        return self._fetch

    def failed(self, fetch: Fetch) -> None:
        """The fetch got no reply (a timeout, a lost connection): the next fetch() asks again."""
        if fetch is self._fetch:
            self._fetch = None

    def fetched(self, fetch: Fetch, events: Sequence[E], seq: int) -> Fetched[E]:
        """History's reply to `fetch`: its events (seq > fetch.after, in order) and the room's
        seq as the reply gives it. Numbers that history lacks below its first event (with no
        event, below the first one we hold) are skipped: they will never come. A reply with
        no event while we hold none says the room ends at seq and ends this repair (a later
        receive() or reached() may start another). One with no event and a seq below what we
        hold comes from a broker behind what we heard (in a cluster, one that has not got the
        room's latest events yet): it skips nothing, and ends this repair until the room is
        reported again."""
        if fetch is not self._fetch:  # stale: failed, or the broker started over
            return Fetched([], range(0), None)
        self._fetch = None
        seqs = [s for s in map(_seq, events) if type(s) is int and s > fetch.after]
        if seqs:
            ready, first = self.receive(events), min(seqs)  # history has none in (after, first)
        elif self._buffer:  # history has none after fetch.after at all
            ready, first = [], min(self._buffer)
            if seq < first - 1:  # says so a broker behind what we heard: none for us yet
                return Fetched([], range(0), None)
        else:
            self.target = max(self.last, min(self.target, seq))
            return Fetched([], range(0), None)
        skipped = range(self.last + 1, first)
        if skipped:
            self.last = first - 1
            ready = ready + self._release()
        return Fetched(ready, skipped, self.fetch())
