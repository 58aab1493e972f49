"""Accounts on one broker (issue 21): in its SQLite database, beside the history.

The accounts themselves are read from SQLite at each use, so that the operator's
`zmqchat-broker accounts add|passwd|del` (which writes the database directly, the broker
running or not) counts at once. What an account keeps between sessions (its rooms, marks,
last room) only this broker changes: it is read from SQLite once per account and kept in
memory, and every change goes to the store's log like the history does (it survives a
kill -9 the same way). Failed logins are counted in memory: a restart forgets them.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

from zmqchat._core.accounts_state import FAILURES_KEPT, Account, Kept
from zmqchat._core.state import Op
from zmqchat._local.store import Store
from zmqchat.protocol import Code, ProtocolError


class LocalAccounts:
    """AccountStore for one broker."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._kept: dict[str, tuple[float, Kept]] = {}  # key -> (its account's created, kept)
        self._failures: defaultdict[tuple[str, str], list[float]] = defaultdict(list)

    def account(self, key: str) -> Account | None:
        data = self.store.account(key)
        return Account.from_json(key, json.loads(data)) if data is not None else None

    def register(self, account: Account) -> Op:
        if self.account(account.key) is not None:
            return Op.failed(ProtocolError(Code.NICK_TAKEN, f"{account.name} is registered"))
        return self.set_keys(account)

    def set_keys(self, account: Account) -> Op:
        self.store.save_account(account.key, json.dumps(account.to_json()))
        return Op.ready()

    def kept(self, account: Account) -> Kept:
        cached = self._kept.get(account.key)
        if cached is not None and cached[0] == account.created:
            return cached[1]
        rooms, peers, last = self.store.account_kept(account.key)
        if cached is not None:  # the name was registered again (by the operator): a new start
            for room, _ in rooms:
                self.store.account_change("acct_part", account.key, room)
            rooms, peers, last = [], [], ""
        kept = Kept(dict(rooms), dict(peers), last)
        self._kept[account.key] = (account.created, kept)
        return kept

    def join(self, account: Account, room: str, seq: int) -> Op:
        self.kept(account).rooms[room] = seq
        self.store.account_change("acct_room", account.key, room, seq, time.time())
        return Op.ready()

    def part(self, account: Account, room: str) -> Op:
        self.kept(account).rooms.pop(room, None)
        self.store.account_change("acct_part", account.key, room)
        return Op.ready()

    def mark(self, account: Account, room: str, seq: int) -> Op:
        rooms = self.kept(account).rooms
        if room in rooms and seq > rooms[room]:
            rooms[room] = seq
            self.store.account_change("acct_room", account.key, room, seq, time.time())
        return Op.ready()

    def mark_private(self, account: Account, peer_key: str, ts: float) -> Op:
        privates = self.kept(account).privates
        if ts > privates.get(peer_key, 0.0):
            privates[peer_key] = ts
            self.store.account_change("acct_private", account.key, peer_key, ts)
        return Op.ready()

    def heard_mark(self, account: Account, room: str | None, peer_key: str, value: float) -> None:
        pass  # one broker, one database: a stored mark is seen at once

    def enter(self, account: Account, room: str) -> Op:
        kept = self.kept(account)
        if kept.last_room != room:
            kept.last_room = room
            self.store.account_change("acct_last", account.key, room)
        return Op.ready()

    def failures(self, key: str, address: str, since: float) -> list[float]:
        return [at for at in self._failures.get((key, address), ()) if at >= since]

    def failed(self, key: str, address: str, at: float) -> Op:
        for k in [k for k, times in self._failures.items() if times[-1] < at - FAILURES_KEPT]:
            del self._failures[k]  # forget the old ones as new ones come: memory stays bounded
        self._failures[(key, address)].append(at)
        return Op.ready()

    def privates_to(self, owner: str, since: float, limit: int) -> Op:
        return Op.ready(self.store.privates_of(owner, since, limit))
