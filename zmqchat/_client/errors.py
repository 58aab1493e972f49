"""What the client library raises, and the shape of a transfer's progress callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Progress = Callable[[int, int], None]  # (bytes done, bytes in all) of a file transfer


class ChatError(Exception):
    """An ERROR reply from the broker (or DISCONNECTED / TIMEOUT from the library):
    `.code` says what went wrong (protocol.Code: NICK_TAKEN, NOT_MEMBER, ...), `.reason`
    says it in words, `.body` has the reply's other fields (`retry_after`, `free_in`, ...)."""

    def __init__(self, code: str, reason: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.body = code, reason, body or {}
