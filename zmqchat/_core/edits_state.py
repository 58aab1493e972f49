"""What edits, removals, replies and search need of the shared state (issue 23).

A room log that holds edits and removals: `RoomLog.append` takes them as events like any
other (an `edit` or `delete` draft whose `extra` names the message changed, `ref`), and the
implementation makes each change the message it names in the same step:

    edit     the message's text becomes the edit's, marked `edited` (its time), wherever it
             is read from then on (history, the backlog on joining, search)
    delete   the message and every edit of it become `deleted` events (protocol.tombstone):
             their text is gone from the store and from search, not hidden

Both implementations (one broker: SQLite, _local/; a cluster: JetStream streams and each
broker's own index, _cluster/) give the same answers to the two reads below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from zmqchat._core.search import Query
from zmqchat._core.state import Op, RoomLog


@dataclass(slots=True)
class Stored:
    """A room event as it is stored now, and whether the owner asked about sent it."""

    event: dict[str, Any]
    mine: bool


@dataclass(slots=True)
class Found:
    """A search's answer: the newest matches (stored JSON texts, newest first) and how many
    match in all."""

    texts: list[str]
    total: int


class MessageLog(RoomLog, Protocol):
    def message(self, room: str, seq: int, owner: str) -> Op:
        """The room's event at `seq` as a `Stored` (`mine`: sent by identity `owner`, an
        Identity.owner), or None when there is none (or it was removed)."""

    def search(self, query: Query, rooms: list[str], me: str | None, limit: int) -> Op:
        """A `Found` of what matches `query` in `rooms` and, when `me` (an Identity.owner)
        is given, in the private messages `me` sent or was sent. It includes everything
        acknowledged before it was asked, and nothing removed."""
