"""Accounts (issue 21): a registered nick belongs to whoever knows its password.

AUTH and HELLO's `proof` log in with SCRAM-SHA-256 (zmqchat/_scram.py); REGISTER makes the
session's nick an account; PASSWORD changes its password. A logged-in session's identity
names its account (`Identity.account`): bans and operator rights follow the account whatever
its nick (`Identity.principal`), private messages are kept for the account, and a new login
while an earlier session is on is one more session of the account (devices.py).
An account stays in its rooms when its session ends, without leave notices, and comes back
to them without join notices: it leaves a room by LEAVE, or by being kicked or banned. What
an account has read, and what is unread, is catchup.py.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Final

from zmqchat import protocol as m
from zmqchat._core.accounts_state import Account, AccountStore, NoAccounts
from zmqchat._core.base import Handler, Opener
from zmqchat._core.moderation import Moderation
from zmqchat._core.rooms import Rooms
from zmqchat._core.session import Room, Session
from zmqchat._core.sessions import Sessions
from zmqchat._core.state import Identity, Member, Op, gather
from zmqchat._ops.logs import event as log_event
from zmqchat._scram import Keys, ScramError, Verifier
from zmqchat.protocol import Code, Kind, ProtocolError, Reply, Why

log = logging.getLogger("zmqchat.broker")

FAILURES: Final = 5  # failed logins to one account from one address...
FAILURE_WINDOW: Final = 60.0  # ...within this many seconds make the next ones wait
AUTH_TTL: Final = 30.0  # seconds from AUTH to the HELLO (or PASSWORD) that completes it
MAX_AUTHS: Final = 10_000  # logins under way at once: memory stays bounded
RECHECK: Final = 2.0  # seconds between looks at the logged-in accounts' records


@dataclass(eq=False)
class Pending:
    """A login under way on one connection: AUTH was answered, the proof is to come."""

    verifier: Verifier
    account: Account
    address: str
    expires: float  # monotonic


class Accounts(Sessions, Rooms, Moderation):
    """Logging in, registering, passwords; an account's sessions, rooms and standing."""

    def __init__(self, *args: Any, accounts: AccountStore | None = None, **kwargs: Any) -> None:
        self.accounts: AccountStore = accounts if accounts is not None else NoAccounts()
        self.auths: dict[bytes, Pending] = {}
        self.logged_in: dict[str, Account] = {}  # session id -> its account
        self.proved: dict[bytes, tuple[Account, float]] = {}  # a login's record, until HELLO
        self.changing: dict[str, int] = {}  # account key -> its /password changes under way
        self.recheck_at = 0.0
        super().__init__(*args, **kwargs)

    def handler_table(self) -> dict[Kind, Handler]:
        return {
            **super().handler_table(),
            Kind.REGISTER: self._on_register,
            Kind.PASSWORD: self._on_password,
        }

    def opener_table(self) -> dict[Kind, Opener]:
        return {**super().opener_table(), Kind.AUTH: self._on_auth}

    # ------------------------------------------------------------------ logging in
    def _on_auth(
        self, rid: bytes, session: Session | None, req: m.Request, pubkey: str
    ) -> Generator[Op, Any, dict[str, Any]]:
        address = self.peer(rid)  # the failed-login limit is per account and address
        name = req.body["account"]
        key = m.nick_key(name)
        if session is not None and session.ident.account != key:
            raise ProtocolError(Code.NOT_ALLOWED, "in a session, AUTH is for your own account")
        yield self.registry.catch_up(accounts=True)  # registered on another broker just now
        account = self.accounts.account(key)
        if account is None:
            raise ProtocolError(Code.NO_ACCOUNT, f"{name} is not a registered account")
        self._check_failures(account, address)
        if len(self.auths) >= MAX_AUTHS and rid not in self.auths:
            raise ProtocolError(
                Code.RATE_LIMITED, "too many logins under way: retry soon", retry_after=1.0
            )
        verifier = Verifier(account.name, account.keys, self.tokens(18))
        try:
            answer = verifier.start(req.body["first"])
        except ScramError as exc:
            raise ProtocolError(Code.BAD_REQUEST, f"not a SCRAM first message: {exc}") from None
        self.auths[rid] = Pending(verifier, account, address, self.clock.monotonic() + AUTH_TTL)
        return {"account": account.name, "next": answer}

    def _check_failures(self, account: Account, address: str) -> None:
        now = self.clock.time()
        recent = sorted(self.accounts.failures(account.key, address, now - FAILURE_WINDOW))
        if len(recent) >= FAILURES:
            wait = max(recent[len(recent) - FAILURES] + FAILURE_WINDOW - now, 0.1)
            raise ProtocolError(
                Code.RATE_LIMITED,
                f"{len(recent)} failed logins to {account.name} from your address in the "
                f"last minute: retry in {wait:.0f} s",
                retry_after=round(wait, 3),
            )

    def _verify(self, rid: bytes, proof: str) -> Generator[Op, Any, tuple[Account, str]]:
        """The login under way on this connection, completed by the client's proof: its
        account and the broker's final SCRAM message; AUTH_FAILED if wrong, once the failure
        is counted where every broker sees it (the client's next try may go to another)."""
        pending = self.auths.pop(rid, None)
        if pending is None or pending.expires < self.clock.monotonic():
            raise ProtocolError(
                Code.AUTH_FAILED, "no login under way on this connection: send AUTH first"
            )
        account = pending.account
        self._check_failures(account, pending.address)
        try:
            final = pending.verifier.finish(proof)
        except ScramError:  # a wrong password (or a garbled proof)
            pass
        else:
            now = self.accounts.account(account.key)
            if now is None:  # removed since its AUTH
                raise ProtocolError(Code.NO_ACCOUNT, f"{account.name} is not a registered account")
            if not _same(now, account):  # its password changed since
                raise ProtocolError(
                    Code.AUTH_FAILED,
                    f"the password for {account.name} changed meanwhile: log in again",
                )
            return account, final
        log_event(log, "login-failed", account=account.name, address=pending.address)
        try:
            yield self.accounts.failed(account.key, pending.address, self.clock.time())
        except ProtocolError:  # not stored (a cluster out of reach): counted here only
            pass
        raise ProtocolError(Code.AUTH_FAILED, f"wrong password for {account.name}")

    def _login(
        self, rid: bytes, nick: str, key: str, body: dict[str, Any]
    ) -> Generator[Op, Any, tuple[str, Any]]:
        welcome: dict[str, Any] = {"scram_iterations": self.rules.scram_iterations}
        if body["proof"] is None:
            if self.accounts.account(key) is not None:
                raise ProtocolError(
                    Code.AUTH_REQUIRED, f"{nick} is a registered account: log in with its password"
                )
            if self.rules.registered_only:
                raise ProtocolError(
                    Code.ACCOUNTS_ONLY,
                    "this broker admits registered accounts only: ask its operator for one",
                )
            return "", welcome
        account, final = yield from self._verify(rid, body["proof"])
        if key != account.key and self.accounts.account(key) is not None:
            raise ProtocolError(Code.NICK_TAKEN, f"the nickname {nick} is another account")
        self.proved[rid] = (account, self.clock.monotonic() + AUTH_TTL)
        return account.key, {**welcome, "account": account.name, "verify": final}

    def _logged_in(self, s: Session) -> dict[str, Any]:
        """A logged-in session (the account's others, if any, go on: devices.py); the
        welcome says which rooms the account is in and which it was in last. The session
        is held to the record its password was proved against: a change since, and the
        next recheck ends it."""
        proved, _ = self.proved.pop(s.rid, (None, 0.0))
        if not s.ident.account:
            return {}
        account = proved if proved is not None else self.accounts.account(s.ident.account)
        if account is None or account.key != s.ident.account:
            return {}
        self.logged_in[s.sid] = account
        kept = self.accounts.kept(account)
        joined = [room for room in kept.rooms if room in self.rooms]
        log_event(log, "login", account=account.name, nick=s.nick, sid=s.sid)
        last = kept.last_room if kept.last_room in joined else ""
        return {"joined": joined, "last_room": last}

    # ------------------------------------------------------------------ registering
    def _on_register(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        if s.ident.account:
            raise ProtocolError(Code.NOT_ALLOWED, f"you are logged in as {s.nick}'s account")
        keys = self._keys(req.body)
        yield self.registry.catch_up(accounts=True)
        if self.accounts.account(s.key) is not None:
            raise ProtocolError(Code.NICK_TAKEN, f"{s.nick} is registered already")
        account = Account(s.nick, s.key, keys, self.clock.time())
        yield self.accounts.register(account)
        ident = dataclasses.replace(s.ident, account=account.key)
        yield self.registry.claim(ident, s.ident)
        s.ident, s.replayable = ident, True
        self.logged_in[s.sid] = account
        rooms = sorted(s.rooms)
        ops = [self.accounts.join(account, room, self.room_log.last(room)) for room in rooms]
        if len(rooms) == 1:  # the room it is in is where its next login starts
            ops.append(self.accounts.enter(account, rooms[0]))
        yield gather(ops)
        log_event(log, "registered", account=account.name, sid=s.sid)
        return {"account": account.name, "joined": rooms}

    def _keys(self, body: dict[str, Any]) -> Keys:
        if body["iterations"] < self.rules.scram_iterations:
            raise ProtocolError(
                Code.BAD_REQUEST,
                f"a password's keys need {self.rules.scram_iterations} iterations or more here",
                iterations=self.rules.scram_iterations,
            )
        return Keys(body["salt"], body["stored_key"], body["server_key"], body["iterations"])

    def _on_password(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        account = self.logged_in.get(s.sid)
        if account is None:
            raise ProtocolError(Code.NOT_ALLOWED, "you are not logged in to an account")
        keys = self._keys(req.body)
        proved, _ = yield from self._verify(s.rid, req.body["proof"])  # the old one, again
        if proved.key != account.key:
            raise ProtocolError(Code.AUTH_FAILED, "that login was for another account")
        changed = dataclasses.replace(account, keys=keys)
        key = account.key  # a recheck waits until the change is stored (or is not)
        self.changing[key] = self.changing.get(key, 0) + 1
        try:
            yield self.accounts.set_keys(changed)
        finally:
            self.changing[key] -= 1
            if not self.changing[key]:
                del self.changing[key]
        if s.sid in self.logged_in:  # (unless the session ended meanwhile)
            self.logged_in[s.sid] = changed
        log_event(log, "password-changed", account=account.name, sid=s.sid)
        return {"account": account.name}

    # ------------------------------------------------------------------ an account's rooms
    def _returning(self, s: Session, room: str) -> bool:
        account = self.logged_in.get(s.sid)
        return account is not None and room in self.accounts.kept(account).rooms

    def _account_recipient(self, nick: str) -> Identity | None:
        """A private message to an account: to its session under whatever nick it has now,
        else kept for it (it is counted unread at its next login)."""
        account = self.accounts.account(m.nick_key(nick))
        if account is None:
            return None
        return self._account_holder(account.key) or Identity(
            "", account.name, account.key, "", "", False, "", account=account.key
        )

    def _account_holder(self, account: str) -> Identity | None:
        for ident in self.registry.identities():
            if ident.account == account:
                return ident
        return None

    def _may_take(self, s: Session, nick: str, key: str) -> None:
        owner = self.accounts.account(key)
        if owner is not None and owner.key != s.ident.account:
            raise ProtocolError(Code.NICK_TAKEN, f"{nick} is a registered account")

    def _on_join(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        """JOIN, and for an account: the room is its own from now on (where it stands in it,
        `mark`, comes with the reply when it was in the room before), and the room it is in
        now, unless this is a rejoin after a reconnect (`resume`)."""
        reply: dict[str, Any] = yield from super()._on_join(s, req)
        account = self.logged_in.get(s.sid)
        if account is None:
            return reply
        room = reply["room"]
        if req.body["follow"]:  # devices.py: only while the account is in it
            yield from self._still_followed(s, room)
        mark = self.accounts.kept(account).rooms.get(room)
        joined = self.room_log.last(room)  # its own join notice is not news to it
        ops = [] if mark is not None else [self.accounts.join(account, room, joined)]
        if not req.body["resume"] and not req.body["follow"]:
            ops.append(self.accounts.enter(account, room))
        yield gather(ops)
        return reply if mark is None else {**reply, "mark": mark}

    def _still_followed(self, s: Session, room: str) -> Generator[Op, Any, None]:
        """A JOIN after JOINED (devices.py): the account may have left the room on another
        broker meanwhile. Once we have heard all that was stored before now (its LEAVE's
        record, if the LEFT push came before this session was in the room), or the LEFT
        took this session out, it is refused and this session's join undone."""
        yield self.registry.catch_up(accounts=True)
        account = self.logged_in.get(s.sid)
        if account is not None and room in self.accounts.kept(account).rooms:
            if s.sid in self.rooms[room].members:
                return
        self._remove(s, self.rooms[room])
        yield self.registry.remove_member(room, s.key, s.sid)
        raise ProtocolError(Code.NOT_MEMBER, f"your account is not in {room} any more")

    def _on_leave(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        reply: dict[str, Any] = yield from super()._on_leave(s, req)
        account = self.logged_in.get(s.sid)
        if account is not None:
            yield self.accounts.part(account, reply["room"])
        return reply

    def _kick(self, s: Session, room: Room, target: Member, reason: str, kind: m.EventKind) -> Op:
        """A kick or ban takes an account out of the room for good (it may join again)."""
        ident = self.registry.holder(target.key)
        account = self.accounts.account(ident.account) if ident and ident.account else None
        op = super()._kick(s, room, target, reason, kind)
        return op if account is None else gather([op, self.accounts.part(account, room.name)])

    def _drop(self, s: Session, why: Why, reason: str = "") -> Op:
        """An account's session ending: out of its rooms here, quietly; the account stays
        in them (a guest's ending is announced, base.py)."""
        if not s.ident.account:
            return super()._drop(s, why, reason)
        pending = [self.registry.remove_member(name, s.key, s.sid) for name in sorted(s.rooms)]
        for name in sorted(s.rooms):
            self._remove(s, self.rooms[name])
        self._forget(s)
        pending.append(self._release(s.ident))
        log_event(log, "account-away", account=s.ident.account, nick=s.nick, why=str(why))
        return gather(pending)

    def reap(self, ident: Identity) -> Op:
        if not ident.account:
            return super().reap(ident)
        pending = [
            self.registry.remove_member(name, ident.key, ident.sid)
            for name in self.rooms
            if (member := self.registry.members(name).get(ident.key)) is not None
            and member.sid == ident.sid
        ]
        pending.append(self._release(ident))
        return gather(pending)

    def _forget(self, s: Session) -> None:
        super()._forget(s)
        self.logged_in.pop(s.sid, None)
        self.auths.pop(s.rid, None)
        self.proved.pop(s.rid, None)

    def sweep(self) -> None:
        super().sweep()
        now = self.clock.monotonic()
        for rid in [rid for rid, p in self.auths.items() if p.expires < now]:
            del self.auths[rid]
        for rid in [rid for rid, (_, until) in self.proved.items() if until < now]:
            del self.proved[rid]
        if now >= self.recheck_at:
            self.recheck_at = now + RECHECK
            try:
                self._recheck()
            except Exception:  # the store unreadable just now: at the next sweep
                log.exception("could not recheck the logged-in accounts")

    def _recheck(self) -> None:
        """An account the operator removed, or whose password changed since a session of
        it logged in (`zmqchat-broker accounts del|passwd`, or /password on another
        device): those sessions end, and their client is told (EXPIRED, `refused`: a
        client that misses it finds out as it resumes). A session's own /password, under
        way or done, keeps it."""
        records: dict[str, Account | None] = {}
        for sid, account in list(self.logged_in.items()):
            if account.key in self.changing:
                continue
            if account.key not in records:
                records[account.key] = self.accounts.account(account.key)
            now, s = records[account.key], self.by_sid.get(sid)
            if s is None or _same(now, account):
                continue
            why = "account removed" if now is None else "password changed"
            log_event(log, "account-ended", account=account.name, nick=s.nick, why=why)
            code, reason = (
                (Code.NO_ACCOUNT, f"the account {account.name} was removed")
                if now is None
                else (Code.AUTH_FAILED, f"the password for {account.name} was changed")
            )
            self._push(s, Reply.EXPIRED, {"reason": reason, "refused": code})
            self._drop(s, Why.LOST)


def _same(a: Account | None, b: Account | None) -> bool:
    """The same record: the same registration, with the same password."""
    if a is None or b is None:
        return a is b
    return a.created == b.created and a.keys == b.keys
