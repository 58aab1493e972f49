"""Files in a cluster (issue 24): offers in a JetStream key-value bucket, contents in a
JetStream Object Store, so that a file sent through one broker downloads through any.

    NS-files          key-value bucket: file id -> the offer (JSON), watched into memory
    NS-contents       Object Store: one object per content, named by its SHA-256

Each broker keeps a disk cache of contents (a DiskBlobs: uploads are written and checked
there first, then put into the Object Store before the offer exists; a content read here
for the first time is fetched from the Object Store into the cache, then served from disk).
Everything here runs on the broker's own asyncio loop (the bridge's): NATS calls are
awaited in tasks, disk reads of nats-py's put go to its executor, and an Op completed from
a task wakes the broker's loop to send what it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from zmqchat._blobs import DiskBlobs
from zmqchat._cluster.file_parts import SharedUploads
from zmqchat._cluster.names import why
from zmqchat._core.files_state import FileOffer
from zmqchat._core.state import Op
from zmqchat.protocol import Code, ProtocolError

log = logging.getLogger("zmqchat.files")

WATCH_TRY = 5.0  # seconds a watch of the files bucket may take to give its initial values
SETUP_WAIT = 70.0  # seconds the start waits for the bucket and the object store (each step
# patiently: the bridge's SETUP_PATIENCE)


def cluster_files(cluster: Any, folder: str) -> tuple[ClusterFiles, ClusterBlobs]:
    """The FileIndex and Blobs of a started Cluster (its NATS connection is up)."""
    bridge = cluster.bridge
    ns, replicas = cluster.cfg.namespace, max(1, int(bridge.replicas))

    async def setup() -> tuple[Any, Any]:
        import nats.js.errors
        from nats.js import api

        js = bridge.js

        async def bucket() -> Any:
            try:
                return await js.key_value(f"{ns}-files")
            except nats.js.errors.BucketNotFoundError:
                return await js.create_key_value(
                    api.KeyValueConfig(bucket=f"{ns}-files", history=1, replicas=replicas)
                )

        async def objects() -> Any:
            try:
                return await js.object_store(f"{ns}-contents")
            except nats.js.errors.BucketNotFoundError:
                return await js.create_object_store(
                    f"{ns}-contents", api.ObjectStoreConfig(replicas=replicas)
                )

        # a cluster that is still settling answers as the bridge's start found (patiently)
        kv, store = await bridge.together(
            {
                f"making the bucket {ns}-files": bucket,
                f"making the object store {ns}-contents": objects,
            }
        )
        return kv, store

    try:
        kv, store = cluster.loop.run_until_complete(asyncio.wait_for(setup(), SETUP_WAIT))
    except TimeoutError:  # (an OSError: the broker would print its empty text)
        raise OSError(
            f"the NATS cluster did not make the files bucket and object store in {SETUP_WAIT:g} s"
        ) from None
    blobs = ClusterBlobs(folder, cluster, store)
    index = ClusterFiles(cluster, kv, blobs)
    index.start()
    return index, blobs


class _Async:
    """Ops completed by tasks on the cluster's loop."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.tasks: set[asyncio.Task[Any]] = set()

    def run(self, make: Callable[[], Awaitable[Any]], what: str) -> Op:
        """`what`: the operation, as the log says it if it fails ("sweeping ...")."""
        op = Op()

        async def go() -> None:
            try:
                value = await make()
            except ProtocolError as err:
                op.fail(err)
            except Exception as exc:  # noqa: BLE001 - NATS unreachable, timeouts: retry later
                log.warning("files: %s failed: %s", what, why(exc))
                op.fail(ProtocolError(Code.UNAVAILABLE, f"the cluster did not answer: {exc}"))
            else:
                op.resolve(value)
            self.cluster.wake()  # what the Op's continuations made goes out now

        task = self.cluster.loop.create_task(go())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return op


class ClusterFiles(_Async):
    """The FileIndex: every offer in memory from a watch of the bucket; a miss (an offer
    made on another broker a moment ago) asks the bucket."""

    def __init__(self, cluster: Any, kv: Any, blobs: ClusterBlobs) -> None:
        super().__init__(cluster)
        self.kv, self.blobs = kv, blobs
        self.offers: dict[str, FileOffer] = {}

    def start(self) -> None:
        ready = asyncio.Event()
        self._watching = self._watch_again(None, ready)
        try:
            self.cluster.loop.run_until_complete(
                asyncio.wait_for(self._until_watched(ready), SETUP_WAIT)
            )
        except TimeoutError:  # (an OSError: the broker would print its empty text)
            raise OSError(f"the files bucket's offers did not come in {SETUP_WAIT:g} s") from None

    def _watch_again(
        self, old: asyncio.Task[Any] | None, ready: asyncio.Event
    ) -> asyncio.Task[Any]:
        if old is not None:
            old.cancel()
        task: asyncio.Task[Any] = self.cluster.loop.create_task(self._watch(ready))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _until_watched(self, ready: asyncio.Event) -> None:
        """A watch made while a NATS node dies can stay silent: made again until its initial
        values come (each try gets WATCH_TRY seconds), then kept."""
        while not ready.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(ready.wait()), WATCH_TRY)
            except TimeoutError:
                self._watching = self._watch_again(self._watching, ready)

    async def _watch(self, ready: asyncio.Event) -> None:
        while True:
            try:
                watcher = await self.kv.watchall()
                break
            except Exception as exc:  # noqa: BLE001 - the cluster is still settling
                log.info("files bucket not watched yet: %r", exc)
                await asyncio.sleep(0.5)
        try:
            async for entry in watcher:
                if entry is None:  # the initial values are in
                    ready.set()
                    continue
                if entry.value and entry.operation in (None, "PUT"):
                    self._seen(FileOffer.from_json(json.loads(entry.value)))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _seen(self, offer: FileOffer) -> None:
        old = self.offers.get(offer.id)
        self.offers[offer.id] = offer
        if offer.removed_by and (old is None or not old.removed_by):
            if not any(o.sha256 == offer.sha256 and not o.removed_by for o in self.offers.values()):
                self.blobs.forget(offer.sha256)  # removed elsewhere: our cached copy too

    def find(self, fid: str) -> Op:
        offer = self.offers.get(fid)
        if offer is not None:
            return Op.ready(offer)

        async def ask() -> FileOffer | None:
            import nats.js.errors

            try:
                entry = await self.kv.get(fid)
            except nats.js.errors.KeyNotFoundError:
                return None
            if not entry.value:
                return None
            found = FileOffer.from_json(json.loads(entry.value))
            self._seen(found)
            return found

        return self.run(ask, "reading the files index")

    def listing(self, room: str | None, peer: str | None) -> Op:
        if room is not None:
            found = [o for o in self.offers.values() if o.room == room]
        else:
            found = [o for o in self.offers.values() if not o.room and peer in (o.sender, o.to_key)]
        return Op.ready(sorted(found, key=lambda o: o.ts))

    def add(self, offer: FileOffer) -> Op:
        return self.save(offer)

    def save(self, offer: FileOffer) -> Op:
        self.offers[offer.id] = offer
        data = json.dumps(offer.to_json()).encode()
        return self.run(lambda: self.kv.put(offer.id, data), f"storing the offer {offer.id}")

    def sent_since(self, owner: str, since: float) -> Op:
        return Op.ready(
            sum(o.size for o in self.offers.values() if o.owner == owner and o.ts >= since)
        )

    def refs(self, sha256: str) -> Op:
        return Op.ready(
            sum(1 for o in self.offers.values() if o.sha256 == sha256 and not o.removed_by)
        )


class ClusterBlobs(DiskBlobs):
    """Contents in the Object Store, with this broker's disk as their cache; uploads under
    way shared there too, a segment at a time (file_parts.py)."""

    def __init__(self, folder: str, cluster: Any, store: Any) -> None:
        super().__init__(folder)
        self.store = store
        self.tasks = _Async(cluster)
        self.fetching: dict[str, Op] = {}  # contents on their way into the cache
        self.parts = SharedUploads(store, self.tasks)

    def begin(self, key: str, size: int, sha256: str) -> Op:
        """Resume from what this disk has, or from what another broker shared."""
        result = Op()
        restored = self.tasks.run(
            lambda: self.parts.restore(key, self._part_path(key), size), f"restoring upload {key}"
        )
        restored.then(
            lambda op: (
                result.fail(op.error)
                if op.error is not None
                else super(ClusterBlobs, self)
                .begin(key, size, sha256)
                .then(lambda op: result.fail(op.error) if op.error else result.resolve(op.value))
            )
        )
        return result

    def write(self, key: str, offset: int, data: Any) -> Op:
        op = super().write(key, offset, data)

        def written(op: Op) -> None:
            if op.error is None:
                self.parts.written(key, self._part_path(key), int(op.value))

        op.then(written)
        return op

    def finish(self, key: str, sha256: str) -> Op:
        result = Op()

        def checked(op: Op) -> None:
            if op.error is not None:
                self.parts.drop(key)
                result.fail(op.error)
                return
            self.tasks.run(lambda: self._share(sha256), f"sharing content {sha256[:12]}").then(
                shared
            )

        def shared(op: Op) -> None:
            if op.error is not None:
                result.fail(op.error)  # the segments stay: the client may try again
            else:
                self.parts.drop(key)
                result.resolve(None)

        super().finish(key, sha256).then(checked)
        return result

    def abandon(self, key: str) -> None:
        super().abandon(key)
        self.parts.drop(key)

    def sweep(self, grace: float, live: set[str]) -> None:
        super().sweep(grace, live)
        self.tasks.run(
            lambda: self.parts.sweep(grace, set(live)), "sweeping unfinished uploads' parts"
        )

    async def _share(self, sha256: str) -> None:
        """Put a checked content into the Object Store (once: the same bytes sent again
        are there already)."""
        import nats.js.errors

        try:
            info = await self.store.get_info(sha256)
            if not info.deleted and info.size == os.path.getsize(self.object_path(sha256)):
                return
        except nats.js.errors.NotFoundError:
            pass
        with open(self.object_path(sha256), "rb") as f:
            await self.store.put(sha256, f)

    def read(self, sha256: str, offset: int, size: int) -> Op:
        if sha256 in self._open or self.has(sha256):  # open here: in the cache
            return super().read(sha256, offset, size)
        fetching = self.fetching.get(sha256)
        if fetching is None:
            fetching = self.fetching[sha256] = self.tasks.run(
                lambda: self._fetch(sha256), f"fetching content {sha256[:12]}"
            )

            def fetched_here(_: Op) -> None:
                self.fetching.pop(sha256, None)

            fetching.then(fetched_here)
        result = Op()

        def fetched(op: Op) -> None:
            if op.error is not None:
                result.fail(op.error)
            else:
                super(ClusterBlobs, self).read(sha256, offset, size).then(
                    lambda op: result.fail(op.error) if op.error else result.resolve(op.value)
                )

        fetching.then(fetched)
        return result

    async def _fetch(self, sha256: str) -> None:
        """Copy a content from the Object Store into the cache (nats-py checks its digest;
        its writes go to an executor thread)."""
        import nats.js.errors

        tmp = os.path.join(self.uploads, f"fetch-{sha256}.tmp")
        try:
            with open(tmp, "wb") as f:
                await self.store.get(sha256, writeinto=f)
        except nats.js.errors.NotFoundError:
            raise ProtocolError(Code.NO_SUCH_FILE, "this file's bytes are gone") from None
        except BaseException:
            os.unlink(tmp)
            raise
        os.replace(tmp, self.object_path(sha256))

    def delete(self, sha256: str) -> Op:
        self.forget(sha256)

        async def remove() -> None:
            import nats.js.errors

            try:
                await self.store.delete(sha256)
            except nats.js.errors.NotFoundError:
                pass

        return self.tasks.run(remove, "removing a file")

    def forget(self, sha256: str) -> None:
        """Drop the cached copy only."""
        super().delete(sha256)
