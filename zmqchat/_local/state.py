"""The shared state of a single broker: memory and its history store (store.py).

Everything here answers at once: an append is numbered as it is made and becomes durable at
the next follow() (one write to the store's log per pass of the broker's loop), before the
loop publishes it or sends any reply, so an acknowledgement still means stored.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from zmqchat import protocol as m
from zmqchat._core import search
from zmqchat._core.edits_state import Found, Stored
from zmqchat._core.search import Query
from zmqchat._core.state import DEPARTURES, Delivery, Draft, Identity, Member, Op, RoomSettings
from zmqchat._local.store import CHANGES, Store
from zmqchat.protocol import Code, EventKind, ProtocolError, Reply

log = logging.getLogger("zmqchat.broker")


class LocalLog:
    """Each room's events in the store, numbered here."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seqs: dict[str, int] = store.last_seqs()
        self._pending: dict[str, Delivery] = {}
        self.backlog = 0  # events appended since the last follow()

    def last(self, room: str) -> int:
        return self.seqs.get(room, 0)

    def append(self, room: str, drafts: list[Draft], heard: int | None = None) -> Op:
        seq = self.seqs.get(room, 0)
        pending = self._pending.get(room)
        if pending is None:
            pending = self._pending[room] = Delivery(room, seq + 1, [])
        events, append, seqs = pending.events, self.store.append, []
        for d in drafts:
            seq += 1
            ts = time.time()
            data = m.encode_event(room, seq, ts, d.nick, d.kind, d.text, d.cmid, d.extra)
            if d.kind in CHANGES:  # an edit or removal: it changes the message it names too
                ref = int((d.extra or {})["ref"])
                self.store.append_change(d.kind, room, seq, ts, d.owner, data, ref)
            else:
                append(room, seq, ts, d.owner, d.cmid, data)
            events.append(data)
            if d.kind in DEPARTURES:
                pending.departures.append(seq)
            seqs.append(seq)
        self.seqs[room] = seq
        self.backlog += len(drafts)
        return Op.ready(seqs)

    def known_ids(self, owner: str, cmids: list[str]) -> dict[str, tuple[str, str, int] | None]:
        find = self.store.find_cmid
        return {cmid: find(owner, cmid) for cmid in cmids}

    def read(
        self, room: str, *, after: int | None, before: int | None, since: float | None, limit: int
    ) -> Op:
        return Op.ready(
            self.store.history(room, after=after, before=before, since=since, limit=limit)
        )

    def append_private(
        self, ts: float, sender: str, recipient: str, cmid: str, data: bytes, from_key: str
    ) -> Op:
        self.store.append_private(ts, sender, recipient, cmid, data, from_key)
        return Op.ready()

    def private_kept(self, sender: str, recipient: str, cmid: str, since: float) -> Op:
        return Op.ready(False)  # known_ids reads the table of every one kept

    def conversation(self, me: str, peer_key: str, since: float | None, limit: int) -> Op:
        return Op.ready(self.store.conversation(me, peer_key, since, limit))

    def privates_to(self, recipient: str, since: float, limit: int) -> Op:
        return Op.ready(self.store.privates_to(recipient, since, limit))

    # ------------------------------------------------------------ edits, search (issue 23)
    def message(self, room: str, seq: int, owner: str) -> Op:
        found = self.store.message(room, seq)
        if found is None or found[1].get("kind") == EventKind.DELETED:
            return Op.ready(None)
        return Op.ready(Stored(found[1], found[0] == owner))

    def search(self, query: Query, rooms: list[str], me: str | None, limit: int) -> Op:
        texts, total = self.store.search(search.expression(query), rooms, me, limit)
        return Op.ready(Found(texts, total))

    def lag(self) -> int:
        """Events logged but not yet in SQLite (-1 if SQLite cannot be read now)."""
        logged = dict(self.seqs)
        try:
            stored = self.store.stored_seqs()
        except sqlite3.Error:
            return -1
        return sum(max(0, seq - stored.get(room, 0)) for room, seq in logged.items())

    def follow(self) -> list[Delivery]:
        """Make this pass's appends durable (one write) and hand them over to publish."""
        self.store.commit()
        if not self._pending:
            return []
        out = list(self._pending.values())
        self._pending.clear()
        self.backlog = 0
        return out


class LocalRegistry:
    """Sessions in memory (a restart ends them all); memberships and room settings in the
    store. Members at the last stop are kept as they were, so their resume-joins are quiet."""

    def __init__(
        self, store: Store, rooms: Iterable[str], operators: Iterable[str], allow_new_rooms: bool
    ) -> None:
        self.store = store
        self.sessions: dict[str, Identity] = {}
        self._companions: dict[str, Identity] = {}  # sid -> an account's further session
        self._members: dict[str, dict[str, Member]] = {}
        for key, name in store.take_members():
            self._members.setdefault(name, {})[key] = Member(key, key, "", "")
        saved = {name: RoomSettings.from_json(d) for name, d in store.room_settings().items()}
        self.rooms: dict[str, RoomSettings] = {}
        op_keys = {m.nick_key(n) for n in operators}
        for name in rooms:
            room = saved.get(name) or RoomSettings(name, topic=store.last_topic(name))
            room.operators |= op_keys
            room.created = False
            self.rooms[name] = room
        if allow_new_rooms:  # rooms made by /join in earlier runs
            for name in [*saved, *store.last_seqs()]:
                if name not in self.rooms:
                    self.rooms[name] = saved.get(name) or RoomSettings(
                        name, topic=store.last_topic(name), created=True
                    )

    def catch_up(self, accounts: bool = False) -> Op:
        return Op.ready()

    # ---------------------------------------------------------------- sessions
    def holder(self, key: str) -> Identity | None:
        return self.sessions.get(key)

    def identities(self) -> Iterable[Identity]:
        return self.sessions.values()

    def claim(self, ident: Identity, replacing: Identity | None) -> Op:
        held = self.sessions.get(ident.key)
        if held is not None and (replacing is None or held.sid != replacing.sid):
            return Op.failed(ProtocolError(Code.NICK_TAKEN, f"the nickname {held.nick} is taken"))
        self.sessions[ident.key] = ident
        return Op.ready()

    def rename(self, ident: Identity, new_nick: str, new_key: str) -> Op:
        held = self.sessions.get(new_key)
        if held is not None and held.sid != ident.sid:
            return Op.failed(ProtocolError(Code.NICK_TAKEN, f"the nickname {held.nick} is taken"))
        old_key = ident.key
        if self.sessions.get(old_key) is ident:
            del self.sessions[old_key]
        ident.nick, ident.key = new_nick, new_key
        self.sessions[new_key] = ident
        for room, members in self._members.items():
            member = members.get(old_key)
            if member is not None and member.sid == ident.sid:
                self.remove_member(room, old_key)
                self.add_member(room, Member(new_nick, new_key, ident.sid, ident.broker))
        return Op.ready()

    def keeps_lost(self) -> bool:
        return False  # no other broker to resume on: a silent session ends now

    def release(self, ident: Identity) -> Op:
        if self.sessions.get(ident.key) is not ident:
            return Op.ready(False)
        del self.sessions[ident.key]
        return Op.ready(True)

    # ---------------------------------------------------------------- devices
    def companions(self, account: str) -> list[Identity]:
        return [c for c in self._companions.values() if c.account == account]

    def companion(self, sid: str) -> Identity | None:
        return self._companions.get(sid)

    def attach(self, ident: Identity) -> Op:
        self._companions[ident.sid] = ident
        return Op.ready()

    def detach(self, ident: Identity) -> Op:
        return Op.ready(self._companions.pop(ident.sid, None) is not None)

    # ---------------------------------------------------------------- membership
    def members(self, room: str) -> dict[str, Member]:
        return self._members.get(room, {})

    def add_member(self, room: str, member: Member) -> Op:
        self._members.setdefault(room, {})[member.key] = member
        self.store.add_member(room, member.key)
        return Op.ready()

    def remove_member(self, room: str, key: str, sid: str | None = None) -> Op:
        members = self._members.get(room, {})
        member = members.get(key)
        if member is not None and (sid is None or member.sid == sid):
            del members[key]
            self.store.remove_member(room, key)
        return Op.ready()

    # ---------------------------------------------------------------- rooms
    def room_names(self) -> list[str]:
        return list(self.rooms)

    def settings(self, room: str) -> RoomSettings | None:
        return self.rooms.get(room)

    def create_room(self, settings: RoomSettings) -> Op:
        if settings.name in self.rooms:
            return Op.ready(False)
        self.rooms[settings.name] = settings
        self.save(settings)
        return Op.ready(True)

    def save(self, settings: RoomSettings) -> Op:
        self.store.save_room(settings.name, json.dumps(settings.to_json()))
        return Op.ready()

    # ---------------------------------------------------------------- CURVE
    def nick_owner(self, key: str) -> str | None:
        return self.store.nick_owner(key)

    def bind_nick(self, key: str, pubkey: str) -> Op:
        self.store.bind_nick(key, pubkey)  # the first key stays (the core checked)
        return Op.ready()


class LocalPresence:
    """One broker holds every session: there is nowhere else to deliver to."""

    def send(self, broker: str, sid: str, kind: Reply, body: dict[str, Any]) -> None:
        log.warning("push %s for session %s on unknown broker %s dropped", kind, sid, broker)

    def silent(self, broker: str, sid: str) -> Op:
        return Op.ready(None)
