"""The commands that fix, answer and find messages (issue 23): EDIT, DELETE, a SAY that
answers a message (`re`), and SEARCH.

Only messages (kinds msg and action) are edited, removed or answered. A message is its
sender's: the identity that sent it (Identity.owner: a CURVE key, a resume token, an
account), whatever nick it has now. Its sender may edit or delete it; a room operator may
delete anyone's (and edit nobody's). A search finds only what its asker could read: the
rooms it is in now, and its own private conversations.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any, cast

from zmqchat import protocol as m
from zmqchat._core import search
from zmqchat._core.base import Handler, Result, _Raw
from zmqchat._core.edits_state import Found, MessageLog, Stored
from zmqchat._core.rooms import Rooms
from zmqchat._core.session import Room, Session
from zmqchat._core.state import Draft, Op
from zmqchat.protocol import Code, EventKind, Kind, ProtocolError

EDITABLE = frozenset({EventKind.MSG, EventKind.ACTION})


class Edits(Rooms):
    """A part of the core (core.py) that comes before Rooms: a SAY with `re` passes here."""

    def handler_table(self) -> dict[Kind, Handler]:
        return {
            **super().handler_table(),
            Kind.EDIT: self._on_edit,
            Kind.DELETE: self._on_delete,
            Kind.SEARCH: self._on_search,
        }

    @property
    def messages(self) -> MessageLog:
        """The room log, as edits and search use it (both implementations are one)."""
        return cast(MessageLog, self.room_log)

    def _message(self, s: Session, room: Room, seq: int, verb: str) -> Generator[Op, Any, Stored]:
        """The room's message at seq, or NO_SUCH_MESSAGE."""
        found = yield self.messages.message(room.name, seq, s.ident.owner)
        if found is None or found.event.get("kind") not in EDITABLE:
            raise ProtocolError(Code.NO_SUCH_MESSAGE, f"{room.name} has no message {seq} to {verb}")
        return cast(Stored, found)

    def _on_say(self, s: Session, req: m.Request) -> Result:
        """A SAY; one with `re` answers a message, which must be there (and is named with
        its sender in every message of the SAY)."""
        if req.body["re"] is None:
            return super()._on_say(s, req)
        return self._say_reply(s, req)

    def _say_reply(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any] | bytes]:
        room = self._member_room(s, req.body["room"])
        known = self.room_log.known_ids(s.ident.owner, [i["id"] for i in req.body["msgs"]])
        body = dict(req.body)
        if any(prior is None for prior in known.values()):  # not all a retry: check it
            original = yield from self._message(s, room, req.body["re"], "answer")
            body["re_nick"] = original.event.get("nick", "")
        else:
            body["re"] = None  # stored already: the acks repeat their seqs
        result = super()._on_say(s, m.Request(req.kind, req.label, body))
        if isinstance(result, Generator):  # a cluster: answered once stored
            result = yield from result
        return cast(dict[str, Any] | bytes, result)

    def _on_edit(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        self._charge(s, 1)
        b = req.body
        room = self._member_room(s, b["room"])
        original = yield from self._message(s, room, b["seq"], "edit")
        if not original.mine:
            raise ProtocolError(Code.NOT_AUTHOR, "you can edit only your own messages")
        extra: dict[str, Any] = {"ref": b["seq"]}
        if s.ident.bot:
            extra["bot"] = True
        seqs = yield self._store(
            room.name, [Draft(EventKind.EDIT, s.nick, b["text"], s.ident.owner, None, extra)]
        )
        return {"room": room.name, "seq": seqs[0], "ref": b["seq"]}

    def _on_delete(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        self._charge(s, 1)
        b = req.body
        room = self._member_room(s, b["room"])
        original = yield from self._message(s, room, b["seq"], "delete")
        author = str(original.event.get("nick", ""))
        extra: dict[str, Any] = {"ref": b["seq"]}
        if original.mine:
            text = f"{author} deleted a message"
        else:
            yield self.registry.catch_up()  # made an operator on another broker just now?
            if s.key not in self._settings(room).operators:
                raise ProtocolError(
                    Code.NOT_AUTHOR,
                    "you can delete only your own messages (operators may remove any)",
                )
            text = f"a message by {author} was removed by {s.nick}"
            extra["by"] = s.nick
        seqs = yield self._store(
            room.name, [Draft(EventKind.DELETE, author, text, s.ident.owner, None, extra)]
        )
        return {"room": room.name, "seq": seqs[0], "ref": b["seq"]}

    def _on_search(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        self._charge(s, 1)
        b = req.body
        query = search.parse(b["query"])
        if b["room"] is not None:
            rooms, me = [self._member_room(s, b["room"]).name], None
        else:  # every room it is in, and its private conversations (if it proves who it is)
            rooms, me = sorted(s.rooms), s.ident.owner if s.replayable else None
        found = cast(Found, (yield self.messages.search(query, rooms, me, b["limit"])))
        results = []
        for text in found.texts:
            event = json.loads(text)
            event["marks"] = search.marks(str(event.get("text", "")), query)
            results.append(m.dumps(event).decode())
        return {
            "query": b["query"],
            "room": b["room"],
            "results": _Raw(results),
            "more": max(0, found.total - len(results)),
        }
