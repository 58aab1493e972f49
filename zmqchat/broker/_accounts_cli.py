"""`zmqchat-broker accounts add|passwd|del|list [NICK]`: the operator's side of accounts
(issue 21), and the broker's flags about them.

Against one broker's SQLite database (`--db`, default ./chat.db; the broker may be running:
a change counts at its next login, and passwd and del end the account's live sessions
within seconds) or a cluster's buckets (`--cluster URLS`, with the brokers' `--namespace`).
Passwords are read as the client reads them (zmqchat/_cli/passwords.py) and only SCRAM's
salted keys are stored.
Exit status: 0 done, 1 refused (no such account, registered already, a store that cannot
be used or reached), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
from typing import Any, Final

from zmqchat import protocol as m
from zmqchat._passwords import PasswordError, ask_new, from_file
from zmqchat._scram import DEFAULT_ITERATIONS, Keys, make_keys, password_problem
from zmqchat._usage import Parser, program

NATS_TIMEOUT: Final = 10.0  # seconds an operation on the cluster may take


def add_flags(p: Parser) -> None:
    """The broker's own flags about accounts: a table of the README's."""
    flag = p.table("accounts (see the README: Accounts; the operator's `accounts` command)")
    flag(
        "--registered-only",
        action="store_true",
        help="admit registered accounts only: guests are refused",
    )
    flag(
        "--scram-iterations",
        type=iterations,
        default=DEFAULT_ITERATIONS,
        metavar="N",
        help=f"the fewest PBKDF2 iterations a new password's keys may use (at least "
        f"{m.MIN_ITERATIONS}; see the README: Accounts)",
    )


def iterations(text: str) -> int:
    """--scram-iterations N: within SCRAM's bounds."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not m.MIN_ITERATIONS <= n <= m.MAX_ITERATIONS:
        raise argparse.ArgumentTypeError(f"from {m.MIN_ITERATIONS} to {m.MAX_ITERATIONS}")
    return n


def config(a: argparse.Namespace) -> dict[str, Any]:
    """Config fields from the broker's parsed flags."""
    return {"registered_only": a.registered_only, "scram_iterations": a.scram_iterations}


class Refused(Exception):
    """The store said no (or could not be used): the message says why."""


def main(argv: list[str]) -> int:
    prog = f"{program('zmqchat.broker')} accounts"  # as run: `broker.py accounts` too
    p = argparse.ArgumentParser(
        prog=prog,
        description="Manage the chat's accounts: add NICK and passwd NICK ask for a password "
        "twice (from a pipe, its next two lines) unless --password-file gives it; del NICK "
        "removes an account with its rooms and marks; list shows them all.",
    )
    p.add_argument("action", choices=("add", "passwd", "del", "list"))
    p.add_argument("nick", nargs="?", help="the account (its registered nickname)")
    p.add_argument("--db", default="chat.db", help="the broker's database (default ./chat.db)")
    p.add_argument(
        "--create",
        action="store_true",
        help="add: make the database if there is none yet (accounts before the broker's first "
        "start); without it a --db that is not there is refused",
    )
    p.add_argument("--cluster", metavar="URLS", help="a cluster's NATS servers instead of --db")
    p.add_argument("--namespace", default="zmqchat", help="the cluster brokers' --namespace")
    p.add_argument("--password-file", metavar="FILE", help="the password: this file's first line")
    p.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help=f"PBKDF2 rounds for the new password's keys (default {DEFAULT_ITERATIONS})",
    )
    a = p.parse_args(argv)
    if a.action != "list":
        if a.nick is None:
            p.error(f"accounts {a.action} needs a NICK")
        try:
            a.nick = m.check_nick(a.nick)
        except m.ProtocolError as err:
            p.error(f"{a.nick!r}: {err.reason}")
    if not m.MIN_ITERATIONS <= a.iterations <= m.MAX_ITERATIONS:
        p.error(f"--iterations: from {m.MIN_ITERATIONS} to {m.MAX_ITERATIONS}")
    try:
        store: Store | None = None
        if not a.cluster and not a.create and not os.path.exists(a.db):
            raise Refused(
                f"{a.db}: no such database (--db the broker's, or --cluster URLS"
                + ("; --create makes a new one)" if a.action == "add" else ")")
            )
        if a.action == "passwd" or (a.action == "add" and os.path.exists(a.db)):
            if not a.cluster:  # a wrong --db or nick is said before the password is asked
                local = store = LocalStore(a.db, a.action)
                local.expect(a.nick, registered=a.action == "passwd")
        keys = _keys(a) if a.action in ("add", "passwd") else None
        if store is None:  # (add: the database is made once the password is there)
            store = (
                ClusterStore(a.cluster, a.namespace) if a.cluster else LocalStore(a.db, a.action)
            )
        print(store.run(a.action, a.nick, keys))
    except (PasswordError, Refused) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except EOFError:  # the input ended before the password was read twice
        print(file=sys.stderr)
        print(
            f"{prog}: no password: it is read twice (two lines from a pipe), or give it with "
            "--password-file FILE; nothing was changed",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 1
    return 0


def _keys(a: argparse.Namespace) -> Keys:
    if a.password_file:
        password = from_file(a.password_file)
        problem = password_problem(password)
        if problem is not None:
            raise PasswordError(f"--password-file {a.password_file}: {problem}")
    else:
        password = ask_new(first=f"Password for {a.nick}: ")
    return make_keys(password, a.iterations)


def _record(nick: str, keys: Keys) -> dict[str, Any]:
    return {"name": nick, "created": time.time(), **keys.to_wire()}


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


class Store:
    def run(self, action: str, nick: str | None, keys: Keys | None) -> str:
        raise NotImplementedError


class LocalStore(Store):
    """One broker's SQLite database, written directly (SQLite lets the broker's writer and
    us take turns); the broker reads an account at each login."""

    def __init__(self, path: str, action: str) -> None:
        if action != "add" and not os.path.exists(path):
            raise Refused(f"{path}: no such database (--db the broker's, or --cluster URLS)")
        from zmqchat._local.store import SCHEMA

        try:
            self.db = sqlite3.connect(path, timeout=10, isolation_level=None)
            self.db.executescript(SCHEMA)
        except sqlite3.Error as err:
            raise Refused(f"{path}: {err}") from None
        self.path = path

    def expect(self, nick: str, registered: bool) -> None:
        """Refused (and closed) unless `nick` is an account (`registered`), or is not:
        said before a password is asked for (run() checks again as it writes)."""
        try:
            _expected(nick, self._found(nick), registered)
        except sqlite3.Error as err:
            self.db.close()
            raise Refused(f"{self.path}: {err}") from None
        except Refused:
            self.db.close()
            raise

    def _found(self, nick: str) -> Any:
        return self.db.execute(
            "SELECT data FROM accounts WHERE key=?", (m.nick_key(nick),)
        ).fetchone()

    def run(self, action: str, nick: str | None, keys: Keys | None) -> str:
        try:
            return self._run(action, nick, keys)
        except sqlite3.Error as err:
            raise Refused(f"{self.path}: {err}") from None
        finally:
            self.db.close()

    def _run(self, action: str, nick: str | None, keys: Keys | None) -> str:
        if action == "list":
            rows = self.db.execute("SELECT data FROM accounts ORDER BY key").fetchall()
            return _listing([json.loads(data) for (data,) in rows])
        assert nick is not None
        key = m.nick_key(nick)
        found = self._found(nick)
        _expected(nick, found, registered=action != "add")
        if action == "add":
            assert keys is not None
            self.db.execute(
                "INSERT INTO accounts VALUES (?,?)", (key, json.dumps(_record(nick, keys)))
            )
            return f"added {nick}"
        name = json.loads(found[0])["name"]
        if action == "passwd":
            assert keys is not None
            record = {**json.loads(found[0]), **keys.to_wire()}
            self.db.execute("UPDATE accounts SET data=? WHERE key=?", (json.dumps(record), key))
            return f"changed the password of {name}"
        self.db.execute("BEGIN")
        for table, column in (
            ("accounts", "key"),
            ("account_rooms", "account"),
            ("account_privates", "account"),
            ("account_last", "account"),
        ):
            self.db.execute(f"DELETE FROM {table} WHERE {column}=?", (key,))
        self.db.execute("COMMIT")
        return f"removed {name}"


def _expected(nick: str, found: Any, registered: bool) -> None:
    """Refused unless `nick` is an account (`registered`, its row `found`), or is not."""
    if registered and not found:
        raise Refused(f"no account {nick}")
    if found and not registered:
        name = json.loads(found[0])["name"]
        raise Refused(f"{name} is registered already (a new password: accounts passwd {name})")


def _listing(records: list[dict[str, Any]]) -> str:
    if not records:
        return "no accounts"
    return "\n".join(f"{r['name']}  (registered {_when(float(r['created']))})" for r in records)


async def _quiet(exc: Exception) -> None:
    """nats-py's errors while connecting: the one that matters is raised."""


class ClusterStore(Store):
    """A cluster's buckets (zmqchat/_cluster/accounts.py), through NATS."""

    def __init__(self, urls: str, namespace: str) -> None:
        self.servers = [u.strip() for u in urls.split(",") if u.strip()]
        self.ns = namespace

    def run(self, action: str, nick: str | None, keys: Keys | None) -> str:
        try:
            return asyncio.run(asyncio.wait_for(self._run(action, nick, keys), NATS_TIMEOUT))
        except TimeoutError:
            raise Refused(f"the cluster at {', '.join(self.servers)} did not answer") from None

    async def _run(self, action: str, nick: str | None, keys: Keys | None) -> str:
        import nats
        import nats.errors
        import nats.js.errors

        from zmqchat._cluster.names import hexkey

        try:
            nc = await nats.connect(
                self.servers, connect_timeout=3, allow_reconnect=False, error_cb=_quiet
            )
        except (OSError, nats.errors.Error) as err:
            raise Refused(f"cannot reach NATS at {', '.join(self.servers)}: {err}") from None
        try:
            accounts = await self._bucket(nc, "accounts")
            if action == "list":
                try:
                    names = await accounts.keys()
                except nats.js.errors.NoKeysError:
                    names = []
                return _listing([json.loads((await accounts.get(k)).value) for k in names])
            assert nick is not None
            key = hexkey(m.nick_key(nick))
            try:
                found: dict[str, Any] | None = json.loads((await accounts.get(key)).value)
            except nats.js.errors.KeyNotFoundError:
                found = None
            if action == "add":
                if found is not None:
                    raise Refused(
                        f"{found['name']} is registered already (a new password: accounts "
                        f"passwd {found['name']})"
                    )
                assert keys is not None
                try:
                    await accounts.create(key, json.dumps(_record(nick, keys)).encode())
                except nats.js.errors.KeyWrongLastSequenceError:
                    raise Refused(f"{nick} was registered just now") from None
                return f"added {nick}"
            if found is None:
                raise Refused(f"no account {nick}")
            if action == "passwd":
                assert keys is not None
                await accounts.put(key, json.dumps({**found, **keys.to_wire()}).encode())
                return f"changed the password of {found['name']}"
            await accounts.delete(key)
            marks = await self._bucket(nc, "marks")
            try:
                kept = [k for k in await marks.keys() if k.startswith(key + ".")]
            except nats.js.errors.NoKeysError:
                kept = []
            for k in kept:
                await marks.delete(k)
            return f"removed {found['name']}"
        finally:
            await nc.close()

    async def _bucket(self, nc: Any, bucket: str) -> Any:
        """One of the chat's buckets; made (as the brokers make them) if no broker has yet."""
        import nats.js.errors
        from nats.js import api

        js = nc.jetstream(timeout=NATS_TIMEOUT / 2)
        name = f"{self.ns}-{bucket}"
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            size = len(set(nc._server_info.get("connect_urls") or []) | {"self"})
            config = api.KeyValueConfig(bucket=name, history=1, replicas=min(3, size))
            return await js.create_key_value(config)
