"""A room log that holds its appends until a test lets them through, as a cluster's does,
so the broker's core is shown waiting for the shared state (test_core.py)."""

from __future__ import annotations

from typing import Any

from zmqchat._core.state import Delivery, Draft, Op


class HeldLog:
    """A room log whose appends wait until the test lets them through, as a cluster's do
    until its quorum has stored them (or fail, as when it cannot be reached)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.held: list[tuple[Op, Op]] = []  # (the inner append, the one handed out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def append(self, room: str, drafts: list[Draft], heard: int | None = None) -> Op:
        waiting = Op()
        self.held.append((self.inner.append(room, drafts, heard), waiting))
        return waiting

    def release(self, error: BaseException | None = None) -> None:
        held, self.held = self.held, []
        for inner, waiting in held:
            if error is not None:
                waiting.fail(error)
            else:
                waiting.resolve(inner.value)

    def follow(self) -> list[Delivery]:
        return self.inner.follow()
