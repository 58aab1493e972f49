"""The history file itself: the WAL starts over instead of growing without bound."""
from __future__ import annotations

import os

import store


def test_wal_stays_bounded_under_steady_writes(tmp_path, monkeypatch):
    """One-event commits, as a quiet broker makes them: the WAL file stays small because the
    writer finishes a checkpoint every FINISH_EVERY commits (here 50)."""
    monkeypatch.setattr(store, "FINISH_EVERY", 50)
    db = store.Store(str(tmp_path / "chat.db"))
    try:
        sizes = []
        for seq in range(1, 1001):
            db.append("lobby", seq, float(seq), "tok:x", f"id{seq}", b'{"text":"%d"}' % seq)
            db.commit()
            if seq % 100 == 0:
                sizes.append(os.path.getsize(tmp_path / "chat.db-wal"))
        assert max(sizes) < 1_000_000, sizes          # 1000 commits would be ~4 MB of WAL
        assert len(db.history("lobby", after=0, limit=500)) == 500
    finally:
        db.close()
