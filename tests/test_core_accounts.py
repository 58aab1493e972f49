"""Accounts in the core, without sockets (test_core.py's harness): the races between a
password change and the sessions and logins under way, which only a clock the test moves
and a store whose writes the test holds can show."""

from __future__ import annotations

import dataclasses
from typing import Any

from tests.test_core import Conn, Harness, _close_stores  # noqa: F401 - (its fixture)
from zmqchat._core.accounts_state import Account
from zmqchat._core.core import Core
from zmqchat._core.state import Op
from zmqchat._local.accounts import LocalAccounts
from zmqchat._local.state import LocalRegistry
from zmqchat._scram import Login, make_keys
from zmqchat.protocol import Code

ITERATIONS = 4096
OLD, NEW = "old password", "new password"


class HeldAccounts(LocalAccounts):
    """A store whose password changes show at once but are stored when the test says, as
    a cluster broker's are (its own copy at once, the cluster's answer later)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.held: list[Op] = []

    def register(self, account: Any) -> Op:
        super().set_keys(account)  # (a registration is not held)
        return Op.ready()

    def set_keys(self, account: Any) -> Op:
        super().set_keys(account)
        op = Op()
        self.held.append(op)
        return op


class RegisteredElsewhere(LocalAccounts):
    """A cluster broker's accounts as its core sees them: an account registered through
    another broker just now is heard here only when a catch-up that includes the accounts
    is done (AccountsNewsOnCatchUp)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.unheard: list[Account] = []
        self.unheard_joins: list[tuple[str, str]] = []  # (account key, room)

    def hear(self) -> None:
        for account in self.unheard:
            super().register(account)
        for key, room in self.unheard_joins:
            super().join(self.account(key), room, 0)
        self.unheard.clear()
        self.unheard_joins.clear()


class AccountsNewsOnCatchUp(LocalRegistry):
    accounts: RegisteredElsewhere

    def catch_up(self, accounts: bool = False) -> Op:
        if accounts:
            self.accounts.hear()
        return Op.ready()


def with_accounts(
    accounts_type: type[LocalAccounts] = LocalAccounts,
    registry_type: type[LocalRegistry] = LocalRegistry,
) -> tuple[Harness, Any]:
    h = Harness(scram_iterations=ITERATIONS)
    accounts = accounts_type(h.store)
    if registry_type is not LocalRegistry:
        h.registry = registry_type(h.store, h.cfg.rooms, h.cfg.operators, h.cfg.allow_new_rooms)
    h.core = Core(
        h.cfg.rules(),
        h.log,
        h.registry,
        h.core.presence,
        name="b1",
        pub_port=9002,
        motd="",
        clock=h.clock,
        accounts=accounts,
    )
    return h, accounts


def registered(h: Harness, nick: str) -> Conn:
    c = h.conn(nick)
    c.hello(nick)
    c.ask("REGISTER", **make_keys(OLD, ITERATIONS).to_wire())
    return c


def sweeps(h: Harness, seconds: float, *beating: Conn) -> None:
    """The broker's sweeps over `seconds` (the accounts are rechecked every 2 s), the
    `beating` connections sending their heartbeats."""
    for _ in range(int(seconds)):
        h.clock.advance(1.0)
        for c in beating:
            c.send("PING")
        h.core.sweep()
        h.flush()


def logged_in(h: Harness, name: str, nick: str) -> Conn:
    """A connection logged in to the account `nick` with the old password."""
    c = h.conn(name)
    login = Login(nick, OLD)
    answer = c.ask("AUTH", account=nick, first=login.first())
    c.ask(
        "HELLO",
        version=1,
        nick=nick,
        token=f"{name}-token-0123456789",
        proof=login.proof(answer["next"]),
    )
    return c


def test_a_session_keeps_its_own_password_change_while_it_is_being_stored():
    """The 2 s recheck comes while the session's own /password is being stored (the
    record here already new, its session's not yet): the session stays, and is answered;
    the account's other device is not told anything until the change is stored, then it
    ends."""
    h, accounts = with_accounts(HeldAccounts)
    ann = registered(h, "ann")
    phone = logged_in(h, "phone", "ann")
    login = Login("ann", OLD)
    proof = login.proof(ann.ask("AUTH", account="ann", first=login.first())["next"])
    label = ann.send("PASSWORD", proof=proof, **make_keys(NEW, ITERATIONS).to_wire())
    assert ann.reply(label) == ("", {})  # waiting for the store
    sweeps(h, 5, ann, phone)
    assert len(h.core.by_sid) == 2 and phone.pushes("EXPIRED") == []
    accounts.held.pop().resolve()
    h.flush()
    assert ann.reply(label) == ("OK", {"account": "ann"})
    sweeps(h, 5, ann, phone)
    assert [s.nick for s in h.core.by_sid.values()] == ["ann"]
    assert h.core.logged_in and "rooms" in ann.ask("PING")
    assert phone.pushes("EXPIRED") == [
        {"reason": "the password for ann was changed", "refused": "AUTH_FAILED"}
    ]


def test_a_login_begun_before_the_password_changed_is_not_let_in_after():
    """Someone who has the old password starts a login (AUTH); the password is changed
    (the operator, or the owner on another device) before they send their proof: they are
    refused, and nothing is left of them."""
    h, accounts = with_accounts()
    registered(h, "ann").ask("BYE")
    thief = h.conn("thief")
    login = Login("ann", OLD)
    answer = thief.ask("AUTH", account="ann", first=login.first())
    record = accounts.account("ann")
    accounts.set_keys(dataclasses.replace(record, keys=make_keys(NEW, ITERATIONS)))
    kind, got = thief.reply(
        thief.send(
            "HELLO",
            version=1,
            nick="ann",
            token="thief-token-0123456789",
            proof=login.proof(answer["next"]),
        )
    )
    assert (kind, got["code"]) == ("ERROR", Code.AUTH_FAILED)
    assert "changed meanwhile" in got["reason"]
    sweeps(h, 5, thief)
    assert h.core.by_sid == {}


def test_a_nick_registered_on_another_broker_just_now_is_an_account_here():
    """On a cluster an account registered through another broker is heard here a moment
    later. What asks whether a nick is an account waits for that news: a guest's HELLO
    under the nick is told to log in, a guest's NICK to it is refused, a private message
    to it (away) is kept for the account."""
    h, accounts = with_accounts(RegisteredElsewhere, AccountsNewsOnCatchUp)
    h.registry.accounts = accounts

    def elsewhere(nick: str) -> None:
        accounts.unheard.append(Account(nick, nick, make_keys(OLD, ITERATIONS), 1.0))

    elsewhere("ann")
    guest = h.conn("guest")
    kind, got = guest.reply(guest.send("HELLO", version=1, nick="ann", token="guest-token-0"))
    assert (kind, got["code"]) == ("ERROR", Code.AUTH_REQUIRED)
    elsewhere("eve")  # a guest's resume under a nick it does not hold (its session gone)
    kind, got = guest.reply(
        guest.send("HELLO", version=1, nick="eve", token="guest-token-0", resume=True)
    )
    assert (kind, got["code"]) == ("ERROR", Code.AUTH_REQUIRED)
    bea = h.conn("bea")
    bea.hello("bea")
    elsewhere("cat")
    kind, got = bea.reply(bea.send("NICK", nick="cat"))
    assert (kind, got["code"], got["reason"]) == (
        "ERROR",
        Code.NICK_TAKEN,
        "cat is a registered account",
    )
    elsewhere("dan")
    assert bea.ask("PRIV", to="dan", text="for when you are back", id="p1")["to"] == "dan"


def test_a_join_after_joined_waits_for_the_accounts_join_made_on_another_broker():
    """The account joined `work` through another broker, which told this session
    (JOINED) before this broker heard the account's record of it: the session's JOIN
    (follow) waits for that record and is let in, not refused as 'not in work any more'."""
    h, accounts = with_accounts(RegisteredElsewhere, AccountsNewsOnCatchUp)
    h.registry.accounts = accounts
    ann = registered(h, "ann")
    accounts.unheard_joins.append(("ann", "work"))
    assert ann.ask("JOIN", room="work", follow=True)["room"] == "work"
