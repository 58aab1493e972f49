"""The history files themselves: the log is applied after a crash, and neither the log nor
SQLite's WAL grows without bound under steady writes."""
from __future__ import annotations

import os
import subprocess
import sys

import store
from conftest import ROOT


def event(seq: int, text: str = "") -> bytes:
    return b'{"room":"lobby","seq":%d,"ts":%d.5,"text":"%s","cmid":"id%d"}' % (
        seq, seq, (text or str(seq)).encode(), seq)


def test_log_is_applied_after_a_crash(tmp_path):
    """A process that logged records and was killed before its writer applied them: the next
    Store has all of them, once, and a torn last record is left out."""
    path = str(tmp_path / "chat.db")
    code = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import store
db = store.Store({path!r})
with db._cond:  # held: the writer thread never gets to apply what is logged
    for seq in range(1, 201):
        db.append("lobby", seq, float(seq), "tok:x", f"id{{seq}}", {event(1)!r}.replace(b"1", str(seq).encode()))
        db.add_member("lobby", "ann")
        db.commit()
    os.write(db._log, b"E\\ttok:x\\t{{\\"room\\":\\"lobby\\",\\"seq\\":999")  # torn
    os._exit(9)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 9, run.stderr
    assert len(store.stored_events(path, "lobby")) == 200  # on disk: SQLite + log
    db = store.Store(path)
    try:
        texts = db.history("lobby", after=0, limit=500)
        assert len(texts) == 200
        assert db.last_seqs() == {"lobby": 200}
        assert db.find_cmid("id7") == ("tok:x", "lobby", 7)
        assert db.take_members() == {("ann", "lobby")}
        assert os.path.getsize(path + "-log") < 200  # applied, then started over
    finally:
        db.close()
    assert not os.path.exists(path + "-log")  # a clean close leaves SQLite alone


def test_log_and_wal_stay_bounded_under_steady_writes(tmp_path, monkeypatch):
    """One-event passes, as a quiet broker makes them: the log starts over once SQLite has
    it (here every 64 KB), and the writer's checkpoints keep the WAL small."""
    monkeypatch.setattr(store, "LOG_RESET", 64 << 10)
    path = str(tmp_path / "chat.db")
    db = store.Store(path)
    try:
        logs, wals = [], []
        for seq in range(1, 3001):
            db.append("lobby", seq, float(seq), "tok:x", f"id{seq}", event(seq, "x" * 200))
            db.commit()
            if seq % 100 == 0:
                db.sync()
                logs.append(os.path.getsize(path + "-log"))
                wals.append(os.path.getsize(path + "-wal"))
        assert max(logs) < 200_000, logs     # 3000 records are ~800 KB of log
        assert max(wals) < 8_000_000, wals   # 3000 one-event commits would be ~50 MB of WAL
        assert len(db.history("lobby", after=0, limit=5000)) == 3000
    finally:
        db.close()
