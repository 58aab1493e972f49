"""The broker's history: every room event and private message, in one SQLite file.

Writes reach SQLite through a short log. Each pass of the broker's loop appends its records to
`<db>-log` with one write() (with `fsync=True` also an fdatasync) before anything of the pass
is published or acknowledged: from then on they survive a crash of the broker process (with
fsync, a power loss too). A writer thread applies the log to SQLite in batches, off the loop,
where SQLite's commits and checkpoints cannot stall it; the log starts over whenever SQLite
has all of it. On startup whatever the log holds is applied first (every record is
idempotent). Reads wait until SQLite has everything logged so far.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from typing import Any, Final

log = logging.getLogger("store")

CMID_CACHE: Final = 50_000   # recent client message ids kept in memory; older ones hit the index
LOG_RESET: Final = 4 << 20   # bytes: the log starts over once SQLite has it all and it is this big
LOG_MAX: Final = 64 << 20    # bytes: past this the loop waits for the writer to catch up
SYNC_TIMEOUT: Final = 10.0   # seconds a read waits for the writer before it gives up
RETRY_AFTER: Final = 1.0     # seconds between the writer's attempts when SQLite fails

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

# What each record does to SQLite. A room event is ("event", room, seq, ts, sender, cmid,
# data); every statement leaves the same result when a record is applied twice.
SQL: Final = {
    "event": "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?)",
    "private": "INSERT OR IGNORE INTO privates (ts, sender, recipient, cmid, data) "
               "VALUES (?,?,?,?,?)",
    "member": "INSERT OR IGNORE INTO members VALUES (?,?)",
    "unmember": "DELETE FROM members WHERE room=? AND nick=?",
    "no_members": "DELETE FROM members",
    "nick": "INSERT OR IGNORE INTO nick_keys VALUES (?,?)",
}


class StoreError(Exception):
    """The database cannot be used (corrupt, truncated, not a database, unwritable)."""


def encode_record(op: tuple[Any, ...]) -> bytes:
    """One log line. A room event is `E <sender> <event JSON>`: its room, seq, ts and cmid
    are in the JSON already. Anything else is `J <JSON array>`."""
    if op[0] == "event":
        sender = op[4]
        if "\t" not in sender and "\n" not in sender:
            return b"E\t" + sender.encode("utf-8") + b"\t" + op[6].encode("utf-8") + b"\n"
    return b"J\t" + json.dumps(op, ensure_ascii=False).encode("utf-8") + b"\n"


def decode_record(line: bytes) -> tuple[Any, ...]:
    tag, rest = line[:2], line[2:]
    if tag == b"E\t":
        sender, data = rest.decode("utf-8").split("\t", 1)
        ev = json.loads(data)
        return ("event", ev["room"], ev["seq"], ev["ts"], sender, ev.get("cmid"), data)
    if tag == b"J\t":
        op = tuple(json.loads(rest))
        if op and op[0] in SQL:
            return op
    raise ValueError(f"unknown log record {line[:40]!r}")


def apply(db: sqlite3.Connection, ops: list[tuple[Any, ...]]) -> None:
    """Apply records in order in one transaction (runs of room events in one call)."""
    db.execute("BEGIN")
    try:
        i = 0
        while i < len(ops):
            kind = ops[i][0]
            j = i + 1
            while j < len(ops) and ops[j][0] == kind == "event":
                j += 1
            if kind == "event":
                db.executemany(SQL[kind], (op[1:] for op in ops[i:j]))
            else:
                db.execute(SQL[kind], ops[i][1:])
            i = j
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def read_log(path: str) -> list[tuple[Any, ...]]:
    """The records of a log file; a torn last line (a crash in mid-write) is left out."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    ops = []
    for line in data.split(b"\n")[:-1]:
        try:
            ops.append(decode_record(line))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("%s: skipped a damaged record: %s", path, exc)
    return ops


class Store:
    """Append-only event history with per-room sequence numbers that survive restarts."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path, self.fsync = path, fsync
        self.log_path = path + "-log"
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._check()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self.db.executescript(SCHEMA)
            self._replay()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: {exc}") from None
        self._cmids: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._seen = CmidFilter()
        for (cmid,) in self.db.execute("SELECT cmid FROM events WHERE cmid IS NOT NULL "
                                       "UNION ALL SELECT cmid FROM privates "
                                       "WHERE cmid IS NOT NULL"):
            self._seen.add(cmid)
        self._lines: list[bytes] = []            # this pass's records, as log lines
        self._ops: list[tuple[Any, ...]] = []    # the same records, for the writer
        self._log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._log_size = os.fstat(self._log).st_size
        self._cond = threading.Condition()
        self._queue: list[tuple[Any, ...]] = []  # logged, for the writer to apply
        self._handed = self._applied = 0         # records given to the writer / in SQLite
        self._error: str = ""
        self._stopping = False
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name="history-writer")
        self._writer.start()

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

    def _replay(self) -> None:
        """Apply what the last run logged but had not yet written to SQLite."""
        ops = read_log(self.log_path)
        if ops:
            apply(self.db, ops)
            log.info("applied %d logged records to %s", len(ops), self.path)
        if os.path.exists(self.log_path):
            os.truncate(self.log_path, 0)

    def close(self) -> None:
        self.commit()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._writer.join(SYNC_TIMEOUT)
        complete = self._applied == self._handed
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()
        os.close(self._log)
        if complete:
            os.unlink(self.log_path)

    # ---------------------------------------------------------------- the writer
    def _write_loop(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    if not self._queue:
                        return
                    batch, self._queue = self._queue, []
                try:
                    apply(db, batch)  # SQLite checkpoints (autocheckpoint) here, off the loop
                except sqlite3.Error as exc:
                    log.error("history not written yet (retrying): %s", exc)
                    with self._cond:
                        self._queue[:0] = batch
                        self._error = str(exc)
                        self._cond.notify_all()
                        if self._stopping:
                            return
                        self._cond.wait(RETRY_AFTER)
                    continue
                with self._cond:
                    self._applied += len(batch)
                    self._error = ""
                    self._cond.notify_all()
        finally:
            db.close()

    def sync(self) -> None:
        """Log this pass's records and wait until SQLite has everything logged."""
        self.commit()
        with self._cond:
            target = self._handed
            if not self._cond.wait_for(lambda: self._applied >= target, SYNC_TIMEOUT):
                raise StoreError(f"{self.path}: history writer behind"
                                 + (f": {self._error}" if self._error else ""))

    # ---------------------------------------------------------------- reading state
    def last_seqs(self) -> dict[str, int]:
        """Each room's highest sequence number, so numbering continues after a restart."""
        self.sync()
        return dict(self.db.execute("SELECT room, MAX(seq) FROM events GROUP BY room"))

    def last_topic(self, room: str) -> str:
        self.sync()
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
        self.sync()
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
    def _add(self, op: tuple[Any, ...]) -> None:
        self._ops.append(op)
        self._lines.append(encode_record(op))

    def append(self, room: str, seq: int, ts: float, sender: str, cmid: str | None,
               data: bytes) -> None:
        """Add one room event (its JSON, as published) to this pass."""
        self._add(("event", room, seq, ts, sender, cmid, data.decode("utf-8")))
        if cmid:
            self._remember(cmid, (sender, room, seq))

    def append_private(self, ts: float, sender: str, recipient: str, cmid: str,
                       data: bytes) -> None:
        self._add(("private", ts, sender, recipient, cmid, data.decode("utf-8")))
        self._remember(cmid, (sender, "", 0))

    def commit(self) -> None:
        """Make everything added so far durable: one write to the log per broker pass."""
        if not self._ops:
            return
        if self._log_size >= LOG_RESET and self._applied == self._handed:
            os.ftruncate(self._log, 0)  # SQLite has it all and the writer is idle: start over
            self._log_size = 0
        blob = b"".join(self._lines)
        view = memoryview(blob)
        while view:
            view = view[os.write(self._log, view):]
        if self.fsync:
            os.fdatasync(self._log)
        self._log_size += len(blob)
        with self._cond:
            self._queue.extend(self._ops)
            self._handed += len(self._ops)
            self._cond.notify()
        self._ops, self._lines = [], []
        if self._log_size >= LOG_MAX:
            self.sync()  # a writer that cannot keep up slows the loop, not the disk fills

    # ---------------------------------------------------------------- memberships
    def take_members(self) -> set[tuple[str, str]]:
        """(nick key, room) of everyone who was in a room when the broker last stopped (or
        crashed); the table starts empty again, refilled as people join."""
        self.sync()
        rows = self.db.execute("SELECT nick, room FROM members").fetchall()
        self._add(("no_members",))
        self.commit()
        return {(nick, room) for nick, room in rows}

    def add_member(self, room: str, nick_key: str) -> None:
        self._add(("member", room, nick_key))

    def remove_member(self, room: str, nick_key: str) -> None:
        self._add(("unmember", room, nick_key))

    # ---------------------------------------------------------------- CURVE nick owners
    def nick_owner(self, nick_key: str) -> str | None:
        """The CURVE public key that first registered this nick, if any."""
        self.sync()
        row = self.db.execute("SELECT pubkey FROM nick_keys WHERE nick=?",
                              (nick_key,)).fetchone()
        return row[0] if row else None

    def bind_nick(self, nick_key: str, pubkey: str) -> None:
        self._add(("nick", nick_key, pubkey))

    # ---------------------------------------------------------------- history
    def history(self, room: str, *, after: int | None = None, before: int | None = None,
                since: float | None = None, limit: int = 50) -> list[str]:
        """Events of a room as stored JSON texts, oldest first.

        With `after`, the first `limit` events after that seq (gap repair); otherwise the last
        `limit` events before `before` (or the end), optionally only those at or after `since`.
        """
        self.sync()
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


def stored_events(path: str, room: str) -> list[dict[str, Any]]:
    """A room's events as they are on disk (SQLite and the log not yet applied to it), for
    tools and tests that look at a broker's files while it runs or after it died."""
    logged = read_log(path + "-log")  # first: what leaves the log is in SQLite by then
    con = sqlite3.connect(path)
    try:
        by_seq = dict(con.execute("SELECT seq, data FROM events WHERE room=?", (room,)))
    finally:
        con.close()
    for op in logged:
        if op[0] == "event" and op[1] == room:
            by_seq.setdefault(op[2], op[6])
    return [json.loads(by_seq[seq]) for seq in sorted(by_seq)]


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
