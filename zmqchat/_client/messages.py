"""The client library's part for fixing, answering and finding messages (issue 23): a part
of `Client` (library.py), on the same requests and events as everything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from zmqchat import protocol as m

PURGE_PAGES: Final = 10  # history pages (of MAX_HISTORY events) purge() looks back through
PURGE_MAX: Final = 100  # messages one purge() removes at most


@dataclass
class SearchResults:
    """A search's answer: the newest matches first (`Event`s, backlog=True; each event's
    `data["marks"]` holds the [start, end) offsets of the matches in its text), and how
    many more matched than were returned."""

    query: str
    room: str | None
    events: list[Any] = field(default_factory=list)  # Events
    more: int = 0


class Messages:
    """Edits, removals, replies and search: a part of Client."""

    if TYPE_CHECKING:  # what it uses of Client
        nick: str

        async def request(self, kind: m.Kind, body: dict[str, Any]) -> dict[str, Any]: ...

        async def say(self, room: str, text: str, *, action: bool = ..., **extra: Any) -> int: ...

        async def history(
            self,
            room: str,
            *,
            limit: int = ...,
            before: int | None = ...,
            after: int | None = ...,
        ) -> list[Any]: ...

        def _from_wire(self, d: dict[str, Any], *, mine: bool, backlog: bool) -> Any: ...

        def _is_mine(self, ev: dict[str, Any]) -> bool: ...

    async def edit(self, room: str, seq: int, text: str) -> int:
        """Replace the text of your message `seq` in room (everyone sees it, marked edited,
        in history too); returns the number of the `edit` event. ChatError NOT_AUTHOR for
        someone else's message, NO_SUCH_MESSAGE when there is none (or it was deleted)."""
        reply = await self.request(m.Kind.EDIT, {"room": room, "seq": seq, "text": text})
        return int(reply["seq"])

    async def delete(self, room: str, seq: int) -> int:
        """Delete your message `seq` in room (a room operator: anyone's): its text is gone
        from history and search. Returns the number of the `delete` event."""
        reply = await self.request(m.Kind.DELETE, {"room": room, "seq": seq})
        return int(reply["seq"])

    async def reply(
        self, room: str, seq: int, text: str, *, action: bool = False, **extra: Any
    ) -> int:
        """Say text in room as an answer to its message `seq` (the event carries `re` and
        `re_nick`); returns its seq once stored, as say() does."""
        return await self.say(room, text, action=action, re=seq, **extra)

    async def message(self, room: str, seq: int) -> Any:
        """A room's Event as stored now (edited, or a `deleted` event), or None."""
        found = await self.history(room, after=seq - 1, limit=1)
        return found[0] if found and found[0].seq == seq else None

    async def search(self, query: str, room: str | None = None, limit: int = 20) -> SearchResults:
        """Messages that match query (words, `prefix*`, `"a phrase"`), newest first: in
        room, or (room None) in every room you are in and your private conversations."""
        reply = await self.request(m.Kind.SEARCH, {"query": query, "room": room, "limit": limit})
        me = m.nick_key(self.nick)
        events = [
            self._from_wire(
                d,
                mine=self._is_mine(d)
                or (d.get("kind") == "private" and m.nick_key(str(d.get("nick", ""))) == me),
                backlog=True,
            )
            for d in reply.get("results", [])
        ]
        return SearchResults(query, room, events, int(reply.get("more", 0)))

    async def purge(self, room: str, nick: str, count: int = 1) -> list[int]:
        """A room operator's clean-up: delete nick's last `count` messages in room (at most
        PURGE_MAX, looked for in its last PURGE_PAGES * 500 events); returns their seqs."""
        key, wanted = m.nick_key(nick), max(1, min(count, PURGE_MAX))
        found: list[int] = []
        before: int | None = None
        for _ in range(PURGE_PAGES):
            page = await self.history(room, before=before, limit=m.MAX_HISTORY)
            for ev in reversed(page):
                if ev.kind in ("msg", "action") and m.nick_key(ev.nick) == key:
                    found.append(int(ev.seq or 0))
                    if len(found) == wanted:
                        break
            if len(found) == wanted or len(page) < m.MAX_HISTORY or not page[0].seq:
                break
            before = page[0].seq
        for seq in found:
            await self.delete(room, seq)
        return found
