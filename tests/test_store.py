"""The history files themselves: what a crash leaves in the log is applied on the next start,
neither the log nor SQLite's WAL grows under steady writes, and a writer that dies is
replaced."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import wait_for
from zmqchat._local import store


def event(seq: int, text: str = "") -> bytes:
    return b'{"room":"lobby","seq":%d,"ts":%d.5,"text":"%s","cmid":"id%d"}' % (
        seq,
        seq,
        (text or str(seq)).encode(),
        seq,
    )


def test_log_left_by_a_crash_is_applied_on_start(tmp_path):
    """Records logged by a broker that died before its writer applied them (two segments,
    the last line torn in mid-write) are in SQLite once the next Store starts, once each."""
    path = str(tmp_path / "chat.db")
    store.Store(path).close()  # an empty database, as a first run leaves it
    recs = [
        store.encode_record(
            ("event", "lobby", seq, seq + 0.5, "tok:x", f"id{seq}", event(seq).decode())
        )
        for seq in range(1, 201)
    ]
    recs.insert(50, store.encode_record(("member", "lobby", "ann")))
    recs.insert(
        60,
        store.encode_record(
            ("event", "lobby", 999, 1.0, "tok:\ty", "a\nb", '{"room":"lobby","seq":999}')
        ),
    )
    (tmp_path / "chat.db-log.000001").write_bytes(b"".join(recs[:100]))
    (tmp_path / "chat.db-log.000002").write_bytes(b"".join(recs[100:]) + recs[0][:30])
    assert len(store.stored_events(path, "lobby")) == 201  # on disk: SQLite + the log
    db = store.Store(path)
    try:
        assert len(db.history("lobby", after=0, limit=500)) == 201
        assert db.last_seqs() == {"lobby": 999}
        assert db.find_cmid("tok:x", "id7") == ("tok:x", "lobby", 7)
        assert db.find_cmid("tok:\ty", "a\nb") == ("tok:\ty", "lobby", 999)
        assert db.take_members() == {("ann", "lobby")}
    finally:
        db.close()
    assert store.segments(path) == []  # a clean stop leaves everything in SQLite alone


def test_log_and_wal_stay_bounded_under_steady_writes(tmp_path, monkeypatch):
    """One-event passes, as a quiet broker makes them: applied segments are deleted (here
    every 64 KB), and the writer's checkpoints keep the WAL small."""
    monkeypatch.setattr(store, "SEGMENT_BYTES", 64 << 10)
    path = str(tmp_path / "chat.db")
    db = store.Store(path)
    try:
        logs, wals = [], []
        for seq in range(1, 3001):
            db.append("lobby", seq, float(seq), "tok:x", f"id{seq}", event(seq, "x" * 200))
            db.commit()
            if seq % 100 == 0:
                db.sync()
                logs.append(sum(os.path.getsize(s) for s in store.segments(path)))
                wals.append(os.path.getsize(path + "-wal"))
        assert max(logs) < 200_000, logs  # 3000 records are ~800 KB of log
        assert max(wals) < 8_000_000, wals  # 3000 one-event commits would be ~50 MB of WAL
        assert len(db.history("lobby", after=0, limit=5000)) == 3000
    finally:
        db.close()


def test_a_dead_writer_is_replaced_and_nothing_is_lost(tmp_path):
    path = str(tmp_path / "chat.db")
    db = store.Store(path)
    try:
        for seq in range(1, 11):
            db.append("lobby", seq, float(seq), "tok:x", f"id{seq}", event(seq))
        db.commit()
        first = db._writer
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert len(db.history("lobby", after=0)) == 10
        assert db._writer is not first and db._writer.poll() is None
    finally:
        db.close()


def test_a_second_store_on_the_same_file_is_refused(tmp_path):
    """Two brokers on one database would number the same rooms twice: the second stops."""
    path = str(tmp_path / "chat.db")
    first = store.Store(path)
    try:
        with pytest.raises(store.StoreError, match="in use by another broker"):
            store.Store(path)
    finally:
        first.close()
    store.Store(path).close()  # free again once the first is closed


def test_two_writers_after_a_kill_neither_fails_nor_loses(tmp_path, monkeypatch):
    """A broker killed and restarted at once: its old writer is still applying the log when
    the new broker's writer starts. A segment the new one listed but the old one applied and
    deleted meanwhile is skipped, not an error (it would stop the new broker's start)."""
    path = str(tmp_path / "chat.db")
    store.Store(path).close()
    recs = [
        store.encode_record(
            ("event", "lobby", seq, float(seq), "tok:x", f"id{seq}", event(seq).decode())
        )
        for seq in range(1, 101)
    ]
    (tmp_path / "chat.db-log.000001").write_bytes(b"".join(recs[:60]))
    (tmp_path / "chat.db-log.000002").write_bytes(b"".join(recs[60:]))
    old, new = store.Writer(path, False), store.Writer(path, False)
    try:
        listed = store.segments(path)  # the new writer looks at the log first...
        assert old.catch_up() == 100  # ...the old one applies it, deletes segment 1...
        monkeypatch.setattr(store, "segments", lambda p: listed)
        assert new.catch_up(final=True) == 40  # ...and the new one reads on from its list
    finally:
        old.close()
        new.close()
    monkeypatch.undo()
    assert store.segments(path) == []
    assert [e["seq"] for e in store.stored_events(path, "lobby")] == list(range(1, 101))


def writer_lock_taken(path: str) -> bool:
    fd = os.open(path + "-writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class Opening(threading.Thread):
    """Store(path) on a thread of its own: the test can watch it wait."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.store: store.Store | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.store = store.Store(self.path)
        except BaseException as exc:  # noqa: BLE001  (reported by the test)
            self.error = exc


def test_a_start_waits_while_an_earlier_writer_runs(tmp_path, monkeypatch, caplog):
    """While another process holds the writer lock a new Store does not touch the database:
    it goes on once the lock is free, or gives up after OLD_WRITER_WAIT and says why (and
    leaves nothing locked behind)."""
    path = str(tmp_path / "chat.db")
    store.Store(path).close()
    held = store.writer_lock(path, 0)
    try:
        opening = Opening(path)
        wait_for(lambda: "previous broker's history writer" in caplog.text, 10, "the start to wait")
        assert opening.is_alive() and opening.store is None
    finally:
        os.close(held)
    opening.join(10)
    assert opening.error is None and opening.store is not None
    opening.store.close()

    monkeypatch.setattr(store, "OLD_WRITER_WAIT", 0.3)
    held = store.writer_lock(path, 0)
    try:
        with pytest.raises(store.StoreError, match="writer of an earlier broker"):
            store.Store(path)
    finally:
        os.close(held)
    store.Store(path).close()  # the failed start let go of the database


BROKER_LIKE = """
import sys
sys.path.insert(0, {root!r})
from zmqchat._local import store
s = store.Store({path!r})
print(s._writer.pid, flush=True)
sys.stdin.read()
"""


def test_a_killed_brokers_writer_keeps_the_next_start_waiting(tmp_path, caplog):
    """A broker logs 5,000 records and is SIGKILLed; its writer lives on (here frozen, so
    that it cannot finish early) and still holds the writer lock it was handed. The next
    Store waits for it, and once that writer has applied the log and gone, starts with every
    record, once."""
    path = str(tmp_path / "chat.db")
    root = os.path.dirname(os.path.abspath(store.__file__))
    broker = subprocess.Popen(
        [sys.executable, "-c", BROKER_LIKE.format(root=root, path=path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert broker.stdout is not None and broker.stdin is not None
    try:
        writer = int(broker.stdout.readline())  # its history writer's pid, once it is up
    except BaseException:
        broker.kill()
        raise
    recs = [
        store.encode_record(
            ("event", "lobby", seq, float(seq), "tok:x", f"id{seq}", event(seq, "x" * 200).decode())
        )
        for seq in range(1, 5001)
    ]
    with open(store.segments(path)[-1], "ab") as log:  # as the broker logs them
        log.write(b"".join(recs))
    os.kill(writer, signal.SIGSTOP)
    try:
        os.kill(broker.pid, signal.SIGKILL)
        broker.wait(10)
        broker.stdin.close()
        broker.stdout.close()
        assert writer_lock_taken(path)  # by the orphan: its inherited lock outlives the broker
        opening = Opening(path)
        wait_for(lambda: "previous broker's history writer" in caplog.text, 10, "the start to wait")
        assert opening.store is None
    finally:
        os.kill(writer, signal.SIGCONT)  # it reads end-of-input: applies the log, exits
    opening.join(30)
    assert opening.error is None and opening.store is not None
    try:
        events = [json.loads(e) for e in opening.store.history("lobby", after=0, limit=6000)]
        assert [e["seq"] for e in events] == list(range(1, 5001))
    finally:
        opening.store.close()
    assert store.segments(path) == []
