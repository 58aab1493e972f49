"""The broker's history: every room event and private message, in one SQLite file.

WAL mode; the broker appends a whole pass of events and commits them in one transaction
before it publishes or acknowledges any of them, so an acknowledged message survives a
crash of the broker process (with `fsync=True`, a power loss too).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from typing import Final

log = logging.getLogger("store")

CMID_CACHE: Final = 50_000  # recent client message ids kept in memory; older ones hit the index
CHECKPOINT_EVERY: Final = 0.5  # seconds between WAL checkpoints, run off the broker's loop
# Commits between checkpoints by the writer itself: only the writer, between transactions,
# can finish one with nothing newer in the WAL, so that the WAL starts over instead of growing.
FINISH_EVERY: Final = 5000

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    room TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, sender TEXT NOT NULL,
    cmid TEXT, data TEXT NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS events_cmid ON events (cmid) WHERE cmid IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_ts ON events (room, ts);
CREATE TABLE IF NOT EXISTS privates (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    cmid TEXT, data TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS privates_cmid ON privates (cmid) WHERE cmid IS NOT NULL;
CREATE TABLE IF NOT EXISTS nick_keys (nick TEXT PRIMARY KEY, pubkey TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (room TEXT NOT NULL, nick TEXT NOT NULL,
    PRIMARY KEY (room, nick)) WITHOUT ROWID;
"""


class StoreError(Exception):
    """The database cannot be used (corrupt, truncated, not a database, unwritable)."""


class Store:
    """Append-only event history with per-room sequence numbers that survive restarts."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path, self.fsync = path, fsync
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._check()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            # Checkpoints copy the WAL into the database: milliseconds that would stall the
            # broker's loop now and then. A thread of our own does them instead.
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: {exc}") from None
        self._cmids: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._in_tx = False
        self._commits = 0
        self._rows: list[tuple] = []    # events appended, inserted at commit in one call
        self._seen = CmidFilter()
        for (cmid,) in self.db.execute("SELECT cmid FROM events WHERE cmid IS NOT NULL "
                                       "UNION ALL SELECT cmid FROM privates "
                                       "WHERE cmid IS NOT NULL"):
            self._seen.add(cmid)
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, daemon=True,
                                              name="wal-checkpoint")
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """PASSIVE checkpoints on a second connection: they never block the broker's writes."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            while not self._stop.wait(CHECKPOINT_EVERY):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy now: the next round catches up
                    log.debug("checkpoint skipped: %s", exc)
        finally:
            db.close()

    def _check(self) -> None:
        """Refuse a truncated or corrupted file instead of serving silently short history."""
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if size:
            with open(self.path, "rb") as f:
                header = f.read(100)
            if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
                raise StoreError(f"{self.path}: not an SQLite database (or truncated)")
            page = int.from_bytes(header[16:18], "big")
            page = 65536 if page == 1 else page
            pages = int.from_bytes(header[28:32], "big")
            if size % page or (pages and size < pages * page):
                raise StoreError(f"{self.path}: file is truncated ({size} bytes)")
        rows = self.db.execute("PRAGMA integrity_check").fetchall()
        if rows != [("ok",)]:
            raise StoreError(f"{self.path}: integrity check failed: "
                             + "; ".join(r[0] for r in rows[:3]))

    def close(self) -> None:
        self.commit()
        self._stop.set()
        self._checkpointer.join(5)
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()

    # ---------------------------------------------------------------- reading state
    def last_seqs(self) -> dict[str, int]:
        """Each room's highest sequence number, so numbering continues after a restart."""
        return dict(self.db.execute("SELECT room, MAX(seq) FROM events GROUP BY room"))

    def last_topic(self, room: str) -> str:
        row = self.db.execute(
            "SELECT data FROM events WHERE room=? AND data LIKE '%\"kind\":\"topic\"%' "
            "ORDER BY seq DESC LIMIT 1", (room,)).fetchone()
        return json.loads(row[0]).get("text", "") if row else ""

    def find_cmid(self, cmid: str) -> tuple[str, str, int] | None:
        """(sender, room, seq) of an already stored message with this client id, if any."""
        hit = self._cmids.get(cmid)
        if hit is not None:
            return hit
        if cmid not in self._seen:  # certainly new: no query (the common case)
            return None
        self._insert_rows()
        row = self.db.execute("SELECT sender, room, seq FROM events WHERE cmid=?",
                              (cmid,)).fetchone()
        if row is None:
            row = self.db.execute("SELECT sender, '', id FROM privates WHERE cmid=?",
                                  (cmid,)).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    def _remember(self, cmid: str, value: tuple[str, str, int]) -> None:
        self._seen.add(cmid)
        self._cmids[cmid] = value
        if len(self._cmids) > CMID_CACHE:
            self._cmids.popitem(last=False)

    # ---------------------------------------------------------------- writing
    def _begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def append(self, room: str, seq: int, ts: float, sender: str, cmid: str | None,
               data: bytes) -> None:
        """Add one room event to the open transaction."""
        self._begin()
        self._rows.append((room, seq, ts, sender, cmid, data.decode("utf-8")))
        if cmid:
            self._remember(cmid, (sender, room, seq))

    def append_private(self, ts: float, sender: str, recipient: str, cmid: str,
                       data: bytes) -> None:
        self._begin()
        cur = self.db.execute("INSERT INTO privates (ts, sender, recipient, cmid, data) "
                              "VALUES (?,?,?,?,?)", (ts, sender, recipient, cmid,
                                                     data.decode("utf-8")))
        self._remember(cmid, (sender, "", cur.lastrowid or 0))

    def commit(self) -> None:
        """Make everything appended so far durable (one transaction per broker pass)."""
        if self._in_tx:
            self._insert_rows()
            self.db.execute("COMMIT")
            self._in_tx = False
            self._commits += 1
            if self._commits >= FINISH_EVERY:  # the thread did the bulk: this is the tail
                self._commits = 0
                self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # ---------------------------------------------------------------- memberships
    def take_members(self) -> set[tuple[str, str]]:
        """(nick key, room) of everyone who was in a room when the broker last stopped (or
        crashed); the table starts empty again, refilled as people join."""
        rows = self.db.execute("SELECT nick, room FROM members").fetchall()
        self.db.execute("DELETE FROM members")
        return {(nick, room) for nick, room in rows}

    def add_member(self, room: str, nick_key: str) -> None:
        self._begin()
        self.db.execute("INSERT OR IGNORE INTO members VALUES (?,?)", (room, nick_key))

    def remove_member(self, room: str, nick_key: str) -> None:
        self._begin()
        self.db.execute("DELETE FROM members WHERE room=? AND nick=?", (room, nick_key))

    # ---------------------------------------------------------------- CURVE nick owners
    def nick_owner(self, nick_key: str) -> str | None:
        """The CURVE public key that first registered this nick, if any."""
        row = self.db.execute("SELECT pubkey FROM nick_keys WHERE nick=?",
                              (nick_key,)).fetchone()
        return row[0] if row else None

    def bind_nick(self, nick_key: str, pubkey: str) -> None:
        self._begin()
        self.db.execute("INSERT OR IGNORE INTO nick_keys VALUES (?,?)", (nick_key, pubkey))

    def _insert_rows(self) -> None:
        if self._rows:
            self.db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?)", self._rows)
            self._rows.clear()

    # ---------------------------------------------------------------- history
    def history(self, room: str, *, after: int | None = None, before: int | None = None,
                since: float | None = None, limit: int = 50) -> list[str]:
        """Events of a room as stored JSON texts, oldest first.

        With `after`, the first `limit` events after that seq (gap repair); otherwise the last
        `limit` events before `before` (or the end), optionally only those at or after `since`.
        """
        self._insert_rows()  # rows appended in this pass must be visible to history
        where, args = ["room=?"], [room]
        if after is not None:
            where.append("seq>?")
            args.append(after)
        if before is not None:
            where.append("seq<?")
            args.append(before)
        if since is not None:
            where.append("ts>=?")
            args.append(since)
        order = "ASC" if after is not None else "DESC"
        rows = self.db.execute(f"SELECT data FROM events WHERE {' AND '.join(where)} "
                               f"ORDER BY seq {order} LIMIT ?", (*args, limit)).fetchall()
        texts = [r[0] for r in rows]
        return texts if order == "ASC" else texts[::-1]


class CmidFilter:
    """A Bloom filter of every stored client message id: 'no' is certain, 'yes' is checked
    against the database (about 1% false positives at 10 bits per id)."""

    def __init__(self, bits: int = 1 << 24) -> None:
        self.bits = bits
        self.array = bytearray(bits // 8)

    def _probes(self, cmid: str) -> tuple[int, int, int]:
        h = hash(cmid) & 0xFFFFFFFFFFFFFFFF
        return h % self.bits, (h >> 21) % self.bits, ((h >> 42) | (h << 22)) % self.bits

    def add(self, cmid: str) -> None:
        for i in self._probes(cmid):
            self.array[i >> 3] |= 1 << (i & 7)

    def __contains__(self, cmid: str) -> bool:
        a = self.array
        return all(a[i >> 3] & (1 << (i & 7)) for i in self._probes(cmid))
