"""The core's machinery, shared by every part of it: requests in, exactly one reply out;
sessions and their departures; publishing a room's durable events, with its topic changed
after every departure; subscriptions approved only for fresh grants; liveness.

The core answers through two effect lists that the broker's loop sends (`outbox`: frames for
the ROUTER, replies and pushes; `pubs`: topic and batch frames for the XPUB) and through the
shared state's interfaces (state.py). A subscription is approved or refused on the spot
(`subscription()` returns what the XPUB must do at once, since XPUB_MANUAL applies it to the
pipe just read).

Handlers take (session, request). One that needs the shared state to agree first (an append
acknowledged, a nick claimed) is a generator: it yields the pending Op and is resumed with
its value when it is done, at once on a single broker, later in a cluster; its reply goes
out then. Every request gets exactly one reply, whatever happens in between. The commands
themselves are in the modules beside this one (sessions, rooms, moderation), each a part of
`Core` (core.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Collection, Generator, Iterator
from typing import Any, Final

from zmqchat import protocol as m
from zmqchat._core.rules import Bucket, Clock, Rules, SystemClock, Tokens, system_tokens
from zmqchat._core.session import Room, Session, Stage, Turn
from zmqchat._core.state import (
    Delivery,
    Draft,
    Identity,
    Member,
    Op,
    Presence,
    Registry,
    RoomLog,
    RoomSettings,
    gather,
)
from zmqchat._core.stats import Stats
from zmqchat._ops.logs import Throttle
from zmqchat._ops.logs import event as log_event
from zmqchat.protocol import Code, EventKind, Kind, ProtocolError, Reply, Why

log = logging.getLogger("zmqchat.broker")

# Commands that change rooms cost one rate-limit token each (SAY and PRIV pay per message).
CHARGED: Final = frozenset(
    {Kind.JOIN, Kind.LEAVE, Kind.NICK, Kind.TOPIC, Kind.KICK, Kind.BAN, Kind.UNBAN}
)
BATCH_EVENTS: Final = 256  # events per published frame: keeps frames well under 64 KiB
GRANT_TTL: Final = 120  # seconds a grant may wait before it is used
MIN_REPLAY_TOKEN: Final = 16  # a shorter resume token proves too little for private history
# Requests refused as sent (a client's bug, or someone probing): logged at INFO, with the
# sender's address, at most MALFORMED_LOGS a second (a flood must not flood the log too).
MALFORMED: Final = frozenset(
    {Code.BAD_REQUEST, Code.BAD_VERSION, Code.UNKNOWN_COMMAND, Code.TOO_LARGE}
)
MALFORMED_LOGS: Final = 10
DISK_TOLD_EVERY: Final = 10.0  # seconds between errors saying requests fail on the disk
_OK: Final = b"OK"
_SAY: Final = [b"SAY"]

LATER: Final = object()  # a handler's result: it sends its one reply itself, later (files)
Result = dict[str, Any] | bytes | Generator[Op, Any, dict[str, Any] | bytes] | object
Handler = Callable[[Session, m.Request], Result]
Opener = Callable[[bytes, Session | None, m.Request, str], Result]


class CoreBase:
    """The state and machinery every command handler uses; see the module docstring."""

    def __init__(
        self,
        rules: Rules,
        room_log: RoomLog,
        registry: Registry,
        presence: Presence,
        *,
        name: str,
        pub_port: int,
        motd: str,
        clock: Clock | None = None,
        tokens: Tokens = system_tokens,
    ) -> None:
        self.rules, self.room_log, self.registry, self.presence = (
            rules,
            room_log,
            registry,
            presence,
        )
        self.name, self.pub_port, self.motd = name, pub_port, motd
        self.clock: Clock = clock or SystemClock()
        self.tokens = tokens
        self.grant_secret = bytes.fromhex(tokens(32))  # signs grants
        self.rooms: dict[str, Room] = {}
        for room in registry.room_names():
            self.add_room(room)
        self.by_rid: dict[bytes, Session] = {}
        self.by_sid: dict[str, Session] = {}
        self.used_nonces: dict[str, float] = {}
        # A connection's requests are handled in the order they came (see Turn).
        self.turns: dict[bytes, Turn] = {}
        self.outbox: list[list[bytes]] = []  # [rid, kind, label, body] to send
        self.pubs: list[tuple[bytes, bytes]] = []  # (topic, batch) to publish
        self.stats = Stats()
        self.ack_starts: list[float] = []  # arrival times of the SAYs answered in outbox
        self.peer: Callable[[bytes], str] = _no_peer  # the loop says where a request came from
        self.malformed_lines = Throttle(MALFORMED_LOGS)
        self.disk_told = -DISK_TOLD_EVERY  # (monotonic) when requests failing on it were said
        self.handlers: dict[Kind, Handler] = self.handler_table()
        self.openers: dict[Kind, Opener] = self.opener_table()

    def _on_hello(self, rid: bytes, session: Session | None, req: m.Request, pubkey: str) -> Result:
        """HELLO, which starts a session (sessions.py)."""
        raise NotImplementedError

    def handler_table(self) -> dict[Kind, Handler]:
        """Every command's handler but the openers'. Each part of the core adds its own commands
        to what the parts after it in the method order give (`super().handler_table()`)."""
        return {}

    def opener_table(self) -> dict[Kind, Opener]:
        """The commands a connection may send without a session: HELLO, and what may come
        before it (a login's AUTH). Their handlers get the connection and its session, if any."""
        return {Kind.HELLO: self._on_hello}

    # ------------------------------------------------------------------ state.Listener
    def room_added(self, name: str) -> None:
        self.add_room(name)

    def local_sids(self) -> Collection[str]:
        return self.by_sid.keys()

    def silent_for(self, sid: str) -> float | None:
        s = self.by_sid.get(sid)
        return None if s is None else self.clock.monotonic() - s.last_seen

    def add_room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, self.tokens(8), published=self.room_log.last(name))
        return room

    def request(self, rid: bytes, frames: list[bytes], pubkey: str = "") -> None:
        """One request from a connection: exactly one reply, now or once it is decided."""
        turn = self.turns.get(rid)
        if turn is not None and not turn.may_start(frames[0] if frames else b""):
            turn.queue.append((frames, pubkey))
            return
        self._handle(rid, frames, pubkey)

    def _handle(self, rid: bytes, frames: list[bytes], pubkey: str) -> None:
        arrived = self.clock.monotonic() if frames[:1] == _SAY else 0.0  # its ack's latency
        label = m.decode_label(frames)
        session = self.by_rid.get(rid)
        try:
            req = m.decode_request(frames)
            self.stats.requests[req.kind] += 1
            log.debug("<- %s %s", req.kind, session.nick if session else rid.hex())
            opener = self.openers.get(req.kind)
            if opener is not None:
                result: Result = opener(rid, session, req, pubkey)
            elif session is None:
                raise ProtocolError(Code.NO_HELLO, "say HELLO first")
            elif self.rules.keys_required and pubkey != session.ident.pubkey:
                raise ProtocolError(Code.NO_HELLO, "say HELLO first")  # a stolen routing id
            else:
                session.last_seen = self.clock.monotonic()
                if req.kind in CHARGED:
                    self._charge(session, 1)
                result = self.handlers[req.kind](session, req)
        except ProtocolError as err:
            self._error(rid, label, err)
            return
        except Exception:  # a bug: still exactly one reply, and the loop goes on
            log.exception("error handling %r from %s", [f[:64] for f in frames[:2]], rid.hex())
            self._error(
                rid, label, ProtocolError(Code.INTERNAL, "the broker failed on this request")
            )
            return
        if result is LATER:
            return
        if isinstance(result, (dict, bytes)):
            self.outbox.append([rid, _OK, label, _dumps_with_raw(result)])
            if arrived:
                self.ack_starts.append(arrived)
        elif not self._step(rid, label, result, Op.ready(), arrived):  # type: ignore[arg-type]
            turn = self.turns.get(rid)  # it waits for the shared state
            if turn is None:
                turn = self.turns[rid] = Turn()
            turn.started(req.kind is Kind.SAY)

    def _resume(
        self,
        rid: bytes,
        label: bytes,
        gen: Generator[Op, Any, dict[str, Any] | bytes],
        op: Op,
        arrived: float,
    ) -> None:
        """A waiting handler's Op is done: run it on; once it has answered, its
        connection's requests that waited behind it go."""
        if not self._step(rid, label, gen, op, arrived):
            return
        turn = self.turns.get(rid)
        if turn is None:
            return
        turn.finished(bool(arrived))
        while turn.queue and turn.may_start(turn.queue[0][0][0] if turn.queue[0][0] else b"", True):
            frames, pubkey = turn.queue.popleft()
            self._handle(rid, frames, pubkey)
        if turn.idle():
            del self.turns[rid]

    def _step(
        self,
        rid: bytes,
        label: bytes,
        gen: Generator[Op, Any, dict[str, Any] | bytes],
        op: Op,
        arrived: float,
    ) -> bool:
        """Run the handler on; True once it has answered, False if it waits again."""
        while True:
            try:
                if op.error is not None:
                    op = gen.throw(op.error)
                else:
                    op = gen.send(op.value)
            except StopIteration as done:
                self.outbox.append([rid, _OK, label, _dumps_with_raw(done.value)])
                if arrived:
                    self.ack_starts.append(arrived)
                return True
            except ProtocolError as err:
                self._error(rid, label, err)
                return True
            except OSError as exc:  # the disk (full, gone): this request may work later
                now = self.clock.monotonic()
                if now - self.disk_told >= DISK_TOLD_EVERY:
                    log.error("requests fail: the broker cannot use its files: %s", exc)
                    self.disk_told = now
                self._error(
                    rid,
                    label,
                    ProtocolError(Code.UNAVAILABLE, "the broker cannot read its files now"),
                )
                return True
            except Exception:
                log.exception("error handling a request from %s", rid.hex())
                self._error(
                    rid, label, ProtocolError(Code.INTERNAL, "the broker failed on this request")
                )
                return True
            if not op.done:
                op.then(lambda op: self._resume(rid, label, gen, op, arrived))
                return False

    def _error(self, rid: bytes, label: bytes, err: ProtocolError) -> None:
        log.debug("-> ERROR %s %s", err.code, err.reason)
        self.stats.errors[err.code] += 1
        if err.code in MALFORMED:
            self._log_malformed(rid, err)
        self.outbox.append([rid, *m.encode_error(label, err)])

    def _log_malformed(self, rid: bytes, err: ProtocolError) -> None:
        """One line for a malformed request, with who sent it, unless too many came."""
        if not log.isEnabledFor(logging.INFO):
            return
        held = self.malformed_lines.allow(self.clock.monotonic())
        if held is None:
            return
        s = self.by_rid.get(rid)
        fields: dict[str, Any] = {"code": str(err.code), "reason": err.reason}
        fields.update(peer=self.peer(rid), rid=rid.hex(), **({"nick": s.nick} if s else {}))
        if held:
            fields["unlogged"] = held  # malformed requests not logged since the last line
        log_event(log, "malformed", **fields)

    def _push(self, s: Session, kind: Reply, body: dict[str, Any]) -> None:
        self.outbox.append([s.rid, *m.encode_reply(kind, b"", body)])

    def push_to(self, ident: Identity | Member, kind: Reply, body: dict[str, Any]) -> None:
        """A push to a session wherever it is: here, or through its broker."""
        s = self.by_sid.get(ident.sid)
        if s is not None:
            self._push(s, kind, body)
        elif ident.broker and ident.broker != self.name:
            self.presence.send(ident.broker, ident.sid, kind, body)

    def _tell_others(self, s: Session, kind: Reply, body: dict[str, Any]) -> None:
        """A push for the other sessions of this session's account (accounts.py)."""

    def routed(self, sid: str, kind: Reply, body: dict[str, Any]) -> None:
        """A push another broker sent to one of our sessions (gone meanwhile: dropped)."""
        s = self.by_sid.get(sid)
        if s is None:
            return
        if kind in (Reply.KICKED, Reply.LEFT):
            room = self.rooms.get(str(body.get("room")))
            if room is None or s.sid not in room.members:
                return
            self._remove(s, room)
        self._push(s, kind, body)

    def deliver(self, d: Delivery) -> None:
        """Publish a room's new durable events to this broker's subscribers, in order.
        The topic changes right after each departure and wherever a re-key is due (what
        came before, the leave notice included, still goes out on the old topic, so the
        members who stay see it live; nothing after it reaches the departed)."""
        room = self.rooms.get(d.room)
        if room is None:
            room = self.add_room(d.room)
        if not d.departures and room.rekey_after is None and d.first == room.published + 1:
            self._publish(room, d.events)  # the usual case: nothing to cut at
            room.published += len(d.events)
            return
        i, n = max(room.published - d.first + 1, 0), len(d.events)  # a cluster may repeat
        ends = {seq - d.first + 1 for seq in d.departures if seq > room.published}
        while i < n:
            cut = min((c for c in ends if c > i), default=n)
            while cut + 1 in ends:  # a run of departures (a sweep): one re-key after it
                cut += 1
            if room.rekey_after is not None:
                cut = max(min(cut, room.rekey_after - d.first + 1), i + 1)
            self._publish(room, d.events[i:cut])
            room.published = d.first + cut - 1
            left = [c for c in ends if i < c <= cut]
            for c in sorted(left):
                self._departed_here(room, d.events[c - 1])
            if left:
                self._rekey_after(room, room.published)
            elif room.rekey_after is not None and room.rekey_after <= room.published:
                self._rotate(room)
            i = cut
        if room.rekey_after is not None and room.rekey_after <= room.published:
            self._rotate(room)

    def _publish(self, room: Room, events: list[bytes]) -> None:
        topic = m.room_topic(room.name, room.epoch)
        if len(events) == 1:
            self.pubs.append((topic, b"[" + events[0] + b"]"))
            return
        for i in range(0, len(events), BATCH_EVENTS):
            self.pubs.append((topic, b"[" + b",".join(events[i : i + BATCH_EVENTS]) + b"]"))

    def _departed_here(self, room: Room, data: bytes) -> None:
        """A kick or ban of one of our sessions that another broker made: it is out here."""
        if b'"kind":"kick"' not in data and b'"kind":"ban"' not in data:
            return
        ev = json.loads(data)
        if ev.get("kind") not in ("kick", "ban"):
            return
        for target in self._locals_by_key(m.nick_key(str(ev.get("nick", "")))):
            if target.sid not in room.members:
                continue
            self._remove(target, room, rekey=False)  # the caller re-keys after the notice
            self._push(
                target,
                Reply.KICKED,
                {
                    "room": room.name,
                    "by": ev.get("by", ""),
                    "reason": ev.get("reason", ""),
                    "kind": ev["kind"],
                },
            )

    def _locals_by_key(self, key: str) -> list[Session]:
        """Our sessions under a nick: its holder's, and an account's further ones."""
        return [s for s in self.by_sid.values() if s.key == key and self._live(key, s.sid)]

    def _live(self, key: str, sid: str) -> bool:
        """Whether session `sid` is one under nick `key` now: the nick's holder, or one of
        its account's further sessions (devices)."""
        ident = self.registry.holder(key)
        if ident is not None and ident.sid == sid:
            return True
        other = self.registry.companion(sid)
        return other is not None and other.key == key

    def _rekey_after(self, room: Room, seq: int) -> None:
        room.rekey_after = seq if room.rekey_after is None else max(room.rekey_after, seq)
        if room.rekey_after <= room.published:
            self._rotate(room)

    def _rotate(self, room: Room) -> None:
        """Change a room's topic so departed connections hear nothing; re-grant the rest."""
        room.rekey_after = None
        room.epoch = self.tokens(8)
        for s in room.members.values():
            self._push(s, Reply.GRANT, {"room": room.name, "grant": self._grant(s, room)})

    def _grant(self, s: Session, room: Room) -> str:
        payload = m.grant_payload(
            room.name, room.epoch, s.sid, int(self.clock.time()) + GRANT_TTL, self.tokens(8)
        )
        return payload + "." + self._mac(payload)

    def _mac(self, payload: str) -> str:
        return hmac.new(self.grant_secret, payload.encode(), hashlib.sha256).hexdigest()[:32]

    def subscription(self, data: bytes, pubkey: str = "") -> tuple[bytes | None, bytes | None]:
        """A subscription message from the XPUB: (topic to drop, topic to approve) for the
        connection it came from, if `data` is a fresh, valid, unused grant of a member."""
        parsed = m.parse_grant(data)
        if parsed is None:
            log_event(log, "subscription-refused", why="not a grant", data=data[:40])
            return None, None
        name, epoch, sid, expiry, nonce, mac = parsed
        payload = m.grant_payload(name, epoch, sid, expiry, nonce)
        room, s = self.rooms.get(name), self.by_sid.get(sid)
        if (
            not hmac.compare_digest(mac, self._mac(payload))
            or expiry < self.clock.time()
            or nonce in self.used_nonces
            or room is None
            or room.epoch != epoch
            or s is None
            or sid not in room.members
            or (self.rules.keys_required and pubkey != s.ident.pubkey)
        ):
            log_event(log, "subscription-refused", why="stale, used or forged", room=name)
            return None, None
        self.used_nonces[nonce] = expiry
        topic = m.room_topic(name, epoch)
        old = s.topics.get(name)
        s.topics[name] = topic
        self._push(s, Reply.LIVE, {"room": name, "seq": room.published})
        return (old if old is not None and old != topic else None), topic

    def _room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            raise ProtocolError(
                Code.ROOM_UNKNOWN,
                f"no room {name!r}; rooms: {', '.join(self.rooms)}",
                rooms=list(self.rooms),
            )
        return room

    def _member_room(self, s: Session, name: str) -> Room:
        room = self._room(name)
        if s.sid not in room.members:
            raise ProtocolError(Code.NOT_MEMBER, f"you are not in {name}: join it first")
        return room

    def _settings(self, room: Room) -> RoomSettings:
        settings = self.registry.settings(room.name)
        return settings if settings is not None else RoomSettings(room.name)

    def _listing(self, room: Room) -> tuple[list[str], list[str]]:
        """(members, operators among them) of a room, cluster-wide, sorted."""
        operators = self._settings(room).operators
        here = [
            (mem, ident)
            for mem in self.registry.members(room.name).values()
            if self._live(mem.key, mem.sid)
            and (ident := self.registry.holder(mem.key) or self.registry.companion(mem.sid))
        ]
        return (
            sorted(mem.nick for mem, _ in here),
            sorted(mem.nick for mem, ident in here if ident.principal in operators),
        )

    def _principal_of(self, nick: str) -> str:
        """Whom a nick names for a ban: the account of the session holding it, if it has
        one (a registered nick is its account's key); else the nick."""
        key = m.nick_key(nick)
        ident = self.registry.holder(key)
        return ident.principal if ident is not None else key

    def _returning(self, s: Session, room: str) -> bool:
        """Whether a session comes back to a room it never left (an account's room): its
        JOIN makes no notice. Guests come back only with a resume (rooms.py)."""
        return False

    def _replaced(self, s: Session, by: Identity) -> None:
        """A session whose nick another client took (an account's login elsewhere): told
        so, and not to come back by itself (a resume of the same client tells nothing)."""
        if by.token_hash != s.ident.token_hash:
            self._push(s, Reply.EXPIRED, replaced(by))

    def _present(self, mem: Member) -> bool:
        """Whether a member record is held by the session now holding its nick."""
        return self._live(mem.key, mem.sid)

    def _append(
        self, room: Room, kind: EventKind, s: Session | Identity | Member, text: str, **extra: Any
    ) -> Op:
        nick = s.nick
        return self._store(
            room.name, [Draft(kind, nick, text, m.nick_key(nick), None, extra or None)]
        )

    def _store(self, room: str, drafts: list[Draft], heard: int | None = None) -> Op:
        """Append events to a room's log (counted by kind)."""
        events = self.stats.events
        for d in drafts:
            events[d.kind] += 1
        return self.room_log.append(room, drafts, heard)

    def _remove(self, s: Session, room: Room, *, rekey: bool = True) -> None:
        """Take a session of ours out of a room's audience and re-key the room once all
        that was appended so far is published (its leave notice, if any, included)."""
        room.members.pop(s.sid, None)
        s.rooms.discard(room.name)
        s.topics.pop(room.name, None)
        if rekey:
            self._rekey_after(room, self.room_log.last(room.name))

    def _leave(self, s: Session, room: Room, why: Why, reason: str = "") -> Op:
        """A departure with its notice: out of the room here and in the registry."""
        op = self._append(
            room,
            EventKind.LEAVE,
            s,
            leave_text(s.nick, why, reason),
            why=why,
            reason=reason,
            bot=s.ident.bot,
        )
        gone = self.registry.remove_member(room.name, s.key, s.sid)
        self._remove(s, room)
        return gather([op, gone])

    def _drop(self, s: Session, why: Why, reason: str = "") -> Op:
        """End a session with leave notices in its rooms; its nick is free again."""
        pending = [self._leave(s, self.rooms[name], why, reason) for name in sorted(s.rooms)]
        self._forget(s)
        pending.append(self._release(s.ident))
        return gather(pending)

    def _lose(self, s: Session) -> None:
        """A session silent for three heartbeats: its nick is let go first, and only if it
        still held it (a compare-and-set in a cluster) is it announced as lost. A client
        that resumed on another broker meanwhile holds it there: it ends here quietly.
        In a cluster it ends here quietly anyway, and its nick and memberships are held for
        a grace period: its client may be on its way to another broker (its resume here
        cut short, say), and is announced as lost only if it does not get there."""
        if self.registry.keeps_lost():
            log_event(log, "held", nick=s.nick, sid=s.sid, why="missed 3 heartbeats")
            for name in sorted(s.rooms):
                self._remove(s, self.rooms[name])
            self._forget(s)
            return
        log_event(log, "lost", nick=s.nick, sid=s.sid, why="missed 3 heartbeats")
        self._forget(s)

        def released(op: Op) -> None:
            rooms = [self.rooms[name] for name in sorted(s.rooms)]
            if op.error is None and op.value is not False:
                for room in rooms:
                    self._leave(s, room, Why.LOST)
            else:  # moved on (or the cluster is away: its broker settles it later)
                for room in rooms:
                    self._remove(s, room)

        self._release(s.ident).then(released)

    def _drop_quietly(self, s: Session) -> None:
        """End a session that its own client took over (here or on another broker): no
        notices, its memberships stay for the resume-joins to come."""
        log_event(log, "replaced", nick=s.nick, sid=s.sid)
        for name in sorted(s.rooms):
            self._remove(s, self.rooms[name])
        self._forget(s)

    def _forget(self, s: Session) -> None:
        s.stage = Stage.GONE
        self.by_rid.pop(s.rid, None)
        self.by_sid.pop(s.sid, None)

    def identity_changed(self, key: str, ident: Identity | None) -> None:
        """The registry heard that a nick moved (resumed on another broker) or was freed
        (by a broker that found ours dead): a session of ours that held it is over."""
        for s in [s for s in self.by_sid.values() if s.key == key]:
            if ident is not None and ident.sid == s.sid:
                continue
            if self.registry.companion(s.sid) is not None or (
                ident is not None
                and ident.account
                and ident.account == s.ident.account
                and ident.token_hash != s.ident.token_hash
            ):
                continue  # another device of the same account: it goes on (accounts.py)
            log_event(
                log,
                "moved" if ident is not None else "ended",
                nick=s.nick,
                sid=s.sid,
                to=ident.broker if ident is not None else "",
            )
            self._drop_quietly(s)
            if ident is None:
                self._push(s, Reply.EXPIRED, {"reason": "your session was ended"})
            else:
                self._replaced(s, ident)

    def reap(self, ident: Identity) -> Op:
        """A session of a broker that died and that its client did not resume elsewhere:
        announce it as lost in its rooms, once, and free its nick."""
        pending = []
        for name, room in self.rooms.items():
            member = self.registry.members(name).get(ident.key)
            if member is not None and member.sid == ident.sid:
                pending.append(self.registry.remove_member(name, ident.key, ident.sid))
                pending.append(
                    self._append(
                        room,
                        EventKind.LEAVE,
                        ident,
                        leave_text(ident.nick, Why.LOST, ""),
                        why=Why.LOST,
                        reason="",
                        bot=ident.bot,
                    )
                )
        pending.append(self._release(ident))
        return gather(pending)

    def _release(self, ident: Identity) -> Op:
        """A session ends: its nick is free (accounts.py: or held by another of its
        account's sessions); the Op's value says whether it was free by this."""
        return self.registry.release(ident)

    def _bucket(self, now: float) -> Bucket:
        """A new session's rate limit: a full burst."""
        return Bucket(self.rules.rate, self.rules.burst, self.rules.burst, now)

    def _charge(self, s: Session, n: float) -> None:
        if self.rules.rate > 0 and n > self.rules.burst:
            raise ProtocolError(Code.TOO_LARGE, f"at most {self.rules.burst} messages at once")
        wait = s.bucket.take(n, self.clock.monotonic()) if n else 0.0
        if wait:
            raise ProtocolError(
                Code.RATE_LIMITED, f"slow down: retry in {wait:.2f} s", retry_after=round(wait, 3)
            )

    def sweep(self) -> None:
        """Drop the sessions silent for three heartbeats; forget expired grant nonces."""
        now = self.clock.monotonic()
        limit = 3 * self.rules.heartbeat
        for s in [s for s in self.by_rid.values() if now - s.last_seen > limit]:
            self._lose(s)
        wall = self.clock.time()
        for nonce in [n for n, exp in self.used_nonces.items() if exp < wall]:
            del self.used_nonces[nonce]

    def shutdown(self) -> None:
        """Tell every client the broker is going."""
        for s in list(self.by_rid.values()):
            self._push(s, Reply.SHUTDOWN, {"reason": "the broker is shutting down"})

    def sessions(self) -> Iterator[Session]:
        return iter(self.by_rid.values())


class _Raw(list):  # type: ignore[type-arg]
    """History texts that the reply encoder splices in as JSON without decoding them."""


def _dumps_with_raw(body: dict[str, Any] | bytes) -> bytes:
    if isinstance(body, bytes):  # encoded by its handler already
        return body
    raw = {k: v for k, v in body.items() if isinstance(v, _Raw)}
    if not raw:
        return m.dumps(body)
    plain = m.dumps({k: v for k, v in body.items() if k not in raw})
    parts = [f'"{k}":[{",".join(v)}]' for k, v in raw.items()]
    inner = plain[1:-1].decode("utf-8")
    return ("{" + ",".join(p for p in [inner, *parts] if p) + "}").encode("utf-8")


def replaced(by: Identity) -> dict[str, Any]:
    """The EXPIRED push of a session whose nick another client took (an account's login)."""
    return {"reason": f"{by.nick} logged in from another connection", "replaced": True}


def leave_text(nick: str, why: Why, reason: str) -> str:
    """How a departure reads: 'bob left', 'bob left (quit: tired)', 'bob left (connection lost)'."""
    if why is Why.LOST:
        return f"{nick} left (connection lost)"
    if why is Why.QUIT and reason:
        return f"{nick} left (quit: {reason})"
    return f"{nick} left"


def _no_peer(rid: bytes) -> str:
    return ""
