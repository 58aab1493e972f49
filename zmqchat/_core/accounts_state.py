"""What brokers share about accounts (issue 21), behind one interface, and its records.

    AccountStore   the accounts (a registered nick and SCRAM's keys of its password), what
                   each keeps between its sessions (its rooms with how far it has read each,
                   how far it has read each private conversation, the room it was last in),
                   recent failed logins, and the private messages sent to an account

One broker keeps them in its SQLite database (zmqchat/_local/accounts.py), a cluster in
JetStream key-value buckets (zmqchat/_cluster/accounts.py). As for the registry (state.py),
reads answer from what the implementation holds; a change returns an Op done once stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from zmqchat._core.state import Op
from zmqchat._scram import Keys
from zmqchat.protocol import Code, ProtocolError

FAILURES_KEPT: Final = 60.0  # seconds a failed login is remembered (the core looks back 60)


@dataclass(frozen=True, slots=True)
class Account:
    """A registered nick: its name as registered, its nick key, its password's SCRAM keys."""

    name: str
    key: str  # protocol.nick_key(name)
    keys: Keys
    created: float  # when it was registered (UTC seconds): tells a re-registered name apart

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "created": self.created, **self.keys.to_wire()}

    @classmethod
    def from_json(cls, key: str, d: dict[str, Any]) -> Account:
        return cls(str(d["name"]), key, Keys.from_wire(d), float(d["created"]))


@dataclass(slots=True)
class Kept:
    """What an account keeps between its sessions."""

    rooms: dict[str, int] = field(default_factory=dict)  # room -> seq read up to (join order)
    privates: dict[str, float] = field(default_factory=dict)  # peer nick key -> read up to (ts)
    last_room: str = ""  # the room it last entered


class AccountStore(Protocol):
    def account(self, key: str) -> Account | None:
        """The account registered under a nick key, if any (as stored now: an account added
        or removed by the operator counts at once)."""

    def register(self, account: Account) -> Op:
        """Register a nick; fails with NICK_TAKEN if it was registered meanwhile."""

    def set_keys(self, account: Account) -> Op:
        """Keep an account's new password keys (a changed password)."""

    def kept(self, account: Account) -> Kept:
        """The account's rooms, marks and last room (nothing, for a new account)."""

    def join(self, account: Account, room: str, seq: int) -> Op:
        """The account is in `room` from now on, having read it up to `seq`."""

    def part(self, account: Account, room: str) -> Op:
        """The account left `room` (its mark there is forgotten)."""

    def mark(self, account: Account, room: str, seq: int) -> Op:
        """The account has read `room` up to `seq` (a mark never moves back)."""

    def mark_private(self, account: Account, peer_key: str, ts: float) -> Op:
        """The account has read its private messages from `peer_key` up to time `ts`."""

    def heard_mark(self, account: Account, room: str | None, peer_key: str, value: float) -> None:
        """A mark another broker stored (in `room`, or else of the conversation with
        `peer_key`), told by its push to one of our sessions, which can come before the
        news of it: counted from at once (forward only, in the account's rooms only)."""

    def enter(self, account: Account, room: str) -> Op:
        """The room the account is in now: where its next login starts."""

    def failures(self, key: str, address: str, since: float) -> list[float]:
        """When the failed logins to account `key` from `address` at or after `since`
        were (UTC seconds)."""

    def failed(self, key: str, address: str, at: float) -> Op:
        """Count a failed login (kept for a minute or so); done once every broker sees it."""

    def privates_to(self, owner: str, since: float, limit: int) -> Op:
        """The latest `limit` private messages stored for identity `owner` under any of its
        nicks at or after `since`, oldest first, as JSON texts."""


class NoAccounts:
    """No accounts at all (a core built without a store, in tests and benchmarks): every
    nick is a guest's, and registering is refused."""

    def account(self, key: str) -> Account | None:
        return None

    def register(self, account: Account) -> Op:
        return Op.failed(ProtocolError(Code.NOT_ALLOWED, "this broker keeps no accounts"))

    set_keys = register

    def kept(self, account: Account) -> Kept:
        return Kept()

    def join(self, account: Account, room: str, seq: int) -> Op:
        return Op.ready()

    def part(self, account: Account, room: str) -> Op:
        return Op.ready()

    def mark(self, account: Account, room: str, seq: int) -> Op:
        return Op.ready()

    def mark_private(self, account: Account, peer_key: str, ts: float) -> Op:
        return Op.ready()

    def heard_mark(self, account: Account, room: str | None, peer_key: str, value: float) -> None:
        pass

    def enter(self, account: Account, room: str) -> Op:
        return Op.ready()

    def failures(self, key: str, address: str, since: float) -> list[float]:
        return []

    def failed(self, key: str, address: str, at: float) -> Op:
        return Op.ready()

    def privates_to(self, owner: str, since: float, limit: int) -> Op:
        return Op.ready([])
