"""Uploads under way in a cluster (issue 24): shared as they go, so another broker resumes them.

An upload is written to the disk of the broker that takes it (a DiskBlobs .part file). Each
time SEGMENT more bytes are on that disk, they are put into the cluster's Object Store as an
object of their own:

    up-<upload key>-<n>       bytes n * SEGMENT to (n + 1) * SEGMENT of the upload

If that broker dies, the client sends UPLOAD again to another one, which finds the segments
(the key is the same: it is made of the sender's identity, the upload's own id, its size
and digest), copies those it lacks into its own .part file and answers with how far that
gets: the client goes on from there, having lost at most a segment's worth. Once the
content is checked and shared whole, or the upload is dropped, its segments are deleted;
those of an upload nobody went on with are deleted after the grace period by any broker.
"""

from __future__ import annotations

import io
import logging
import os
import time
from datetime import datetime
from typing import Any, Final

from zmqchat._core.state import Op
from zmqchat._ops.logs import event as log_event

log = logging.getLogger("zmqchat.files")

SEGMENT: Final = 8 << 20  # bytes shared at a time: a resume elsewhere loses at most this much
PREFIX: Final = "up-"


def segment_name(key: str, n: int) -> str:
    return f"{PREFIX}{key}-{n}"


class _Slice(io.RawIOBase):
    """Bytes [start, end) of a file, read as the Object Store's put reads (on its executor)."""

    def __init__(self, path: str, start: int, end: int) -> None:
        super().__init__()
        self.fd, self.at, self.end = os.open(path, os.O_RDONLY), start, end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self.fd, min(len(view), self.end - self.at), self.at)
        view[: len(data)] = data
        self.at += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


class SharedUploads:
    """The segments of the uploads this broker takes; `tasks` runs coroutines on the
    cluster's loop and gives their Ops (see _cluster/files.py)."""

    def __init__(self, store: Any, tasks: Any) -> None:
        self.store, self.tasks = store, tasks
        self.shared: dict[str, int] = {}  # upload key -> segments put (or being put)
        self.putting: dict[str, list[Op]] = {}  # upload key -> its puts under way

    def written(self, key: str, path: str, written: int) -> None:
        """The upload's bytes on disk reached `written`: share the whole segments not yet."""
        whole, n = written // SEGMENT, self.shared.get(key, 0)
        if whole <= n:
            return
        self.shared[key] = whole
        for i in range(n, whole):
            op = self.tasks.run(lambda i=i: self._put(key, path, i), f"storing part {i} of {key}")
            self.putting.setdefault(key, []).append(op)
            op.then(lambda op, key=key: self._put_done(key, op))

    def _put_done(self, key: str, op: Op) -> None:
        left = [o for o in self.putting.get(key, []) if o is not op]
        if left:
            self.putting[key] = left
        else:
            self.putting.pop(key, None)

    async def _put(self, key: str, path: str, n: int) -> None:
        try:
            part = _Slice(path, n * SEGMENT, (n + 1) * SEGMENT)
        except FileNotFoundError:  # finished (or dropped) meanwhile: nothing left to resume
            return
        with part:
            await self.store.put(segment_name(key, n), part)
        log_event(log, "upload-shared", key=key, upto=(n + 1) * SEGMENT)

    async def restore(self, key: str, path: str, size: int) -> int:
        """Copy into `path` the segments of upload `key` that other brokers shared and this
        disk lacks; how many bytes of it the file then holds."""
        import nats.js.errors

        have = os.path.getsize(path) if os.path.exists(path) else 0
        if have > size:
            return have  # not this upload's: DiskBlobs starts it over
        n = have // SEGMENT
        got = n
        with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as f:
            while (n + 1) * SEGMENT <= size:
                f.seek(n * SEGMENT)
                try:
                    await self.store.get(segment_name(key, n), writeinto=f)
                except nats.js.errors.NotFoundError:
                    break
                n += 1
            f.flush()
        if n > got:
            log_event(log, "upload-restored", key=key, upto=n * SEGMENT)
        self.shared[key] = max(self.shared.get(key, 0), n)
        return max(have, n * SEGMENT)

    def drop(self, key: str) -> Op:
        """Delete the upload's segments (once those being put are in)."""
        count = self.shared.pop(key, 0)
        pending = self.putting.pop(key, [])
        result = Op()

        async def delete() -> None:
            import nats.js.errors

            for n in range(count):
                try:
                    await self.store.delete(segment_name(key, n))
                except nats.js.errors.NotFoundError:
                    pass

        def go(_: Op | None = None) -> None:
            if any(not op.done for op in pending):
                return
            self.tasks.run(delete, "deleting stored parts").then(
                lambda op: result.fail(op.error) if op.error else result.resolve()
            )

        if not pending:
            go()
        for op in pending:
            op.then(go)
        return result

    async def sweep(self, grace: float, live: set[str]) -> None:
        """Delete the segments of uploads no broker added to for `grace` seconds."""
        import nats.js.errors

        try:
            entries = await self.store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return
        newest: dict[str, float] = {}
        names: dict[str, list[str]] = {}
        for info in entries:
            if not info.name.startswith(PREFIX) or info.deleted:
                continue
            key = info.name[len(PREFIX) :].rsplit("-", 1)[0]
            try:
                mtime = datetime.fromisoformat(info.mtime or "").timestamp()
            except ValueError:  # written by another client, in a form Python does not read
                mtime = time.time()
            newest[key] = max(newest.get(key, 0.0), mtime)
            names.setdefault(key, []).append(info.name)
        cutoff = time.time() - grace
        for key, when in newest.items():
            if key in live or key in self.shared or when >= cutoff:
                continue
            for name in names[key]:
                try:
                    await self.store.delete(name)
                except nats.js.errors.NotFoundError:
                    pass
            log_event(log, "upload-segments-dropped", key=key, segments=len(names[key]))
