"""What the client library raises, and the shape of a transfer's progress callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Progress = Callable[[int, int], None]  # (bytes done, bytes in all) of a file transfer


class ChatError(Exception):
    """An ERROR reply from the broker (or DISCONNECTED / TIMEOUT from the library)."""

    def __init__(self, code: str, reason: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.body = code, reason, body or {}
