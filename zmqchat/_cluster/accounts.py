"""Accounts in a cluster (issue 21): the AccountStore of accounts_state.py on JetStream
key-value buckets, so that every broker has the same accounts, rooms and marks (register
on b1, log in on b2).

    bucket N-accounts   account -> its name, SCRAM keys, when it was registered
    bucket N-marks      account.r.ROOM -> {seq} (the account is in ROOM, has read up to seq);
                        account.p.PEER -> {ts} (read private messages from PEER up to ts);
                        account.last -> {room} (the room it was in last)
    bucket N-logins     account.ADDRESS -> the times of recent failed logins from there

(account, PEER and ADDRESS as hex: bucket keys allow few characters.) Every broker watches
them (the bridge's buckets), so reads answer from memory; a change is made here at once and
stored through the bridge, and its Op is done when NATS has it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from zmqchat._cluster.names import Bucket, Change, Failure, hexkey, unhex
from zmqchat._core.accounts_state import FAILURES_KEPT, Account, Kept
from zmqchat._core.state import Op
from zmqchat.protocol import Code, ProtocolError

if TYPE_CHECKING:
    from zmqchat._cluster.calls import Calls


class ClusterAccounts:
    """AccountStore for a cluster: the buckets above as last heard, and changes to them."""

    def __init__(
        self,
        calls: Calls,
        privates_of: Callable[[str, float, int], Op],
    ) -> None:
        self.calls = calls  # commands to the bridge
        self.privates_of = privates_of  # the private messages kept for an identity
        self.all: dict[str, Account] = {}
        self.rooms: defaultdict[str, dict[str, int]] = defaultdict(dict)
        self.privates: defaultdict[str, dict[str, float]] = defaultdict(dict)
        self.last: dict[str, str] = {}
        self.logins: dict[tuple[str, str], list[float]] = {}
        # our own writes: a key's news is older than what we hold while one is in flight,
        # and when it carries a revision before the one our last write got
        self.writing: Counter[tuple[Bucket, str]] = Counter()
        self.written: dict[tuple[Bucket, str], int] = {}
        # the newest news of a key that came while our write to it was under way: applied
        # after it if it turns out newer (another broker wrote after us)
        self.held: dict[tuple[Bucket, str], tuple[Callable[..., None], tuple[Any, ...]]] = {}

    # ---------------------------------------------------------------- news
    def appliers(self) -> dict[Bucket, Callable[[str, int, bool, bytes], None]]:
        """What to do with a changed key of each of our buckets (the registry's watch)."""
        handlers = {
            Bucket.ACCOUNTS: self._account_news,
            Bucket.MARKS: self._mark_news,
            Bucket.LOGINS: self._login_news,
        }
        return {bucket: partial(self._news, bucket, handle) for bucket, handle in handlers.items()}

    def _news(
        self, bucket: Bucket, handle: Callable[[str, int, bool, bytes], None], *news: Any
    ) -> None:
        key, rev = news[0], news[1]
        where = (bucket, key)
        if rev <= self.written.get(where, 0):
            return  # what we hold is newer: our write came after it
        if self.writing[where]:  # under way: which is newer, we know when it is stored
            held = self.held.get(where)
            if held is None or held[1][1] < rev:
                self.held[where] = (handle, news)
            return
        handle(*news)

    def _account_news(self, key: str, rev: int, put: bool, value: bytes) -> None:
        name = unhex(key)
        if put and value:
            self.all[name] = Account.from_json(name, json.loads(value))
        else:
            self.all.pop(name, None)

    def _login_news(self, key: str, rev: int, put: bool, value: bytes) -> None:
        account, _, address = key.partition(".")
        if put and value:
            self.logins[(unhex(account), address)] = [float(t) for t in json.loads(value)]
        else:
            self.logins.pop((unhex(account), address), None)

    def _mark_news(self, key: str, rev: int, put: bool, value: bytes) -> None:
        d = json.loads(value) if put and value else None
        account, _, rest = key.partition(".")
        who = unhex(account)
        kind, _, what = rest.partition(".")
        if kind == "r":
            rooms = self.rooms[who]
            if d is None:
                rooms.pop(what, None)
            else:
                rooms[what] = max(int(d["seq"]), rooms.get(what, 0))
        elif kind == "p":
            privates = self.privates[who]
            if d is None:
                privates.pop(unhex(what), None)
            else:
                privates[unhex(what)] = max(float(d["ts"]), privates.get(unhex(what), 0.0))
        elif kind == "last":
            self.last[who] = d["room"] if d is not None else ""

    def _kv(self, change: Change, bucket: Bucket, key: str, value: Any = None) -> Op:
        data = json.dumps(value).encode() if value is not None else b""
        where = (bucket, key)
        self.writing[where] += 1

        def done(op: Op) -> None:
            self.writing[where] -= 1
            if op.error is None and isinstance(op.value, int):
                self.written[where] = max(op.value, self.written.get(where, 0))
            if self.writing[where]:
                return
            del self.writing[where]
            held = self.held.pop(where, None)
            # a delete answers no revision (0): what came meanwhile is not known to be newer
            if held is not None and self.written.get(where, 0) and held[1][1] > self.written[where]:
                held[0](*held[1])

        op = self.calls.kv(change, bucket, key, data)
        op.then(done)
        return op

    # ---------------------------------------------------------------- accounts
    def account(self, key: str) -> Account | None:
        return self.all.get(key)

    def register(self, account: Account) -> Op:
        outer = Op()

        def created(op: Op) -> None:
            if (
                isinstance(op.error, ProtocolError)
                and op.error.extra.get("cluster") == Failure.CONFLICT
            ):
                outer.fail(ProtocolError(Code.NICK_TAKEN, f"{account.name} is registered already"))
            elif op.error is not None:
                outer.fail(op.error)
            else:
                self._forget(account.key)  # what a removed account of that name kept
                self.all[account.key] = account
                outer.resolve()

        self._kv(Change.CREATE, Bucket.ACCOUNTS, hexkey(account.key), account.to_json()).then(
            created
        )
        return outer

    def set_keys(self, account: Account) -> Op:
        """The new password's record, here at once (the session that changed it is checked
        against it); back to the old one if the cluster did not take it."""
        before, outer = self.all.get(account.key), Op()
        self.all[account.key] = account

        def stored(op: Op) -> None:
            if op.error is None:
                outer.resolve()
                return
            if before is not None and self.all.get(account.key) is account:
                self.all[account.key] = before  # (a watched change since stays)
            outer.fail(op.error)

        self._kv(Change.PUT, Bucket.ACCOUNTS, hexkey(account.key), account.to_json()).then(stored)
        return outer

    def _forget(self, key: str) -> None:
        self.rooms.pop(key, None)
        self.privates.pop(key, None)
        self.last.pop(key, None)

    # ---------------------------------------------------------------- what an account keeps
    def kept(self, account: Account) -> Kept:
        key = account.key
        return Kept(self.rooms[key], self.privates[key], self.last.get(key, ""))

    def join(self, account: Account, room: str, seq: int) -> Op:
        self.rooms[account.key][room] = seq
        return self._kv(Change.PUT, Bucket.MARKS, f"{hexkey(account.key)}.r.{room}", {"seq": seq})

    def part(self, account: Account, room: str) -> Op:
        self.rooms[account.key].pop(room, None)
        return self._kv(Change.DELETE, Bucket.MARKS, f"{hexkey(account.key)}.r.{room}")

    def mark(self, account: Account, room: str, seq: int) -> Op:
        rooms = self.rooms[account.key]
        if room not in rooms or seq <= rooms[room]:
            return Op.ready()
        rooms[room] = seq
        return self._kv(Change.PUT, Bucket.MARKS, f"{hexkey(account.key)}.r.{room}", {"seq": seq})

    def mark_private(self, account: Account, peer_key: str, ts: float) -> Op:
        privates = self.privates[account.key]
        if ts <= privates.get(peer_key, 0.0):
            return Op.ready()
        privates[peer_key] = ts
        key = f"{hexkey(account.key)}.p.{hexkey(peer_key)}"
        return self._kv(Change.PUT, Bucket.MARKS, key, {"ts": ts})

    def heard_mark(self, account: Account, room: str | None, peer_key: str, value: float) -> None:
        # as the marks bucket's news will say (_mark_news): forward only
        rooms, privates = self.rooms[account.key], self.privates[account.key]
        if room is None:
            privates[peer_key] = max(value, privates.get(peer_key, 0.0))
        elif room in rooms:
            rooms[room] = max(int(value), rooms[room])

    def enter(self, account: Account, room: str) -> Op:
        if self.last.get(account.key) == room:
            return Op.ready()
        self.last[account.key] = room
        return self._kv(Change.PUT, Bucket.MARKS, f"{hexkey(account.key)}.last", {"room": room})

    # ---------------------------------------------------------------- failed logins
    def failures(self, key: str, address: str, since: float) -> list[float]:
        return [at for at in self.logins.get((key, hexkey(address) or "-"), ()) if at >= since]

    def failed(self, key: str, address: str, at: float) -> Op:
        stale = at - FAILURES_KEPT
        for old in [w for w, times in self.logins.items() if not times or times[-1] < stale]:
            del self.logins[old]  # forgotten as new ones come (the bucket's: bridge.BUCKET_TTL)
        where = (key, hexkey(address) or "-")
        recent = [t for t in self.logins.get(where, ()) if t >= stale] + [at]
        self.logins[where] = recent
        return self._kv(Change.PUT, Bucket.LOGINS, f"{hexkey(key)}.{where[1]}", recent)

    # ---------------------------------------------------------------- private messages
    def privates_to(self, owner: str, since: float, limit: int) -> Op:
        return self.privates_of(owner, since, limit)
