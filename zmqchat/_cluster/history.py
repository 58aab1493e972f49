"""Reading a room's stream by the room's seqs, and erasing from it (issue 23's removals).

A stream message holds events a..b (streams.py). A removal erases the removed message's text
from the cluster: the stream message that holds it is deleted (JetStream overwrites its
bytes on every replica), and what else it held is kept as an overlay, in the key-value
bucket NS-erased under `<room hex>.<stream seq>`, with a `deleted` event in place of each
erased one. Reading fills what a deleted stream message leaves: from its overlay, or, where
there is none (all its events erased, or a stream written one event a message), with a
`deleted` event for each missing seq: a room's numbers never have a gap.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final, Protocol

import nats.js.errors

from zmqchat import protocol as m
from zmqchat._cluster.names import hexkey, room_stream, room_subject

logger = logging.getLogger("zmqchat.cluster")

READ_BATCH: Final = 500  # messages per direct-get request
DELETED: Final = str(m.EventKind.DELETED)


class Stored:
    """One stream message: its sequence, and the room's events in it (a..b)."""

    __slots__ = ("seq", "first", "kinds", "ids", "tails")

    def __init__(
        self, seq: int, first: int, kinds: list[str], ids: list[str], tails: list[bytes]
    ) -> None:
        self.seq, self.first, self.kinds, self.ids, self.tails = seq, first, kinds, ids, tails

    @property
    def last(self) -> int:
        return self.first + len(self.tails) - 1

    def kind(self, i: int) -> str:
        return self.kinds[i] if i < len(self.kinds) else ""

    def msgid(self, i: int) -> str:
        return self.ids[i] if i < len(self.ids) else ""


def parse(seq: int, headers: dict[str, str] | None, data: bytes) -> Stored:
    headers = headers or {}
    first = headers.get("Zc-First")
    if first is None:  # one event, numbered by its stream sequence
        kind, msgid = headers.get("Zc-Kind", ""), headers.get("Nats-Msg-Id", "")
        return Stored(seq, seq, [kind], [msgid], [data])
    return Stored(
        seq,
        int(first),
        headers.get("Zc-Kinds", "").split(","),
        headers.get("Zc-Ids", "").split(","),
        data.split(b"\n"),
    )


def stored_of(msg: Any) -> Stored:
    """A direct get's answer as a stream message (its sequence is in a header)."""
    headers = msg.headers or {}
    return parse(int(headers["Nats-Sequence"]), headers, msg.data or b"")


def event_ts(tail: bytes) -> float:
    """The time of an event from its stored tail, which starts `"ts":<number>,`."""
    try:
        return float(tail[5 : tail.index(b",", 5)])
    except ValueError:
        return 0.0


def tombstone_tail(ts: float) -> bytes:
    return m.encode_event_tail(ts, "", DELETED, m.DELETED_TEXT)


class Host(Protocol):
    """What reading and erasing use of the bridge."""

    js: Any
    ns: str
    erased: Any  # the NS-erased bucket

    async def direct(self, stream: str, request: dict[str, Any]) -> list[Any]: ...


class History:
    """One room's stream, read by seq (see the module docstring). `index` is what the room's
    RoomStream learned: (first seq, stream seq) of each message, ascending."""

    def __init__(self, host: Host, room: str, index: list[tuple[int, int]]) -> None:
        self.host, self.room, self.index = host, room, index
        self.stream, self.subject = room_stream(host.ns, room), room_subject(host.ns, room)

    def _key(self, seq: int) -> str:
        return f"{hexkey(self.room)}.{seq}"

    # ------------------------------------------------------------------ messages
    async def messages(self, start: int, end: int | None) -> list[Stored]:
        """Stream messages start..end (None: to the end as the stream's leader has it),
        in order, with what deleted ones leave filled in."""
        if end is None:
            info = await self.host.js.stream_info(self.stream)
            end = info.state.last_seq
        out: list[Stored] = []
        seq = start
        while seq <= end:
            request = {"seq": seq, "batch": min(READ_BATCH, end - seq + 1)}
            got = [stored_of(m) for m in await self.host.direct(self.stream, request)]
            out += [s for s in got if s.seq <= end]
            if not got or len(got) < request["batch"]:
                break
            seq = got[-1].seq + 1
        have = out[-1].seq if out else start - 1
        for missing in range(have + 1, end + 1):  # a replica that lags: from the leader
            try:
                raw = await self.host.js.get_msg(self.stream, missing)
            except nats.js.errors.NotFoundError:  # deleted (erased): filled below
                continue
            out.append(parse(missing, raw.headers, raw.data or b""))
        return await self.filled(out)

    async def filled(self, messages: list[Stored]) -> list[Stored]:
        """Messages in stream order, with the seqs between two of them that none holds
        (a deleted message's) taken from overlays, or `deleted` events."""
        out: list[Stored] = []
        for stored in messages:
            if out and stored.first > out[-1].last + 1:
                out += await self._gap(out[-1], stored)
            out.append(stored)
        return out

    async def _gap(self, before: Stored, after: Stored) -> list[Stored]:
        found: list[Stored] = []
        for seq in range(before.seq + 1, after.seq):
            overlay = await self._overlay(seq)
            if overlay is not None:
                found.append(overlay)
        out, at = [], before.last + 1
        ts = event_ts(after.tails[0]) if after.tails else 0.0
        for overlay in sorted(found, key=lambda s: s.first):
            if overlay.first > at:
                out.append(self._tombstones(overlay.seq - 1, at, overlay.first - 1, ts))
            out.append(overlay)
            at = overlay.last + 1
        if at < after.first:
            out.append(self._tombstones(after.seq - 1, at, after.first - 1, ts))
        return out

    def _tombstones(self, seq: int, first: int, last: int, ts: float) -> Stored:
        n = last - first + 1
        return Stored(seq, first, [DELETED] * n, [""] * n, [tombstone_tail(ts)] * n)

    async def _overlay(self, seq: int) -> Stored | None:
        try:
            entry = await self.host.erased.get(self._key(seq))
        except nats.js.errors.KeyNotFoundError:  # none (or deleted: a subclass)
            return None
        if not entry.value:
            return None
        d = json.loads(entry.value)
        return Stored(seq, d["first"], d["kinds"], d["ids"], [t.encode() for t in d["tails"]])

    # ------------------------------------------------------------------ by seq
    async def _next(self, seq: int) -> Stored | None:
        """The first message of the room at or after stream sequence `seq`."""
        got = await self.host.direct(self.stream, {"seq": seq, "next_by_subj": self.subject})
        return stored_of(got[0]) if got else None

    async def locate(self, seq: int) -> int:
        """The stream sequence to read from for room seq `seq`: the last message that
        begins at or before it (what a deleted one held comes with it)."""
        import bisect

        at = bisect.bisect_right(self.index, (seq, 1 << 62)) - 1
        if self.index and at >= 0:
            return self.index[at][1]
        lo, hi = 1, min(seq, self.index[0][1] - 1 if self.index else seq)
        while lo < hi:  # each message holds one seq at least: its stream seq is <= seq
            mid = (lo + hi + 1) // 2
            found = await self._next(mid)
            if found is not None and found.first <= seq and found.seq <= hi:
                lo = found.seq
            else:
                hi = mid - 1
        return lo

    async def events(self, lo: int, hi: int, known: int = 0) -> list[tuple[int, bytes, str, str]]:
        """The room's events lo..hi: (seq, tail, kind, message id), as far as it has them;
        up to `known` (stored, as the broker knows) even from a replica that lags."""
        out: list[tuple[int, bytes, str, str]] = []
        if lo > hi:
            return out
        seq = await self.locate(lo)
        previous: Stored | None = None
        while True:
            request = {"seq": seq, "batch": READ_BATCH, "next_by_subj": self.subject}
            got = [stored_of(msg) for msg in await self.host.direct(self.stream, request)]
            if previous is None and got and got[0].first > lo:  # erased at the stream's start
                ts = event_ts(got[0].tails[0]) if got[0].tails else 0.0
                previous = self._tombstones(0, lo, got[0].first - 1, ts)
                _take(previous, lo, hi, out)
            batch = await self.filled(([previous] if previous else []) + got)
            for stored in batch[1:] if previous else batch:
                _take(stored, lo, hi, out)
            if got and got[-1].last >= hi:
                return out
            if not got or len(got) < READ_BATCH:  # the end, as the replica that answered has it
                end = min(hi, known)
                if (out[-1][0] if out else lo - 1) < end:  # it lags: the rest from the leader
                    before = got[-1] if got else previous
                    rest = await self._from_leader(got[-1].seq + 1 if got else seq, end)
                    batch = await self.filled(([before] if before else []) + rest)
                    for stored in batch[1:] if before else batch:
                        _take(stored, lo, hi, out)
                return out
            previous, seq = got[-1], got[-1].seq + 1

    async def _from_leader(self, seq: int, end: int) -> list[Stored]:
        """The room's messages from stream sequence `seq` on, read from the stream's leader,
        up to the one that holds room seq `end`."""
        out: list[Stored] = []
        while not out or out[-1].last < end:
            try:
                raw = await self.host.js.get_msg(self.stream, seq, subject=self.subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            out.append(parse(raw.seq, raw.headers, raw.data or b""))
            seq = raw.seq + 1
        return out

    async def read(self, lo: int, hi: int, known: int = 0) -> list[tuple[int, bytes]]:
        return [(seq, tail) for seq, tail, _, _ in await self.events(lo, hi, known)]

    async def message(self, seq: int) -> tuple[bytes, str] | None:
        """A room event's tail and message id; None if there is none (or it was erased)."""
        for at, tail, kind, msgid in await self.events(seq, seq, seq):
            if at == seq and kind != DELETED:
                return tail, msgid
        return None

    # ------------------------------------------------------------------ erasing
    async def erase(self, seqs: list[int]) -> None:
        """Erase events: each stream message that holds one is deleted, and an overlay
        keeps what else it held (or its overlay is written again, if it was deleted)."""
        holders: dict[int, list[int]] = {}
        found: dict[int, Stored] = {}
        for seq in seqs:
            for stored in await self.messages_around(seq):
                if (
                    stored.first <= seq <= stored.last
                    and stored.kind(seq - stored.first) != DELETED
                ):
                    holders.setdefault(stored.seq, []).append(seq)
                    found[stored.seq] = stored
        for stream_seq, erased in holders.items():
            await self._erase_in(found[stream_seq], erased)

    async def messages_around(self, seq: int) -> list[Stored]:
        start = await self.locate(seq)
        first = await self._next(start)
        if first is None:
            return []
        after = await self._next(first.seq + 1)
        return await self.filled([first, after] if after is not None else [first])

    async def _erase_in(self, stored: Stored, seqs: list[int]) -> None:
        for seq in seqs:
            i = seq - stored.first
            stored.tails[i] = tombstone_tail(event_ts(stored.tails[i]))
            stored.kinds[i] = DELETED
            if i < len(stored.ids):
                stored.ids[i] = ""
        keep = any(kind != DELETED for kind in stored.kinds)
        key = self._key(stored.seq)
        try:
            old = await self.host.erased.get(key)
        except nats.js.errors.KeyNotFoundError:
            old = None
        if keep:
            overlay = {
                "first": stored.first,
                "kinds": stored.kinds,
                "ids": stored.ids,
                "tails": [t.decode() for t in stored.tails],
            }
            await self.host.erased.put(key, json.dumps(overlay).encode())
        elif old is not None:
            await self.host.erased.delete(key)
        if old is not None:  # its earlier text: gone for good too
            await self._delete(f"KV_{self.host.ns}-erased", old.revision)
        await self._delete(self.stream, stored.seq)

    async def _delete(self, stream: str, seq: int) -> None:
        try:
            await self.host.js.delete_msg(stream, seq)
        except nats.js.errors.NotFoundError:  # deleted already (by another broker)
            pass


def _take(stored: Stored, lo: int, hi: int, out: list[tuple[int, bytes, str, str]]) -> None:
    for i, tail in enumerate(stored.tails):
        if lo <= stored.first + i <= hi:
            out.append((stored.first + i, tail, stored.kind(i), stored.msgid(i)))
