"""An account on several devices at once (issue 21): a laptop and a desktop both logged in.

A login of an account that has a session already (on any broker, under the nick it asked for
or the one that session took since) adds a further session under that session's nick, a
companion (Registry.attach), instead of ending the first or taking a second nick. Everything
the account receives, each session receives: room traffic (each session joins the account's
rooms, quietly), private messages to it and those it sent (so a conversation reads the same
everywhere), kicks and bans. What one session does for the account, the others are told:
JOINED (they join the room too, quietly, with JOIN's `follow`: refused if the account has
left the room again since, so that a late follower does not join it anew), LEFT (they are
out of it already), MARKED (their unread counts drop). The nick stays with the account while
any of its sessions lives: when its holder ends, a companion takes it over, with no notice.
A nick change is refused while the account has other sessions (they would be left under the
old nick).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterable
from typing import Any

from zmqchat._core.accounts import Accounts
from zmqchat._core.session import Room, Session
from zmqchat._core.state import Identity, Member, Op, gather
from zmqchat._ops.logs import event as log_event
from zmqchat.protocol import Code, ProtocolError, Reply, Why, nick_key

log = logging.getLogger("zmqchat.broker")


class Devices(Accounts):
    """An account's several sessions: one holds its nick, the others are its companions."""

    # ------------------------------------------------------------------ who is where
    def _others(self, ident: Identity) -> list[Identity]:
        """The account's live sessions besides `ident`, wherever they are."""
        if not ident.account:
            return []
        out = [c for c in self.registry.companions(ident.account) if c.sid != ident.sid]
        holder = self.registry.holder(ident.key)
        if holder is not None and holder.account == ident.account and holder.sid != ident.sid:
            out.insert(0, holder)
        return out

    def _tell_others(self, s: Session, kind: Reply, body: dict[str, Any]) -> None:
        for other in self._others(s.ident):
            super().push_to(other, kind, body)

    def push_to(self, ident: Identity | Member, kind: Reply, body: dict[str, Any]) -> None:
        """A push to an account's session goes to each of its sessions."""
        if isinstance(ident, Identity) and ident.account:
            if ident.sid:
                super().push_to(ident, kind, body)
            for other in self._others(ident):
                super().push_to(other, kind, body)
            return
        super().push_to(ident, kind, body)

    # ------------------------------------------------------------------ logging in
    def _attach(self, ident: Identity, resume: bool) -> Generator[Op, Any, None]:
        """A further session of the account. A resume of one of its companions (the same
        client, its earlier connection lost) takes that one's place."""
        for earlier in self.registry.companions(ident.account):
            if resume and earlier.token_hash == ident.token_hash:
                local = self.by_sid.get(earlier.sid)
                if local is not None:
                    self._drop_quietly(local)
                yield self.registry.detach(earlier)
        yield self.registry.attach(ident)
        log_event(log, "device", account=ident.account, nick=ident.nick, sid=ident.sid)
        if self.registry.holder(ident.key) is not None:
            return
        # its holder ended meanwhile (on another broker that did not know of this session
        # yet): the nick is this session's, else it would be held by nobody (missing from
        # WHO, its companions' nick free)
        try:
            yield self.registry.claim(ident, None)
        except ProtocolError:  # another session of the account took it just now
            return  # this one stays its companion
        log_event(log, "device-heir", account=ident.account, sid=ident.sid, after="")
        yield self.registry.detach(ident)

    def identity_changed(self, key: str, ident: Identity | None) -> None:
        """A nick's holder changed, or a companion's record went (cluster). A session of
        ours under the nick that is neither its holder nor a companion any more was settled
        by another broker (which took ours for dead): it ends, and its client is told. A
        nick freed while a session of ours is one of its account's companions: that broker
        let its holder go without knowing of ours (it ended as ours logged in); ours takes
        the nick over."""
        super().identity_changed(key, ident)
        for s in [s for s in self.by_sid.values() if s.key == key and s.ident.account]:
            if not self._live(key, s.sid):  # its record is gone: another broker settled it
                log_event(log, "ended", nick=s.nick, sid=s.sid, to="")
                self._drop_quietly(s)  # its client comes back (and is a companion again)
                self._push(s, Reply.EXPIRED, {"reason": "your session was ended"})
        if ident is not None:
            return
        heir = next(
            (
                s.ident
                for s in self.by_sid.values()
                if s.key == key and self.registry.companion(s.sid) is not None
            ),
            None,
        )
        if heir is None:
            return
        chosen = heir

        def claimed(op: Op) -> None:
            if op.error is None:  # else another broker's session of the account has it
                log_event(log, "device-heir", account=chosen.account, sid=chosen.sid, after="freed")
                self.registry.detach(chosen)

        self.registry.claim(heir, None).then(claimed)

    def _release(self, ident: Identity) -> Op:
        """A companion ending is let go; a holder with companions hands its nick to one
        of them (ours first), so that the nick never looks free while the account is on.
        Either way the Op's value is False: nothing is to be announced."""
        if not ident.account:
            return super()._release(ident)
        if self.registry.companion(ident.sid) is not None:
            return _no(self.registry.detach(ident))
        heirs = [c for c in self._others(ident) if c.key == ident.key]
        holder = self.registry.holder(ident.key)
        if not heirs or (holder is not None and holder.sid != ident.sid):
            return super()._release(ident)
        heir = next((c for c in heirs if c.sid in self.by_sid), heirs[0])
        claimed = self.registry.claim(heir, holder)
        outer = Op()

        def done(op: Op) -> None:
            if op.error is not None:  # someone else's by now: let go as usual
                super(Devices, self)._release(ident).then(lambda _: outer.resolve(False))
                return
            log_event(log, "device-heir", account=ident.account, sid=heir.sid, after=ident.sid)
            self.registry.detach(heir).then(lambda _: outer.resolve(False))

        claimed.then(done)
        return outer

    def _hand_over(self, ident: Identity, rooms: Iterable[str]) -> list[Op]:
        """A session of an account ends: the rooms' member records that name it name
        another of the account's sessions, or go if there is none."""
        heirs = [c for c in self._others(ident) if c.key == ident.key]
        heir = next((c for c in heirs if c.sid in self.by_sid), heirs[0] if heirs else None)
        ops = []
        for name in rooms:
            mem = self.registry.members(name).get(ident.key)
            if mem is None or mem.sid != ident.sid:
                continue
            if heir is None:
                ops.append(self.registry.remove_member(name, ident.key, ident.sid))
            else:
                ops.append(
                    self.registry.add_member(
                        name, Member(heir.nick, heir.key, heir.sid, heir.broker)
                    )
                )
        return ops

    def _drop(self, s: Session, why: Why, reason: str = "") -> Op:
        if not s.ident.account:
            return super()._drop(s, why, reason)
        pending = self._hand_over(s.ident, sorted(s.rooms))
        for name in sorted(s.rooms):
            self._remove(s, self.rooms[name])
        self._forget(s)
        pending.append(self._release(s.ident))
        log_event(log, "account-away", account=s.ident.account, nick=s.nick, why=str(why))
        return gather(pending)

    def _lose(self, s: Session) -> None:
        """A lost session of an account with other sessions on: it ends quietly."""
        if not self._others(s.ident):
            super()._lose(s)
            return
        log_event(log, "device-lost", account=s.ident.account, sid=s.sid)
        self._hand_over(s.ident, sorted(s.rooms))
        for name in sorted(s.rooms):
            self._remove(s, self.rooms[name])
        self._forget(s)
        self._release(s.ident)

    def reap(self, ident: Identity) -> Op:
        if not ident.account:
            return super().reap(ident)
        pending = self._hand_over(ident, list(self.rooms))
        pending.append(self._release(ident))
        return gather(pending)

    def _may_take(self, s: Session, nick: str, key: str) -> None:
        super()._may_take(s, nick, key)
        others = self._others(s.ident)
        if others and key != s.key:
            raise ProtocolError(
                Code.NOT_ALLOWED,
                f"your account is logged in on {len(others)} other "
                f"connection{'s' if len(others) > 1 else ''}: a nick change is for an account "
                "logged in once",
            )

    # ------------------------------------------------------------------ rooms
    def _on_join(self, s: Session, req: Any) -> Generator[Op, Any, dict[str, Any]]:
        if req.body["follow"]:  # after JOINED: the account may have left the room since
            yield self.registry.catch_up(accounts=True)  # its JOIN, or a LEAVE, just now
            account = self.logged_in.get(s.sid)
            if account is None or req.body["room"] not in self.accounts.kept(account).rooms:
                raise ProtocolError(
                    Code.NOT_MEMBER, f"your account is not in {req.body['room']} any more"
                )
        reply: dict[str, Any] = yield from super()._on_join(s, req)
        if s.ident.account and "mark" not in reply:  # the account's new room
            self._tell_others(s, Reply.JOINED, {"room": reply["room"]})
        return reply

    def _on_leave(self, s: Session, req: Any) -> Generator[Op, Any, dict[str, Any]]:
        reply: dict[str, Any] = yield from super()._on_leave(s, req)
        if not s.ident.account:
            return reply
        name = reply["room"]
        room = self.rooms[name]
        for other in self._others(s.ident):
            local = self.by_sid.get(other.sid)
            if local is not None and name in local.rooms:
                self._remove(local, room)
            super().push_to(other, Reply.LEFT, {"room": name})  # routed() takes it out there
        yield self.registry.remove_member(name, s.key)
        return reply

    def routed(self, sid: str, kind: Reply, body: dict[str, Any]) -> None:
        """LEFT from another broker: this session is out of the room, and so is the member
        record that names it (that broker's remove may have gone by an older record).
        MARKED: the mark counts here at once (the session asks its unread counts next)."""
        s = self.by_sid.get(sid)
        room = str(body.get("room"))
        if kind is Reply.LEFT and s is not None and room in s.rooms:
            self.registry.remove_member(room, s.key, s.sid)
        account = self.logged_in.get(sid) if kind is Reply.MARKED else None
        if account is not None:
            if isinstance(body.get("seq"), int):
                self.accounts.heard_mark(account, room, "", body["seq"])
            elif isinstance(body.get("with"), str) and isinstance(body.get("ts"), (int, float)):
                self.accounts.heard_mark(account, None, nick_key(body["with"]), body["ts"])
        super().routed(sid, kind, body)

    def _kick(self, s: Session, room: Room, target: Member, reason: str, kind: Any) -> Op:
        op = super()._kick(s, room, target, reason, kind)
        holder = self.registry.holder(target.key)
        if holder is not None and holder.sid == target.sid:
            return op
        other = self.registry.companion(target.sid)  # the record named a companion
        account = self.accounts.account(other.account) if other is not None else None
        return op if account is None else gather([op, self.accounts.part(account, room.name)])


def _no(op: Op) -> Op:
    """`op`, whose value is False once it is done."""
    outer = Op()
    op.then(lambda done: outer.fail(done.error) if done.error else outer.resolve(False))
    return outer
