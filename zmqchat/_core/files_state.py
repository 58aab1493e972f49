"""Files (issue 24): what brokers share about them, behind two interfaces.

    FileIndex  the offers: who sent which file (name, size, SHA-256) to which room or person,
               and whether an operator removed it; a sender's bytes of the last day
    Blobs      the contents, by SHA-256: an upload written chunk by chunk (resumable, its
               digest checked before it counts), chunks read back, removal

One broker keeps the offers in its SQLite store and the contents in a folder beside it
(_local/files.py, _local/blobs.py); a cluster keeps the offers in a JetStream key-value
bucket and the contents in a JetStream Object Store, each broker with a disk cache of its
own (_cluster/files.py). Disk work happens on a thread of the Blobs, never on the broker's
loop: every call returns an Op done when the work is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from zmqchat._core.state import Op

DAY = 86400.0


@dataclass
class FileRules:
    """A broker's limits on files, as its flags set them; each default is written here only."""

    max_size: int = 100 * 2**20  # bytes in one file (--max-file-size)
    daily: int = 2 * 2**30  # bytes one sender may offer per day (--max-file-bytes-per-day)
    keep_free: int = 1 * 2**30  # free disk space uploads never take (--keep-free)
    grace: float = 600.0  # seconds an unfinished upload is kept for a resume (--upload-grace)
    uploads: int = 4  # uploads under way per sender at once


@dataclass(slots=True)
class FileOffer:
    """A file offered to a room or to one person. `sender` and `to_key` are nick keys;
    `owner` and `to_owner` the two parties' Identity.owner (the sender's bytes per day are
    counted by it; a private file is theirs, as private history is: an account once there
    are accounts, else the CURVE key or the client's resume token, never a nick alone)."""

    id: str
    sha256: str
    size: int
    name: str
    nick: str
    sender: str
    owner: str
    room: str = ""  # the room, or "" for a private file
    to: str = ""  # the recipient's nick (a private file)
    to_key: str = ""
    ts: float = 0.0
    removed_by: str = ""  # the operator who removed it
    to_owner: str = ""  # the recipient's Identity.owner (a private file; "" in offers of before)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileOffer:
        return cls(**{k: d[k] for k in cls.__slots__ if k in d})

    def public(self) -> dict[str, Any]:
        """What a client is told of it."""
        out: dict[str, Any] = {
            "file": self.id,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "nick": self.nick,
            "ts": self.ts,
        }
        if self.room:
            out["room"] = self.room
        else:
            out["to"] = self.to
        if self.removed_by:
            out["removed"] = True
            out["removed_by"] = self.removed_by
        return out

    def readable_by(self, owner: str, key: str, rooms: set[str]) -> bool:
        """Whether a session of identity `owner`, with nick key `key`, in `rooms`, may have
        it: a room's members, or a private file's two identities (whoever holds their nicks
        later is nobody to it; an offer made before identities were kept: the nicks)."""
        if self.room:
            return self.room in rooms
        if self.to_owner:
            return owner in (self.owner, self.to_owner)
        return key in (self.sender, self.to_key)

    def between(self, owner: str, key: str, peer: str) -> bool:
        """Whether it is a private file between identity `owner` (nick key `key`) and the
        nick key `peer`, either way."""
        if self.room:
            return False
        if self.to_owner:
            return (self.owner == owner and self.to_key == peer) or (
                self.to_owner == owner and self.sender == peer
            )
        return {self.sender, self.to_key} == {key, peer}


class FileIndex(Protocol):
    def find(self, fid: str) -> Op:
        """The FileOffer with this id, or None."""

    def listing(self, room: str | None, peer: str | None) -> Op:
        """The offers of a room, or the private offers with nick key `peer` as one of their
        two parties (sender or recipient), oldest first."""

    def add(self, offer: FileOffer) -> Op:
        """Keep a new offer."""

    def save(self, offer: FileOffer) -> Op:
        """Keep an offer's change (its removal)."""

    def sent_since(self, owner: str, since: float) -> Op:
        """Bytes offered by `owner` at or after `since`."""

    def refs(self, sha256: str) -> Op:
        """How many offers that are not removed hold this content."""


class Blobs(Protocol):
    def begin(self, key: str, size: int, sha256: str) -> Op:
        """Start or resume upload `key`: its value is the bytes already stored."""

    def write(self, key: str, offset: int, data: bytes) -> Op:
        """Add a chunk at `offset` (the end of what is stored)."""

    def finish(self, key: str, sha256: str) -> Op:
        """Check the upload's digest (BAD_DIGEST and nothing kept if it differs) and keep
        its bytes as content `sha256`, readable by every broker once done."""

    def abandon(self, key: str) -> None:
        """Forget an upload and its bytes."""

    def read(self, sha256: str, offset: int, size: int) -> Op:
        """Bytes of a content (NO_SUCH_FILE if it is gone)."""

    def delete(self, sha256: str) -> Op:
        """Remove a content."""

    def free_bytes(self) -> int:
        """Free disk space where uploads are written."""

    def sweep(self, grace: float, live: set[str]) -> None:
        """Delete unfinished uploads older than `grace` seconds that are not in `live`."""
