"""The history store's interface in memory, so the broker's core runs in a test with its
real local state (local.py) and no files, processes or sockets."""

from __future__ import annotations

import json
from typing import Any

from zmqchat._core.state import Delivery, Draft, Op


class MemoryStore:
    """What LocalLog and LocalRegistry use of store.Store, kept in dicts."""

    def __init__(self) -> None:
        self.events: dict[str, dict[int, tuple[float, str, str | None, bytes]]] = {}
        self.privates: list[tuple[float, str, str, str, bytes]] = []
        self.members: set[tuple[str, str]] = set()
        self.rooms: dict[str, str] = {}
        self.nicks: dict[str, str] = {}
        self.commits = 0
        self.cmids: dict[str, tuple[str, str, int]] = {}

    def last_seqs(self) -> dict[str, int]:
        return {room: max(evs) for room, evs in self.events.items() if evs}

    def last_topic(self, room: str) -> str:
        return ""

    def append(
        self, room: str, seq: int, ts: float, sender: str, cmid: str | None, data: bytes
    ) -> None:
        self.events.setdefault(room, {})[seq] = (ts, sender, cmid, data)
        if cmid is not None:
            self.cmids[cmid] = (sender, room, seq)

    def find_cmid(self, cmid: str) -> tuple[str, str, int] | None:
        if cmid in self.cmids:
            return self.cmids[cmid]
        return next(((p[1], "", 0) for p in self.privates if p[3] == cmid), None)

    def history(
        self,
        room: str,
        *,
        after: int | None = None,
        before: int | None = None,
        since: float | None = None,
        limit: int = 50,
    ) -> list[str]:
        evs = sorted(self.events.get(room, {}).items())
        chosen = [
            (s, e)
            for s, e in evs
            if (after is None or s > after)
            and (before is None or s < before)
            and (since is None or e[0] >= since)
        ]
        chosen = chosen[:limit] if after is not None else chosen[-limit:]
        return [e[3].decode() for _, e in chosen]

    def append_private(
        self, ts: float, sender: str, recipient: str, cmid: str, data: bytes
    ) -> None:
        self.privates.append((ts, sender, recipient, cmid, data))

    def privates_to(self, recipient: str, since: float, limit: int) -> list[str]:
        return [p[4].decode() for p in self.privates if p[2] == recipient and p[0] >= since][
            -limit:
        ]

    def commit(self) -> None:
        self.commits += 1

    def take_members(self) -> set[tuple[str, str]]:
        taken, self.members = self.members, set()
        return taken

    def add_member(self, room: str, key: str) -> None:
        self.members.add((key, room))

    def remove_member(self, room: str, key: str) -> None:
        self.members.discard((key, room))

    def room_settings(self) -> dict[str, dict[str, Any]]:
        return {name: json.loads(data) for name, data in self.rooms.items()}

    def save_room(self, name: str, settings: str) -> None:
        self.rooms[name] = settings

    def nick_owner(self, key: str) -> str | None:
        return self.nicks.get(key)

    def bind_nick(self, key: str, pubkey: str) -> None:
        self.nicks.setdefault(key, pubkey)


class HeldLog:
    """A room log whose appends wait until the test lets them through, as a cluster's do
    until its quorum has stored them (or fail, as when it cannot be reached)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.held: list[tuple[Op, Op]] = []  # (the inner append, the one handed out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def append(self, room: str, drafts: list[Draft]) -> Op:
        waiting = Op()
        self.held.append((self.inner.append(room, drafts), waiting))
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
