"""File transfers of the client library (issue 24): Client.send_file and Client.download.

Both move a file in chunks over the command socket with at most WINDOW requests unanswered
(zguide's credit-based transfer): memory stays a few chunks whatever the file's size. A lost
connection (a broker restart, a failover to another broker) is waited out and the transfer
goes on from where the broker (upload) or the partial file (download) got to. A download is
checked against the sender's SHA-256 before it gets its name; until then it is a hidden
`.ID.part` file in the folder, which a later download of the same id resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Protocol

from zmqchat import protocol as m
from zmqchat._client.errors import ChatError, Progress


class Client(Protocol):
    """What a transfer uses of the library's Client (library.py imports this module)."""

    @property
    def connected(self) -> bool: ...

    @property
    def rooms(self) -> Mapping[str, Any]: ...

    async def request(self, kind: m.Kind, body: dict[str, Any]) -> dict[str, Any]: ...

    async def wait_online(self, timeout: float | None = None) -> None: ...

    def _start(
        self, kind: m.Kind, body: dict[str, Any], data: bytes | None = None
    ) -> tuple[bytes, asyncio.Future[dict[str, Any]]]: ...

    def _forget(self, label: bytes) -> None: ...


# Errors after which a transfer waits for the connection and goes on.
RESUMABLE: Final = frozenset(
    {
        "DISCONNECTED",
        "TIMEOUT",
        m.Code.UNAVAILABLE,
        m.Code.NO_HELLO,
        m.Code.BAD_OFFSET,
        m.Code.RATE_LIMITED,  # the broker's disk is behind (many uploads at once)
    }
)
RECONNECT_WAIT: Final = 120.0  # seconds a transfer waits for the broker to come back
CHUNK_TIMEOUT: Final = 20.0  # seconds one chunk may take (a busy disk, a loaded cluster)
HASH_BLOCK: Final = 1 << 20
SINK_BEHIND: Final = 4  # chunks of a download received and not yet written (4 MiB)


def sha256_file(path: str, upto: int | None = None) -> tuple[Any, int]:
    """The running SHA-256 of a file's first `upto` bytes (all), and how many it read."""
    hasher, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while upto is None or n < upto:
            block = f.read(HASH_BLOCK if upto is None else min(HASH_BLOCK, upto - n))
            if not block:
                break
            hasher.update(block)
            n += len(block)
    return hasher, n


async def _off_loop(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _recover(client: Client, err: ChatError, deadline: float) -> None:
    """After a resumable error: wait for the connection (until the deadline)."""
    if err.code not in RESUMABLE or time.monotonic() > deadline:
        raise err
    if not client.connected:
        await client.wait_online(max(0.1, deadline - time.monotonic()))
    else:
        await asyncio.sleep(min(1.0, float(err.body.get("retry_after", 0.05))))


class _Window:
    """Requests of one transfer under way, answered in the order sent."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sent: deque[tuple[bytes, asyncio.Future[dict[str, Any]]]] = deque()

    def send(self, kind: m.Kind, body: dict[str, Any], data: bytes | None = None) -> None:
        self.sent.append(self.client._start(kind, body, data))

    async def next(self, timeout: float) -> dict[str, Any]:
        label, fut = self.sent[0]
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise ChatError("TIMEOUT", "a chunk was not answered") from None
        finally:
            if fut.done():
                self.sent.popleft()
                self.client._forget(label)

    def cancel(self) -> None:
        for label, fut in self.sent:
            self.client._forget(label)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: no "never retrieved" warning
            fut.cancel()
        self.sent.clear()


def _target(client: Client, room_or_nick: str) -> dict[str, str]:
    if room_or_nick.startswith("@"):
        return {"to": room_or_nick[1:]}
    if room_or_nick in client.rooms:
        return {"room": room_or_nick}
    return {"to": room_or_nick}


async def send_file(
    client: Client, room_or_nick: str, path: str, name: str | None, progress: Progress | None
) -> dict[str, Any]:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ChatError("NO_SUCH_FILE", f"{path}: no such file")
    hasher, size = await _off_loop(sha256_file, path)
    body = {
        **_target(client, room_or_nick),
        "id": secrets.token_hex(16),
        "name": m.safe_name(name or os.path.basename(path)),
        "size": size,
        "sha256": hasher.hexdigest(),
    }
    deadline = time.monotonic() + RECONNECT_WAIT
    with open(path, "rb") as f:
        while True:
            try:
                reply = await client.request(m.Kind.UPLOAD, body)
                if "offer" in reply:  # all there already (sent before a lost answer, or before)
                    if progress is not None:
                        progress(size, size)
                    return dict(reply["offer"])
                if int(reply["offset"]) >= size:  # the broker is finishing it: ask again
                    await asyncio.sleep(0.2)
                    continue
                return await _put_all(client, f, reply, size, progress)
            except ChatError as err:
                await _recover(client, err, deadline)
                deadline = time.monotonic() + RECONNECT_WAIT


async def _put_all(
    client: Client, f: Any, reply: dict[str, Any], size: int, progress: Progress | None
) -> dict[str, Any]:
    key, offset = str(reply["upload"]), int(reply["offset"])
    chunk = min(int(reply.get("chunk", m.CHUNK)), m.CHUNK)
    window = _Window(client)
    fd = f.fileno()
    last_timeout = CHUNK_TIMEOUT + size / (20 << 20)  # the last answer waits for the check
    try:
        while True:
            while offset < size and len(window.sent) < int(reply.get("window", m.WINDOW)):
                data = os.pread(fd, min(chunk, size - offset), offset)
                if not data:
                    raise ChatError("NO_SUCH_FILE", "the file got shorter while it was sent")
                window.send(m.Kind.PUT, {"upload": key, "offset": offset}, data)
                offset += len(data)
            last = offset >= size and len(window.sent) == 1
            answer = await window.next(last_timeout if last else CHUNK_TIMEOUT)
            if progress is not None:
                progress(int(answer.get("offset", 0)), size)
            if "offer" in answer:
                return dict(answer["offer"])
    finally:
        window.cancel()


def _downloads_part(folder: str, file_id: str) -> str:
    return os.path.join(folder, f".{file_id}.part")


def free_name(folder: str, name: str) -> str:
    """`name` in folder, or `name (1).ext`, `name (2).ext`, ... : the first that is free."""
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension (or a name that was only one)
        stem, dot, ext = name, "", ""
    n = 0
    while True:
        candidate = name if n == 0 else f"{stem} ({n}){dot}{ext}"
        path = os.path.join(folder, candidate)
        if not os.path.lexists(path):
            return path
        n += 1


def _place(part: str, folder: str, name: str) -> str:
    """Give the checked download its name, never replacing a file (even one made just now)."""
    while True:
        path = free_name(folder, name)
        try:
            os.link(part, path)  # fails if the name was taken meanwhile
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            os.replace(part, path)
            return path
        os.unlink(part)
        return path


async def download(client: Client, file_id: str, folder: str, progress: Progress | None) -> str:
    if not m.FILE_ID_RE.match(file_id):
        raise ChatError(m.Code.NO_SUCH_FILE, f"{file_id!r} is not a file id")
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise ChatError("NO_SUCH_FILE", f"{folder}: no such folder")
    deadline = time.monotonic() + RECONNECT_WAIT
    while True:
        try:
            info = await client.request(m.Kind.FILE, {"file": file_id})
            break
        except ChatError as err:
            await _recover(client, err, deadline)
    size, sha, name = int(info["size"]), str(info["sha256"]), m.safe_name(str(info["name"]))
    part = _downloads_part(folder, file_id)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    sink: _Sink | None = None
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, 0)
        hasher, have = await _off_loop(sha256_file, part)
        sink = _Sink(fd, hasher, have)
        # what this broker serves per GET (65536 and 16 for the first brokers, which did not say)
        chunk = max(1, min(int(info.get("chunk", 1 << 16)), m.CHUNK))
        window = max(1, min(int(info.get("window", 16)), 64))
        while sink.have < size:
            try:
                await _get_all(client, file_id, sink, size, (chunk, window), progress)
            except ChatError as err:
                await _recover(client, err, deadline)
                deadline = time.monotonic() + RECONNECT_WAIT
        await sink.settle()
    finally:
        if sink is not None:
            sink.close()  # its thread is done with the descriptor before it is closed
        os.close(fd)
    if hasher.hexdigest() != sha:
        os.unlink(part)
        raise ChatError(m.Code.BAD_DIGEST, f"{name} arrived damaged (SHA-256 differs): not kept")
    if progress is not None:
        progress(size, size)
    return _place(part, folder, name)


class _Sink:
    """A download's partial file, its running digest and its length (`have`: the bytes
    received, written or on their way to the file). Chunks are written and hashed in order
    on a thread of their own while the loop reads the next ones (both let go of the
    interpreter lock), at most SINK_BEHIND of them waiting."""

    def __init__(self, fd: int, hasher: Any, have: int) -> None:
        self.fd, self.hasher, self.have = fd, hasher, have
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="zmqchat-download")
        self._behind: deque[asyncio.Future[None]] = deque()

    async def add(self, data: bytes | memoryview) -> None:
        """Queue a chunk; wait while too many are (an error of a write comes out here)."""
        loop = asyncio.get_running_loop()
        self._behind.append(loop.run_in_executor(self._pool, self._write, data, self.have))
        self.have += len(data)
        while self._behind and (len(self._behind) > SINK_BEHIND or self._behind[0].done()):
            await self._behind.popleft()

    async def settle(self) -> None:
        """Until every chunk is in the file and the digest."""
        while self._behind:
            await self._behind.popleft()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fut in self._behind:  # cancelled mid-way: their errors are of no use now
            if fut.done() and not fut.cancelled():
                fut.exception()
        self._behind.clear()

    def _write(self, data: bytes | memoryview, at: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n
        self.hasher.update(data)


async def _get_all(
    client: Client,
    fid: str,
    sink: _Sink,
    size: int,
    pace: tuple[int, int],
    progress: Progress | None,
) -> None:
    (chunk, credit), window, asked = pace, _Window(client), sink.have
    try:
        while sink.have < size:
            while asked < size and len(window.sent) < credit:
                window.send(m.Kind.GET, {"file": fid, "offset": asked, "size": chunk})
                asked += min(chunk, size - asked)
            answer = await window.next(CHUNK_TIMEOUT)
            data = answer.get("~data", b"")
            if int(answer.get("offset", -1)) != sink.have or not data:
                raise ChatError(m.Code.BAD_OFFSET, "a chunk came out of place")
            await sink.add(data)
            if progress is not None:
                progress(sink.have, size)
    finally:
        window.cancel()
