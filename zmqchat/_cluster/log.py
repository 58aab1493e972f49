"""The room log on NATS: each room's events in a stream of its own, private messages in one
stream for all (the bridge's streams.py and privates.py); the latest events of each room
kept here, so that joins and gap repair read them without asking NATS.

A broker follows only the rooms that have members on it: from the first local member's
join (the join waits until the room's latest events are here) until a while after the
last local member left (UNFOLLOW_AFTER), so that NATS sends each room's messages only to
the brokers that deliver them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from zmqchat import protocol as m
from zmqchat._cluster.index import ClusterIndex, LogEdits
from zmqchat._cluster.names import SeenIds, Verb, json_answer, list_answer, msg_id, subject_hash
from zmqchat._core.state import Delivery, Draft, Op, gather

if TYPE_CHECKING:
    from zmqchat._cluster.calls import Calls

logger = logging.getLogger("zmqchat.cluster")

CACHE_EVENTS: Final = 1000  # latest events kept per room: joins and gap repair read these
PRIVATE_READBACK: Final = 500  # a retried private message is looked for among the latest
# this many from its sender to its recipient (its client sends in order: it is the oldest
# of its own that is not acknowledged)
UNFOLLOW_AFTER: Final = 30.0  # seconds a room without local members is still followed


class ClusterLog(LogEdits):
    """Rooms' events in their streams; the latest of each kept here for reads (edits,
    removals and search: index.py)."""

    msg_id = staticmethod(msg_id)

    def __init__(self, calls: Calls, seen: SeenIds) -> None:
        self.calls, self.seen = calls, seen
        self.delivered: dict[str, int] = {}  # room -> the highest number handed to the core
        self.incoming: list[Delivery] = []
        self.acked: dict[str, int] = {}  # room -> the highest number our own appends got
        self.cache: dict[str, deque[bytes]] = {}
        self.following: dict[str, Op] = {}  # room -> done once it is followed
        self.idle: dict[str, float] = {}  # followed room -> since when it has no local member
        self.index = ClusterIndex(self._index_read, self._erase, self._patch_cache)  # issue 23

    def start_at(self, room: str, last: int) -> None:
        """LAST room seq: the room is followed from after seq on (its events come next)."""
        self.delivered[room] = max(last, self.delivered.get(room, 0))
        self.cache[room] = deque(maxlen=CACHE_EVENTS)
        self.index.start(room, last)  # the search index reads the room up to last

    def follow_room(self, room: str) -> Op:
        """Follow a room: done when its events up to what its stream has now are here (a
        join waits for it, so that its reply says where the room really is)."""
        self.idle.pop(room, None)
        op = self.calls.call([Verb.FOLLOW, room.encode()], json_answer)
        known = self.following.get(room)
        if known is None or known.error is not None:
            self.following[room] = op
        return op

    def unfollow_idle(self, has_local_members: Callable[[str], bool], now: float) -> None:
        """Stop following the rooms without local members for UNFOLLOW_AFTER."""
        for room, op in list(self.following.items()):
            if not op.done or has_local_members(room):
                self.idle.pop(room, None)
                continue
            since = self.idle.setdefault(room, now)
            if now - since >= UNFOLLOW_AFTER:
                del self.following[room], self.idle[room]
                self.calls.tell([Verb.UNFOLLOW, room.encode()])

    def last(self, room: str) -> int:
        return self.delivered.get(room, 0)

    def read(
        self, room: str, *, after: int | None, before: int | None, since: float | None, limit: int
    ) -> Op:
        """Stored events (LogEdits.read), once the room is followed here. A member whose
        join still waits for the follow may ask already (its client resumed here holding a
        gap, and a ping's reply names its rooms): the room's end is not here yet, and an
        answer now would say the room has nothing after `after` (a soak's client gave up
        on 579 stored events so). A follow that failed is asked for again, as a join would."""
        follow = self.following.get(room)
        if follow is not None and follow.error is not None:
            follow = self.follow_room(room)
        if follow is None or (follow.done and follow.error is None):
            return super().read(room, after=after, before=before, since=since, limit=limit)
        outer = Op()

        def followed(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
                return
            done = super(ClusterLog, self).read(
                room, after=after, before=before, since=since, limit=limit
            )
            done.then(lambda r: outer.resolve(r.value) if r.error is None else outer.fail(r.error))

        follow.then(followed)
        return outer

    def append(self, room: str, drafts: list[Draft], heard: int | None = None) -> Op:
        frames = [Verb.APPEND, room.encode(), b"" if heard is None else str(heard).encode()]
        for d in drafts:
            tail = m.encode_event_tail(time.time(), d.nick, d.kind, d.text, d.cmid, d.extra)
            mid = msg_id(d.owner, d.cmid) if d.cmid is not None else uuid.uuid4().hex
            frames += [mid.encode(), str(d.kind).encode(), tail]
        op = self.calls.call(frames, json_answer)

        def stored(op: Op) -> None:  # a read after the ack includes them (read your writes)
            if op.error is None and op.value:
                self.acked[room] = max(self.acked.get(room, 0), max(op.value))

        op.then(stored)
        return op

    def known_ids(self, owner: str, cmids: list[str]) -> dict[str, tuple[str, str, int] | None]:
        out: dict[str, tuple[str, str, int] | None] = {}
        for cmid in cmids:
            hit = self.seen.get(msg_id(owner, cmid))
            out[cmid] = (owner, *hit) if hit is not None else None
        return out

    def _read(
        self, room: str, *, after: int | None, before: int | None, since: float | None, limit: int
    ) -> Op:
        last = max(self.last(room), self.acked.get(room, 0))
        if last == self.last(room):  # everything it may ask for has reached us
            cached = self._from_cache(room, after, before, since, limit)
            if cached is not None:
                return Op.ready(cached)
        q = {"after": after, "before": before, "since": since, "limit": limit, "last": last}
        return self.calls.call([Verb.READ, room.encode(), json.dumps(q).encode()], list_answer)

    def _from_cache(
        self, room: str, after: int | None, before: int | None, since: float | None, limit: int
    ) -> list[str] | None:
        cache, last = self.cache.get(room), self.last(room)
        if not cache:
            return [] if last == 0 else None
        first = last - len(cache) + 1
        if after is not None:
            lo, hi = after + 1, min(last, after + limit)
        else:
            hi = min(before - 1, last) if before is not None else last
            lo = max(1, hi - limit + 1)
        if lo > hi:
            return []
        if lo < first:
            return None
        texts = [cache[seq - first].decode() for seq in range(lo, hi + 1)]
        if since is not None:
            texts = [t for t in texts if json.loads(t).get("ts", 0) >= since]
        return texts

    # ------------------------------------------------------------------ private messages
    def append_private(
        self, ts: float, sender: str, recipient: str, cmid: str, data: bytes, from_key: str
    ) -> Op:
        to_owner, _, to_key = recipient.partition(" ")
        subject = ".".join(subject_hash(t) for t in (to_owner, to_key, sender, from_key))
        mid = msg_id(sender, cmid)
        op = self.calls.call([Verb.PRIV, subject.encode(), mid.encode(), data], json_answer)

        def stored(op: Op) -> None:
            if op.error is None:  # a retry of it is a duplicate from now on
                self.seen.add(mid, "", 0)

        op.then(stored)
        return op

    def private_kept(self, sender: str, recipient: str, cmid: str, since: float) -> Op:
        """Read back the latest private messages from sender to recipient, under any nicks
        of theirs, for one with this id (a retry past the stream's duplicate window, to a
        broker that did not store the first copy)."""
        to_owner = recipient.partition(" ")[0]
        pattern = f"{subject_hash(to_owner)}.*.{subject_hash(sender)}.*"
        outer = Op()

        def read(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
                return
            found = any(json.loads(text).get("cmid") == cmid for text in op.value)
            if found:  # a retry of it is a duplicate here from now on
                self.seen.add(msg_id(sender, cmid), "", 0)
            outer.resolve(found)

        self._privates(pattern, since, PRIVATE_READBACK).then(read)
        return outer

    def _privates(self, pattern: str, since: float, limit: int) -> Op:
        return self.calls.call(
            [Verb.PRIVREAD, pattern.encode(), repr(since).encode(), str(limit).encode()],
            list_answer,
        )

    def privates_to(self, recipient: str, since: float, limit: int) -> Op:
        owner, _, key = recipient.partition(" ")
        return self._privates(f"{subject_hash(owner)}.{subject_hash(key)}.*.*", since, limit)

    def privates_of(self, owner: str, since: float, limit: int) -> Op:
        """The private messages kept for an identity under any nick (accounts)."""
        return self._privates(f"{subject_hash(owner)}.*.*.*", since, limit)

    def conversation(self, me: str, peer_key: str, since: float | None, limit: int) -> Op:
        mine, peer = subject_hash(me), subject_hash(peer_key)
        both = gather(
            [
                self._privates(f"{mine}.*.*.{peer}", since or 0.0, limit),
                self._privates(f"*.{peer}.{mine}.*", since or 0.0, limit),
            ]
        )
        outer = Op()

        def merged(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
                return
            texts = {t: json.loads(t).get("ts", 0) for part in op.value for t in part}
            outer.resolve(sorted(texts, key=texts.__getitem__)[-limit:])

        both.then(merged)
        return outer

    # ------------------------------------------------------------------ news
    def arrived(self, frames: list[bytes]) -> None:
        """EVENTS room first meta event...: a room's next events from its stream."""
        room, first, meta = frames[1].decode(), int(frames[2]), json.loads(frames[3])
        events = frames[4:]
        last = self.delivered.get(room, 0)
        if first > last + 1:
            logger.error("%s: events %d..%d never arrived", room, last + 1, first - 1)
        end = first + len(events) - 1
        if end <= last:
            return
        self.delivered[room] = end
        self.incoming.append(Delivery(room, first, events, meta["departures"]))
        cache = self.cache.get(room)
        if cache is None or first > last + 1:
            cache = self.cache[room] = deque(maxlen=CACHE_EVENTS)
        cache.extend(events[max(0, last + 1 - first) :])
        self.index.arrived(room, first, events)  # edits, removals, search (issue 23)

    def follow(self) -> list[Delivery]:
        """The events that arrived since the last pass; and the commands of this pass go
        out to the bridge now (the end of a pass of the broker's loop)."""
        self.calls.send_pending()
        self.index.commit()
        out, self.incoming = self.incoming, []
        return out
