"""File contents on disk (issue 24): a folder beside the database, one file per SHA-256.

    FOLDER/objects/<sha256>        a content, complete and checked
    FOLDER/uploads/<key>.part      an upload under way (resumable until its grace runs out)

Disk work that may wait runs on one thread of its own, in the order asked (an upload's
chunks are written in order), so a slow disk never stalls the broker's loop: each call
returns an Op that the loop completes in `drain()` once the thread is done, woken through
a pipe (`fd`). Each upload's running SHA-256 is kept by a second thread, fed by the first
in order: a chunk is hashed while the next is written (hashlib lets go of the interpreter
lock for large buffers, as do reads and writes), so an upload's rate is that of the slower
of the two, not of both in turn.

A read whose bytes are in the page cache is a memory copy: the loop does it itself on a
content the thread opened for it, asking the kernel not to wait (RWF_NOWAIT), and goes to
the thread only when the kernel would have to read the disk. That spares a download two
thread switches per chunk; a pass reads at most INLINE_BYTES so chat is not held up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Final

from zmqchat._core.state import Op
from zmqchat.protocol import Code, ProtocolError

log = logging.getLogger("zmqchat.files")

DRAIN: Final = 256  # completions handled per pass of the loop: bounds a pass's work
OPEN_READERS: Final = 64  # contents kept open for reading (the most recently read), per side
INLINE_BYTES: Final = 4 << 20  # bytes the loop reads per pass (~1 ms of copying), then the thread
_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0)  # Linux 4.14+: fail rather than wait for the disk
REHASH_BLOCK: Final = 1 << 20  # bytes read at a time to hash a resumed upload's start
HASH_QUEUE: Final = 4  # chunks written and not yet hashed, at most (then the writer waits)


class _Part:
    """An upload being written: its file and the digest of what is in it."""

    __slots__ = ("fd", "hasher", "written")

    def __init__(self, fd: int, hasher: Any, written: int) -> None:
        self.fd, self.hasher, self.written = fd, hasher, written


class _Hashing:
    """A thread that feeds chunks to their uploads' hashers, in the order given."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Any, Any] | None] = queue.Queue(HASH_QUEUE)
        self._thread = threading.Thread(target=self._work, name="files-hash", daemon=True)
        self._thread.start()

    def update(self, hasher: Any, data: Any) -> None:
        self._jobs.put((hasher, data))

    def settle(self) -> None:
        """Until every chunk given so far is hashed."""
        done = threading.Event()
        self._jobs.put((done, None))
        done.wait()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(5.0)

    def _work(self) -> None:
        _behind_the_loop()
        while (job := self._jobs.get()) is not None:
            hasher, data = job
            if data is None:
                hasher.set()
            else:
                hasher.update(data)


class DiskBlobs:
    """The Blobs of files_state.py on a local disk; see the module docstring."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.objects = os.path.join(folder, "objects")
        self.uploads = os.path.join(folder, "uploads")
        os.makedirs(self.objects, exist_ok=True)
        os.makedirs(self.uploads, exist_ok=True)
        self._jobs: queue.SimpleQueue[tuple[Op, Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._done: deque[tuple[Op, Any, BaseException | None]] = deque()
        self._parts: dict[str, _Part] = {}  # the thread's alone
        self._readers: OrderedDict[str, int] = OrderedDict()  # the thread's alone
        self._open: OrderedDict[str, int] = OrderedDict()  # the loop's alone: read inline
        self._inline = 0  # bytes read on the loop in this pass
        self._woken = False  # the thread has written to the pipe since the last drain
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.pending = 0  # jobs asked and not yet completed
        self._hashing = _Hashing()
        self._thread = threading.Thread(target=self._work, name="files-io", daemon=True)
        self._thread.start()

    @property
    def fd(self) -> int:
        """Readable when completions wait for drain()."""
        return self._wake_r

    # ------------------------------------------------------------------ the loop's side
    def _submit(self, fn: Callable[..., Any], *args: Any) -> Op:
        op = Op()
        self.pending += 1
        self._jobs.put((op, fn, args))
        return op

    def drain(self) -> None:
        """Complete the Ops whose work is done (at most DRAIN; the rest on the next pass)."""
        self._inline = 0
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        # After the pipe is read and before the deque is: a completion after this wakes us
        # again, one before it is in the deque (cleared first, a wake-up could be lost).
        self._woken = False
        done = self._done
        for _ in range(DRAIN):
            if not done:
                return
            op, value, error = done.popleft()
            self.pending -= 1
            try:
                if error is not None:
                    op.fail(error)
                else:
                    op.resolve(value)
            except Exception:  # a bug in a continuation must not end the loop
                log.exception("a file operation's continuation failed")
        if done:
            self._signal()  # more next pass, without waiting for the poll's timeout

    def _signal(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the loop will look anyway
            pass

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(5.0)
        self._hashing.close()
        for fd in (self._wake_r, self._wake_w, *self._open.values()):
            os.close(fd)
        self._open.clear()

    def free_bytes(self) -> int:
        st = os.statvfs(self.folder)
        return st.f_bavail * st.f_frsize

    def begin(self, key: str, size: int, sha256: str) -> Op:
        return self._submit(self._begin, key, size)

    def write(self, key: str, offset: int, data: bytes) -> Op:
        return self._submit(self._write, key, offset, data)

    def finish(self, key: str, sha256: str) -> Op:
        return self._submit(self._finish, key, sha256)

    def abandon(self, key: str) -> None:
        self._submit(self._abandon, key)

    def read(self, sha256: str, offset: int, size: int) -> Op:
        data = self._read_now(sha256, offset, size)
        if data is not None:
            return Op.ready(data)
        if sha256 in self._open:
            return self._submit(self._read, sha256, offset, size)
        result = Op()
        self._submit(self._read_and_open, sha256, offset, size).then(
            lambda op: self._opened(sha256, op, result)
        )
        return result

    def _read_now(self, sha256: str, offset: int, size: int) -> bytearray | None:
        """The bytes, if they are all in the page cache of a content open here; else None."""
        fd = self._open.get(sha256)
        if fd is None or not _NOWAIT or self._inline >= INLINE_BYTES:
            return None
        buf = bytearray(size)
        try:
            n = os.preadv(fd, [buf], offset, _NOWAIT)
        except OSError:  # EAGAIN: on the disk; EOPNOTSUPP: a file system without it
            return None
        self._inline += n
        self._open.move_to_end(sha256)
        return buf if n == size else None

    def _opened(self, sha256: str, op: Op, result: Op) -> None:
        """The thread read a content the loop has no descriptor of, and opened one for it."""
        if op.error is not None:
            result.fail(op.error)
            return
        data, fd = op.value
        if sha256 in self._open:  # two first reads at once
            os.close(fd)
        else:
            self._open[sha256] = fd
            if len(self._open) > OPEN_READERS:
                os.close(self._open.popitem(last=False)[1])
        result.resolve(data)

    def delete(self, sha256: str) -> Op:
        self._close_open(sha256)
        return self._submit(self._delete, sha256)

    def _close_open(self, sha256: str) -> None:
        fd = self._open.pop(sha256, None)
        if fd is not None:
            os.close(fd)

    def sweep(self, grace: float, live: set[str]) -> None:
        self._submit(self._sweep, grace, set(live))

    def has(self, sha256: str) -> bool:
        return os.path.exists(self.object_path(sha256))

    def object_path(self, sha256: str) -> str:
        return os.path.join(self.objects, sha256)

    # ------------------------------------------------------------------ the thread
    def _work(self) -> None:
        _behind_the_loop()
        while True:
            job = self._jobs.get()
            if job is None:
                break
            op, fn, args = job
            try:
                self._done.append((op, fn(*args), None))
            except Exception as exc:  # noqa: BLE001 - handed to the loop as the Op's error
                if not isinstance(exc, ProtocolError):
                    log.warning("file operation %s failed: %s", fn.__name__, exc)
                    exc = ProtocolError(Code.NO_SPACE if _full(exc) else Code.INTERNAL, str(exc))
                self._done.append((op, None, exc))
            if not self._woken:  # else the loop has yet to drain: it will see this one too
                self._woken = True
                self._signal()
        for part in self._parts.values():
            os.close(part.fd)
        for fd in self._readers.values():
            os.close(fd)

    def _part_path(self, key: str) -> str:
        return os.path.join(self.uploads, key + ".part")

    def _begin(self, key: str, size: int) -> int:
        part = self._parts.get(key)
        if part is not None:
            return part.written
        fd = os.open(self._part_path(key), os.O_RDWR | os.O_CREAT, 0o600)
        hasher, written = hashlib.sha256(), 0
        if os.fstat(fd).st_size > size:  # not this upload's: start over
            os.ftruncate(fd, 0)
        while block := os.pread(fd, REHASH_BLOCK, written):
            hasher.update(block)
            written += len(block)
        self._parts[key] = _Part(fd, hasher, written)
        return written

    def _write(self, key: str, offset: int, data: bytes) -> int:
        part = self._parts.get(key)
        if part is None:
            raise ProtocolError(Code.NO_SUCH_FILE, "this upload was abandoned; start it again")
        if offset != part.written:
            raise ProtocolError(
                Code.BAD_OFFSET, f"the upload is at {part.written}", offset=part.written
            )
        view = memoryview(data)
        at = offset
        while view:
            n = os.pwrite(part.fd, view, at)
            view, at = view[n:], at + n
        self._hashing.update(part.hasher, data)
        part.written = at
        return at

    def _finish(self, key: str, sha256: str) -> None:
        part = self._parts.pop(key, None)
        if part is None:
            raise ProtocolError(Code.NO_SUCH_FILE, "this upload was abandoned; start it again")
        os.close(part.fd)
        path = self._part_path(key)
        self._hashing.settle()
        if part.hasher.hexdigest() != sha256:
            os.unlink(path)
            raise ProtocolError(
                Code.BAD_DIGEST, "the bytes uploaded do not have the SHA-256 announced"
            )
        if os.path.exists(self.object_path(sha256)):
            os.unlink(path)  # the same content was sent before: kept once
        else:
            os.replace(path, self.object_path(sha256))

    def _abandon(self, key: str) -> None:
        part = self._parts.pop(key, None)
        if part is not None:
            os.close(part.fd)
        try:
            os.unlink(self._part_path(key))
        except FileNotFoundError:
            pass

    def _reader(self, sha256: str) -> int:
        fd = self._readers.pop(sha256, None)
        if fd is None:
            try:
                fd = os.open(self.object_path(sha256), os.O_RDONLY)
            except FileNotFoundError:
                raise ProtocolError(Code.NO_SUCH_FILE, "this file's bytes are gone") from None
            if len(self._readers) >= OPEN_READERS:
                os.close(self._readers.popitem(last=False)[1])
        self._readers[sha256] = fd
        return fd

    def _read(self, sha256: str, offset: int, size: int) -> bytes:
        return os.pread(self._reader(sha256), size, offset)

    def _read_and_open(self, sha256: str, offset: int, size: int) -> tuple[bytes, int]:
        data = self._read(sha256, offset, size)
        return data, os.dup(self._readers[sha256])

    def _delete(self, sha256: str) -> None:
        fd = self._readers.pop(sha256, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.object_path(sha256))
        except FileNotFoundError:
            pass

    def _sweep(self, grace: float, live: set[str]) -> None:
        """Unfinished uploads nobody has touched for `grace` seconds: gone."""
        cutoff = time.time() - grace
        for entry in os.scandir(self.uploads):
            key = entry.name.removesuffix(".part")
            if key in live or key in self._parts:
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass


def _behind_the_loop() -> None:
    """This thread yields the processor to the broker's loop (Linux schedules threads one by
    one: a nice of 10 on this one alone), so that a chat line is not queued behind file
    work on a busy host."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: the same priority then
        pass


def _full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (28, 122)  # ENOSPC, EDQUOT
