"""What belongs to one broker alone: its connections (`Session`, around the `Identity`
every broker knows), its view of each room (`Room`: who hears it here, under which topic)
and the order of each connection's requests (`Turn`)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from zmqchat._core.rules import Bucket
from zmqchat._core.state import Identity


class Stage(Enum):
    """A session's life on this broker."""

    LIVE = "live"  # connected here
    GONE = "gone"  # ended: quit, lost, replaced, expired


@dataclass(eq=False)
class Session:
    """One client connection on this broker, around the identity every broker knows."""

    rid: bytes
    ident: Identity
    bucket: Bucket
    last_seen: float
    replayable: bool = False  # proved enough (CURVE key or a long token) for private replay
    stage: Stage = Stage.LIVE
    rooms: set[str] = field(default_factory=set)
    topics: dict[str, bytes] = field(default_factory=dict)  # room -> topic approved on our pipe

    @property
    def nick(self) -> str:
        return self.ident.nick

    @property
    def sid(self) -> str:
        return self.ident.sid

    @property
    def key(self) -> str:
        return self.ident.key


@dataclass(eq=False)
class Room:
    """A room as this broker serves it: who hears it here, under which topic."""

    name: str
    epoch: str  # part of its topic: a new one shuts out who has left
    members: dict[str, Session] = field(default_factory=dict)  # sid -> local session
    published: int = 0  # the highest number published here
    rekey_after: int | None = None  # change the topic once this number is published

    @property
    def seq(self) -> int:
        """The room's latest event as this broker has published it."""
        return self.published


@dataclass(eq=False)
class Turn:
    """The requests of one connection that wait for the shared state, and those waiting
    behind them. A connection's requests are handled in the order they came: a JOIN that
    waits for the cluster holds up the SAY after it. SAYs may overlap one another (the room
    log keeps their order), and a PING never waits: a slow cluster must not look like a
    dead broker."""

    says: int = 0  # SAYs under way
    other: bool = False  # a request other than SAY under way
    queue: deque[tuple[list[bytes], str]] = field(default_factory=deque)

    def may_start(self, kind: bytes, queued: bool = False) -> bool:
        """Whether a request of this kind goes now (`queued`: it is the first in line)."""
        if kind == b"PING":
            return True
        if (self.queue and not queued) or self.other:
            return False
        return kind == b"SAY" or not self.says

    def started(self, say: bool) -> None:
        if say:
            self.says += 1
        else:
            self.other = True

    def finished(self, say: bool) -> None:
        if say:
            self.says -= 1
        else:
            self.other = False

    def idle(self) -> bool:
        return not (self.says or self.other or self.queue)
