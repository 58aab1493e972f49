"""Catching up (issue 21): how far an account has read each of its rooms and private
conversations (MARK), and what waits for it after that (UNREAD).

A room's mark is the number of the last event its account has read there; a private
conversation's is the time of the last message read from that person. Unread are the
messages (`msg` and `action`) after the mark that someone else sent; those that name the
account (its name or its nick now, as a word, folded as nicks are) are counted apart as
mentions. The marks are the account's, shared by all its sessions, and kept as the rooms are.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Final

import msgspec

from zmqchat import protocol as m
from zmqchat._core.accounts import Accounts
from zmqchat._core.accounts_state import Account, Kept
from zmqchat._core.base import Handler
from zmqchat._core.session import Session
from zmqchat._core.state import Op, gather
from zmqchat.protocol import Code, Kind, ProtocolError, Reply

UNREAD_SCAN: Final = 5000  # events read per room to count its unread: past that, `more`
PRIVATE_SCAN: Final = 1000  # the latest private messages read to count the unread ones
MARK_COST: Final = 0.1  # rate-limit tokens a MARK takes: ten of them cost one message
COUNTED: Final = frozenset({"msg", "action", "private"})


class _Seen(msgspec.Struct, gc=False):
    """What counting needs of a stored event (decoded without the rest)."""

    kind: str = ""
    nick: str = ""
    text: str = ""
    ts: float = 0.0


_SEEN: Final = msgspec.json.Decoder(_Seen)


class CatchUp(Accounts):
    """MARK and UNREAD."""

    def handler_table(self) -> dict[Kind, Handler]:
        return {**super().handler_table(), Kind.MARK: self._on_mark, Kind.UNREAD: self._on_unread}

    def _account(self, s: Session) -> Account:
        account = self.logged_in.get(s.sid)
        if account is None:
            raise ProtocolError(
                Code.NOT_ALLOWED, "marks and unread counts are kept for accounts: /register first"
            )
        return account

    def _on_mark(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        account = self._account(s)
        self._charge(s, MARK_COST)
        b = req.body
        if b["room"] is not None:
            room = b["room"]
            if room not in self.accounts.kept(account).rooms:
                raise ProtocolError(Code.NOT_MEMBER, f"you are not in {room}")
            yield self.accounts.mark(account, room, min(b["seq"], self.room_log.last(room)))
            reply = {"room": room, "seq": self.accounts.kept(account).rooms.get(room, b["seq"])}
        else:
            peer = m.nick_key(b["with"])
            yield self.accounts.mark_private(account, peer, min(b["ts"], self.clock.time()))
            reply = {
                "with": b["with"],
                "ts": self.accounts.kept(account).privates.get(peer, b["ts"]),
            }
        self._tell_others(s, Reply.MARKED, reply)  # the account's other devices (devices.py)
        return reply

    def _on_unread(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        account = self._account(s)
        kept = self.accounts.kept(account)
        b = req.body
        if b["room"] is not None and b["room"] not in kept.rooms:
            raise ProtocolError(Code.NOT_MEMBER, f"you are not in {b['room']}")
        names = [b["room"]] if b["room"] is not None else [r for r in kept.rooms if r in self.rooms]
        starts = [b["after"] if b["after"] is not None else kept.rooms[name] for name in names]
        lasts = [self.room_log.last(name) for name in names]  # as this broker has them now
        reads = [
            self.room_log.read(name, after=after, before=None, since=None, limit=UNREAD_SCAN)
            if last > after
            else Op.ready([])
            for name, after, last in zip(names, starts, lasts, strict=True)
        ]
        if b["room"] is None:  # the private messages too
            reads.append(self.accounts.privates_to(s.ident.owner, account.created, PRIVATE_SCAN))
        texts = yield gather(reads)
        me = Me(account, s)
        rooms = [
            room_count(me, name, after, last, got)
            for name, after, last, got in zip(names, starts, lasts, texts, strict=False)
        ]
        if b["room"] is not None:
            return {"rooms": rooms}
        return {"rooms": rooms, "privates": me.privates(kept, texts[-1])}


def room_count(me: Me, room: str, after: int, last: int, texts: list[str]) -> dict[str, Any]:
    """A room's line of UNREAD's reply (`more`: there is more than was counted)."""
    unread, mentioned = me.count(texts)
    more = len(texts) >= UNREAD_SCAN and last > after + len(texts)
    return {
        "room": room,
        "unread": unread,
        "mentions": mentioned,
        "mark": after,
        "last": last,
        **({"more": True} if more else {}),
    }


class Me:
    """Who is counting: whose messages are not unread, which names are mentions."""

    def __init__(self, account: Account, s: Session) -> None:
        self.keys = {account.key, s.key}  # its messages are not unread; its names, mentions
        self.account = account
        self._keys: dict[str, str] = {}

    def key(self, nick: str) -> str:
        key = self._keys.get(nick)
        if key is None:
            key = self._keys[nick] = m.nick_key(nick)
        return key

    def mentioned(self, text: str) -> bool:
        folded = m.fold(text)
        return any(m.names(folded, key) for key in self.keys)

    def count(self, texts: list[str]) -> tuple[int, int]:
        """(unread, mentions) among stored events."""
        unread = mentioned = 0
        for text in texts:
            ev = _SEEN.decode(text)
            if ev.kind in COUNTED and self.key(ev.nick) not in self.keys:
                unread += 1
                mentioned += self.mentioned(ev.text)
        return unread, mentioned

    def privates(self, kept: Kept, texts: list[str]) -> list[dict[str, Any]]:
        """Per person: the private messages from them after the account's mark."""
        found: dict[str, dict[str, Any]] = {}
        for text in texts:
            ev = _SEEN.decode(text)
            peer = self.key(ev.nick)
            mark = kept.privates.get(peer, self.account.created)
            if peer in self.keys or ev.ts <= mark:
                continue
            entry = found.setdefault(peer, {"with": ev.nick, "unread": 0, "mentions": 0})
            entry.update(**{"with": ev.nick, "mark": mark})
            entry["unread"] += 1
            entry["mentions"] += self.mentioned(ev.text)
        return list(found.values())
