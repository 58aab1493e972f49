"""Files (issue 24): UPLOAD, PUT, GET, FILES, FILE and RMFILE.

A sender announces a file (UPLOAD: room or person, name, size, SHA-256) and sends its bytes
in chunks (PUT), never more than WINDOW unanswered: each PUT is answered once its chunk is
on disk, and that answer is the credit for the next one (zguide's credit-based transfer).
Once the bytes are all there and their digest is the one announced, the offer becomes an
event of the room's log (or a private message) and the last PUT's answer carries it. A
reader pulls chunks the same way (GET, WINDOW at a time). An upload cut off resumes where
it stopped (UPLOAD again says how far it got); one left alone for the grace period is
deleted, as is one that lies (more bytes than announced, another digest).

PUT and GET answer later, when the disk thread is done (`LATER`), without holding up the
connection's other requests: a chat line is not queued behind a chunk.

A chunk read for a GET stays in the broker's memory until the client has read it: ZeroMQ
holds a reply until it has written it to the kernel, and a client that asks and does not
read would have it hold thousands. So a GET is read only while what is held for its
connection (chunks being read, and chunks lent to ZeroMQ and not yet let go: the loop's
`Backlog`) stays within HELD_PER_CONNECTION, and what is held for all within HELD_LIMIT;
past that it is refused with RATE_LIMITED, which the client library waits out.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from zmqchat import protocol as m
from zmqchat._core.base import LATER, CoreBase, Handler
from zmqchat._core.files_state import DAY, Blobs, FileIndex, FileOffer, FileRules
from zmqchat._core.session import Session, Stage
from zmqchat._core.state import Draft, Op
from zmqchat._ops.logs import event as log_event
from zmqchat.protocol import Code, EventKind, Kind, ProtocolError, Reply, size_text

log = logging.getLogger("zmqchat.files")

IO_LIMIT: Final = 64 << 20  # bytes of chunks waiting for the disk, all uploads together
MAX_LISTING: Final = 200  # offers in one FILES reply (the newest)
GETS_PER_CONNECTION: Final = 4 * m.WINDOW  # being read for one client: 4 downloads at full speed
# Bytes of chunks held for one connection (being read, or waiting for the client to read
# them): its GETs at most, and a window more for the moment between a chunk's arrival at
# the client and the broker's seeing that ZeroMQ let go of it.
HELD_PER_CONNECTION: Final = (GETS_PER_CONNECTION + m.WINDOW) * m.CHUNK
HELD_LIMIT: Final = 256 << 20  # the same, all connections together: 32 downloads at full speed
_OK: Final = b"OK"


class Backlog(Protocol):
    """Bytes of replies held for the connections until their clients read them: chunks in
    the outbox, and replies the sockets have not written yet (the broker's loop keeps it:
    broker/_outflow.py)."""

    total: int

    def held(self, rid: bytes) -> int: ...

    def queue(self, rid: bytes, n: int) -> None:
        """A chunk of n bytes for this connection goes in the outbox."""


class _NoBacklog:
    """A core without a loop (its tests): nothing is held."""

    total = 0

    def held(self, rid: bytes) -> int:
        return 0

    def queue(self, rid: bytes, n: int) -> None:
        pass


@dataclass(eq=False)
class Upload:
    """An upload under way on this broker."""

    key: str
    owner: str
    size: int
    sha256: str
    name: str
    room: str | None
    to: str | None
    received: int  # bytes accepted (on disk, or queued for it)
    written: int  # bytes on disk
    touched: float
    inflight: int = 0
    finishing: bool = False
    offered: bool = False  # in the file index: counted there against the daily limit
    waiting: list[tuple[bytes, bytes]] = field(default_factory=list)  # (rid, label) of the last PUT


class Files(CoreBase):
    """The file commands; `attach_files` gives the core its index, contents and limits."""

    file_index: FileIndex | None = None
    blobs: Blobs | None = None
    file_rules: FileRules = FileRules()
    backlog: Backlog = _NoBacklog()  # the loop sets its own

    def attach_files(self, index: FileIndex, blobs: Blobs, rules: FileRules) -> None:
        self.file_index, self.blobs, self.file_rules = index, blobs, rules
        self.uploads: dict[str, Upload] = {}
        self.io_bytes = 0  # bytes of PUTs queued for the disk
        self.gets: dict[bytes, tuple[int, int]] = {}  # connection -> GETs being read, bytes
        self.reading = 0  # bytes of all the GETs being read

    def handler_table(self) -> dict[Kind, Handler]:
        return {
            **super().handler_table(),
            Kind.UPLOAD: self._on_upload,
            Kind.PUT: self._on_put,
            Kind.GET: self._on_get,
            Kind.FILES: self._on_files,
            Kind.FILE: self._on_file,
            Kind.RMFILE: self._on_rmfile,
        }

    def _parts(self) -> tuple[FileIndex, Blobs]:
        if self.file_index is None or self.blobs is None:
            raise ProtocolError(Code.UNAVAILABLE, "this broker does not take files")
        return self.file_index, self.blobs

    # ------------------------------------------------------------------ upload
    def _on_upload(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        index, blobs = self._parts()
        b, rules = req.body, self.file_rules
        if b["size"] > rules.max_size:
            raise ProtocolError(
                Code.TOO_LARGE,
                f"{b['name']} is {size_text(b['size'])}; this broker takes files up to "
                f"{size_text(rules.max_size)}",
                limit=rules.max_size,
            )
        to = None
        if b["room"] is not None:
            self._member_room(s, b["room"])
        else:
            to = yield from self._recipient(b["to"])
        owner = s.ident.owner
        key = hashlib.sha256(f"{owner}\0{b['id']}\0{b['sha256']}\0{b['size']}".encode()).hexdigest()
        key = key[:32]
        up = self.uploads.get(key)
        if up is None:
            sent = yield index.sent_since(owner, self.clock.time() - DAY)
            sent += sum(  # those under way, not yet in the index
                u.size for u in self.uploads.values() if u.owner == owner and not u.offered
            )
            if sent + b["size"] > rules.daily:
                raise ProtocolError(
                    Code.QUOTA,
                    f"you have sent {size_text(sent)} today; the limit is "
                    f"{size_text(rules.daily)} a day",
                )
            if blobs.free_bytes() - b["size"] < rules.keep_free:
                raise ProtocolError(Code.NO_SPACE, "the broker is short of disk space for that")
            if sum(1 for u in self.uploads.values() if u.owner == owner) >= rules.uploads:
                raise ProtocolError(
                    Code.RATE_LIMITED, f"at most {rules.uploads} uploads at once", retry_after=1.0
                )
            done = yield blobs.begin(key, b["size"], b["sha256"])
            up = self.uploads.get(key)  # a twin UPLOAD may have made it meanwhile
            if up is None:
                up = self.uploads[key] = Upload(
                    key, owner, b["size"], b["sha256"], b["name"], b["room"], to, done, done, 0.0
                )
        up.name, up.room, up.to = b["name"], b["room"], to
        up.touched = self.clock.monotonic()
        log_event(log, "upload", nick=s.nick, key=key, size=up.size, at=up.received)
        reply = {"upload": key, "offset": up.received, "chunk": m.CHUNK, "window": m.WINDOW}
        if up.received == up.size and not up.inflight and not up.finishing:
            offer = yield self._finish(up, s)  # empty, or all there before a restart
            reply["offer"] = offer
        return reply

    def _recipient(self, nick: str) -> Generator[Op, Any, str]:
        target = self.registry.holder(m.nick_key(nick))
        if target is None:
            yield self.registry.catch_up()
            target = self.registry.holder(m.nick_key(nick))
        if target is None:
            raise ProtocolError(Code.NO_SUCH_NICK, f"nobody called {nick} is connected")
        return target.nick

    def _on_put(self, s: Session, req: m.Request) -> object:
        _, blobs = self._parts()
        b = req.body
        up = self.uploads.get(b["upload"])
        if up is None or up.owner != s.ident.owner:
            raise ProtocolError(Code.NO_SUCH_FILE, "no such upload here: send UPLOAD again")
        data: bytes = b["data"]
        if b["offset"] != up.received or up.finishing:
            raise ProtocolError(
                Code.BAD_OFFSET, f"the upload is at {up.received}", offset=up.received
            )
        if up.received + len(data) > up.size:
            self._abandon(up, "more bytes than announced")
            raise ProtocolError(Code.BAD_REQUEST, "more bytes than the size announced: dropped")
        if up.inflight >= m.WINDOW:
            raise ProtocolError(Code.BAD_REQUEST, f"at most {m.WINDOW} chunks unanswered")
        if self.io_bytes >= IO_LIMIT:
            raise ProtocolError(Code.RATE_LIMITED, "the disk is busy", retry_after=0.05)
        up.received += len(data)
        up.inflight += 1
        up.touched = self.clock.monotonic()
        self.io_bytes += len(data)
        rid, label = s.rid, req.label
        blobs.write(up.key, b["offset"], data).then(
            lambda op: self._written(rid, label, up, op, len(data))
        )
        return LATER

    def _written(self, rid: bytes, label: bytes, up: Upload, op: Op, n: int) -> None:
        up.inflight -= 1
        self.io_bytes -= n
        if op.error is not None:
            self._abandon(up, str(op.error))
            self._later_error(rid, label, op.error)
            return
        up.written = int(op.value)
        if up.written < up.size or up.finishing:
            self._later(rid, label, {"upload": up.key, "offset": up.written})
            return
        s = self.by_rid.get(rid)
        up.finishing = True
        finished = self._finish(up, s)
        finished.then(lambda op: self._finished(rid, label, up, op))

    def _finished(self, rid: bytes, label: bytes, up: Upload, op: Op) -> None:
        if op.error is not None:
            self._later_error(rid, label, op.error)
        else:
            self._later(rid, label, {"upload": up.key, "offset": up.size, "offer": op.value})

    def _finish(self, up: Upload, s: Session | None) -> Op:
        """Digest checked, content kept, offer stored: the Op's value is the offer event."""
        index, blobs = self._parts()
        up.finishing = True
        result = Op()

        def fail(error: BaseException) -> None:
            self.uploads.pop(up.key, None)
            result.fail(error)

        def kept(op: Op) -> None:
            if op.error is not None:
                return fail(op.error)
            if s is None or s.stage is Stage.GONE:
                return fail(ProtocolError(Code.NO_HELLO, "say HELLO first"))
            try:
                offer = self._offer(up, s)
            except ProtocolError as err:
                if not self._content_used(up.sha256):
                    blobs.delete(up.sha256)
                return fail(err)
            index.add(offer).then(lambda op: stored(op, offer))

        def stored(op: Op, offer: FileOffer) -> None:
            if op.error is not None:
                return fail(op.error)
            up.offered = True
            assert s is not None
            self._announce(offer, s).then(announced)

        def announced(op: Op) -> None:
            self.uploads.pop(up.key, None)
            if op.error is not None:
                result.fail(op.error)
            else:
                result.resolve(op.value)

        blobs.finish(up.key, up.sha256).then(kept)
        return result

    def _content_used(self, sha256: str) -> bool:
        index = self.file_index
        if index is None:
            return False
        op = index.refs(sha256)
        return not op.done or bool(op.value)

    def _offer(self, up: Upload, s: Session) -> FileOffer:
        to_key = to_owner = ""
        if up.room is not None:
            self._member_room(s, up.room)  # still in it
        else:
            assert up.to is not None
            holder = self.registry.holder(m.nick_key(up.to))
            if holder is None:
                raise ProtocolError(Code.NO_SUCH_NICK, f"{up.to} is gone")
            to_key, to_owner = holder.key, holder.owner
        fid = self.tokens(4)
        index = self.file_index
        while index is not None and (found := index.find(fid)).done and found.value is not None:
            fid = self.tokens(4)
        return FileOffer(
            fid,
            up.sha256,
            up.size,
            up.name,
            s.nick,
            s.key,
            s.ident.owner,
            up.room or "",
            up.to or "",
            to_key,
            self.clock.time(),
            to_owner=to_owner,
        )

    def _announce(self, offer: FileOffer, s: Session) -> Op:
        """The offer as an event: in the room's log, or a private message to its recipient."""
        extra = {
            "file": offer.id,
            "name": offer.name,
            "size": offer.size,
            "sha256": offer.sha256,
            "bot": s.ident.bot,
        }
        text = f"{offer.nick} offers {offer.name} ({size_text(offer.size)}): /get {offer.id}"
        log_event(log, "file", nick=s.nick, file=offer.id, size=offer.size, room=offer.room)
        if offer.room:
            draft = Draft(EventKind.FILE, s.nick, text, s.ident.owner, None, extra)
            op = self._store(offer.room, [draft])
            result = Op()
            op.then(
                lambda op: (
                    result.fail(op.error)
                    if op.error is not None
                    else result.resolve(
                        {**offer.public(), "kind": "file", "text": text, "seq": op.value[0]}
                    )
                )
            )
            return result
        target = self.registry.holder(offer.to_key)
        if target is not None and target.owner != offer.to_owner:
            target = None  # another client took the nick meanwhile: not the one it is for
        cmid = "file-" + offer.id
        event: dict[str, Any] = {
            "kind": "file",
            "nick": s.nick,
            "to": offer.to,
            "text": text,
            "ts": offer.ts,
            "cmid": cmid,
            **extra,
        }
        if target is None:
            return Op.failed(ProtocolError(Code.NO_SUCH_NICK, f"{offer.to} is gone"))
        op = self.room_log.append_private(
            offer.ts, s.ident.owner, target.recipient, cmid, m.dumps(event), s.key
        )
        result = Op()

        def kept(op: Op) -> None:
            if op.error is not None:
                result.fail(op.error)
                return
            assert target is not None
            self.push_to(target, Reply.PRIVATE, {"event": event})
            self._tell_others(s, Reply.PRIVATE, {"event": event})  # its account's other devices
            result.resolve(event)

        op.then(kept)
        return result

    def _abandon(self, up: Upload, why: str) -> None:
        if self.uploads.pop(up.key, None) is not None and self.blobs is not None:
            log_event(log, "upload-dropped", key=up.key, why=why)
            self.blobs.abandon(up.key)

    # ------------------------------------------------------------------ replies made later
    def _later(
        self, rid: bytes, label: bytes, body: dict[str, Any], data: bytes | None = None
    ) -> None:
        frames = [rid, _OK, label, m.dumps(body)]
        if data is not None:
            frames.append(data)
        self.outbox.append(frames)

    def _later_error(self, rid: bytes, label: bytes, error: BaseException) -> None:
        if not isinstance(error, ProtocolError):
            log.error("file operation failed: %r", error)
            error = ProtocolError(Code.INTERNAL, "the broker failed on this request")
        self._error(rid, label, error)

    # ------------------------------------------------------------------ download
    def _on_get(self, s: Session, req: m.Request) -> object:
        index, blobs = self._parts()
        b, rid = req.body, s.rid
        label, size = req.label, min(b["size"], m.CHUNK)
        self._may_read(rid, size)
        self._reading(rid, 1, size)

        def found(op: Op) -> None:
            try:
                offer = self._readable(s, op)
                offset = b["offset"]
                if offset > offer.size:
                    raise ProtocolError(
                        Code.BAD_OFFSET, f"the file has {offer.size} bytes", offset=offer.size
                    )
                n = min(size, offer.size - offset)
            except ProtocolError as err:
                return done(Op.failed(err), 0)
            if n == 0:
                return done(Op.ready(b""), offset)
            blobs.read(offer.sha256, offset, n).then(lambda op: done(op, offset))

        def done(op: Op, offset: int) -> None:
            self._reading(rid, -1, -size)  # its bytes are the backlog's to count from here
            if op.error is not None:
                self._later_error(rid, label, op.error)
            else:
                data = op.value
                body = {"file": b["file"], "offset": offset, "size": len(data)}
                if data:
                    self.backlog.queue(rid, len(data))
                self._later(rid, label, body, data or None)  # past the end: no bytes frame

        index.find(b["file"]).then(found)
        return LATER

    def _may_read(self, rid: bytes, size: int) -> None:
        """Refuse a GET that would take what is held for its connection, or for all, past
        its bound (see the module docstring); the refusal says when to ask again."""
        gets, reading = self.gets.get(rid, (0, 0))
        if gets >= GETS_PER_CONNECTION:  # several downloads at once: wait
            raise ProtocolError(
                Code.RATE_LIMITED,
                f"at most {GETS_PER_CONNECTION} GETs unanswered per connection",
                retry_after=0.05,
            )
        backlog = self.backlog
        if reading + backlog.held(rid) + size > HELD_PER_CONNECTION:
            raise ProtocolError(
                Code.RATE_LIMITED,
                f"{size_text(HELD_PER_CONNECTION)} of chunks wait for you to read them",
                retry_after=0.05,
            )
        if self.reading + backlog.total + size > HELD_LIMIT:
            raise ProtocolError(
                Code.RATE_LIMITED, "the broker sends all the chunks it may at once", retry_after=0.2
            )

    def _reading(self, rid: bytes, gets: int, n: int) -> None:
        """GETs of a connection begun (+1, their size) or answered (-1, -size)."""
        was_gets, was = self.gets.get(rid, (0, 0))
        if was_gets + gets:
            self.gets[rid] = (was_gets + gets, was + n)
        else:
            self.gets.pop(rid, None)
        self.reading += n

    def _readable(self, s: Session, op: Op, *, removed: bool = False) -> FileOffer:
        """The offer an Op found, if this session may have it; else the one same refusal."""
        if op.error is not None:
            raise op.error
        offer: FileOffer | None = op.value
        if (
            offer is None
            or s.stage is Stage.GONE
            or not offer.readable_by(s.ident.owner, s.key, s.rooms)
        ):
            raise ProtocolError(
                Code.NO_SUCH_FILE,
                "no such file for you (a room's files are for its members, a private file "
                "for its two people)",
            )
        if offer.removed_by and not removed:
            raise ProtocolError(
                Code.FILE_REMOVED, f"{offer.name} was removed by {offer.removed_by}"
            )
        return offer

    def _on_file(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        index, _ = self._parts()
        found = yield index.find(req.body["file"])
        offer = self._readable(s, Op.ready(found), removed=True)
        return {**offer.public(), "chunk": m.CHUNK, "window": m.WINDOW}  # what GETs may ask

    def _on_files(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        index, _ = self._parts()
        b = req.body
        if b["room"] is not None:
            self._member_room(s, b["room"])
            offers = yield index.listing(b["room"], None)
        else:
            peer = m.nick_key(b["with"])
            found = yield index.listing(None, peer)
            offers = [o for o in found if o.between(s.ident.owner, s.key, peer)]
        return {"files": [o.public() for o in offers[-MAX_LISTING:]]}

    def _on_rmfile(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        index, blobs = self._parts()
        found = yield index.find(req.body["file"])
        offer = self._readable(s, Op.ready(found))
        if offer.room:
            yield self.registry.catch_up()
            if s.key not in self._settings(self._room(offer.room)).operators:
                raise ProtocolError(Code.NOT_OPERATOR, f"you are not an operator of {offer.room}")
        elif s.ident.owner != offer.owner:
            raise ProtocolError(Code.NOT_OPERATOR, "only its sender removes a private file")
        offer.removed_by = s.nick
        yield index.save(offer)
        if not (yield index.refs(offer.sha256)):
            yield blobs.delete(offer.sha256)
        log_event(log, "file-removed", file=offer.id, by=s.nick)
        if offer.room:
            text = f"{offer.nick}'s file {offer.name} ({offer.id}) was removed by {s.nick}"
            yield self._store(
                offer.room,
                [
                    Draft(
                        EventKind.NOTICE,
                        s.nick,
                        text,
                        s.key,
                        None,
                        {"file": offer.id, "removed": True},
                    )
                ],
            )
        return offer.public()

    # ------------------------------------------------------------------ housekeeping
    def sweep(self) -> None:
        super().sweep()
        if self.blobs is None:
            return
        now = self.clock.monotonic()
        for up in [u for u in self.uploads.values() if not u.inflight and not u.finishing]:
            if now - up.touched > self.file_rules.grace:
                self._abandon(up, "abandoned")
        if now >= getattr(self, "_next_blob_sweep", 0.0):
            self._next_blob_sweep = now + min(60.0, self.file_rules.grace / 4)
            self.blobs.sweep(self.file_rules.grace, set(self.uploads))
