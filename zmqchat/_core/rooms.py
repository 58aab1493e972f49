"""The commands about rooms: JOIN, LEAVE, SAY, ROOMS, WHO, TOPIC and HISTORY."""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any, Final

from zmqchat import protocol as m
from zmqchat._core.base import MIN_REPLAY_TOKEN, CoreBase, Handler, Result, _Raw
from zmqchat._core.session import Session, Stage
from zmqchat._core.state import Draft, Member, Op, RoomSettings, gather
from zmqchat._ops.logs import event as log_event
from zmqchat.protocol import Code, EventKind, Kind, ProtocolError, Why

log = logging.getLogger("zmqchat.broker")

MAX_ROOMS: Final = 1000  # rooms /join may create: one client cannot fill memory


class Rooms(CoreBase):
    def handler_table(self) -> dict[Kind, Handler]:
        return {
            **super().handler_table(),
            Kind.JOIN: self._on_join,
            Kind.LEAVE: self._on_leave,
            Kind.SAY: self._on_say,
            Kind.ROOMS: self._on_rooms,
            Kind.WHO: self._on_who,
            Kind.TOPIC: self._on_topic,
            Kind.HISTORY: self._on_history,
        }

    def _on_join(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        name = req.body["room"]
        yield self.registry.catch_up()  # a ban made on another broker just now
        room = self.rooms.get(name)
        if room is None and self.rules.allow_new_rooms:
            if len(self.rooms) >= MAX_ROOMS:
                raise ProtocolError(Code.TOO_LARGE, f"there are {MAX_ROOMS} rooms already")
            created = yield self.registry.create_room(
                RoomSettings(name, operators={s.key}, created=True)
            )
            room = self.add_room(name)
            if created:
                log_event(log, "room-created", room=name, by=s.nick)
        room = self._room(name) if room is None else room
        if s.ident.principal in self._settings(room).bans:
            raise ProtocolError(Code.BANNED, f"you are banned from {name}")
        before = self.room_log.last(name)
        if s.sid not in room.members:
            room.members[s.sid] = s
            s.rooms.add(name)
            was = self.registry.members(name).get(s.key)
            added = self.registry.add_member(name, Member(s.nick, s.key, s.sid, self.name))
            if (
                not (req.body["resume"] and was is not None)
                and not req.body["follow"]  # an account's other device, after JOINED
                and not self._returning(s, name)
            ):
                joined = self._append(room, EventKind.JOIN, s, f"{s.nick} joined", bot=s.ident.bot)
                seqs, _ = yield gather([joined, added])
                before = seqs[0] - 1
            else:
                yield added
                # read now: a broker that follows the room from this join on knows it now
                before = self.room_log.last(name)
        if s.stage is not Stage.LIVE:  # the session ended meanwhile (its client resumed
            # on another connection, say): the client says HELLO again
            raise ProtocolError(Code.NO_HELLO, "your session ended meanwhile: say HELLO again")
        if s.sid not in room.members:  # out of the room meanwhile (kicked, say)
            raise ProtocolError(Code.NOT_MEMBER, f"you are not in {name} any more")
        members, ops = self._listing(room)
        return {
            "room": name,
            "seq": before,
            "grant": self._grant(s, room),
            "topic": self._settings(room).topic,
            "members": members,
            "ops": ops,
        }

    def _on_leave(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        room = self._member_room(s, req.body["room"])
        yield self._leave(s, room, Why.PART)
        return {"room": room.name}

    def _on_say(self, s: Session, req: m.Request) -> Result:
        room = self._member_room(s, req.body["room"])
        msgs = req.body["msgs"]
        owner = s.ident.owner
        known = self.room_log.known_ids(owner, [item["id"] for item in msgs])  # ours only
        self._charge(s, sum(1 for prior in known.values() if prior is None))  # retries free
        extra: dict[str, Any] | None = {"bot": True} if s.ident.bot else None
        if req.body["relay"]:
            extra = {**(extra or {}), "relay": req.body["relay"]}
        if req.body["hops"] is not None:
            extra = {**(extra or {}), "hops": req.body["hops"]}
        if req.body["re"] is not None:  # a reply (issue 23: edits.py checked the message)
            extra = {**(extra or {}), "re": req.body["re"], "re_nick": req.body["re_nick"]}
        drafts: list[Draft] = []
        fresh: dict[str, int] = {}
        for item in msgs:
            cmid = item["id"]
            if known[cmid] is None and cmid not in fresh:  # a repeat in the batch: a retry
                kind = EventKind.ACTION if item["action"] else EventKind.MSG
                fresh[cmid] = len(drafts)
                drafts.append(Draft(kind, s.nick, item["text"], owner, cmid, extra))
        op = self._store(room.name, drafts, req.body["heard"]) if drafts else Op.ready([])
        if not op.done:  # a cluster: answered once it has stored them
            return self._say_stored(room.name, msgs, known, fresh, op)
        if op.error is not None:
            raise op.error
        return _acks(room.name, msgs, known, fresh, op.value)

    def _say_stored(
        self,
        room: str,
        msgs: list[dict[str, Any]],
        known: dict[str, tuple[str, str, int] | None],
        fresh: dict[str, int],
        op: Op,
    ) -> Generator[Op, Any, bytes]:
        seqs = yield op
        return _acks(room, msgs, known, fresh, seqs)

    def _on_rooms(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        out = []
        for room in self.rooms.values():
            count = sum(
                1 for mem in self.registry.members(room.name).values() if self._present(mem)
            )
            out.append(
                {
                    "name": room.name,
                    "members": count,
                    "topic": self._settings(room).topic,
                    "seq": self.room_log.last(room.name),
                }
            )
        return {"rooms": out}

    def _on_who(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        name = req.body["room"]
        if name is None:
            return {"room": None, "members": sorted(i.nick for i in self.registry.identities())}
        members, ops = self._listing(self._room(name))
        return {"room": name, "members": members, "ops": ops}

    def _on_topic(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        room = self._member_room(s, req.body["room"])
        yield self.registry.catch_up()
        settings = self._settings(room)
        text, lock = req.body["text"], req.body["lock"]
        ops = []
        if lock is not None:  # operators choose whether only they may set the topic
            if s.ident.principal not in settings.operators:
                raise ProtocolError(Code.NOT_OPERATOR, f"you are not an operator of {room.name}")
            settings.locked = lock
            log_event(log, "locked" if lock else "unlocked", room=room.name, by=s.nick)
            ops.append(self.registry.save(settings))
            ops.append(
                self._append(
                    room,
                    EventKind.NOTICE,
                    s,
                    f"{s.nick} {'locked' if lock else 'unlocked'} the topic"
                    + (" (operators only)" if lock else ""),
                )
            )
        if text is None:
            yield gather(ops)
            return {"room": room.name, "topic": settings.topic, "locked": settings.locked}
        if settings.locked and s.ident.principal not in settings.operators:
            raise ProtocolError(Code.NOT_OPERATOR, f"only operators set the topic of {room.name}")
        if any(ord(c) < 32 for c in text):
            raise ProtocolError(Code.BAD_REQUEST, "a topic is one line of text")
        settings.topic = text
        log_event(log, "topic", room=room.name, by=s.nick, topic=text)
        ops.append(self.registry.save(settings))
        ops.append(
            self._append(
                room,
                EventKind.TOPIC,
                s,
                text,
                locked=settings.locked,
                note=f"{s.nick} set the topic: {text}" if text else f"{s.nick} cleared the topic",
            )
        )
        yield gather(ops)
        return {"room": room.name, "topic": text, "locked": settings.locked}

    def _on_history(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        b = req.body
        if b["with"] is not None:  # a private conversation, which only its two parties read
            if not s.replayable:
                raise ProtocolError(
                    Code.NOT_ALLOWED,
                    "private history needs a proven "
                    "identity: a CURVE key or a resume token of "
                    f"{MIN_REPLAY_TOKEN}+ characters",
                )
            texts = yield self.room_log.conversation(
                s.ident.owner, m.nick_key(b["with"]), b["since"], b["limit"]
            )
            return {"with": b["with"], "events": _Raw(texts)}
        room = self._member_room(s, b["room"])
        texts = yield self.room_log.read(
            room.name, after=b["after"], before=b["before"], since=b["since"], limit=b["limit"]
        )
        # Stored JSON goes out as it is: spliced, not re-encoded.
        return {"room": room.name, "seq": self.room_log.last(room.name), "events": _Raw(texts)}


def _acks(
    room: str,
    msgs: list[dict[str, Any]],
    known: dict[str, tuple[str, str, int] | None],
    fresh: dict[str, int],
    seqs: list[int],
) -> bytes:
    """A SAY's reply, written directly: {"room": ..., "acks": [[id, seq], ...]}."""
    acks = []
    for item in msgs:
        cmid = item["id"]
        at = fresh.get(cmid)
        seq = seqs[at] if at is not None else known[cmid][2]  # type: ignore[index]
        acks.append(f"[{m.quote(cmid)},{seq}]")
    return f'{{"room":"{room}","acks":[{",".join(acks)}]}}'.encode()
