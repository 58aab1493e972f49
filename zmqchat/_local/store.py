"""The broker's history: every room event and private message, in one SQLite file.

Writes reach SQLite through a short log. Each pass of the broker's loop appends its records to
the log (`<db>-log.NNNNNN`, a new segment every few MB) with one write() (with `fsync=True`
also an fdatasync) before anything of the pass is published or acknowledged: from then on they
survive a crash of the broker process (with fsync, a power loss too). A writer process of its
own (`python store.py --writer DB`) applies the log to SQLite in batches, so that SQLite's
commits, checkpoints and fsyncs never stall the broker's loop nor take its interpreter lock,
and deletes each segment once SQLite has all of it. Every record is idempotent, so whatever a
crash leaves in the log is applied again on the next start. Reads (history, ...) first ask the
writer to catch up with everything logged so far. One writer at a time: the broker takes
`<db>-writer-lock` before it opens the database and hands it to each writer it starts, so a
writer still applying the log after its broker was killed holds it, and the next broker
waits for that writer to finish.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Any, Final

if __name__ == "__main__" and not __package__:  # the writer, run as `python .../store.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from zmqchat import _index as messages  # noqa: E402 - edits, removals, the full-text index

log = logging.getLogger("zmqchat.store")
LOG_FORMAT_ENV: Final = "ZMQCHAT_LOG_FORMAT"  # the broker's log format, for its writer

CMID_CACHE: Final = 50_000  # recent client message ids kept in memory; older ones hit the index
WRITER_TOLD_EVERY: Final = 10.0  # seconds between the writer's errors while it cannot write
SEGMENT_BYTES: Final = 4 << 20  # the log goes on in a new segment past this size
WRITER_DELAY: Final = 0.02  # seconds the writer gathers records per transaction
WRITER_NICE: Final = 10  # the writer's niceness: background work
WRITER_IDLE: Final = 0.5  # seconds between looks at the log when nothing comes
SYNC_TIMEOUT: Final = 10.0  # seconds a read waits for the writer before it gives up
OLD_WRITER_WAIT: Final = 60.0  # seconds a start waits for a killed broker's writer to finish

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    room TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, sender TEXT NOT NULL,
    cmid TEXT, data TEXT NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID;
DROP INDEX IF EXISTS events_cmid;
CREATE UNIQUE INDEX IF NOT EXISTS events_sender_cmid ON events (sender, cmid)
    WHERE cmid IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_ts ON events (room, ts);
CREATE TABLE IF NOT EXISTS privates (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    cmid TEXT, data TEXT NOT NULL, from_key TEXT);
DROP INDEX IF EXISTS privates_cmid;
CREATE UNIQUE INDEX IF NOT EXISTS privates_sender_cmid ON privates (sender, cmid)
    WHERE cmid IS NOT NULL;
CREATE INDEX IF NOT EXISTS privates_to ON privates (recipient, ts);
CREATE INDEX IF NOT EXISTS privates_from ON privates (sender, ts);
CREATE TABLE IF NOT EXISTS nick_keys (nick TEXT PRIMARY KEY, pubkey TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (room TEXT NOT NULL, nick TEXT NOT NULL,
    PRIMARY KEY (room, nick)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, settings TEXT NOT NULL);
-- accounts (issue 21): SCRAM's keys as JSON (never a password); an account's rooms with the
-- seq it has read up to, its private conversations with the time read up to, its last room
CREATE TABLE IF NOT EXISTS accounts (key TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS account_rooms (account TEXT NOT NULL, room TEXT NOT NULL,
    mark INTEGER NOT NULL, joined REAL NOT NULL, PRIMARY KEY (account, room)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS account_privates (account TEXT NOT NULL, peer TEXT NOT NULL,
    mark REAL NOT NULL, PRIMARY KEY (account, peer)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS account_last (account TEXT PRIMARY KEY, room TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, offer TEXT NOT NULL);
"""

# What each record does to SQLite. A room event is ("event", room, seq, ts, sender, cmid,
# data); every statement leaves the same result when a record is applied twice.
SQL: Final = {
    "event": "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?)",
    "private": "INSERT OR IGNORE INTO privates (ts, sender, recipient, cmid, data, from_key) "
    "VALUES (?,?,?,?,?,?)",
    "member": "INSERT OR IGNORE INTO members VALUES (?,?)",
    "unmember": "DELETE FROM members WHERE room=? AND nick=?",
    "no_members": "DELETE FROM members",
    "nick": "INSERT OR IGNORE INTO nick_keys VALUES (?,?)",
    "room": "INSERT OR REPLACE INTO rooms VALUES (?,?)",
    # accounts (issue 21); a mark never moves back
    "account": "INSERT OR REPLACE INTO accounts VALUES (?,?)",
    "acct_room": "INSERT INTO account_rooms VALUES (?,?,?,?) ON CONFLICT (account, room) "
    "DO UPDATE SET mark=max(mark, excluded.mark)",
    "acct_part": "DELETE FROM account_rooms WHERE account=? AND room=?",
    "acct_private": "INSERT INTO account_privates VALUES (?,?,?) ON CONFLICT (account, peer) "
    "DO UPDATE SET mark=max(mark, excluded.mark)",
    "acct_last": "INSERT OR REPLACE INTO account_last VALUES (?,?)",
    "file": "INSERT OR REPLACE INTO files VALUES (?,?)",  # a file offer (issue 24)
}
# Records that change earlier events too (issue 23): (kind, room, seq, ts, sender, data, ref).
CHANGES: Final = {"edit": messages.apply_edit, "delete": messages.apply_delete}


class StoreError(OSError):
    """The database cannot be used (corrupt, truncated, not a database, unwritable); at
    run time, an OSError like any other failure of the disk (a request gets UNAVAILABLE)."""


# ---------------------------------------------------------------------------- the log


def event_line(
    room: str, seq: int, ts: float, sender: str, cmid: str | None, data: bytes
) -> bytes | None:
    """A room event as `E room seq ts sender cmid data` (tab-separated, its fields as they
    are), or None when a field holds a tab or a newline (then it goes as JSON)."""
    head = f"E\t{room}\t{seq}\t{ts!r}\t{sender}\t{cmid or ''}\t"
    if head.count("\t") != 6 or "\n" in head:
        return None
    return head.encode("utf-8") + data + b"\n"


def encode_record(op: tuple[Any, ...]) -> bytes:
    """One log line: a room event as event_line() writes it if it can; anything else as
    `J <JSON array>`."""
    if op[0] == "event":
        room, seq, ts, sender, cmid, text = op[1:7]
        line = event_line(room, seq, ts, sender, cmid, text.encode("utf-8"))
        if line is not None:
            return line
    return b"J\t" + json.dumps(op, ensure_ascii=False).encode("utf-8") + b"\n"


def decode_record(line: bytes) -> tuple[Any, ...]:
    tag, rest = line[:2], line[2:]
    if tag == b"E\t":
        room, seq, ts, sender, cmid, data = rest.decode("utf-8").split("\t", 5)
        return ("event", room, int(seq), float(ts), sender, cmid or None, data)
    if tag == b"J\t":
        op = tuple(json.loads(rest))
        if op and (op[0] in SQL or op[0] in CHANGES):
            return op
    raise ValueError(f"unknown log record {line[:40]!r}")


def decode_records(data: bytes, where: str) -> list[tuple[Any, ...]]:
    ops = []
    for line in data.split(b"\n"):
        try:
            ops.append(decode_record(line))
        except (ValueError, TypeError, IndexError) as exc:
            log.warning("%s: skipped a damaged record: %s", where, exc)
    return ops


def segments(path: str) -> list[str]:
    """The log's segment files, oldest first."""
    folder, base = os.path.split(os.path.abspath(path))
    prefix = base + "-log."
    names = [
        n for n in os.listdir(folder or ".") if n.startswith(prefix) and n[len(prefix) :].isdigit()
    ]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[len(prefix) :]))]


def read_segment(seg: str, start: int = 0) -> tuple[list[tuple[Any, ...]], int]:
    """The complete records of a segment from byte `start` on (a torn last line, one being
    written or left by a crash, is left out), and the offset just after them."""
    with open(seg, "rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n")
    if end < 0:
        return [], start
    return decode_records(data[:end], seg), start + end + 1


def read_log(path: str) -> list[tuple[Any, ...]]:
    """Every complete record in a database's log."""
    return [op for seg in segments(path) for op in read_segment(seg)[0]]


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
                messages.insert_events(db, [op[1:] for op in ops[i:j]])
            elif kind == "private" and len(ops[i]) == 6:  # logged before from_key was kept
                db.execute(SQL[kind], (*ops[i][1:], None))
            elif kind in CHANGES:
                CHANGES[kind](db, *ops[i][1:])
            else:
                db.execute(SQL[kind], ops[i][1:])
            i = j
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # (SQLite may have rolled back itself:
            db.execute("ROLLBACK")  # a full disk) the error said is the first one
        raise


def stored_events(path: str, room: str) -> list[dict[str, Any]]:
    """A room's events as they are on disk (SQLite and the log not yet applied to it), for
    tools and tests that look at a broker's files while it runs or after it died."""
    for attempt in range(5):  # a segment may be applied and deleted while we read
        try:
            logged = read_log(path)  # first: what leaves the log is in SQLite by then
            break
        except FileNotFoundError:
            if attempt == 4:
                raise
    con = sqlite3.connect(path)
    try:
        by_seq = dict(con.execute("SELECT seq, data FROM events WHERE room=?", (room,)))
    finally:
        con.close()
    for op in logged:
        if (op[0] == "event" or op[0] in CHANGES) and op[1] == room:
            by_seq.setdefault(op[2], op[6])
    return [json.loads(by_seq[seq]) for seq in sorted(by_seq)]


# ---------------------------------------------------------------------------- the writer


class Writer:
    """The writer process's work: follow the log's segments, apply what is new to SQLite,
    delete a segment once it is applied and the broker has moved on to a newer one."""

    def __init__(self, path: str, fsync: bool) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self.db.execute("PRAGMA secure_delete=ON")  # a removed message's bytes are zeroed
        self.done: dict[str, int] = {}  # segment -> bytes applied
        self.failing, self.told = 0, 0.0  # rounds failed in a row; when that was last said

    def catch_up(self, final: bool = False) -> int:
        """Apply every complete record logged so far; with final, the broker has stopped
        writing and every segment goes. Returns how many records were applied."""
        ops: list[tuple[Any, ...]] = []
        segs = segments(self.path)
        read: dict[str, int] = {}
        for seg in segs:
            try:
                new, read[seg] = read_segment(seg, self.done.get(seg, 0))
            except FileNotFoundError:  # applied and deleted by a writer of a broker that
                continue  # was killed just before ours started: nothing left
            ops += new
        if ops:
            apply(self.db, ops)
        self.done.update(read)
        for seg in segs if final else segs[:-1]:  # only the newest one is still written
            try:
                os.unlink(seg)
            except FileNotFoundError:  # that other writer was first
                pass
            self.done.pop(seg, None)
        return len(ops)

    def step(self, final: bool) -> tuple[bytes, int]:
        """catch_up(), as the broker is answered ("ok", or "error why"), and how many
        records were applied (-1: none could be). A failure is said at once, then every
        WRITER_TOLD_EVERY seconds while it lasts (a full disk fails every round)."""
        try:
            applied = self.catch_up(final=final)
        except sqlite3.Error as exc:  # the log keeps it all: try again next round
            self.failing += 1
            if time.monotonic() - self.told >= WRITER_TOLD_EVERY:
                log.error("cannot write the history yet (%d tries): %s", self.failing, exc)
                self.told = time.monotonic()
            return f"error {exc}\n".encode(), -1
        if self.failing:
            log.warning("the history is written again, after %d failed tries", self.failing)
        self.failing, self.told = 0, 0.0
        return b"ok\n", applied

    def close(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()


def background() -> None:
    """Lower this process's priority: the broker's loop (and its clients, on one machine)
    come first; the writer catches up whenever a core is free (the log holds its backlog)."""
    try:
        os.nice(WRITER_NICE)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        pass


def writer_main(argv: list[str]) -> int:
    """The writer process: catch up every WRITER_DELAY seconds, and at once when the broker
    writes a line on our stdin ("sync": answer "ok" on stdout once applied; "stop": apply
    everything, delete the log, exit)."""
    parser = argparse.ArgumentParser(description="the broker's history writer")
    parser.add_argument("--writer", required=True, metavar="DB")
    parser.add_argument("--fsync", action="store_true")
    parser.add_argument(
        "--lock-fd",
        type=int,
        metavar="FD",
        help="the broker's writer lock, open and held: kept until we exit",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the broker says when to stop
    if os.environ.get(LOG_FORMAT_ENV) == "json":  # the broker's --log-format json: one format
        from zmqchat._ops import logs

        logs.setup("INFO", "json")
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s history writer: %(message)s")
    if args.lock_fd is None:  # started by hand: take the writer lock ourselves
        try:
            writer_lock(args.writer, wait=0)
        except StoreError as exc:
            log.error("%s", exc)
            return 1
    background()
    writer = Writer(args.writer, args.fsync)
    stdin = sys.stdin.buffer
    buf, delay = b"", WRITER_DELAY
    while True:
        ready, _, _ = select.select([stdin], [], [], delay)
        cmds: list[bytes] = []
        if ready:
            chunk = os.read(stdin.fileno(), 4096)
            if not chunk:  # the broker is gone without saying stop: leave the log for it
                writer.catch_up()
                writer.close()
                return 0
            *cmds, buf = (buf + chunk).split(b"\n")
        stop = b"stop" in cmds
        reply, applied = writer.step(final=stop)
        if applied >= 0:
            # Busy: every WRITER_DELAY. Quiet: look less and less often (an idle broker
            # costs nothing); a read still makes us catch up at once.
            delay = WRITER_DELAY if applied else min(delay * 2, WRITER_IDLE)
        if b"sync" in cmds or stop:
            os.write(sys.stdout.fileno(), reply)
        if stop and reply == b"ok\n":
            writer.close()
            return 0


# ---------------------------------------------------------------------------- the store


def lock_file(name: str, held: str, wait: float = 0.0, waiting: str = "") -> int:
    """An exclusive flock on file `name`, tried for up to `wait` seconds (logging `waiting`
    once if it has to wait); StoreError(`held`) if it is still held by then. Returns the
    open descriptor: the lock lasts as long as it (or a copy of it in a child) is open."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"{name}: {exc.strerror}") from None
    deadline, told = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StoreError(held) from None
            if waiting and not told:
                log.warning("%s", waiting)
                told = True
            time.sleep(0.05)
        except OSError as exc:  # no locks here (some network file systems)
            os.close(fd)
            raise StoreError(f"{name}: {exc.strerror}") from None


def writer_lock(path: str, wait: float) -> int:
    """Take `<db>-writer-lock`, waiting up to `wait` seconds: one process at a time writes
    the database. The broker takes it before it looks at the file and hands it to each
    writer it starts, so that a writer left applying the log after its broker was killed
    still holds it, and the next broker waits for that writer to finish."""
    return lock_file(
        path + "-writer-lock",
        f"{path}: the history writer of an earlier broker is still running",
        wait,
        "waiting for the previous broker's history writer to finish",
    )


def close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        try:
            if pipe is not None:
                pipe.close()
        except OSError:  # a command it never read: nobody to tell
            pass


class Store:
    """Append-only event history with per-room sequence numbers that survive restarts."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path, self.fsync = path, fsync
        self._writer: subprocess.Popen[bytes] | None = None
        self._writer_lock: int | None = None
        self._lines: list[bytes] = []  # this pass's records, as log lines
        self._roll = False  # a removal was logged: start a new segment once it is written
        self._privates_logged = False  # a private message logged since the last sync()
        self._accounts_logged = False  # an account changed since the last sync()
        self._lock = self._take_lock()
        try:
            self._open()
        except BaseException:  # free what was taken: a caller may start again
            self._release()
            raise
        existing = segments(path)
        self._seg = int(existing[-1].rsplit(".", 1)[1]) + 1 if existing else 1
        self._log = -1
        self._open_segment()
        self._cmids: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._seen = CmidFilter()
        for sender, cmid in self.db.execute(
            "SELECT sender, cmid FROM events WHERE cmid IS NOT NULL "
            "UNION ALL SELECT sender, cmid FROM privates "
            "WHERE cmid IS NOT NULL"
        ):
            self._seen.add(sender + "\0" + cmid)

    def _open(self) -> None:
        self._writer_lock = writer_lock(self.path, OLD_WRITER_WAIT)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._check()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(privates)")}
            if "from_key" not in columns:  # a file from before private history was kept
                self.db.execute("ALTER TABLE privates ADD COLUMN from_key TEXT")
            messages.create(self.db)
            self.db.execute("DELETE FROM members WHERE 0")  # can we write? (read-only:
            # SQLite opens it anyway, and only a write says so)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        self._start_writer()
        self.sync()  # what the last run logged is in SQLite before anyone reads it

    def _release(self) -> None:
        """Stop the writer (if any) and let go of the database and both locks."""
        if self._writer is not None:
            if self._writer.poll() is None:
                self._writer.kill()
                self._writer.wait()
            close_pipes(self._writer)
        if hasattr(self, "db"):
            self.db.close()
        if self._writer_lock is not None:
            os.close(self._writer_lock)
        os.close(self._lock)  # the lock files stay: removing them would race a new broker

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
            # the page count in the header counts only while its "version valid for" is the
            # change counter (SQLite's file format); with a write-ahead log not yet copied
            # in (a checkpoint cut short by a full disk), the pages are there: SQLite reads
            # them, and the integrity check below says whether all is well
            valid = header[24:28] == header[92:96]
            wal = self.path + "-wal"
            pending = os.path.exists(wal) and os.path.getsize(wal) > 0
            if size % page or (pages and valid and not pending and size < pages * page):
                raise StoreError(f"{self.path}: file is truncated ({size} bytes)")
        rows = self.db.execute("PRAGMA integrity_check").fetchall()
        if rows != [("ok",)]:
            raise StoreError(
                f"{self.path}: integrity check failed: " + "; ".join(r[0] for r in rows[:3])
            )

    def _take_lock(self) -> int:
        """One broker per database: a second one would number the same rooms again."""
        return lock_file(self.path + "-lock", f"{self.path} is in use by another broker")

    def _start_writer(self) -> None:
        lock = self._writer_lock
        assert lock is not None  # _open() takes the writer lock before it starts a writer
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--writer",
            self.path,
            "--lock-fd",
            str(lock),
        ]
        from zmqchat._ops import logs

        self._writer = subprocess.Popen(
            cmd + (["--fsync"] if self.fsync else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, LOG_FORMAT_ENV: logs.FORMAT},  # its log as the broker's
            pass_fds=(lock,),
            start_new_session=True,
        )  # no Ctrl+C from a terminal

    def _open_segment(self) -> None:
        if self._log >= 0:
            os.close(self._log)
        name = f"{self.path}-log.{self._seg:06d}"
        self._log = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._seg_size = os.fstat(self._log).st_size
        if self.fsync:  # the new name itself must survive a power loss
            folder = os.open(os.path.dirname(os.path.abspath(name)), os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def _ask_writer(self, cmd: bytes) -> str:
        """Send the writer a command and wait for its one-line answer (restarting a writer
        that died: it starts over from the log, which holds everything)."""
        for attempt in (1, 2):
            proc = self._writer
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(cmd + b"\n")
                proc.stdin.flush()
                if select.select([proc.stdout], [], [], SYNC_TIMEOUT)[0]:
                    answer = proc.stdout.readline().decode().strip()
                    if answer:
                        return answer
            except (BrokenPipeError, OSError):
                pass
            if proc.poll() is None:
                raise StoreError(f"{self.path}: the history writer does not answer")
            if attempt == 1 and cmd != b"stop":
                log.error("history writer exited (%s); starting it again", proc.returncode)
                close_pipes(proc)
                self._start_writer()
        raise StoreError(f"{self.path}: the history writer keeps failing")

    def sync(self) -> None:
        """Log this pass's records and wait until SQLite has everything logged."""
        self.commit()
        answer = self._ask_writer(b"sync")
        if answer != "ok":
            raise StoreError(f"{self.path}: history not written: {answer}")
        self._privates_logged = self._accounts_logged = False

    def close(self) -> None:
        try:
            self.commit()
        except StoreError as exc:  # (none of them was acknowledged: they are lost)
            log.error("%s: %d records not written at the stop", exc, len(self._lines))
        os.close(self._log)
        try:
            self._ask_writer(b"stop")
            assert self._writer is not None
            self._writer.wait(SYNC_TIMEOUT)
        except (StoreError, subprocess.TimeoutExpired) as exc:  # the log stays for next time
            log.error("history writer: %s", exc)
        self._release()

    # ---------------------------------------------------------------- reading state
    def last_seqs(self) -> dict[str, int]:
        """Each room's highest sequence number, so numbering continues after a restart."""
        return dict(self.db.execute("SELECT room, MAX(seq) FROM events GROUP BY room"))

    def stored_seqs(self) -> dict[str, int]:
        """Each room's highest number already in SQLite, read on a connection of its own
        (so any thread may ask): what the writer has applied of the log."""
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1)
        try:
            return dict(con.execute("SELECT room, MAX(seq) FROM events GROUP BY room"))
        finally:
            con.close()

    def last_topic(self, room: str) -> str:
        row = self.db.execute(
            'SELECT data FROM events WHERE room=? AND data LIKE \'%"kind":"topic"%\' '
            "ORDER BY seq DESC LIMIT 1",
            (room,),
        ).fetchone()
        return json.loads(row[0]).get("text", "") if row else ""

    def find_cmid(self, sender: str, cmid: str) -> tuple[str, str, int] | None:
        """(sender, room, seq) of a message already stored with this client id from this
        sender, if any (ids are per sender: two clients using one id do not collide)."""
        key = sender + "\0" + cmid
        hit = self._cmids.get(key)
        if hit is not None:
            return hit
        if not self._seen.add(key):  # certainly new: no query (the common case)
            return None
        self.sync()
        row = self.db.execute(
            "SELECT sender, room, seq FROM events WHERE sender=? AND cmid=?", (sender, cmid)
        ).fetchone()
        if row is None:
            row = self.db.execute(
                "SELECT sender, '', id FROM privates WHERE sender=? AND cmid=?", (sender, cmid)
            ).fetchone()
        return tuple(row) if row else None

    def _remember(self, key: str, value: tuple[str, str, int]) -> None:
        """Keep a new id at hand (find_cmid, which every id passes first, put it in the
        Bloom filter already: an id that then goes unstored costs only a query later)."""
        self._cmids[key] = value
        if len(self._cmids) > CMID_CACHE:
            self._cmids.popitem(last=False)

    # ---------------------------------------------------------------- writing
    def append(
        self, room: str, seq: int, ts: float, sender: str, cmid: str | None, data: bytes
    ) -> None:
        """Add one room event (its JSON, as published) to this pass."""
        line = event_line(room, seq, ts, sender, cmid, data)
        self._lines.append(
            line
            if line is not None
            else encode_record(("event", room, seq, ts, sender, cmid, data.decode("utf-8")))
        )
        if cmid:
            self._remember(sender + "\0" + cmid, (sender, room, seq))

    def append_change(
        self, kind: str, room: str, seq: int, ts: float, sender: str, data: bytes, ref: int
    ) -> None:
        """An edit or a removal (CHANGES): an event that also changes the message `ref`."""
        self._lines.append(encode_record((kind, room, seq, ts, sender, data.decode("utf-8"), ref)))
        if kind == "delete":
            self._roll = True

    def append_private(
        self, ts: float, sender: str, recipient: str, cmid: str, data: bytes, from_key: str = ""
    ) -> None:
        """A private message: `sender` is the sender's identity, `recipient` the
        recipient's identity and nick key (a space between), `from_key` the sender's nick
        key then."""
        self._lines.append(
            encode_record(("private", ts, sender, recipient, cmid, data.decode("utf-8"), from_key))
        )
        self._privates_logged = True
        self._remember(sender + "\0" + cmid, (sender, "", 0))

    def commit(self) -> None:
        """Make everything added so far durable: one write to the log per broker pass."""
        if not self._lines:
            return
        blob = b"".join(self._lines)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(self._log, view) :]
            if self.fsync:
                os.fdatasync(self._log)
        except OSError as exc:  # a full disk, say: the records stay here, to be written
            with contextlib.suppress(OSError):  # again; what got out is cut off, or a torn
                os.ftruncate(self._log, self._seg_size)  # record would spoil the next one
            raise StoreError(
                f"{self.path}: the history log cannot be written ({exc.strerror or exc})"
            ) from None
        self._lines = []
        self._seg_size += len(blob)
        if self._seg_size >= SEGMENT_BYTES or self._roll:
            # (after a removal: the segment holding the removed text is deleted once applied)
            self._roll = False
            self._seg += 1
            self._open_segment()

    # ---------------------------------------------------------------- memberships
    def take_members(self) -> set[tuple[str, str]]:
        """(nick key, room) of everyone who was in a room when the broker last stopped (or
        crashed); the table starts empty again, refilled as people join."""
        rows = self.db.execute("SELECT nick, room FROM members").fetchall()
        self._lines.append(encode_record(("no_members",)))
        self.commit()
        return {(nick, room) for nick, room in rows}

    def add_member(self, room: str, nick_key: str) -> None:
        self._lines.append(encode_record(("member", room, nick_key)))

    def remove_member(self, room: str, nick_key: str) -> None:
        self._lines.append(encode_record(("unmember", room, nick_key)))

    # ---------------------------------------------------------------- room settings
    def room_settings(self) -> dict[str, dict[str, Any]]:
        """Each room's settings (topic, lock, operators, bans) as last saved."""
        return {
            name: json.loads(data)
            for name, data in self.db.execute("SELECT name, settings FROM rooms")
        }

    def save_room(self, name: str, settings: str) -> None:
        self._lines.append(encode_record(("room", name, settings)))

    # ---------------------------------------------------------------- file offers (issue 24)
    def file_offers(self) -> list[str]:
        """Every file offer as last saved (JSON texts)."""
        return [offer for (offer,) in self.db.execute("SELECT offer FROM files")]

    def save_file(self, fid: str, offer: str) -> None:
        self._lines.append(encode_record(("file", fid, offer)))

    # ---------------------------------------------------------------- CURVE nick owners
    def nick_owner(self, nick_key: str) -> str | None:
        """The CURVE public key that first registered this nick, if any."""
        self.sync()
        row = self.db.execute("SELECT pubkey FROM nick_keys WHERE nick=?", (nick_key,)).fetchone()
        return row[0] if row else None

    def bind_nick(self, nick_key: str, pubkey: str) -> None:
        self._lines.append(encode_record(("nick", nick_key, pubkey)))

    # ---------------------------------------------------------------- history
    def history(
        self,
        room: str,
        *,
        after: int | None = None,
        before: int | None = None,
        since: float | None = None,
        limit: int = 50,
    ) -> list[str]:
        """Events of a room as stored JSON texts, oldest first.

        With `after`, the first `limit` events after that seq (gap repair); otherwise the last
        `limit` events before `before` (or the end), optionally only those at or after `since`.
        """
        self.sync()
        where = ["room=?"]
        args: list[str | float] = [room]
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
        rows = self.db.execute(
            f"SELECT data FROM events WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?",
            (*args, limit),
        ).fetchall()
        texts = [r[0] for r in rows]
        return texts if order == "ASC" else texts[::-1]

    def conversation(self, me: str, peer_key: str, since: float | None, limit: int) -> list[str]:
        """The last `limit` private messages between identity `me` (under any of its nicks)
        and whoever had nick key `peer_key`, both ways, oldest first, as stored JSON."""
        if self._privates_logged:
            self.sync()
        rows = self.db.execute(
            "SELECT id, data FROM privates WHERE sender=? AND ts>=? "
            "AND substr(recipient, instr(recipient, ' ') + 1)=? "
            "UNION SELECT id, data FROM privates WHERE recipient>=? AND recipient<? "
            "AND ts>=? AND from_key=? ORDER BY id DESC LIMIT ?",
            (me, since or 0.0, peer_key, me + " ", me + "!", since or 0.0, peer_key, limit),
        ).fetchall()
        return [r[1] for r in reversed(rows)]

    def privates_to(self, recipient: str, since: float, limit: int) -> list[str]:
        """The last `limit` private messages stored for `recipient` (as the broker names
        one: identity and nick) at or after `since`, oldest first, as stored JSON texts.
        Waits for the writer only when a private message is still on its way to SQLite."""
        if self._privates_logged:
            self.sync()
        rows = self.db.execute(
            "SELECT data FROM privates WHERE recipient=? AND ts>=? "
            "ORDER BY ts DESC, id DESC LIMIT ?",
            (recipient, since, limit),
        ).fetchall()
        return [r[0] for r in reversed(rows)]

    # ---------------------------------------------------------------- accounts (issue 21)
    def account(self, key: str) -> str | None:
        """An account's record (JSON), as SQLite has it now: the operator's command
        (`zmqchat-broker accounts`) writes there directly, and counts at once."""
        if self._accounts_logged:
            self.sync()
        row = self.db.execute("SELECT data FROM accounts WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else None

    def save_account(self, key: str, data: str) -> None:
        self._lines.append(encode_record(("account", key, data)))
        self._accounts_logged = True

    def account_kept(self, key: str) -> tuple[list[tuple[str, int]], list[tuple[str, float]], str]:
        """An account's rooms with their marks (in the order it joined them), its private
        conversations' marks, and its last room."""
        self.sync()
        rooms = self.db.execute(
            "SELECT room, mark FROM account_rooms WHERE account=? ORDER BY joined", (key,)
        ).fetchall()
        peers = self.db.execute(
            "SELECT peer, mark FROM account_privates WHERE account=?", (key,)
        ).fetchall()
        last = self.db.execute("SELECT room FROM account_last WHERE account=?", (key,)).fetchone()
        return rooms, peers, last[0] if last else ""

    def account_change(self, *record: Any) -> None:
        """An account's room joined (acct_room) or left (acct_part), a mark (acct_room,
        acct_private), its last room (acct_last): a record of SQL's."""
        self._lines.append(encode_record(record))

    def privates_of(self, owner: str, since: float, limit: int) -> list[str]:
        """The last `limit` private messages stored for identity `owner` under any nick at
        or after `since`, oldest first, as stored JSON texts."""
        if self._privates_logged:
            self.sync()
        rows = self.db.execute(
            "SELECT data FROM privates WHERE recipient>=? AND recipient<? AND ts>=? "
            "ORDER BY id DESC LIMIT ?",
            (owner + " ", owner + "!", since, limit),
        ).fetchall()
        return [r[0] for r in reversed(rows)]

    # ---------------------------------------------------------------- edits and search
    def message(self, room: str, seq: int) -> tuple[str, dict[str, Any]] | None:
        """(sender, the event as stored now) of a room's event, with everything logged."""
        self.sync()
        return messages.lookup(self.db, room, seq)

    def search(
        self, expression: str, rooms: list[str], me: str | None, limit: int
    ) -> tuple[list[str], int]:
        """messages.search() over everything logged so far."""
        self.sync()
        return messages.search(self.db, expression, rooms, me, limit)


class CmidFilter:
    """A Bloom filter of every stored client message id: 'no' is certain, 'yes' is checked
    against the database (about 1% false positives at 10 bits per id)."""

    def __init__(self, bits: int = 1 << 24) -> None:
        self.bits = bits
        self.array = bytearray(bits // 8)

    def _probes(self, cmid: str) -> tuple[int, int, int]:
        h = hash(cmid) & 0xFFFFFFFFFFFFFFFF
        return h % self.bits, (h >> 21) % self.bits, ((h >> 42) | (h << 22)) % self.bits

    def add(self, cmid: str) -> bool:
        """Add an id; return whether it may have been there before (False: certainly not)."""
        a, seen = self.array, True
        for i in self._probes(cmid):
            bit = 1 << (i & 7)
            if not a[i >> 3] & bit:
                seen = False
                a[i >> 3] |= bit
        return seen

    def __contains__(self, cmid: str) -> bool:
        a = self.array
        return all(a[i >> 3] & (1 << (i & 7)) for i in self._probes(cmid))


if __name__ == "__main__":
    sys.exit(writer_main(sys.argv[1:]))
