"""The room operators' commands: KICK, BAN and UNBAN."""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

from zmqchat import protocol as m
from zmqchat._core.base import CoreBase, Handler
from zmqchat._core.session import Room, Session
from zmqchat._core.state import Draft, Member, Op, RoomSettings, gather
from zmqchat._ops.logs import event as log_event
from zmqchat.protocol import Code, EventKind, Kind, ProtocolError, Reply

log = logging.getLogger("zmqchat.broker")


class Moderation(CoreBase):
    def handler_table(self) -> dict[Kind, Handler]:
        return {
            **super().handler_table(),
            Kind.KICK: self._on_kick,
            Kind.BAN: self._on_ban,
            Kind.UNBAN: self._on_unban,
        }

    def _op_room(self, s: Session, req: m.Request) -> tuple[Room, RoomSettings]:
        room = self._member_room(s, req.body["room"])
        settings = self._settings(room)
        if s.ident.principal not in settings.operators:
            raise ProtocolError(Code.NOT_OPERATOR, f"you are not an operator of {room.name}")
        return room, settings

    def _kick(self, s: Session, room: Room, target: Member, reason: str, kind: EventKind) -> Op:
        """Out of the room with a notice (before the removal, so the target sees it), on
        whichever broker it is: ours now, another when that one publishes the notice."""
        verb = "kicked" if kind is EventKind.KICK else "banned"
        text = f"{target.nick} was {verb} by {s.nick}" + (f" ({reason})" if reason else "")
        op = self._append(room, kind, target, text, by=s.nick, reason=reason)
        log_event(
            log,
            "kicked",
            nick=target.nick,
            room=room.name,
            by=s.nick,
            ban=kind is EventKind.BAN,
            reason=reason,
        )
        gone = self.registry.remove_member(room.name, target.key, target.sid)
        for local in self._locals_by_key(target.key):  # an account's every session here
            if local.sid not in room.members:
                continue
            self._remove(local, room)
            self._push(
                local,
                Reply.KICKED,
                {"room": room.name, "by": s.nick, "reason": reason, "kind": str(kind)},
            )
        return gather([op, gone])

    def _target(self, room: Room, nick: str) -> Member | None:
        member = self.registry.members(room.name).get(m.nick_key(nick))
        return member if member is not None and self._present(member) else None

    def _target_by_principal(self, room: Room, principal: str) -> Member | None:
        """The member of a room that an account is in under another nick, if any."""
        for member in self.registry.members(room.name).values():
            ident = self.registry.holder(member.key) or self.registry.companion(member.sid)
            if (
                ident is not None
                and self._live(member.key, member.sid)
                and ident.principal == principal
            ):
                return member
        return None

    def _on_kick(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        room, _ = self._op_room(s, req)
        target = self._target(room, req.body["nick"])
        if target is None:
            raise ProtocolError(Code.NO_SUCH_NICK, f"{req.body['nick']} is not in {room.name}")
        yield self._kick(s, room, target, req.body["reason"] or "", EventKind.KICK)
        return {"room": room.name, "nick": target.nick}

    def _on_ban(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        room, settings = self._op_room(s, req)
        nick, reason = req.body["nick"], req.body["reason"] or ""
        banned = self._principal_of(nick)
        settings.bans.add(banned)
        saved = self.registry.save(settings)
        target = self._target(room, nick) or self._target_by_principal(room, banned)
        if target is not None:
            yield gather([saved, self._kick(s, room, target, reason, EventKind.BAN)])
        else:
            log_event(log, "banned", nick=nick, room=room.name, by=s.nick, reason=reason)
            yield saved
            yield self._store(
                room.name,
                [
                    Draft(
                        EventKind.BAN,
                        nick,
                        f"{nick} was banned by {s.nick}",
                        m.nick_key(nick),
                        None,
                        {"by": s.nick, "reason": reason},
                    )
                ],
            )
        return {"room": room.name, "nick": nick}

    def _on_unban(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        yield self.registry.catch_up()
        room, settings = self._op_room(s, req)
        keys = {m.nick_key(req.body["nick"]), self._principal_of(req.body["nick"])}
        if not keys & settings.bans:  # a typo must not look like it worked, to everyone
            raise ProtocolError(
                Code.NO_SUCH_NICK, f"{req.body['nick']} is not banned from {room.name}"
            )
        settings.bans -= keys
        log_event(log, "unbanned", nick=req.body["nick"], room=room.name, by=s.nick)
        yield self.registry.save(settings)
        yield self._append(
            room, EventKind.NOTICE, s, f"{req.body['nick']} was unbanned by {s.nick}"
        )
        return {"room": room.name, "nick": req.body["nick"]}
