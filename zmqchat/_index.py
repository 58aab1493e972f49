"""Edits, removals and the full-text index of a history database (issue 23): used by the
one broker's history writer (_local/store.py) and by each cluster broker's own index
(_cluster/index.py), so both apply them alike.

The index is SQLite FTS5, kept in step with the `events` and `privates` tables by triggers:
a room message (kind msg or action) is indexed as it is inserted, and whenever its stored
text changes (an edit, or a removal that leaves a `deleted` event in its place) its old words
leave the index and the new ones come in, in the same transaction. Whatever writes the
events (the one broker's writer process, a cluster broker's own index) gets this for free.

The index is contentless (it keeps words, not texts: results are read from `events`); its
rows are numbered `room id * 2**40 + seq`, so that one room is a range of numbers and its
newest matches come first at no cost. Private messages have an index of their own, numbered
as their rows.

A removal overwrites the message, and any edit of it, with a `deleted` event: with
`secure_delete` on (the writer sets it) SQLite zeroes what it frees. No search finds its
words from then on. The index itself is rewritten in place only with SQLite 3.44 or newer
(FTS5's `secure-delete`, turned on when there); with an older SQLite the removed words stay
in the index's older pages, unreadable by any search, until SQLite merges those pages.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Final

from zmqchat import protocol as m

ROOM_SPAN: Final = 1 << 40  # index row numbers per room: more than any room's seqs
SEARCHED: Final = ("msg", "action")  # the kinds a search finds (and an edit may change)

# The tables a cluster broker's index keeps (the same columns as the history's, store.py).
MIRROR: Final = """
CREATE TABLE IF NOT EXISTS events (
    room TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, sender TEXT NOT NULL,
    cmid TEXT, data TEXT NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS privates (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    cmid TEXT, data TEXT NOT NULL, from_key TEXT);
"""

SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS search_rooms (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS edits (room TEXT NOT NULL, ref INTEGER NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (room, ref, seq)) WITHOUT ROWID;
CREATE VIRTUAL TABLE IF NOT EXISTS search_text USING fts5(
    text, content='', columnsize=0, tokenize='unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE IF NOT EXISTS search_privates USING fts5(
    text, content='', columnsize=0, tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS search_added AFTER INSERT ON events
WHEN json_extract(NEW.data, '$.kind') IN ('msg', 'action')
BEGIN
    INSERT OR IGNORE INTO search_rooms (name) VALUES (NEW.room);
    INSERT INTO search_text (rowid, text)
    SELECT id * {ROOM_SPAN} + NEW.seq, json_extract(NEW.data, '$.text')
    FROM search_rooms WHERE name = NEW.room;
END;
CREATE TRIGGER IF NOT EXISTS search_changed AFTER UPDATE OF data ON events
BEGIN
    INSERT INTO search_text (search_text, rowid, text)
    SELECT 'delete', id * {ROOM_SPAN} + OLD.seq, json_extract(OLD.data, '$.text')
    FROM search_rooms
    WHERE name = OLD.room AND json_extract(OLD.data, '$.kind') IN ('msg', 'action');
    INSERT INTO search_text (rowid, text)
    SELECT id * {ROOM_SPAN} + NEW.seq, json_extract(NEW.data, '$.text')
    FROM search_rooms
    WHERE name = NEW.room AND json_extract(NEW.data, '$.kind') IN ('msg', 'action');
END;
CREATE TRIGGER IF NOT EXISTS search_private AFTER INSERT ON privates
BEGIN
    INSERT INTO search_privates (rowid, text) VALUES (NEW.id, json_extract(NEW.data, '$.text'));
END;
"""

# What an index made after its history (a database from before issue 23) starts from.
_BACKFILL: Final = f"""
INSERT OR IGNORE INTO search_rooms (name) SELECT DISTINCT room FROM events;
INSERT INTO search_text (rowid, text)
SELECT r.id * {ROOM_SPAN} + e.seq, json_extract(e.data, '$.text')
FROM events e JOIN search_rooms r ON r.name = e.room
WHERE json_extract(e.data, '$.kind') IN ('msg', 'action');
INSERT INTO search_privates (rowid, text) SELECT id, json_extract(data, '$.text') FROM privates;
"""


def create(db: sqlite3.Connection) -> None:
    """The index, its triggers and the edits table (after `events` and `privates` exist);
    a database that had history but no index gets its history indexed now."""
    had = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'search_text'").fetchone()
    db.executescript(SCHEMA)
    if sqlite3.sqlite_version_info >= (3, 44, 0):  # a removal's words leave the pages at once
        for table in ("search_text", "search_privates"):  # (older: when they are merged)
            db.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('secure-delete', 1)")
    if not had and db.execute("SELECT 1 FROM events LIMIT 1").fetchone():
        db.executescript("BEGIN;" + _BACKFILL + "COMMIT;")


_STAGE: Final = """
CREATE TEMP TABLE IF NOT EXISTS staged_events (
    room TEXT, seq INTEGER, ts REAL, sender TEXT, cmid TEXT, data TEXT)"""
_FROM_STAGE: Final = """
INSERT OR IGNORE INTO events SELECT s.* FROM temp.staged_events s
LEFT JOIN search_rooms r ON r.name = s.room ORDER BY coalesce(r.id, 9e18), s.room, s.seq"""


def insert_events(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Add room events (room, seq, ts, sender, cmid, data), each once (a repeat is ignored),
    in one statement, in the index's order. Not one insert each: the index (FTS5) writes
    out what it holds at every statement of a table with triggers, and whenever a row
    comes with a lower number than the one before (rooms interleave in the log), which
    made indexing ten times as slow."""
    db.execute(_STAGE)
    db.executemany("INSERT INTO temp.staged_events VALUES (?,?,?,?,?,?)", rows)
    db.execute(_FROM_STAGE)
    db.execute("DELETE FROM temp.staged_events")


def _dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def _overwrite(db: sqlite3.Connection, room: str, seq: int) -> None:
    """Leave a `deleted` event at (room, seq), keeping its time."""
    row = db.execute("SELECT ts FROM events WHERE room=? AND seq=?", (room, seq)).fetchone()
    if row is not None:
        db.execute(
            "UPDATE events SET data=? WHERE room=? AND seq=?",
            (m.tombstone(room, seq, row[0]).decode(), room, seq),
        )


def _message(db: sqlite3.Connection, room: str, seq: int) -> dict[str, Any] | None:
    row = db.execute("SELECT data FROM events WHERE room=? AND seq=?", (room, seq)).fetchone()
    return json.loads(row[0]) if row is not None else None


def apply_edit(
    db: sqlite3.Connection,
    room: str,
    seq: int,
    ts: float,
    sender: str,
    data: str,
    ref: int,
) -> None:
    """Store an edit event and give the message it names (`ref`) its text, marked `edited`
    with the edit's time. Applied twice, the second time does nothing. If the message is
    gone by then (removed meanwhile), the edit's own text goes too."""
    added = db.execute(
        "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?)", (room, seq, ts, sender, None, data)
    )
    if added.rowcount == 0:
        return
    original = _message(db, room, ref)
    if original is None or original.get("kind") not in SEARCHED:
        _overwrite(db, room, seq)
        return
    original["text"] = json.loads(data).get("text", "")
    original["edited"] = ts
    db.execute("UPDATE events SET data=? WHERE room=? AND seq=?", (_dumps(original), room, ref))
    db.execute("INSERT OR IGNORE INTO edits VALUES (?,?,?)", (room, ref, seq))


def apply_delete(
    db: sqlite3.Connection,
    room: str,
    seq: int,
    ts: float,
    sender: str,
    data: str,
    ref: int,
) -> None:
    """Store a removal and overwrite the message it names, and every edit of it, with
    `deleted` events. Applied twice, the second time does nothing."""
    added = db.execute(
        "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?)", (room, seq, ts, sender, None, data)
    )
    if added.rowcount == 0:
        return
    original = _message(db, room, ref)
    if original is not None and original.get("kind") in SEARCHED:
        _overwrite(db, room, ref)
    for (edit,) in db.execute("SELECT seq FROM edits WHERE room=? AND ref=?", (room, ref)):
        _overwrite(db, room, edit)
    db.execute("DELETE FROM edits WHERE room=? AND ref=?", (room, ref))


def lookup(db: sqlite3.Connection, room: str, seq: int) -> tuple[str, dict[str, Any]] | None:
    """(sender, event as stored now) of a room's event, if there is one."""
    row = db.execute(
        "SELECT sender, data FROM events WHERE room=? AND seq=?", (room, seq)
    ).fetchone()
    return (row[0], json.loads(row[1])) if row is not None else None


def edits_of(db: sqlite3.Connection, room: str, ref: int) -> list[int]:
    """The seqs of the edit events of a message."""
    return [s for (s,) in db.execute("SELECT seq FROM edits WHERE room=? AND ref=?", (room, ref))]


def search(
    db: sqlite3.Connection, expression: str, rooms: list[str], me: str | None, limit: int
) -> tuple[list[str], int]:
    """The newest `limit` events that match (stored JSON texts, newest first) in `rooms`
    and, when `me` is given, among the private messages that `me` sent or was sent; and
    how many match in all."""
    hits: list[tuple[float, str]] = []
    total = 0
    if rooms:
        marks = ",".join("?" * len(rooms))
        ids = db.execute(f"SELECT name, id FROM search_rooms WHERE name IN ({marks})", rooms)
        for name, rid in ids.fetchall():
            low, high = rid * ROOM_SPAN, (rid + 1) * ROOM_SPAN - 1
            # every match of the room, newest first, in one pass: counting them in a query
            # of its own would make SQLite merge a prefix's words twice
            found = db.execute(
                "SELECT rowid FROM search_text WHERE search_text MATCH ? "
                "AND rowid BETWEEN ? AND ? ORDER BY rowid DESC",
                (expression, low, high),
            ).fetchall()
            total += len(found)
            for (rowid,) in found[:limit]:
                row = db.execute(
                    "SELECT ts, data FROM events WHERE room=? AND seq=?", (name, rowid - low)
                ).fetchone()
                if row is not None:
                    hits.append(row)
    if me is not None:
        mine = (
            "FROM search_privates s JOIN privates p ON p.id = s.rowid "
            "WHERE search_privates MATCH ? AND (p.sender = ? OR (p.recipient >= ? "
            "AND p.recipient < ?))"
        )
        args = (expression, me, me + " ", me + "!")
        found = db.execute(
            f"SELECT p.ts, p.data {mine} ORDER BY s.rowid DESC LIMIT ?", (*args, limit)
        ).fetchall()
        hits += found
        total += (
            len(found)
            if len(found) < limit
            else db.execute(f"SELECT count(*) {mine}", args).fetchone()[0]
        )
    hits.sort(key=lambda hit: hit[0], reverse=True)
    return [data for _, data in hits[:limit]], total
