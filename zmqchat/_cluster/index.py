"""A cluster broker's own search index, and what it knows of edits and removals (issue 23).

Each broker keeps one, in an SQLite file of its own (a temporary directory, gone when it
stops): the same tables, triggers and full-text index as the single broker's history
(_local/store.py, zmqchat/_index.py), holding each room's messages as they read now, fed
by the room streams this broker follows and by the private-message stream. It is rebuilt on
start: each room's stream is read from its first message up to where the broker's
subscription begins (arrivals wait meanwhile, then follow), the private messages from the
first. Applied in stream order, an edit rewrites its message here, a removal overwrites
it (and its edits) with `deleted` events and has them erased from the stream.

What it serves:
    search     the same query as on one broker, over this file
    patch()    history read from a stream shows what it holds: the original texts (an edit
               does not change a stream message) and holes (erased ones); reads are given
               the messages as they read now, and a `deleted` event in each hole
    caught_up  reads and searches first wait until everything this broker has had
               acknowledged has been applied here (for at most CATCH_UP_WAIT seconds)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from zmqchat import _index as messages
from zmqchat import protocol as m
from zmqchat._cluster.names import Verb, list_answer, subject_hash
from zmqchat._core import search
from zmqchat._core.edits_state import Found, Stored
from zmqchat._core.search import Query
from zmqchat._core.state import Op

if TYPE_CHECKING:
    from zmqchat._cluster.calls import Calls

log = logging.getLogger("zmqchat.cluster")

REBUILD_BATCH: Final = 500  # events per history read while rebuilding (the broker's MAX_HISTORY)
CATCH_UP_WAIT: Final = 2.0  # seconds a read or search waits for the index, at most
_CHANGING: Final = (b'"kind":"edit"', b'"kind":"delete"')
_SEARCHED: Final = (b'"kind":"msg"', b'"kind":"action"')


def seq_of(text: bytes | str) -> int:
    """The seq of an event as stored: `{"room":"R","seq":N,...`."""
    raw = text.encode() if isinstance(text, str) else text
    at = raw.index(b'"seq":') + 6
    return int(raw[at : raw.index(b",", at)])


def ts_of(raw: bytes) -> float:
    at = raw.index(b'"ts":') + 5
    return float(raw[at : raw.index(b",", at)])


def read_range(after: int | None, before: int | None, limit: int, last: int) -> tuple[int, int]:
    """The seqs a history read asks for (as the bridge reads them), first to last."""
    if after is not None:
        return after + 1, min(last, after + limit)
    high = min(before - 1, last) if before is not None else last
    return max(1, high - limit + 1), high


class ClusterIndex:
    """See the module docstring. `read(room, after, last)` reads stored events (the room
    log's READ through the bridge); `erase(room, seqs)` has messages erased from a stream."""

    def __init__(
        self,
        read: Callable[[str, int, int], Op],
        erase: Callable[[str, list[int]], None],
        changed: Callable[[str, set[int]], None],
    ) -> None:
        self._read, self._erase, self._changed = read, erase, changed
        self.folder = tempfile.mkdtemp(prefix="zmqchat-index-")
        self.db = sqlite3.connect(os.path.join(self.folder, "index.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")  # rebuilt at every start: nothing to keep
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.executescript(messages.MIRROR)
        messages.create(self.db)
        self.indexed: dict[str, int] = {}  # room -> the highest seq applied
        self.rebuilding: dict[str, list[tuple[int, list[bytes]]]] = {}  # arrivals waiting
        self.backlog: list[tuple[str, int, list[bytes]]] = []  # arrived, not applied yet
        self.changed: dict[str, set[int]] = {}  # seqs whose stream message reads otherwise
        self.waiting: list[tuple[dict[str, int], Op, float]] = []
        self.open = False  # a transaction under way (committed at the end of a pass)
        self._retry_at: list[tuple[float, str, int, int]] = []  # rebuild reads to ask again

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------ feeding
    def start(self, room: str, last: int) -> None:
        """A room followed from last + 1 on: index what its stream holds up to last (what
        is not indexed yet: a room followed again after a while holds more)."""
        if room in self.rebuilding:
            return
        self.settle()  # what came before counts as indexed
        top = self.indexed.setdefault(room, 0)
        if last > top:
            self.rebuilding[room] = []
            self._rebuild(room, top, last)

    def _rebuild(self, room: str, after: int, last: int) -> None:
        def read(op: Op) -> None:
            if op.error is not None:  # the cluster is away: try again later
                log.warning("%s: search index not rebuilt yet: %s", room, op.error)
                self._retry_at.append((time.monotonic() + 1.0, room, after, last))
                return
            texts = [t.encode() for t in op.value]
            if texts:
                self._apply(room, texts, live=False)
            done = max(after + REBUILD_BATCH, self.indexed.get(room, 0))
            if done < last:
                self._rebuild(room, done, last)
                return
            self.indexed[room] = max(self.indexed[room], last)
            for _, events in self.rebuilding.pop(room, []):
                self._apply(room, events, live=True)
            self.commit()
            self._wake()

        self._read(room, after, last).then(read)

    def retry(self) -> None:
        """Rebuild reads that failed, once their time has come (called every tick)."""
        now = time.monotonic()
        due = [r for r in self._retry_at if r[0] <= now]
        for entry in due:
            self._retry_at.remove(entry)
            self._rebuild(*entry[1:])

    def arrived(self, room: str, first: int, events: list[bytes]) -> None:
        """A room's next events from its stream: applied by settle() at the loop's next
        turn, once the broker's pass that brought them has sent them on (their receivers
        do not wait for the index: it took a fifth of the pass)."""
        if not self.backlog:
            asyncio.get_running_loop().call_soon(self.settle)
        self.backlog.append((room, first, events))

    def settle(self) -> None:
        """What arrived, applied (or kept until its room's rebuild is done), in one
        transaction; and the reads and searches waiting for it, answered."""
        if not self.backlog:
            return
        backlog, self.backlog = self.backlog, []
        for room, first, events in backlog:
            waiting = self.rebuilding.get(room)
            if waiting is not None:
                waiting.append((first, events))
            else:
                self._apply(room, events, live=True)
        self.commit()
        self._wake()

    def _apply(self, room: str, events: list[bytes], *, live: bool) -> set[int]:
        changed: set[int] = set()
        db = self.db
        if not self.open:
            db.execute("BEGIN")
            self.open = True
        top = self.indexed.get(room, 0)
        said: list[tuple[Any, ...]] = []
        for raw in events:
            seq = seq_of(raw)
            if seq <= top:
                continue
            top = seq
            if any(kind in raw for kind in _SEARCHED):
                said.append((room, seq, ts_of(raw), "", None, raw.decode()))
            elif any(kind in raw for kind in _CHANGING):
                if said:  # what it changes may be among them
                    messages.insert_events(db, said)
                    said = []
                changed |= self._change(room, seq, raw, live)
        if said:
            messages.insert_events(db, said)
        self.indexed[room] = top
        if changed:
            self.changed.setdefault(room, set()).update(changed)
            self._changed(room, changed)
        return changed

    def _change(self, room: str, seq: int, raw: bytes, live: bool) -> set[int]:
        """An edit or removal: applied here as on one broker; what it removed is erased
        from the stream too (by every broker that still had it: erasing twice is harmless)."""
        event = json.loads(raw)
        ref = event.get("ref")
        if type(ref) is not int:
            return set()
        before = messages.lookup(self.db, room, ref)
        present = before is not None and before[1].get("kind") in messages.SEARCHED
        if event.get("kind") == m.EventKind.EDIT:
            messages.apply_edit(self.db, room, seq, event.get("ts", 0.0), "", raw.decode(), ref)
            if present:
                return {ref}
            self._erase(room, [seq])  # its message was removed first: its text goes too
            return {seq}
        edits = messages.edits_of(self.db, room, ref)
        messages.apply_delete(self.db, room, seq, event.get("ts", 0.0), "", raw.decode(), ref)
        if present or edits:
            self._erase(room, ([ref] if present else []) + edits)
        return {ref, *edits}

    def privates(self, frames: list[bytes]) -> None:
        """PRIVS seq subject data ...: private messages from their stream, in order."""
        db = self.db
        if not self.open:
            db.execute("BEGIN")
            self.open = True
        for i in range(0, len(frames) - 2, 3):
            seq, subject, data = int(frames[i]), frames[i + 1].decode(), frames[i + 2]
            parts = subject.split(".")
            if len(parts) < 6:
                continue
            to_owner, to_key, sender, from_key = parts[-4:]
            try:
                ts = float(json.loads(data).get("ts", 0.0))
            except ValueError:
                continue
            db.execute(
                "INSERT OR IGNORE INTO privates (id, ts, sender, recipient, cmid, data, "
                "from_key) VALUES (?,?,?,?,?,?,?)",
                (seq, ts, sender, f"{to_owner} {to_key}", None, data.decode(), from_key),
            )

    def commit(self) -> None:
        """The end of a pass of the broker's loop: what was applied is one transaction."""
        if self.open:
            self.db.execute("COMMIT")
            self.open = False

    # ------------------------------------------------------------------ serving
    def current(self, room: str, seq: int) -> bytes | None:
        found = messages.lookup(self.db, room, seq)
        return m.dumps(found[1]) if found is not None else None

    def removed(self, room: str, seq: int) -> bool:
        found = messages.lookup(self.db, room, seq)
        return found is not None and found[1].get("kind") == m.EventKind.DELETED

    def patch(
        self, room: str, texts: list[str], low: int, high: int, since: float | None
    ) -> list[str]:
        """Events read from a stream (low..high asked for) as they read now: edited ones
        edited, a `deleted` event where one was erased, none outside the range."""
        changed = self.changed.get(room, set())
        if (
            texts
            and len(texts) == high - low + 1
            and seq_of(texts[0]) == low
            and seq_of(texts[-1]) == high
            and not any(low <= seq <= high for seq in changed)
        ):
            return texts  # the usual case: all there, none changed
        by_seq = {seq_of(t): t for t in texts}
        read_to = max(by_seq, default=low - 1)
        out: list[str] = []
        for seq in range(low, high + 1):
            text = by_seq.get(seq)
            if text is None and since is not None:  # not erased: before `since`
                continue
            if text is None or seq in changed:
                now = self.current(room, seq)
                if now is None:
                    if text is None and seq > read_to:  # past what the read got to: not
                        break  # read (yet), not erased (a client asks again for it)
                    if text is None:  # erased, and not (yet) known here
                        now = m.tombstone(room, seq, _near(by_seq, seq))
                    else:
                        out.append(text)
                        continue
                text = now.decode()
                if since is not None and json.loads(text).get("ts", 0) < since:
                    continue
            out.append(text)
        return out

    def search(
        self, expression: str, rooms: list[str], me: str | None, limit: int
    ) -> tuple[list[str], int]:
        self.commit()
        return messages.search(self.db, expression, rooms, me, limit)

    def caught_up(self, targets: dict[str, int]) -> Op:
        """Done once every room of targets is applied up to its seq (and rebuilt)."""
        if self._reached(targets):
            return Op.ready()
        op = Op()
        self.waiting.append((targets, op, time.monotonic() + CATCH_UP_WAIT))
        return op

    def _reached(self, targets: dict[str, int]) -> bool:
        return all(
            room not in self.rebuilding and self.indexed.get(room, 0) >= seq
            for room, seq in targets.items()
        )

    def _wake(self) -> None:
        """Resolve the waits that are over (caught up, or waited long enough)."""
        if not self.waiting:
            return
        now, still = time.monotonic(), []
        for targets, op, deadline in self.waiting:
            if self._reached(targets) or now > deadline:
                op.resolve()
            else:
                still.append((targets, op, deadline))
        self.waiting = still


def _near(by_seq: dict[int, str], seq: int) -> float:
    """A time for an erased event: that of the next event read (or now)."""
    later = [s for s in by_seq if s > seq]
    if later:
        try:
            return float(json.loads(by_seq[min(later)]).get("ts", 0.0))
        except ValueError:
            pass
    return time.time()


class LogEdits:
    """The cluster room log's part for edits, removals and search (core/edits_state.py's
    MessageLog): a part of ClusterLog (state.py), which holds the index."""

    msg_id: Callable[[str, str], str]  # how the room log names a client's message (state.py)

    if TYPE_CHECKING:  # what it uses of ClusterLog
        calls: Calls
        index: ClusterIndex
        acked: dict[str, int]
        cache: dict[str, deque[bytes]]

        def last(self, room: str) -> int: ...

        def _read(
            self,
            room: str,
            *,
            after: int | None,
            before: int | None,
            since: float | None,
            limit: int,
        ) -> Op: ...

    def read(
        self, room: str, *, after: int | None, before: int | None, since: float | None, limit: int
    ) -> Op:
        """Stored events as they read now (edited, erased ones `deleted`: issue 23), once
        what this broker had acknowledged has been applied to its index."""
        outer = Op()

        def caught_up(_: Op) -> None:
            last = max(self.last(room), self.acked.get(room, 0))
            low, high = read_range(after, before, limit, last)
            self._read(room, after=after, before=before, since=since, limit=limit).then(
                lambda op: (
                    outer.fail(op.error)
                    if op.error is not None
                    else outer.resolve(self.index.patch(room, op.value, low, high, since))
                )
            )

        self.index.caught_up({room: self.acked.get(room, 0)}).then(caught_up)
        return outer

    def _index_read(self, room: str, after: int, last: int) -> Op:
        q = {"after": after, "before": None, "since": None, "limit": REBUILD_BATCH, "last": last}
        return self.calls.call([Verb.READ, room.encode(), json.dumps(q).encode()], list_answer)

    def _erase(self, room: str, seqs: list[int]) -> None:
        self.calls.tell([Verb.ERASE, room.encode(), *(str(s).encode() for s in seqs)])

    def _patch_cache(self, room: str, seqs: set[int]) -> None:
        """Edited or removed events in the latest ones kept here: as they read now."""
        cache, last = self.cache.get(room), self.last(room)
        if not cache:
            return
        first = last - len(cache) + 1
        for seq in seqs:
            if first <= seq <= last:
                now = self.index.current(room, seq)
                cache[seq - first] = now if now is not None else m.tombstone(room, seq, 0.0)

    def message(self, room: str, seq: int, owner: str) -> Op:
        if self.index.removed(room, seq):
            return Op.ready(None)
        outer = Op()

        def got(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
            elif not op.value:
                outer.resolve(None)
            else:
                data, stored_id = op.value
                event = json.loads(m.numbered(room, seq, data.encode()))
                cmid = event.get("cmid")
                mine = isinstance(cmid, str) and stored_id == self.msg_id(owner, cmid)
                outer.resolve(Stored(event, mine))

        self.calls.call([Verb.MSGGET, room.encode(), str(seq).encode()], list_answer).then(got)
        return outer

    def search(self, query: Query, rooms: list[str], me: str | None, limit: int) -> Op:
        outer = Op()

        def caught_up(_: Op) -> None:
            texts, total = self.index.search(
                search.expression(query), rooms, subject_hash(me) if me else None, limit
            )
            outer.resolve(Found(texts, total))

        self.index.caught_up({room: self.acked.get(room, 0) for room in rooms}).then(caught_up)
        return outer
