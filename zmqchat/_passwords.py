"""Reading a password, wherever it comes from, without showing it (issue 21).

A known password (to log in) comes from a file (`--password-file FILE`, its first line),
the environment (`ZMQCHAT_PASSWORD`), or the person at the terminal (`Password for alice: `,
not echoed). A new one (to register or change it) is asked twice, `Password: ` and
`Again: `; read from a pipe, those are its next two lines.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from typing import Final

from zmqchat._scram import password_problem

ENV: Final = "ZMQCHAT_PASSWORD"


class PasswordError(Exception):
    """No password could be had, or the one given cannot be used: the message says why."""


def from_file(path: str) -> str:
    """The first line of a file (without its line end)."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as err:  # `no such file or directory`, not `[Errno 2] ...: 'path'`
        reason = (err.strerror or str(err)).lower()
        raise PasswordError(f"--password-file {path}: {reason}") from None
    except UnicodeDecodeError as err:
        raise PasswordError(f"--password-file {path}: {err}") from None
    password = line.rstrip("\r\n")
    if not password:
        raise PasswordError(f"--password-file {path}: its first line is empty")
    return password


def given(path: str | None) -> str | None:
    """A password given without asking: --password-file, else ZMQCHAT_PASSWORD; or None."""
    if path is not None:
        return from_file(path)
    return os.environ.get(ENV) or None


def line_reader() -> Callable[[str], str]:
    """How to ask for a secret here: getpass on a terminal (no echo), else the next line of
    stdin (the question on stderr). EOFError when stdin ends."""
    if sys.stdin.isatty():
        return lambda prompt: getpass.getpass(prompt)

    def from_pipe(prompt: str) -> str:
        sys.stderr.write(prompt)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        sys.stderr.write("\n")
        return line.rstrip("\r\n")

    return from_pipe


def unusable(password: str) -> str | None:
    """Why a new password would be refused (said before it is asked again), or None."""
    return password_problem(password)


def ask_new(ask: Callable[[str], str] | None = None, first: str = "Password: ") -> str:
    """A new password, asked twice; PasswordError if they differ or it is unusable."""
    ask = ask or line_reader()
    password = ask(first)
    again = ask("Again: ")
    if password != again:
        raise PasswordError("the two passwords differ; nothing was changed")
    problem = password_problem(password)
    if problem is not None:
        raise PasswordError(f"{problem}; nothing was changed")
    return password
