"""The chat broker: one process, one event loop, the authority on who says and hears what.

A ROUTER socket takes commands (see messages.py); an XPUB socket publishes room events under
secret per-room topics that only members are let in on. Every pass of the loop drains the
ready requests, commits the events they produced to SQLite in one transaction, then
publishes them (one frame per room) and sends the replies.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Final

import zmq
import zmq.auth

import messages as m
from messages import Code, Kind, ProtocolError, Reply
from store import Store, StoreError

log = logging.getLogger("broker")

DEFAULT_ROOMS: Final = ("lobby", "work", "support", "team")
# Commands that change rooms cost one rate-limit token each (SAY and PRIV pay per message).
CHARGED: Final = frozenset({Kind.JOIN, Kind.LEAVE, Kind.NICK, Kind.TOPIC, Kind.KICK,
                            Kind.BAN, Kind.UNBAN})
DRAIN: Final = 1000          # requests handled per pass before committing: bounds latency
BATCH_EVENTS: Final = 256    # events per published frame: keeps frames well under 64 KiB
FLUSH_EVENTS: Final = 128    # pending events that make a pass flush early: a pipeline
LISTEN_BACKLOG: Final = 4096  # connections waiting to be accepted (the kernel caps it)
GRANT_TTL: Final = 120       # seconds a grant may wait before it is used
MAX_ROOMS: Final = 1000      # rooms /join may create: one client cannot fill memory
REPLAY_WINDOW: Final = 600   # seconds back a resuming client may be sent private messages again
MIN_REPLAY_TOKEN: Final = 16 # a shorter resume token proves too little to be sent them
# Plain ints: pyzmq's flag enums cost microseconds per use, and the loop sends every event.
_NOBLOCK: Final = int(zmq.NOBLOCK)
_MORE: Final = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)

BANNER: Final = r"""
  ____ _           _     __  __  ___
 / ___| |__   __ _| |_  |  \/  |/ _ \     ZeroMQ chat
| |   | '_ \ / _` | __| | |\/| | | | |    rooms: {rooms}
| |___| | | | (_| | |_  | |  | | |_| |
 \____|_| |_|\__,_|\__| |_|  |_|\__\_\
"""


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 9001
    pub_port: int = 9002
    rooms: tuple[str, ...] = DEFAULT_ROOMS
    allow_new_rooms: bool = False
    heartbeat: float = 2.0
    db: str = "chat.db"
    fsync: bool = False
    motd: str | None = None
    ops: tuple[str, ...] = ()
    rate: float = 5.0
    burst: int = 20
    curve_key: str | None = None     # the broker's secret key file: serve only CURVE
    allow_keys: str | None = None    # directory of client public keys allowed in


@dataclass
class Bucket:
    """Token bucket: `burst` messages at once, refilled at `rate` per second (0 = unlimited)."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, n: float, now: float) -> float:
        """Take n tokens; return 0 on success, else seconds until they would be there."""
        if self.rate <= 0:
            return 0.0
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


@dataclass
class Session:
    rid: bytes
    sid: str
    nick: str
    token: str
    bot: bool
    bucket: Bucket
    last_seen: float
    rooms: set[str] = field(default_factory=set)
    pubkey: str = ""                 # the CURVE key this connection authenticated with
    _owner: str = ""
    topics: dict[str, bytes] = field(default_factory=dict)  # room -> topic approved on our pipe

    @property
    def key(self) -> str:
        return m.nick_key(self.nick)

    @property
    def owner(self) -> str:
        """Who sent a message, stable across nick changes and reconnects: the CURVE key, else
        a hash of the client's resume secret, else the nick (computed once)."""
        if not self._owner:
            if self.pubkey:
                self._owner = "key:" + self.pubkey
            elif self.token:
                self._owner = "tok:" + hashlib.sha256(self.token.encode()).hexdigest()[:24]
            else:
                return "nick:" + self.key
        return self._owner


def private_recipient(s: Session) -> str:
    """Whom a private message is stored for: the client's identity and its nick (a space
    is in neither), so that only that client, under that nick, is sent it again."""
    return f"{s.owner} {s.key}"


@dataclass
class Room:
    name: str
    seq: int = 0
    epoch: str = field(default_factory=lambda: secrets.token_hex(8))
    members: dict[str, Session] = field(default_factory=dict)  # sid -> session
    topic: str = ""
    ops: set[str] = field(default_factory=set)       # nick keys
    bans: set[str] = field(default_factory=set)      # nick keys
    topic_locked: bool = False


Handler = Callable[[Session, m.Request], dict[str, Any]]


class Broker:
    def __init__(self, cfg: Config, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.store = Store(cfg.db, fsync=cfg.fsync)
        self.key = secrets.token_bytes(32)
        self.rooms: dict[str, Room] = {}
        seqs = self.store.last_seqs()
        for name in cfg.rooms:
            self.rooms[name] = Room(name, seqs.get(name, 0), topic=self.store.last_topic(name),
                                    ops={m.nick_key(n) for n in cfg.ops})
        for name, seq in seqs.items():  # rooms created earlier with --allow-new-rooms
            if name not in self.rooms and cfg.allow_new_rooms:
                self.rooms[name] = Room(name, seq, topic=self.store.last_topic(name))
        self.by_rid: dict[bytes, Session] = {}
        self.by_nick: dict[str, Session] = {}
        self.by_sid: dict[str, Session] = {}
        self.used_nonces: dict[str, float] = {}
        # (nick key, room) of members at the last stop, or of a session replaced by its own
        # reconnect: their resume-joins are quiet; anyone else's join is announced.
        self.was_member: set[tuple[str, str]] = self.store.take_members()
        self.pending: dict[str, list[bytes]] = {}      # room -> encoded events to publish
        self.pending_events = 0                        # how many events that is
        self.outbox: list[list[bytes]] = []            # [rid, kind, label, body] to send
        self.stopping = False
        self.handlers: dict[Kind, Handler] = {
            Kind.JOIN: self._on_join, Kind.LEAVE: self._on_leave, Kind.SAY: self._on_say,
            Kind.PRIV: self._on_priv, Kind.ROOMS: self._on_rooms, Kind.WHO: self._on_who,
            Kind.NICK: self._on_nick, Kind.TOPIC: self._on_topic,
            Kind.HISTORY: self._on_history, Kind.PING: self._on_ping, Kind.BYE: self._on_bye,
            Kind.KICK: self._on_kick, Kind.BAN: self._on_ban, Kind.UNBAN: self._on_unban,
        }
        self.auth = None
        self.curve = cfg.curve_key is not None
        try:
            self.motd = self._load_motd()
            self._bind()
        except BaseException:
            self.store.close()  # its writer process and the database lock go with it
            raise

    # ------------------------------------------------------------------ sockets
    def _bind(self) -> None:
        self.router = self.ctx.socket(zmq.ROUTER)
        self.xpub = self.ctx.socket(zmq.XPUB)
        for s in (self.router, self.xpub):
            s.linger = 0
            s.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)  # ZeroMQ's 100 drops a join storm
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, m.MAX_FRAME)
        self.router.setsockopt(zmq.RCVHWM, 10000)
        self.router.setsockopt(zmq.SNDHWM, 10000)
        self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.xpub.setsockopt(zmq.MAXMSGSIZE, 512)  # subscriptions are tiny; floods stay small
        self.xpub.setsockopt(zmq.SNDHWM, 2000)
        if self.curve:
            self._secure()
        try:
            self.port = self._bind_one(self.router, self.cfg.port)
            self.pub_port = self._bind_one(self.xpub, self.cfg.pub_port)
        except zmq.ZMQError:
            self.router.close()
            self.xpub.close()
            raise

    def _secure(self) -> None:
        """CURVE on both sockets, failing closed: no ZAP handler, no connection."""
        public, secret = zmq.auth.load_certificate(self.cfg.curve_key)
        if not secret:
            raise OSError(f"{self.cfg.curve_key} holds no secret key")
        # Imported only here: asyncio and ssl come with it, 8 MB a plain broker never uses.
        from zmq.auth.thread import ThreadAuthenticator
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="chat", location=self.cfg.allow_keys
                                  or zmq.auth.CURVE_ALLOW_ANY)
        for sock in (self.router, self.xpub):
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_server = True
            sock.zap_domain = b"chat"
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def _bind_one(self, sock: zmq.Socket, port: int) -> int:
        if port == 0:
            return sock.bind_to_random_port(f"tcp://{self.cfg.host}")
        sock.bind(f"tcp://{self.cfg.host}:{port}")
        return port

    def _load_motd(self) -> str:
        if self.cfg.motd:
            with open(self.cfg.motd, encoding="utf-8") as f:
                return f.read()
        return BANNER.format(rooms=", ".join(self.rooms))

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Serve until stop(); then tell every client and close."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        next_sweep = time.monotonic() + self.cfg.heartbeat / 2
        try:
            while not self.stopping:
                ready = dict(poller.poll(100))
                if self.xpub in ready:
                    self._drain_subscriptions()
                if self.router in ready:
                    self._drain_requests()
                self._flush()
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    self._flush()
                    next_sweep = time.monotonic() + self.cfg.heartbeat / 2
        finally:
            self._shutdown()

    def stop(self) -> None:
        self.stopping = True

    def _drain_requests(self) -> None:
        router = self.router
        for _ in range(DRAIN):
            if not router.get(_EVENTS) & _POLLIN:  # cheaper than a recv that raises Again
                return
            if self.curve:
                parts = router.recv_multipart(_NOBLOCK, copy=False)
                key = parts[-1].get("User-Id")
                frames = [p.bytes for p in parts]
                if not key:  # fail closed: nothing without an authenticated identity
                    continue
            else:
                frames, key = router.recv_multipart(_NOBLOCK), ""
            try:
                self._handle(frames[0], frames[1:], key)
            except Exception:  # a bug must not take the broker down for everyone
                log.exception("error handling %r", frames[:2])
            if self.pending_events >= FLUSH_EVENTS:
                self._flush()  # publish now: receivers start on these while we read on

    def _handle(self, rid: bytes, frames: list[bytes], key: str = "") -> None:
        label = m.decode_label(frames)
        session = self.by_rid.get(rid)
        try:
            req = m.decode_request(frames)
            log.debug("<- %s %s", req.kind, session.nick if session else rid.hex())
            if req.kind is Kind.HELLO:
                body = self._on_hello(rid, session, req, key)
            elif session is None:
                raise ProtocolError(Code.NO_HELLO, "say HELLO first")
            elif self.curve and key != session.pubkey:  # a stolen routing id gets nothing
                raise ProtocolError(Code.NO_HELLO, "say HELLO first")
            else:
                session.last_seen = time.monotonic()
                if req.kind in CHARGED:
                    self._charge(session, 1)
                body = self.handlers[req.kind](session, req)
            self.outbox.append([rid, b"OK", label, _dumps_with_raw(body)])
        except ProtocolError as err:
            log.debug("-> ERROR %s %s", err.code, err.reason)
            self.outbox.append([rid, *m.encode_error(label, err)])
        except Exception:  # a bug: still exactly one reply, and the loop goes on
            log.exception("error handling %r from %s", frames[:2], rid.hex())
            self.outbox.append([rid, *m.encode_error(label, ProtocolError(
                Code.INTERNAL, "the broker failed on this request"))])

    def _flush(self) -> None:
        """Commit, then publish, then reply: nothing is acknowledged before it is durable."""
        self.store.commit()
        for name in list(self.pending):
            self._publish(self.rooms[name])
        self._send_replies()

    def _publish(self, room: Room) -> None:
        """Publish a room's committed events under its current topic, in batches."""
        events = self.pending.pop(room.name, [])
        self.pending_events -= len(events)
        send = self.xpub.send
        for i in range(0, len(events), BATCH_EVENTS):
            topic, batch = m.encode_batch(room.name, room.epoch, events[i:i + BATCH_EVENTS])
            send(topic, _MORE)
            send(batch, _NOBLOCK)

    def _send_replies(self) -> None:
        send = self.router.send
        for rid, kind, label, body in self.outbox:
            try:  # the first frame decides: ROUTER_MANDATORY refuses a peer that is gone
                send(rid, _MORE)
            except zmq.ZMQError as exc:  # peer gone or its queue full: it will retry
                log.debug("reply to %s dropped: %s", rid.hex(), exc)
                continue
            send(kind, _MORE)
            send(label, _MORE)
            send(body, _NOBLOCK)
        self.outbox.clear()

    def _push(self, s: Session, kind: Reply, body: dict[str, Any]) -> None:
        self.outbox.append([s.rid, *m.encode_reply(kind, b"", body)])

    # ------------------------------------------------------------------ subscriptions
    def _grant(self, s: Session, room: Room) -> str:
        payload = m.grant_payload(room.name, room.epoch, s.sid, int(time.time()) + GRANT_TTL,
                                  secrets.token_hex(8))
        return payload + "." + self._mac(payload)

    def _mac(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()[:32]

    def _drain_subscriptions(self) -> None:
        for _ in range(DRAIN):
            try:
                frame = self.xpub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = frame.bytes
            if msg[:1] == b"\x01":  # approve now: it applies to the pipe just read
                self._approve(msg[1:], frame.get("User-Id") if self.curve else "")

    def _approve(self, data: bytes, key: str = "") -> None:
        """Let this connection hear a room only if `data` is a fresh, valid, unused grant."""
        parsed = m.parse_grant(data)
        if parsed is None:
            log.info("refused subscription %r", data[:40])
            return
        name, epoch, sid, expiry, nonce, mac = parsed
        payload = m.grant_payload(name, epoch, sid, expiry, nonce)
        room, s = self.rooms.get(name), self.by_sid.get(sid)
        if (not hmac.compare_digest(mac, self._mac(payload)) or expiry < time.time()
                or nonce in self.used_nonces or room is None or room.epoch != epoch
                or s is None or sid not in room.members or (self.curve and key != s.pubkey)):
            log.info("refused grant for %s (stale, used or forged)", name)
            return
        self.used_nonces[nonce] = expiry
        topic = m.room_topic(name, epoch)
        old = s.topics.get(name)
        if old is not None and old != topic:
            self.xpub.setsockopt(zmq.UNSUBSCRIBE, old)
        self.xpub.setsockopt(zmq.SUBSCRIBE, topic)
        s.topics[name] = topic
        self._push(s, Reply.LIVE, {"room": name, "seq": room.seq})

    def _rotate(self, room: Room) -> None:
        """Change a room's topic so departed connections hear nothing; re-grant the rest.
        What happened up to now (the leave notice included) still goes out on the old topic,
        so the members who stay see it live."""
        if room.name in self.pending:
            self.store.commit()
            self._publish(room)
        room.epoch = secrets.token_hex(8)
        for s in room.members.values():
            self._push(s, Reply.GRANT, {"room": room.name, "grant": self._grant(s, room)})

    # ------------------------------------------------------------------ events
    def _emit(self, room: Room, kind: m.EventKind, nick: str, text: str,
              cmid: str | None = None, owner: str = "", **extra: Any) -> int:
        room.seq += 1
        ts = time.time()
        data = m.encode_event(room.name, room.seq, ts, nick, kind, text, cmid, extra)
        self.store.append(room.name, room.seq, ts, owner or m.nick_key(nick), cmid, data)
        self.pending.setdefault(room.name, []).append(data)
        self.pending_events += 1
        return room.seq

    def _room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            raise ProtocolError(Code.ROOM_UNKNOWN,
                                f"no room {name!r}; rooms: {', '.join(self.rooms)}",
                                rooms=list(self.rooms))
        return room

    def _member_room(self, s: Session, name: str) -> Room:
        room = self._room(name)
        if s.sid not in room.members:
            raise ProtocolError(Code.NOT_MEMBER, f"you are not in {name}; /join {name} first")
        return room

    def _remove(self, s: Session, room: Room, why: str, reason: str = "",
                quiet: bool = False, rotate: bool = True) -> None:
        """Take s out of room (with a leave notice unless quiet) and re-key the room."""
        if not quiet:
            self._emit(room, m.EventKind.LEAVE, s.nick, leave_text(s.nick, why, reason),
                       why=why, reason=reason, bot=s.bot)
        room.members.pop(s.sid, None)
        s.rooms.discard(room.name)
        self.store.remove_member(room.name, s.key)
        if rotate:
            self._rotate(room)

    def _drop(self, s: Session, reason: str, why: str, quiet: bool = False,
              rotate: bool = True) -> set[str]:
        """End a session: leave notices in its rooms (unless quiet), nick freed. Returns its
        rooms (with rotate=False the caller re-keys them, once for many departures)."""
        rooms = set(s.rooms)
        for name in sorted(rooms):
            if quiet:
                self.was_member.add((s.key, name))
            self._remove(s, self.rooms[name], why, reason, quiet, rotate)
        self.by_rid.pop(s.rid, None)
        self.by_sid.pop(s.sid, None)
        if self.by_nick.get(s.key) is s:
            del self.by_nick[s.key]
        return rooms

    # ------------------------------------------------------------------ handlers
    def _on_hello(self, rid: bytes, session: Session | None, req: m.Request,
                  key: str = "") -> dict[str, Any]:
        if session is not None:
            raise ProtocolError(Code.ALREADY_HELLO, f"already connected as {session.nick}")
        nick, b = req.body["nick"], req.body
        if self.curve:
            owner = self.store.nick_owner(m.nick_key(nick))
            if owner is not None and owner != key:
                raise ProtocolError(Code.NICK_TAKEN,
                                    f"the nickname {nick} belongs to another key")
        holder = self.by_nick.get(m.nick_key(nick))
        if holder is not None and not (b["resume"] and b["token"]
                                       and hmac.compare_digest(holder.token, b["token"])):
            raise ProtocolError(Code.NICK_TAKEN, f"the nickname {holder.nick} is taken")
        now = time.monotonic()
        s = Session(rid, secrets.token_hex(8), nick, b["token"], b["bot"],
                    Bucket(self.cfg.rate, self.cfg.burst, self.cfg.burst, now), now)
        s.pubkey = key
        missed = self._missed_privates(s, b["privates_since"]) if b["resume"] else []
        if holder is not None:  # the same client, back on a new connection
            self._drop(holder, "", "replaced", quiet=True)
        if self.curve:
            self.store.bind_nick(s.key, key)
        self.by_rid[rid], self.by_nick[s.key], self.by_sid[s.sid] = s, s, s
        log.info("hello %s%s", nick, " (resume)" if b["resume"] else "")
        for event in missed:
            self._push(s, Reply.PRIVATE, {"event": event})
        return {"nick": nick, "version": m.VERSION, "pub_port": self.pub_port,
                "motd": self.motd, "rooms": list(self.rooms), "heartbeat": self.cfg.heartbeat,
                "rate": self.cfg.rate, "burst": self.cfg.burst,
                "max_text": m.MAX_TEXT, "max_batch": m.MAX_BATCH, "time": time.time()}

    def _missed_privates(self, s: Session, since: float | None) -> list[dict[str, Any]]:
        """For a resume: the private messages to this client at or after `since` (one may
        have gone to its old connection as it died). Only those sent to the identity it
        proves (a CURVE key, or a resume token of MIN_REPLAY_TOKEN characters or more; a nick
        proves nothing) under the nick it has now, in the last REPLAY_WINDOW seconds: the
        latest m.MAX_HISTORY of them. Read before the HELLO changes anything."""
        if since is None or (not s.pubkey and len(s.token) < MIN_REPLAY_TOKEN):
            return []
        since = max(since, time.time() - REPLAY_WINDOW)
        try:
            stored = self.store.privates_to(private_recipient(s), since, m.MAX_HISTORY)
        except StoreError as exc:  # the client still gets in; only this replay is missing
            log.error("private messages for %s not read: %s", s.nick, exc)
            return []
        return [json.loads(data) for data in stored]

    def _on_join(self, s: Session, req: m.Request) -> dict[str, Any]:
        name = req.body["room"]
        room = self.rooms.get(name)
        if room is None and self.cfg.allow_new_rooms:
            if len(self.rooms) >= MAX_ROOMS:
                raise ProtocolError(Code.TOO_LARGE, f"there are {MAX_ROOMS} rooms already")
            room = self.rooms[name] = Room(name, ops={s.key})
            log.info("room %s created by %s", name, s.nick)
        room = self._room(name) if room is None else room
        if s.key in room.bans:
            raise ProtocolError(Code.BANNED, f"you are banned from {name}")
        before = room.seq
        if s.sid not in room.members:
            room.members[s.sid] = s
            s.rooms.add(name)
            self.store.add_member(name, s.key)
            was_member = (s.key, name) in self.was_member
            self.was_member.discard((s.key, name))
            if not (req.body["resume"] and was_member):
                self._emit(room, m.EventKind.JOIN, s.nick, f"{s.nick} joined", bot=s.bot)
        return {"room": name, "seq": before, "grant": self._grant(s, room), "topic": room.topic,
                "members": sorted(x.nick for x in room.members.values()),
                "ops": sorted(x.nick for x in room.members.values() if x.key in room.ops)}

    def _on_leave(self, s: Session, req: m.Request) -> dict[str, Any]:
        room = self._member_room(s, req.body["room"])
        self._remove(s, room, "part")
        return {"room": room.name}

    def _on_say(self, s: Session, req: m.Request) -> dict[str, Any]:
        room = self._member_room(s, req.body["room"])
        msgs = req.body["msgs"]
        known = {item["id"]: self.store.find_cmid(item["id"]) for item in msgs}
        if any(prior is not None and prior[0] != s.owner for prior in known.values()):
            raise ProtocolError(Code.BAD_REQUEST, "a message id already used by another; "
                                                  "nothing of this request was stored")
        self._charge(s, sum(1 for prior in known.values() if prior is None))  # retries free
        acks = []
        extra: dict[str, Any] = {"bot": True} if s.bot else {}
        if req.body["relay"]:
            extra["relay"] = req.body["relay"]
        if req.body["hops"] is not None:
            extra["hops"] = req.body["hops"]
        owner = s.owner  # a hash: once per request, not once per message
        for item in msgs:
            prior = known[item["id"]]
            if prior is None:  # new (a repeat within this batch counts as a retry of it)
                kind = m.EventKind.ACTION if item["action"] else m.EventKind.MSG
                seq = self._emit(room, kind, s.nick, item["text"], item["id"], owner, **extra)
                prior = known[item["id"]] = (owner, room.name, seq)
            acks.append([item["id"], prior[2]])
        return {"room": room.name, "acks": acks}

    def _charge(self, s: Session, n: float) -> None:
        if self.cfg.rate > 0 and n > self.cfg.burst:
            raise ProtocolError(Code.TOO_LARGE, f"at most {self.cfg.burst} messages at once")
        wait = s.bucket.take(n, time.monotonic()) if n else 0.0
        if wait:
            raise ProtocolError(Code.RATE_LIMITED, f"slow down: retry in {wait:.2f} s",
                                retry_after=round(wait, 3))

    def _on_priv(self, s: Session, req: m.Request) -> dict[str, Any]:
        b = req.body
        target = self.by_nick.get(m.nick_key(b["to"]))
        if target is None:
            raise ProtocolError(Code.NO_SUCH_NICK, f"nobody called {b['to']} is connected")
        prior = self.store.find_cmid(b["id"])
        if prior is not None:
            if prior[0] != s.owner:
                raise ProtocolError(Code.BAD_REQUEST, "a message id already used by another")
            return {"to": target.nick, "id": b["id"], "duplicate": True}
        self._charge(s, 1)
        ts = time.time()
        event = {"kind": "private", "nick": s.nick, "to": target.nick, "text": b["text"],
                 "ts": ts, "cmid": b["id"], "bot": s.bot}
        if b["hops"] is not None:
            event["hops"] = b["hops"]
        self.store.append_private(ts, s.owner, private_recipient(target), b["id"],
                                  m.dumps(event))
        self._push(target, Reply.PRIVATE, {"event": event})
        return {"to": target.nick, "id": b["id"], "event": event}

    def _on_rooms(self, s: Session, req: m.Request) -> dict[str, Any]:
        return {"rooms": [{"name": r.name, "members": len(r.members), "topic": r.topic,
                           "seq": r.seq} for r in self.rooms.values()]}

    def _on_who(self, s: Session, req: m.Request) -> dict[str, Any]:
        name = req.body["room"]
        if name is None:
            return {"room": None, "members": sorted(x.nick for x in self.by_nick.values())}
        room = self._room(name)
        return {"room": name, "members": sorted(x.nick for x in room.members.values()),
                "ops": sorted(x.nick for x in room.members.values() if x.key in room.ops)}

    def _on_nick(self, s: Session, req: m.Request) -> dict[str, Any]:
        new = req.body["nick"]
        key = m.nick_key(new)
        holder = self.by_nick.get(key)
        if holder is not None and holder is not s:
            raise ProtocolError(Code.NICK_TAKEN, f"the nickname {holder.nick} is taken")
        if self.curve:
            owner = self.store.nick_owner(key)
            if owner is not None and owner != s.pubkey:
                raise ProtocolError(Code.NICK_TAKEN, f"the nickname {new} belongs to another key")
            self.store.bind_nick(key, s.pubkey)
        old = s.nick
        if old == new:
            return {"nick": new}
        del self.by_nick[s.key]
        s.nick = new
        self.by_nick[key] = s
        for name in sorted(s.rooms):
            self._emit(self.rooms[name], m.EventKind.NICK, old, f"{old} is now known as {new}",
                       new=new)
        return {"nick": new, "old": old}

    def _on_topic(self, s: Session, req: m.Request) -> dict[str, Any]:
        room = self._member_room(s, req.body["room"])
        text, lock = req.body["text"], req.body["lock"]
        if lock is not None:  # operators choose whether only they may set the topic
            if s.key not in room.ops:
                raise ProtocolError(Code.NOT_OPERATOR, f"you are not an operator of {room.name}")
            room.topic_locked = lock
            self._emit(room, m.EventKind.NOTICE, s.nick,
                       f"{s.nick} {'locked' if lock else 'unlocked'} the topic"
                       + (" (operators only)" if lock else ""))
        if text is None:
            return {"room": room.name, "topic": room.topic, "locked": room.topic_locked}
        if room.topic_locked and s.key not in room.ops:
            raise ProtocolError(Code.NOT_OPERATOR, f"only operators set the topic of {room.name}")
        if any(ord(c) < 32 for c in text):
            raise ProtocolError(Code.BAD_REQUEST, "a topic is one line of text")
        room.topic = text
        self._emit(room, m.EventKind.TOPIC, s.nick, text, locked=room.topic_locked,
                   note=f"{s.nick} set the topic: {text}" if text else f"{s.nick} cleared the topic")
        return {"room": room.name, "topic": text, "locked": room.topic_locked}

    def _on_history(self, s: Session, req: m.Request) -> dict[str, Any]:
        b = req.body
        room = self._member_room(s, b["room"])
        texts = self.store.history(room.name, after=b["after"], before=b["before"],
                                   since=b["since"], limit=b["limit"])
        # Stored JSON goes out as it is: spliced, not re-encoded.
        return {"room": room.name, "seq": room.seq, "events": _Raw(texts)}

    def _on_ping(self, s: Session, req: m.Request) -> dict[str, Any]:
        return {"rooms": {name: self.rooms[name].seq for name in s.rooms}}

    def _on_bye(self, s: Session, req: m.Request) -> dict[str, Any]:
        reason = req.body["reason"] or ""
        self._drop(s, reason, "quit")
        return {"bye": s.nick}

    def _op_room(self, s: Session, req: m.Request) -> Room:
        room = self._member_room(s, req.body["room"])
        if s.key not in room.ops:
            raise ProtocolError(Code.NOT_OPERATOR, f"you are not an operator of {room.name}")
        return room

    def _kick(self, s: Session, room: Room, target: Session, reason: str, kind: m.EventKind
              ) -> None:
        verb = "kicked" if kind is m.EventKind.KICK else "banned"
        text = f"{target.nick} was {verb} by {s.nick}" + (f" ({reason})" if reason else "")
        self._emit(room, kind, target.nick, text, by=s.nick, reason=reason)
        self._remove(target, room, "kick", quiet=True)
        self._push(target, Reply.KICKED, {"room": room.name, "by": s.nick, "reason": reason,
                                          "kind": str(kind)})

    def _on_kick(self, s: Session, req: m.Request) -> dict[str, Any]:
        room = self._op_room(s, req)
        target = self.by_nick.get(m.nick_key(req.body["nick"]))
        if target is None or target.sid not in room.members:
            raise ProtocolError(Code.NO_SUCH_NICK, f"{req.body['nick']} is not in {room.name}")
        self._kick(s, room, target, req.body["reason"] or "", m.EventKind.KICK)
        return {"room": room.name, "nick": target.nick}

    def _on_ban(self, s: Session, req: m.Request) -> dict[str, Any]:
        room = self._op_room(s, req)
        key = m.nick_key(req.body["nick"])
        room.bans.add(key)
        target = self.by_nick.get(key)
        if target is not None and target.sid in room.members:
            self._kick(s, room, target, req.body["reason"] or "", m.EventKind.BAN)
        else:
            self._emit(room, m.EventKind.BAN, req.body["nick"],
                       f"{req.body['nick']} was banned by {s.nick}", by=s.nick,
                       reason=req.body["reason"] or "")
        return {"room": room.name, "nick": req.body["nick"]}

    def _on_unban(self, s: Session, req: m.Request) -> dict[str, Any]:
        room = self._op_room(s, req)
        room.bans.discard(m.nick_key(req.body["nick"]))
        self._emit(room, m.EventKind.NOTICE, s.nick,
                   f"{req.body['nick']} was unbanned by {s.nick}")
        return {"room": room.name, "nick": req.body["nick"]}

    # ------------------------------------------------------------------ liveness
    def _sweep(self) -> None:
        now = time.monotonic()
        limit = 3 * self.cfg.heartbeat
        emptied: set[str] = set()
        for s in [s for s in self.by_rid.values() if now - s.last_seen > limit]:
            log.info("%s missed 3 heartbeats: dropped", s.nick)
            emptied |= self._drop(s, "connection lost", "lost", rotate=False)
        for name in sorted(emptied):  # many vanish at once: re-key each room only once
            self._rotate(self.rooms[name])
        wall = time.time()
        for nonce in [n for n, exp in self.used_nonces.items() if exp < wall]:
            del self.used_nonces[nonce]

    def _shutdown(self) -> None:
        for s in list(self.by_rid.values()):
            self._push(s, Reply.SHUTDOWN, {"reason": "the broker is shutting down"})
        try:
            self._flush()
        finally:
            self.router.linger = 500
            self.router.close()
            self.xpub.close()
            self.store.close()
            if self.auth is not None:
                self.auth.stop()


class _Raw(list):
    """History texts that the reply encoder splices in as JSON without decoding them."""


def _dumps_with_raw(body: dict[str, Any]) -> bytes:
    raw = {k: v for k, v in body.items() if isinstance(v, _Raw)}
    if not raw:
        return m.dumps(body)
    plain = m.dumps({k: v for k, v in body.items() if k not in raw})
    parts = [f'"{k}":[{",".join(v)}]' for k, v in raw.items()]
    inner = plain[1:-1].decode("utf-8")
    return ("{" + ",".join(p for p in [inner, *parts] if p) + "}").encode("utf-8")


def leave_text(nick: str, why: str, reason: str) -> str:
    """How a departure reads: 'bob left', 'bob left (quit: tired)', 'bob left (connection lost)'."""
    if why == "lost":
        return f"{nick} left (connection lost)"
    if why == "quit" and reason:
        return f"{nick} left (quit: {reason})"
    return f"{nick} left"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ZeroMQ chat broker")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for a LAN)")
    p.add_argument("--port", type=int, default=9001, help="command (ROUTER) port")
    p.add_argument("--pub-port", type=int, default=9002, help="room traffic (XPUB) port")
    p.add_argument("--rooms", default=",".join(DEFAULT_ROOMS), help="comma-separated rooms")
    p.add_argument("--allow-new-rooms", action="store_true", help="let /join create rooms")
    p.add_argument("--heartbeat", type=float, default=2.0, help="heartbeat interval, seconds")
    p.add_argument("--db", default="chat.db", help="SQLite history file (default ./chat.db)")
    p.add_argument("--fsync", action="store_true", help="fsync every commit (power-loss safe)")
    p.add_argument("--motd", help="file whose text replaces the welcome banner")
    p.add_argument("--ops", default="", help="comma-separated operator nicks for the rooms")
    p.add_argument("--rate", type=float, default=5.0, help="messages per second per client")
    p.add_argument("--burst", type=int, default=20, help="messages a client may send at once")
    p.add_argument("--gen-keys", metavar="DIR", help="write a CURVE key pair to DIR and exit")
    p.add_argument("--curve-key", metavar="FILE", help="serve only CURVE, with this secret key")
    p.add_argument("--allow-keys", metavar="DIR", help="with --curve-key: only these clients")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if a.gen_keys:
        if os.path.exists(os.path.join(a.gen_keys, "broker.key_secret")):
            print(f"broker: {a.gen_keys} already holds a broker key pair; clients trust its "
                  f"public key, so it is kept (remove it first to make a new one)",
                  file=sys.stderr)
            return 2
        os.makedirs(a.gen_keys, exist_ok=True)
        public, secret = zmq.auth.create_certificates(a.gen_keys, "broker")
        os.chmod(secret, 0o600)
        print(f"wrote {public} (give to clients: --server-key) and {secret} (keep secret)")
        return 0
    try:
        rooms = tuple(m.check_room(r.strip()) for r in a.rooms.split(",") if r.strip())
    except ProtocolError as err:
        print(f"broker: --rooms: {err.reason}", file=sys.stderr)
        return 2
    cfg = Config(a.host, a.port, a.pub_port, rooms, a.allow_new_rooms, a.heartbeat, a.db,
                 a.fsync, a.motd, tuple(n for n in a.ops.split(",") if n), a.rate, a.burst,
                 a.curve_key, a.allow_keys)
    try:
        broker = Broker(cfg)
    except StoreError as err:
        print(f"broker: cannot use the history database: {err}", file=sys.stderr)
        return 4
    except zmq.ZMQError as err:
        print(f"broker: cannot bind on {a.host} (ports {a.port}, {a.pub_port}): {err}",
              file=sys.stderr)
        return 1
    except OSError as err:
        print(f"broker: {err}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stop())
    print(f"Broker started on tcp://{a.host}:{broker.port} (commands) and "
          f"tcp://{a.host}:{broker.pub_port} (rooms)", flush=True)
    if cfg.curve_key:
        print("CURVE encryption on: clients need --server-key with the public key"
              + (f"; only the keys in {cfg.allow_keys} may connect" if cfg.allow_keys else ""),
              flush=True)
    broker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
