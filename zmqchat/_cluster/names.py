"""What the cluster's two sides say to each other, and the names of what lives in NATS.

The broker's side (state.py and the modules it holds) and the bridge (bridge.py, the NATS
connection) run on one event loop and hand each other lists of frames: a verb, then its
arguments. A verb is a member of `Verb` (broker -> bridge) or `News` (bridge -> broker), so
a handler table is keyed by it and a new kind of state (a bucket, a stream) adds a verb and
a handler, not a branch.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from enum import Enum, StrEnum
from typing import Any, Final


class Verb(bytes, Enum):
    """A command for the bridge. Those that expect an answer carry an id after the verb,
    answered by News.DONE or News.FAIL with the same id."""

    APPEND = b"APPEND"  # id room [msgid kind tail]...: append events; DONE [seq, ...]
    READ = b"READ"  # id room query: stored events; DONE list
    PRIV = b"PRIV"  # id subject-hashes msgid data: keep a private message
    PRIVREAD = b"PRIVREAD"  # id filter since limit: private messages; DONE list
    KV = b"KV"  # id bucket change key value revision: DONE revision
    SYNC = b"SYNC"  # id: the registry's latest revisions; DONE {bucket: revision}
    ROOM = b"ROOM"  # id room: make a room; DONE whether we made it
    FOLLOW = b"FOLLOW"  # id room: follow a room's stream; DONE once its window is handed over
    UNFOLLOW = b"UNFOLLOW"  # room: stop following it (no answer)
    ROUTE = b"ROUTE"  # broker data: a push for a session on that broker (no answer)
    MSGGET = b"MSGGET"  # id room seq: one event as stored; DONE [data, msg id] or [] (edits.py)
    ERASE = b"ERASE"  # room seq...: erase events from the stream (no answer; edits.py)
    STOP = b"STOP"  # let go of NATS (News.STOPPED once done)


class News(bytes, Enum):
    """What the bridge tells the broker's side."""

    READY = b"READY"  # replicas: connected, set up, following what there is
    FATAL = b"FATAL"  # reason: cannot start
    STOPPED = b"STOPPED"  # the connection is closed
    DONE = b"DONE"  # id Answer value...: a command's answer
    FAIL = b"FAIL"  # id Failure reason: a command that failed
    EVENTS = b"EVENTS"  # room first meta event...: a room's next events from its stream
    LAST = b"LAST"  # room seq: we follow the room from after seq on (its events come next)
    KEY = b"KEY"  # bucket key revision PUT|DEL value: a watched key changed
    ROUTED = b"ROUTED"  # data: a push for one of our sessions, from another broker
    PRIVS = b"PRIVS"  # seq subject data...: private messages, for the search index


class Answer(bytes, Enum):
    """How a DONE's value is written."""

    JSON = b"json"  # one frame of JSON
    LIST = b"list"  # one frame per item


class Failure(StrEnum):
    """Why a command failed, as the broker's side tells them apart."""

    UNAVAILABLE = "UNAVAILABLE"  # the cluster did not answer, or not in time: try again
    CONFLICT = "CONFLICT"  # a compare-and-set lost: someone changed the key first


class Change(bytes, Enum):
    """What a KV command does to its key."""

    CREATE = b"create"  # only if the key does not exist (or was deleted)
    UPDATE = b"update"  # only if the key is at the given revision
    PUT = b"put"  # whatever it holds
    DELETE = b"delete"  # if at the given revision (0: whatever it holds)


class Bucket(StrEnum):
    """The key-value buckets (each `NS-<name>` in NATS)."""

    SESSIONS = "sessions"  # nick key -> the session that holds it
    MEMBERS = "members"  # room.nick key -> member record
    ROOMS = "rooms"  # room (exists), room.topic, room.locked, room.op.key, room.ban.key
    NICKKEYS = "nickkeys"  # nick key -> the CURVE key that registered it
    BROKERS = "brokers"  # broker name -> its heartbeat
    ACCOUNTS = "accounts"  # account -> its name and SCRAM keys (accounts.py, issue 21)
    MARKS = "marks"  # what an account keeps: its rooms, read marks, last room
    LOGINS = "logins"  # recent failed logins of an account from an address


ACCOUNT_BUCKETS: Final = (Bucket.ACCOUNTS, Bucket.MARKS, Bucket.LOGINS)
REGISTRY: Final = (Bucket.SESSIONS, Bucket.MEMBERS, Bucket.ROOMS, Bucket.NICKKEYS)
# what a catch-up waits for (beats are not registry state), and a login's also the accounts':
# each bucket is a request to its stream's leader, and a catch-up waits for the slowest (in
# the cluster soak, every HELLO waiting for seven instead of four gave 100-180 leave notices
# in 3 minutes: resumes that took longer than a client waits, while a node was stopped; a
# guest's resume of the nick it holds waits for the four, a guest's new HELLO for all seven:
# the accounts say whether its nick is registered, sessions.py)


class Beat(StrEnum):
    """A broker's state as its heartbeat record says."""

    UP = "up"  # beating
    STOPPED = "stopped"  # stopped on purpose: its sessions are for the others to settle
    GONE = "gone"  # found dead by another broker, which settled its sessions


def room_stream(ns: str, room: str) -> str:
    """The stream of a room's events."""
    return f"{ns}-room-{room}"


def room_subject(ns: str, room: str) -> str:
    return f"{ns}.room.{room}"


def subject_hash(text: str) -> str:
    """A subject token for an identity or a nick key (those hold any character)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def msg_id(owner: str, cmid: str) -> str:
    """The dedup id of a client message: its sender's and its own, so that two clients who
    pick the same id do not collide, and a retry through any broker is recognised."""
    return hashlib.sha256(f"{owner}\x00{cmid}".encode()).hexdigest()[:32]


def hexkey(key: str) -> str:
    """A nick key as a bucket key (those allow only [-/_=.a-zA-Z0-9])."""
    return key.encode().hex()


def unhex(key: str) -> str:
    return bytes.fromhex(key).decode()


def json_answer(frames: list[bytes]) -> Any:
    """A DONE's value written as Answer.JSON."""
    if frames[0] != Answer.JSON:
        raise ValueError(f"expected a JSON answer, got {frames[0]!r}")
    return json.loads(frames[1])


def list_answer(frames: list[bytes]) -> list[str]:
    """A DONE's value written as Answer.LIST."""
    if frames[0] != Answer.LIST:
        raise ValueError(f"expected a list answer, got {frames[0]!r}")
    return [f.decode() for f in frames[1:]]


class SeenIds:
    """Message ids already stored, and where (room, seq; a private message's: "", 0):
    the last `size` of them, shared by the bridge (which de-duplicates when it publishes)
    and the broker's side (which answers a retry it recognises at once)."""

    def __init__(self, size: int = 200_000) -> None:
        self.size = size
        self.ids: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self.forgot: dict[str, int] = {}  # room -> the highest seq whose id was let go

    def add(self, msgid: str, room: str, seq: int) -> None:
        self.ids[msgid] = (room, seq)
        if len(self.ids) > self.size:
            _, (room, seq) = self.ids.popitem(last=False)
            if seq > self.forgot.get(room, 0):
                self.forgot[room] = seq

    def get(self, msgid: str) -> tuple[str, int] | None:
        return self.ids.get(msgid)


def why(exc: BaseException) -> str:
    """An exception of the cluster's as a log or error line says it (nats-py's timeouts are
    TimeoutErrors, whichever way they come)."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
