"""What the core is given from outside: the rules it enforces, its clock and its randomness.

The core reads no clock and draws no random number of its own, so a test moves a fake clock
to expire a session, a grant or a resume window instead of sleeping (trio's `Clock`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Rules:
    """The rules of one broker, as its flags set them; each default is written here only."""

    rate: float = 5.0  # messages per second a client may send (0: unlimited)
    burst: int = 20  # messages a client may send at once
    heartbeat: float = 2.0  # seconds; a client silent for 3 of them is gone
    allow_new_rooms: bool = False  # /join may create a room
    keys_required: bool = False  # CURVE: a connection is known by its authenticated key


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds for intervals (heartbeats, rate limits): never jumps."""

    def time(self) -> float:
        """The wall clock, in seconds since the epoch (timestamps, grant expiry)."""


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


Tokens = Callable[[int], str]  # n random bytes, as 2n hex digits (ids, epochs, nonces)
system_tokens: Tokens = secrets.token_hex


@dataclass
class Bucket:
    """Token bucket: `burst` messages at once, refilled at `rate` per second (0 = unlimited)."""

    rate: float
    burst: float
    allowance: float  # messages that may be sent now
    stamp: float

    def take(self, n: float, now: float) -> float:
        """Take n messages' worth; return 0 on success, else seconds until it would be there."""
        if self.rate <= 0:
            return 0.0
        self.allowance = min(self.burst, self.allowance + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.allowance >= n:
            self.allowance -= n
            return 0.0
        return (n - self.allowance) / self.rate
