"""The registry on NATS: key-value buckets for sessions, memberships, room settings and
CURVE nick keys, watched so that reads answer from memory; changes go to the bucket (a
compare-and-set where two brokers could race) and complete once it has them. Pushes for
sessions on other brokers go to that broker's subject (ClusterPresence)."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from zmqchat import protocol as m
from zmqchat._cluster.names import Bucket, Change, Failure, Verb, hexkey, json_answer, unhex
from zmqchat._core.state import Identity, Member, Op, RoomSettings, gather
from zmqchat._ops.logs import event as log_event
from zmqchat.protocol import Code, ProtocolError, Reply

if TYPE_CHECKING:
    from zmqchat._cluster.calls import Calls, CoreLink

logger = logging.getLogger("zmqchat.cluster")

CLAIM_TRIES: Final = 3  # compare-and-sets a claim makes before it gives up (see claim())


@dataclass(slots=True)
class CatchUp:
    """A catch-up under way: done once every bucket has reached its target revision."""

    targets: dict[str, int]
    op: Op
    asked_at: float


def conflict(error: BaseException | None) -> bool:
    """Whether an Op failed because a compare-and-set lost."""
    return isinstance(error, ProtocolError) and error.extra.get("cluster") == Failure.CONFLICT


class ClusterRegistry:
    """The registry's buckets as last heard (watched), and changes to them."""

    def __init__(
        self,
        calls: Calls,
        core: CoreLink,
        fixed_rooms: Iterable[str],
        follow: Callable[[str], Op],
    ) -> None:
        self.calls, self.core, self.fixed_rooms, self.follow = (
            calls,
            core,
            list(fixed_rooms),
            follow,
        )
        self.name = ""  # our broker's, once it has joined
        self.sessions: dict[str, Identity] = {}  # nick key -> its holder
        self.devices: dict[str, Identity] = {}  # sid -> an account's further session
        self._members: dict[str, dict[str, Member]] = {}  # room -> nick key -> member
        self.rooms: dict[str, RoomSettings] = {}
        self.saved: dict[str, RoomSettings] = {}  # as the bucket has them
        self.owners: dict[str, str] = {}  # nick key -> CURVE key
        self.member_revs: dict[str, int] = {}  # members bucket key -> its record's revision
        self.revs: dict[str, int] = {}  # bucket -> the latest revision heard
        self.catching_up: list[CatchUp] = []
        self.appliers: dict[Bucket, Callable[[str, int, bool, bytes], None]] = {
            Bucket.SESSIONS: self._session_news,
            Bucket.MEMBERS: self._member_news,
            Bucket.ROOMS: self._room_news,
            Bucket.NICKKEYS: self._nickkey_news,
        }

    def _kv(self, change: Change, bucket: Bucket, key: str, value: bytes = b"", rev: int = 0) -> Op:
        return self.calls.kv(change, bucket, key, value, rev)

    # ---------------------------------------------------------------- news
    def catch_up(self, accounts: bool = False) -> Op:
        """Done once we have heard every change stored before now (asked of each bucket's
        stream leader): what a command reads afterwards is what every broker agrees on."""
        outer = Op()

        def latest(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
            else:
                self.catching_up.append(CatchUp(op.value, outer, time.monotonic()))
                self._caught_up()

        frames: list[bytes] = [Verb.SYNC, b"accounts"] if accounts else [Verb.SYNC]
        self.calls.call(frames, json_answer).then(latest)
        return outer

    def _caught_up(self) -> None:
        still = []
        for waiting in self.catching_up:
            if all(self.revs.get(b, 0) >= rev for b, rev in waiting.targets.items()):
                waiting.op.resolve()
            else:
                still.append(waiting)
        self.catching_up = still

    def expire_catch_ups(self, now: float, deadline: float) -> None:
        """Fail the catch-ups that waited `deadline` seconds (the news never came)."""
        for waiting in [w for w in self.catching_up if now - w.asked_at > deadline]:
            logger.error(
                "catch-up waited %g s for %s (heard %s)", deadline, waiting.targets, self.revs
            )
            self.catching_up.remove(waiting)
            waiting.op.fail(ProtocolError(Code.UNAVAILABLE, "the cluster did not answer"))

    def woke(self, gap: float) -> None:
        for waiting in self.catching_up:
            waiting.asked_at += gap

    def apply(self, bucket: Bucket, key: str, rev: int, put: bool, value: bytes) -> None:
        """A watched key's news (put: its new value; else deleted)."""
        self.revs[bucket] = max(self.revs.get(bucket, 0), rev)
        self.appliers[bucket](key, rev, put, value)
        if self.catching_up:
            self._caught_up()

    def _session_news(self, hexed: str, rev: int, put: bool, value: bytes) -> None:
        if "." in hexed:  # an account's further session: ACCOUNT.SID
            self._device_news(hexed, rev, put, value)
            return
        key = unhex(hexed)
        old = self.sessions.get(key)
        if not put:
            if old is None:
                return
            del self.sessions[key]
            ident = None
        else:
            d = json.loads(value)
            ident = _identity({**d, "key": key}, rev)
            if old is not None and old.sid == ident.sid and old.rev > rev:
                return  # older news than what we made ourselves
            self.sessions[key] = ident
        if ident is None or old is None or old.sid != ident.sid:
            self.core.identity_changed(key, ident)

    def _device_news(self, key: str, rev: int, put: bool, value: bytes) -> None:
        sid = key.partition(".")[2]
        if not put:
            gone = self.devices.pop(sid, None)
            if gone is not None:  # deleted elsewhere (ours are gone here first): the core
                self.core.identity_changed(gone.key, self.sessions.get(gone.key))  # looks
        else:
            self.devices[sid] = _identity(json.loads(value), rev)

    def _member_news(self, key: str, rev: int, put: bool, value: bytes) -> None:
        room, _, hexed = key.partition(".")
        if rev < self.member_revs.get(key, 0):
            return  # older news than a change we made ourselves
        if put:
            d = json.loads(value)
            self._members.setdefault(room, {})[unhex(hexed)] = Member(
                d["nick"], unhex(hexed), d["sid"], d["broker"]
            )
            self.member_revs[key] = rev
        else:
            self._members.get(room, {}).pop(unhex(hexed), None)
            self.member_revs.pop(key, None)

    def _room_news(self, key: str, rev: int, put: bool, value: bytes) -> None:
        room, _, field = key.partition(".")
        settings = self.rooms.get(room)
        if settings is None:
            if not put:
                return
            settings = self.rooms[room] = RoomSettings(room)
            self.saved[room] = RoomSettings(room)
            self.core.room_added(room)
        for target in (settings, self.saved[room]):
            if field == "":
                target.created = put and json.loads(value).get("created") is True
            elif field == "topic":
                target.topic = json.loads(value) if put else ""
            elif field == "locked":
                target.locked = put and json.loads(value) is True
            elif field.startswith(("op.", "ban.")):
                kind, _, hexed = field.partition(".")
                group = target.operators if kind == "op" else target.bans
                (group.add if put else group.discard)(unhex(hexed))

    def _nickkey_news(self, key: str, rev: int, put: bool, value: bytes) -> None:
        if put:
            self.owners[unhex(key)] = json.loads(value)

    # ---------------------------------------------------------------- sessions
    def holder(self, key: str) -> Identity | None:
        return self.sessions.get(key)

    def identities(self) -> Iterable[Identity]:
        return self.sessions.values()

    def _record(self, ident: Identity, with_key: bool = False) -> bytes:
        return json.dumps(
            {
                **({"key": ident.key} if with_key else {}),
                "sid": ident.sid,
                "nick": ident.nick,
                "token": ident.token_hash,
                "pubkey": ident.pubkey,
                "bot": ident.bot,
                "broker": ident.broker,
                "account": ident.account,
            }
        ).encode()

    def claim(self, ident: Identity, replacing: Identity | None) -> Op:
        """Take the nick: a create, or a compare-and-set on the session it replaces. When
        that loses because the record changed meanwhile (our view was behind), we catch up
        and look again: a record that is still this client's own (the same resume token, a
        session it left on a broker that died, or a resume of it that overtook this one) is
        taken over; only someone else's is NICK_TAKEN."""
        outer = Op()
        self._claim(ident, replacing, outer, CLAIM_TRIES)
        return outer

    def _claim(self, ident: Identity, replacing: Identity | None, outer: Op, tries: int) -> None:
        key = hexkey(ident.key)
        record = self._record(ident)
        inner = (
            self._kv(Change.CREATE, Bucket.SESSIONS, key, record)
            if replacing is None
            else self._kv(Change.UPDATE, Bucket.SESSIONS, key, record, replacing.rev)
        )

        def answered(op: Op) -> None:
            if conflict(op.error) and tries > 1:
                self.catch_up().then(lambda caught: look_again(caught.error))
            elif conflict(op.error):
                outer.fail(ProtocolError(Code.NICK_TAKEN, f"the nickname {ident.nick} is taken"))
            elif op.error is not None:
                outer.fail(op.error)
            else:
                ident.rev = op.value
                old = self.sessions.get(ident.key)
                self.sessions[ident.key] = ident
                if old is not None and old.sid != ident.sid:
                    self.core.identity_changed(ident.key, ident)
                outer.resolve()

        def look_again(error: BaseException | None) -> None:
            holder = self.sessions.get(ident.key)
            if error is not None:
                outer.fail(error)
            elif holder is None or (
                holder.token_hash == ident.token_hash != "" and holder.pubkey == ident.pubkey
            ):
                self._claim(ident, holder, outer, tries - 1)
            else:
                outer.fail(ProtocolError(Code.NICK_TAKEN, f"the nickname {ident.nick} is taken"))

        inner.then(answered)

    def rename(self, ident: Identity, new_nick: str, new_key: str) -> Op:
        moved = Identity(
            ident.sid,
            new_nick,
            new_key,
            ident.token_hash,
            ident.pubkey,
            ident.bot,
            ident.broker,
            account=ident.account,
        )
        inner = self.claim(moved, self.sessions.get(new_key) if new_key == ident.key else None)
        outer = Op()

        def claimed(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
                return
            writes = [self.release(ident)] if new_key != ident.key else []
            for room, members in list(self._members.items()):
                member = members.get(ident.key)
                if member is not None and member.sid == ident.sid:
                    writes.append(self.remove_member(room, ident.key))
                    writes.append(
                        self.add_member(room, Member(new_nick, new_key, ident.sid, ident.broker))
                    )
            gather(writes).then(
                lambda done: outer.fail(done.error) if done.error else outer.resolve()
            )

        inner.then(claimed)
        return outer

    def release(self, ident: Identity) -> Op:
        """Let the nick go if this session still holds it (a compare-and-set on its
        record): True once it did; False if the nick had moved on; UNAVAILABLE if NATS did
        not answer (the record stays ours, and Liveness settles it later)."""
        key = ident.key  # as it is now (a rename changes the identity afterwards)
        held = self.sessions.get(key)
        if held is None or held.sid != ident.sid:
            return Op.ready(False)
        del self.sessions[key]  # so that the news of its deletion is no news to the core
        outer = Op()

        def deleted(op: Op) -> None:
            if conflict(op.error):
                outer.resolve(False)
            elif op.error is not None:
                self.sessions.setdefault(key, held)  # still ours in the bucket
                outer.fail(op.error)
            else:
                outer.resolve(True)

        self._kv(Change.DELETE, Bucket.SESSIONS, hexkey(key), rev=held.rev).then(deleted)
        return outer

    def keeps_lost(self) -> bool:
        """Its record stays ours in the sessions bucket: a session of ours that no
        connection holds, which Liveness settles after a grace period unless its client
        resumes it meanwhile (on any broker: the record moves, and it is not ours)."""
        return True

    def reap(self, ident: Identity) -> None:
        """Claim a dead broker's session (compare-and-set on its record: only one broker
        wins), then announce it as lost."""
        if ident.sid in self.devices:  # an account's further session: ended quietly
            self.detach(ident).then(lambda op: None if op.error else self.core.reap(ident))
            return
        op = self._kv(Change.DELETE, Bucket.SESSIONS, hexkey(ident.key), rev=ident.rev)

        def claimed(op: Op) -> None:
            if op.error is not None:
                logger.info("%s: resumed, or settled by another broker", ident.nick)
                return
            self.sessions.pop(ident.key, None)
            log_event(
                logger,
                "reaped",
                nick=ident.nick,
                sid=ident.sid,
                broker=ident.broker,
                why="did not resume after its broker stopped",
            )
            self.core.reap(ident)

        op.then(claimed)

    # ---------------------------------------------------------------- devices
    def companions(self, account: str) -> list[Identity]:
        return [c for c in self.devices.values() if c.account == account]

    def companion(self, sid: str) -> Identity | None:
        return self.devices.get(sid)

    def every_session(self) -> list[Identity]:
        """Holders and companions: what Liveness settles."""
        return [*self.sessions.values(), *self.devices.values()]

    def attach(self, ident: Identity) -> Op:
        self.devices[ident.sid] = ident
        key = f"{hexkey(ident.account)}.{ident.sid}"
        op = self._kv(Change.PUT, Bucket.SESSIONS, key, self._record(ident, with_key=True))

        def stored(op: Op) -> None:
            if op.error is None:
                ident.rev = op.value

        op.then(stored)
        return op

    def detach(self, ident: Identity) -> Op:
        if self.devices.pop(ident.sid, None) is None:
            return Op.ready(False)
        outer = Op()
        key = f"{hexkey(ident.account)}.{ident.sid}"

        def deleted(op: Op) -> None:
            if op.error is not None:
                self.devices.setdefault(ident.sid, ident)  # still in the bucket: ours to end
                outer.fail(op.error)
            else:
                outer.resolve(True)

        self._kv(Change.DELETE, Bucket.SESSIONS, key).then(deleted)
        return outer

    # ---------------------------------------------------------------- membership
    def members(self, room: str) -> dict[str, Member]:
        return self._members.get(room, {})

    def has_local_members(self, room: str) -> bool:
        """A member here, or a member whose account has a session here (its record may
        name its session on another broker)."""
        # (only an account on several devices has sessions on several brokers: the
        # companions and their holders, not every session, each half heartbeat and room)
        holders = (self.sessions.get(c.key) for c in self.devices.values())
        here = {c.key for c in self.devices.values() if c.broker == self.name}
        here.update(h.key for h in holders if h is not None and h.broker == self.name)
        return any(
            m.broker == self.name or m.key in here for m in self._members.get(room, {}).values()
        )

    def add_member(self, room: str, member: Member) -> Op:
        """A member in the bucket; a member of ours makes us follow the room, and its join
        waits for that (the join's reply says where the room is)."""
        self._members.setdefault(room, {})[member.key] = member
        if member.broker == self.name:
            return gather([self._add_member(room, member), self.follow(room)])
        return self._add_member(room, member)

    def _add_member(self, room: str, member: Member) -> Op:
        record = {"nick": member.nick, "sid": member.sid, "broker": member.broker}
        key = f"{room}.{hexkey(member.key)}"
        self.member_revs.pop(key, None)  # until the bucket says which revision it is
        op = self._kv(Change.PUT, Bucket.MEMBERS, key, json.dumps(record).encode())

        def stored(op: Op) -> None:
            if op.error is None and (self._members.get(room) or {}).get(member.key) is member:
                self.member_revs[key] = max(self.member_revs.get(key, 0), op.value)

        op.then(stored)
        return op

    def remove_member(self, room: str, key: str, sid: str | None = None) -> Op:
        """Out of the room, if the record is still the one we know (a compare-and-set: a
        broker whose view is behind must not remove the record of a session that has just
        resumed elsewhere)."""
        members = self._members.get(room, {})
        member = members.get(key)
        if member is None or (sid is not None and member.sid != sid):
            return Op.ready()
        del members[key]
        bucket_key = f"{room}.{hexkey(key)}"
        rev = self.member_revs.pop(bucket_key, 0)
        outer = Op()

        def deleted(op: Op) -> None:
            if op.error is not None and not conflict(op.error):
                outer.fail(op.error)
            else:  # gone, or someone's newer record (not ours to remove)
                outer.resolve()

        self._kv(Change.DELETE, Bucket.MEMBERS, bucket_key, rev=rev).then(deleted)
        return outer

    # ---------------------------------------------------------------- rooms
    def seed(self, rooms: Iterable[str], operators: Iterable[str]) -> None:
        """Our --rooms and --ops, added to what the cluster has (nothing is taken away)."""
        op_keys = {m.nick_key(n) for n in operators}
        for name in rooms:
            settings = self.rooms.get(name)
            if settings is None:
                settings = self.rooms[name] = RoomSettings(name)
                self.saved[name] = RoomSettings(name)
                self._kv(Change.CREATE, Bucket.ROOMS, name, b'{"created":false}')
            if not op_keys <= settings.operators:
                settings.operators |= op_keys
                self.save(settings)

    def room_names(self) -> list[str]:
        fixed = [r for r in self.fixed_rooms if r in self.rooms]
        return fixed + sorted(r for r in self.rooms if r not in fixed)

    def settings(self, room: str) -> RoomSettings | None:
        return self.rooms.get(room)

    def create_room(self, settings: RoomSettings) -> Op:
        inner = self.calls.call([Verb.ROOM, settings.name.encode()], json_answer)
        outer = Op()

        def made(op: Op) -> None:
            if op.error is not None:
                outer.fail(op.error)
                return
            if settings.name not in self.rooms:
                self.rooms[settings.name] = RoomSettings(settings.name, created=True)
                self.saved[settings.name] = RoomSettings(settings.name, created=True)
            if not op.value:
                outer.resolve(False)
                return
            self.rooms[settings.name].operators |= settings.operators  # ours: we are its operator
            self.save(self.rooms[settings.name]).then(
                lambda saved: outer.fail(saved.error) if saved.error else outer.resolve(True)
            )

        inner.then(made)
        return outer

    def save(self, settings: RoomSettings) -> Op:
        """Write the fields that changed since the bucket last had them (a field a key:
        brokers changing different fields at once do not undo each other)."""
        name = settings.name
        old = self.saved.setdefault(name, RoomSettings(name))
        writes = []

        def put(field: str, value: Any) -> None:
            writes.append(
                self._kv(Change.PUT, Bucket.ROOMS, f"{name}.{field}", json.dumps(value).encode())
            )

        if settings.topic != old.topic:
            put("topic", settings.topic)
        if settings.locked != old.locked:
            put("locked", settings.locked)
        for kind, new, was in (
            ("op", settings.operators, old.operators),
            ("ban", settings.bans, old.bans),
        ):
            for key in new - was:
                put(f"{kind}.{hexkey(key)}", True)
            for key in was - new:
                writes.append(self._kv(Change.DELETE, Bucket.ROOMS, f"{name}.{kind}.{hexkey(key)}"))
        self.saved[name] = RoomSettings(
            name,
            settings.topic,
            settings.locked,
            set(settings.operators),
            set(settings.bans),
            settings.created,
        )
        return gather(writes)

    # ---------------------------------------------------------------- CURVE
    def nick_owner(self, key: str) -> str | None:
        return self.owners.get(key)

    def bind_nick(self, key: str, pubkey: str) -> Op:
        """The first key wins, whichever broker it came through (a create, or the one
        that was there)."""
        if self.owners.get(key) == pubkey:
            return Op.ready()
        outer = Op()

        def created(op: Op) -> None:
            if op.error is None:
                self.owners[key] = pubkey
                outer.resolve()
            else:  # someone bound it first: ours only if it was the same key
                self.catch_up().then(
                    lambda _: (
                        outer.resolve()
                        if self.owners.get(key) == pubkey
                        else outer.fail(
                            ProtocolError(Code.NICK_TAKEN, "the nickname belongs to another key")
                        )
                    )
                )

        record = json.dumps(pubkey).encode()
        self._kv(Change.CREATE, Bucket.NICKKEYS, hexkey(key), record).then(created)
        return outer


class ClusterPresence:
    """Pushes for sessions on other brokers go through NATS, to that broker's subject; so
    do questions about them ("how long has this session been silent?") and their answers."""

    def __init__(self, calls: Calls, wait: float) -> None:
        self.calls, self.wait = calls, wait  # wait: seconds a question waits for its answer
        self.name = ""  # this broker's
        self.asking: dict[str, tuple[Op, float]] = {}  # question id -> (its Op, asked when)
        self._ids = itertools.count(1)

    def send(self, broker: str, sid: str, kind: Reply, body: dict[str, Any]) -> None:
        self._route(broker, {"sid": sid, "kind": str(kind), "body": body})

    def silent(self, broker: str, sid: str) -> Op:
        question, op = str(next(self._ids)), Op()
        self.asking[question] = (op, time.monotonic())
        self._route(broker, {"sid": sid, "ask": "silent", "from": self.name, "q": question})
        return op

    def asked(self, push: dict[str, Any], silent: float | None) -> None:
        """Answer another broker's question about one of our sessions."""
        self._route(str(push["from"]), {"answer": push["q"], "silent": silent})

    def answered(self, push: dict[str, Any]) -> None:
        entry = self.asking.pop(str(push["answer"]), None)
        if entry is not None:
            silent = push.get("silent")
            entry[0].resolve(float(silent) if isinstance(silent, (int, float)) else None)

    def expire(self, now: float) -> None:
        """Questions unanswered for `wait` seconds: not known (their broker is away)."""
        for question, (op, asked) in list(self.asking.items()):
            if now - asked >= self.wait:
                del self.asking[question]
                op.resolve(None)

    def _route(self, broker: str, push: dict[str, Any]) -> None:
        self.calls.tell([Verb.ROUTE, broker.encode(), json.dumps(push).encode()])


def _identity(d: dict[str, Any], rev: int) -> Identity:
    """A companion's record (it names its nick key: its bucket key names its account)."""
    return Identity(
        d["sid"],
        d["nick"],
        d["key"],
        d["token"],
        d["pubkey"],
        d["bot"],
        d["broker"],
        rev,
        d.get("account", ""),
    )
