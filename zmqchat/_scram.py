"""SCRAM-SHA-256 (RFC 5802, RFC 7677) for accounts, on the `scramp` library, for both ends.

A password never crosses the network and is never stored. Whoever sets it (the client at
/register or /password, the operator's `zmqchat-broker accounts`) derives SCRAM's salted
keys from it (`make_keys`: PBKDF2 with the iteration count, the costly part, on purpose)
and the broker keeps only those. At each login the client proves it knows the password
(`Login`) and the broker proves it holds the keys (`Verifier`): the broker's part is a few
HMACs, whatever the iteration count.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Final

import scramp

from zmqchat.protocol import nick_key

MECHANISM: Final = "SCRAM-SHA-256"
# PBKDF2-HMAC-SHA256 rounds for new passwords: OWASP's figure for 2023. A login costs the
# client about 0.15 s of one core here (bench/README.md); the broker nothing of it.
DEFAULT_ITERATIONS: Final = 600_000
MIN_PASSWORD: Final = 8  # characters: shorter ones are refused where a password is set


class ScramError(Exception):
    """A SCRAM exchange that failed: a wrong password, or a malformed message."""


@dataclass(frozen=True, slots=True)
class Keys:
    """What is kept of a password: SCRAM's salt, stored key, server key and iteration count."""

    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    def to_wire(self) -> dict[str, Any]:
        """As REGISTER and PASSWORD send them (and the cluster keeps them): base64 text."""
        return {
            "salt": base64.b64encode(self.salt).decode(),
            "stored_key": base64.b64encode(self.stored_key).decode(),
            "server_key": base64.b64encode(self.server_key).decode(),
            "iterations": self.iterations,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Keys:
        return cls(
            base64.b64decode(d["salt"]),
            base64.b64decode(d["stored_key"]),
            base64.b64decode(d["server_key"]),
            int(d["iterations"]),
        )


def password_problem(password: str) -> str | None:
    """Why a new password is refused, or None."""
    if len(password) < MIN_PASSWORD:
        return f"a password is at least {MIN_PASSWORD} characters"
    if password != password.strip():
        return "a password may not start or end with a space"
    return None


def make_keys(password: str, iterations: int = DEFAULT_ITERATIONS) -> Keys:
    """The salted keys of a new password (a fresh random salt): slow, on purpose."""
    try:
        salt, stored, server, count = scramp.ScramMechanism(MECHANISM).make_auth_info(
            password, iteration_count=iterations
        )
    except scramp.ScramException as exc:
        raise ScramError(str(exc)) from None
    return Keys(bytes(salt), bytes(stored), bytes(server), int(count))


class Login:
    """The client's side of one login: first() -> AUTH, proof(broker's answer) -> HELLO,
    check(the welcome's `verify`) -> the broker was the one that holds our keys."""

    def __init__(self, account: str, password: str) -> None:
        try:
            self._client = scramp.ScramClient([MECHANISM], account, password)
        except scramp.ScramException as exc:
            raise ScramError(str(exc)) from None

    def first(self) -> str:
        return str(self._client.get_client_first())

    def proof(self, server_first: str) -> str:
        """The client's final message (PBKDF2 of the password: slow, run it off the loop)."""
        try:
            self._client.set_server_first(server_first)
            return str(self._client.get_client_final())
        except scramp.ScramException as exc:
            raise ScramError(str(exc)) from None

    def check(self, server_final: str) -> None:
        try:
            self._client.set_server_final(server_final)
        except scramp.ScramException as exc:
            raise ScramError(f"the broker did not prove it holds the account: {exc}") from None


class Verifier:
    """The broker's side of one login, for one account whose keys it holds."""

    def __init__(self, name: str, keys: Keys, nonce: str) -> None:
        self.name, self.keys = name, keys

        def lookup(username: str) -> tuple[bytes, bytes, bytes, int]:
            if nick_key(username) != nick_key(name):
                raise scramp.ScramException(f"this exchange is for {name}, not {username}")
            return keys.salt, keys.stored_key, keys.server_key, keys.iterations

        self._server = scramp.ScramMechanism(MECHANISM).make_server(lookup, s_nonce=nonce)

    def start(self, client_first: str) -> str:
        """The client's first message -> the broker's (ScramError if it is malformed)."""
        try:
            self._server.set_client_first(client_first)
            return str(self._server.get_server_first())
        except scramp.ScramException as exc:
            raise ScramError(str(exc)) from None

    def finish(self, client_final: str) -> str:
        """The client's proof -> the broker's final message; ScramError if it is wrong."""
        try:
            self._server.set_client_final(client_final)
            return str(self._server.get_server_final())
        except scramp.ScramException as exc:
            raise ScramError(str(exc)) from None
