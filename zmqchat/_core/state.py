"""What brokers share, behind three small interfaces, and the records that cross them.

The broker's core (core.py) keeps only what belongs to one broker: its connections, their
rooms, grants and epochs. Everything every broker must agree on goes through:

    RoomLog   each room's events: append (it assigns the numbers), read a range, and the
              events to publish, in order, as they become durable (follow)
    Registry  nicks and sessions with their resume tokens, room membership, room settings
              (topic, lock, operators, bans), which CURVE key owns a nick
    Presence  which broker holds a session, and a push delivered to it there

The single broker implements them with memory and its SQLite store (local.py); cluster mode
with NATS JetStream streams and key-value buckets (cluster.py). Reads are answered from what
the implementation holds in memory; a change that must be agreed on (an append, a nick
claim) returns an `Op` that completes now (locally) or when the cluster has answered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from zmqchat.protocol import EventKind, Reply


class Op:
    """The result of a change to shared state: done at once, or later. A handler yields it
    and resumes with its value (or its ProtocolError) when it is done."""

    __slots__ = ("done", "value", "error", "_then")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self._then: list[Callable[[Op], None]] = []

    @classmethod
    def ready(cls, value: Any = None) -> Op:
        op = cls()
        op.done, op.value = True, value
        return op

    @classmethod
    def failed(cls, error: BaseException) -> Op:
        op = cls()
        op.done, op.error = True, error
        return op

    def resolve(self, value: Any = None) -> None:
        if not self.done:
            self.done, self.value = True, value
            self._fire()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done, self.error = True, error
            self._fire()

    def then(self, fn: Callable[[Op], None]) -> None:
        """Call fn(self) once done (at once if it is)."""
        if self.done:
            fn(self)
        else:
            self._then.append(fn)

    def _fire(self) -> None:
        then, self._then = self._then, []
        for fn in then:
            fn(self)


def gather(ops: Iterable[Op]) -> Op:
    """One Op for several: done when all are, with their values in order; fails with the
    first error (after all are done, so nothing is left running behind the caller)."""
    pending = list(ops)
    if all(op.done for op in pending):
        error = next((op.error for op in pending if op.error is not None), None)
        return Op.failed(error) if error else Op.ready([op.value for op in pending])
    total = Op()
    left = [len(pending)]

    def one_done(_: Op) -> None:
        left[0] -= 1
        if left[0] == 0:
            error = next((op.error for op in pending if op.error is not None), None)
            if error is not None:
                total.fail(error)
            else:
                total.resolve([op.value for op in pending])

    for op in pending:
        op.then(one_done)
    return total


# ---------------------------------------------------------------------------- records


def token_hash(token: str) -> str:
    """What is kept of a resume token: enough to check one, nothing to present."""
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


@dataclass(slots=True)
class Identity:
    """A session as every broker knows it: who holds a nick, where, proven how."""

    sid: str  # the session's id, new at every HELLO
    nick: str
    key: str  # messages.nick_key(nick): the form nicks are compared in
    token_hash: str  # token_hash() of the client's resume secret ("" without one)
    pubkey: str  # the CURVE key it authenticated with ("" without CURVE)
    bot: bool
    broker: str  # the name of the broker that holds its connection
    rev: int = 0  # the registry's revision of this record (a cluster's compare-and-set)
    account: str = ""  # the account it logged in to (its nick key), "" for a guest

    @property
    def principal(self) -> str:
        """Whom operator rights and bans name: the account, whatever its nick now; a
        guest's nick otherwise."""
        return self.account or self.key

    @property
    def owner(self) -> str:
        """Who sent a message, stable across nick changes and reconnects: the account,
        else the CURVE key, else a hash of the client's resume secret, else the nick."""
        if self.account:
            return "acct:" + self.account
        if self.pubkey:
            return "key:" + self.pubkey
        if self.token_hash:
            return "tok:" + self.token_hash[:24]
        return "nick:" + self.key

    @property
    def recipient(self) -> str:
        """Whom a private message to this session is stored for: its identity and its nick
        (a space is in neither), so only this client, under this nick, is sent it again."""
        return f"{self.owner} {self.key}"


@dataclass(slots=True)
class Member:
    """A nick in a room, and the session that put it there."""

    nick: str
    key: str
    sid: str
    broker: str


@dataclass(slots=True)
class RoomSettings:
    """A room's settings, the same on every broker and kept across restarts."""

    name: str
    topic: str = ""
    locked: bool = False  # only operators set the topic
    operators: set[str] = field(default_factory=set)  # nick keys
    bans: set[str] = field(default_factory=set)  # nick keys
    created: bool = False  # made by /join, not by --rooms

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "topic": self.topic,
            "locked": self.locked,
            "ops": sorted(self.operators),
            "bans": sorted(self.bans),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RoomSettings:
        return cls(
            str(d["name"]),
            str(d.get("topic", "")),
            d.get("locked") is True,
            set(d.get("ops", ())),
            set(d.get("bans", ())),
            d.get("created") is True,
        )


@dataclass(slots=True)
class Draft:
    """An event to append: the log gives it its number and time."""

    kind: EventKind
    nick: str
    text: str
    owner: str  # who sent it (Identity.owner), or the nick key
    cmid: str | None = None
    extra: dict[str, Any] | None = None


DEPARTURES = frozenset({EventKind.LEAVE, EventKind.KICK, EventKind.BAN})


@dataclass(slots=True)
class Delivery:
    """Events of one room to publish, numbered first, first + 1, ... as the log has them;
    `departures` are the numbers of the leave, kick and ban events among them."""

    room: str
    first: int
    events: list[bytes]
    departures: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------- interfaces


class RoomLog(Protocol):
    def last(self, room: str) -> int:
        """The highest number of the room's events that this broker has published (or
        will, before any reply now being made goes out)."""

    def append(self, room: str, drafts: list[Draft], heard: int | None = None) -> Op:
        """Store events at the end of the room; the Op's value is their numbers. The core
        leaves out the drafts whose ids `known_ids` finds; a cluster may still meet one
        stored through another broker meanwhile, and gives it its stored number. `heard`:
        the drafts' ids were first sent when the room was at that number, so none of them
        is stored at or before it (a cluster's broker looks back to there for them)."""

    def known_ids(self, owner: str, cmids: list[str]) -> dict[str, tuple[str, str, int] | None]:
        """(sender, room, number) of each of `owner`'s client message ids already stored,
        else None. Ids are per sender: another sender's message with the same id is not
        found (a room's number is 0 for a private message)."""

    def read(
        self, room: str, *, after: int | None, before: int | None, since: float | None, limit: int
    ) -> Op:
        """Stored events as JSON texts, oldest first: the first `limit` after `after`, or
        the last `limit` before `before` (or the end), at or after `since`."""

    def append_private(
        self, ts: float, sender: str, recipient: str, cmid: str, data: bytes, from_key: str
    ) -> Op:
        """Keep a private message: for replay to its recipient after a reconnect, and for
        the private history of its two parties. `sender` is the sender's identity
        (Identity.owner), `recipient` the recipient's (Identity.recipient), `from_key` the
        sender's nick key."""

    def private_kept(self, sender: str, recipient: str, cmid: str, since: float) -> Op:
        """Whether a private message with this id from `sender` to `recipient` (identities)
        is kept (at or after `since`), which `known_ids` did not know: for a client's
        retry. One broker's `known_ids` knows every one (False); a cluster's broker knows
        those it stored or saw, and the stream recognises the rest only within its
        duplicate window, so it reads the latest ones between the two back (True if
        found)."""

    def conversation(self, me: str, peer_key: str, since: float | None, limit: int) -> Op:
        """The latest `limit` private messages between identity `me` and nick key
        `peer_key`, both ways, oldest first, as JSON texts."""

    def privates_to(self, recipient: str, since: float, limit: int) -> Op:
        """The latest `limit` private messages kept for recipient at or after since, oldest
        first, as JSON texts."""

    def follow(self) -> list[Delivery]:
        """The events that became durable since the last call, to publish: of every room
        on one broker; in a cluster, of the rooms that have members on this broker."""


class Registry(Protocol):
    """Reads answer from what this broker holds; `catch_up()` first makes that hold
    everything stored before it was called (a cluster's other brokers included). Every
    change returns an Op done once it is stored, so a reply sent after it is true."""

    def catch_up(self, accounts: bool = False) -> Op:
        """Also the accounts' state (accounts, their marks, failed logins) if `accounts`:
        what a login reads, and what asks whether a nick is an account (a guest's HELLO
        or NICK, a private message to a nick nobody holds); the rest of the registry is
        what every other command reads."""

    def holder(self, key: str) -> Identity | None:
        """The session that holds a nick (by nick key), wherever it is."""

    def identities(self) -> Iterable[Identity]: ...

    def claim(self, ident: Identity, replacing: Identity | None) -> Op:
        """Take a nick for a session (from `replacing`, its own earlier session, if given).
        Fails with NICK_TAKEN when someone else has it by then."""

    def rename(self, ident: Identity, new_nick: str, new_key: str) -> Op:
        """Move a session to another nick (and its memberships with it)."""

    def release(self, ident: Identity) -> Op:
        """Free the nick, if this session still holds it: the Op's value says whether it
        did (False: the nick had moved on, to its client's new session say)."""

    def keeps_lost(self) -> bool:
        """Whether a session of ours that went silent keeps its nick and memberships for a
        grace period, for its client to resume it on another broker (a cluster: it is
        settled, as lost, only if none does), rather than ending now (one broker)."""

    # An account's further sessions (devices): an account logged in on several devices at
    # once holds its nick with one session (`holder`); its others are its companions, under
    # the same nick, wherever they are.
    def companions(self, account: str) -> list[Identity]:
        """The account's sessions besides the one holding its nick."""

    def companion(self, sid: str) -> Identity | None:
        """A companion session by its id."""

    def attach(self, ident: Identity) -> Op:
        """Add a companion session of `ident.account` (its nick's holder is of the account)."""

    def detach(self, ident: Identity) -> Op:
        """Remove a companion session: the Op's value says whether it was one."""

    def members(self, room: str) -> dict[str, Member]:
        """The room's members by nick key (a session that is resuming elsewhere included)."""

    def add_member(self, room: str, member: Member) -> Op: ...

    def remove_member(self, room: str, key: str, sid: str | None = None) -> Op:
        """Take a nick out of a room (only if `sid` still holds it there, when given)."""

    def room_names(self) -> list[str]: ...

    def settings(self, room: str) -> RoomSettings | None: ...

    def create_room(self, settings: RoomSettings) -> Op:
        """Make a room; the Op's value is False when it existed already."""

    def save(self, settings: RoomSettings) -> Op:
        """Keep a room's changed settings."""

    def nick_owner(self, key: str) -> str | None:
        """The CURVE key that first registered a nick."""

    def bind_nick(self, key: str, pubkey: str) -> Op:
        """Register a nick to a CURVE key, if no key has it; NICK_TAKEN if another has."""


class Listener(Protocol):
    """What the shared state tells the core (in a cluster, news from the other brokers):
    the core implements it, and a state implementation knows nothing more of the core."""

    def identity_changed(self, key: str, ident: Identity | None) -> None:
        """A nick moved to another session (resumed elsewhere) or was freed."""

    def room_added(self, name: str) -> None:
        """A room was made (by /join on another broker)."""

    def routed(self, sid: str, kind: Reply, body: dict[str, Any]) -> None:
        """A push for one of this broker's sessions, sent by another broker."""

    def reap(self, ident: Identity) -> Op:
        """A session of a dead broker that did not resume: announce it as lost, once."""

    def local_sids(self) -> Collection[str]:
        """The ids of the sessions connected to this broker."""

    def silent_for(self, sid: str) -> float | None:
        """Seconds since one of this broker's sessions was last heard (None: not ours)."""


class Presence(Protocol):
    def send(self, broker: str, sid: str, kind: Reply, body: dict[str, Any]) -> None:
        """Deliver a push to a session held by another broker."""

    def silent(self, broker: str, sid: str) -> Op:
        """Seconds since a session held by another broker was last heard, as that broker
        says (the Op's value; None if it does not know it, or does not answer in time)."""
