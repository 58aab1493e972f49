"""The commands about a person rather than a room: HELLO (and its resume), NICK, a private
message (PRIV), PING and BYE."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Generator
from typing import Any, Final

from zmqchat import protocol as m
from zmqchat._core.base import MIN_REPLAY_TOKEN, CoreBase, Handler
from zmqchat._core.session import Session
from zmqchat._core.state import Draft, Identity, Op, gather, token_hash
from zmqchat._ops.logs import event as log_event
from zmqchat.protocol import Code, EventKind, Kind, ProtocolError, Reply, Why

log = logging.getLogger("zmqchat.broker")

REPLAY_WINDOW: Final = 600  # seconds back a resuming client may be sent private messages again
RETRY_WINDOW: Final = 86_400  # seconds back a retried private message is looked for (a day)
RETRY_MARGIN: Final = 60.0  # seconds more: the brokers' clocks may differ that much


class Sessions(CoreBase):
    def handler_table(self) -> dict[Kind, Handler]:
        return {
            **super().handler_table(),
            Kind.NICK: self._on_nick,
            Kind.PRIV: self._on_priv,
            Kind.PING: self._on_ping,
            Kind.BYE: self._on_bye,
        }

    def _on_hello(
        self, rid: bytes, session: Session | None, req: m.Request, pubkey: str = ""
    ) -> Generator[Op, Any, dict[str, Any]]:
        if session is not None:
            raise ProtocolError(Code.ALREADY_HELLO, f"already connected as {session.nick}")
        nick, b = req.body["nick"], req.body
        key = m.nick_key(nick)
        yield from self._hello_catch_up(key, b)
        account, extras = yield from self._login(rid, nick, key, b)  # accounts.py: "" = a guest
        if self.rules.keys_required and not account:
            owner = self.registry.nick_owner(key)
            if owner is not None and owner != pubkey:
                raise ProtocolError(Code.NICK_TAKEN, f"the nickname {nick} belongs to another key")
        nick, key, holder = self._nick_for(account, nick, key)
        own = self._holds(key, b)
        # an account on another device: a further session under its nick (accounts.py)
        device = bool(account and holder is not None and holder.account == account and not own)
        if (
            holder is not None
            and not own
            # an account takes its nick from a guest who had it before it was registered
            and not (account and holder.account in ("", account))
        ):
            held = yield from self._held(holder)
            raise ProtocolError(Code.NICK_TAKEN, f"the nickname {holder.nick} is taken", **held)
        ident = Identity(
            self.tokens(8), nick, key, token_hash(b["token"]), pubkey, b["bot"], self.name
        )
        ident.account = account
        replayable = bool(pubkey) or len(b["token"]) >= MIN_REPLAY_TOKEN or bool(account)
        missed: list[dict[str, Any]] = []
        if b["resume"] and b["privates_since"] is not None and replayable:
            missed = yield from self._missed_privates(ident, b["privates_since"])
        if self.rules.keys_required and not account:
            yield self.registry.bind_nick(key, pubkey)
        if device:
            yield from self._attach(ident, bool(b["resume"]))
        else:
            yield self.registry.claim(ident, holder)
        if rid in self.by_rid:  # this connection said HELLO twice at once: the first won
            self._release(ident)
            raise ProtocolError(Code.ALREADY_HELLO, f"already connected as {self.by_rid[rid].nick}")
        old = self.by_sid.get(holder.sid) if holder is not None and not device else None
        if old is not None:  # the same client (or account), back on a new connection
            self._drop_quietly(old)
            self._replaced(old, ident)
        now = self.clock.monotonic()
        s = Session(rid, ident, self._bucket(now), now, replayable)
        self.by_rid[rid], self.by_sid[ident.sid] = s, s
        extras.update(self._logged_in(s))
        log_event(
            log,
            "hello",
            nick=nick,
            sid=ident.sid,
            resume=b["resume"],
            bot=b["bot"],
            curve=bool(pubkey),
        )
        for event in missed:
            self._push(s, Reply.PRIVATE, {"event": event})
        return {
            "nick": nick,
            "version": m.VERSION,
            "pub_port": self.pub_port,
            "motd": self.motd,
            "rooms": list(self.rooms),
            "heartbeat": self.rules.heartbeat,
            "rate": self.rules.rate,
            "burst": self.rules.burst,
            "broker": self.name,
            "max_text": m.MAX_TEXT,
            "max_batch": m.MAX_BATCH,
            "time": self.clock.time(),
            **extras,
        }

    def _login(
        self, rid: bytes, nick: str, key: str, body: dict[str, Any]
    ) -> Generator[Op, Any, tuple[str, Any]]:
        """A HELLO's account (accounts.py): the account it proved it holds, or "" for a
        guest; and fields for the welcome."""
        if False:  # a generator, which the accounts' login is (it may wait for the state)
            yield Op.ready()
        return "", {}

    def _account_holder(self, account: str) -> Identity | None:
        """The session that holds a logged-in account's nick, whatever it is (devices.py)."""
        return None

    def _attach(self, ident: Identity, resume: bool) -> Generator[Op, Any, None]:
        """A further session of a logged-in account (accounts.py)."""
        if False:
            yield Op.ready()
        raise ProtocolError(Code.NICK_TAKEN, f"the nickname {ident.nick} is taken")

    def _logged_in(self, s: Session) -> dict[str, Any]:
        """A new session is there (accounts.py): more fields for its welcome."""
        return {}

    def _held(self, holder: Identity) -> Generator[Op, Any, dict[str, Any]]:
        """For NICK_TAKEN: when the nick will be free (`free_in` seconds) if its holder's
        connection stays silent, and how long it has been silent (`silent`: its broker,
        this one or another, says). A client may wait and ask again: a holder that is
        heard from meanwhile (`silent` shorter than the wait) is there, and the nick taken."""
        limit = 3 * self.rules.heartbeat
        margin = self.rules.heartbeat / 2  # sweeps run every half heartbeat
        # a cluster keeps a lost session's nick a grace period more (for its client to
        # resume elsewhere), settled at a sweep after it
        held = limit + 2 * margin if self.registry.keeps_lost() else 0.0
        silent = self.silent_for(holder.sid)
        if silent is None and holder.broker and holder.broker != self.name:
            silent = yield self.presence.silent(holder.broker, holder.sid)
        if silent is None:  # held (its broker dead, or it no longer knows it): free by then
            return {"free_in": limit + held}
        free_in = max(limit - silent, 0.0) + margin + held
        return {"free_in": round(free_in, 3), "silent": round(silent, 3)}

    def _missed_privates(
        self, ident: Identity, since: float
    ) -> Generator[Op, Any, list[dict[str, Any]]]:
        """For a resume: the private messages to this client at or after `since` (one may
        have gone to its old connection as it died). Only those sent to the identity it
        proves (a CURVE key, or a resume token of MIN_REPLAY_TOKEN characters or more; a nick
        proves nothing) under the nick it has now, in the last REPLAY_WINDOW seconds: the
        latest m.MAX_HISTORY of them. Read before the HELLO changes anything."""
        since = max(since, self.clock.time() - REPLAY_WINDOW)
        try:
            stored = yield self.room_log.privates_to(ident.recipient, since, m.MAX_HISTORY)
        except Exception as exc:  # the client still gets in; only this replay is missing
            log.error("private messages for %s not read: %s", ident.nick, exc)
            return []
        return [json.loads(data) for data in stored]

    def _hello_catch_up(self, key: str, b: dict[str, Any]) -> Generator[Op, Any, None]:
        """A nick freed or taken on another broker just now; a guest's, registered there
        just now? A guest resuming the nick it holds needs no more (only its holder
        registers a nick), and resumes under a stopped node are what must stay quick."""
        guest = b["proof"] is None
        yield self.registry.catch_up(accounts=guest and not b["resume"])
        if guest and b["resume"] and not self._holds(key, b):
            yield self.registry.catch_up(accounts=True)

    def _nick_for(self, account: str, nick: str, key: str) -> tuple[str, str, Identity | None]:
        """The nick a HELLO is to have (and its key, and who holds it now): the one asked
        for, or the one the account is on under already (it took another since: this is
        a further device of it, devices.py)."""
        holder = self.registry.holder(key)
        if account and (holder is None or holder.account != account):
            current = self._account_holder(account)
            if current is not None:
                return current.nick, current.key, current
        return nick, key, holder

    def _holds(self, key: str, b: dict[str, Any]) -> bool:
        """A resuming HELLO from the client that holds this nick (its token's hash)."""
        holder = self.registry.holder(key)
        hashed = token_hash(b["token"])
        return bool(
            holder is not None
            and b["resume"]
            and hashed
            and hmac.compare_digest(holder.token_hash, hashed)
        )

    def _on_nick(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        new = req.body["nick"]
        key = m.nick_key(new)
        yield self.registry.catch_up(accounts=True)  # taken, or registered, elsewhere just now?
        holder = self.registry.holder(key)
        if holder is not None and holder.sid != s.sid:
            raise ProtocolError(Code.NICK_TAKEN, f"the nickname {holder.nick} is taken")
        self._may_take(s, new, key)
        if self.rules.keys_required and not s.ident.account:
            owner = self.registry.nick_owner(key)
            if owner is not None and owner != s.ident.pubkey:
                raise ProtocolError(Code.NICK_TAKEN, f"the nickname {new} belongs to another key")
            yield self.registry.bind_nick(key, s.ident.pubkey)
        old = s.nick
        if old == new:
            return {"nick": new}
        yield self.registry.rename(s.ident, new, key)
        s.ident.nick, s.ident.key = new, key
        yield gather(
            self._store(
                name,
                [
                    Draft(
                        EventKind.NICK,
                        old,
                        f"{old} is now known as {new}",
                        m.nick_key(old),
                        None,
                        {"new": new},
                    )
                ],
            )
            for name in sorted(s.rooms)
        )
        return {"nick": new, "old": old}

    def _account_recipient(self, nick: str) -> Identity | None:
        """PRIV to a nick nobody holds (accounts.py): the account of that name, if any."""
        return None

    def _may_take(self, s: Session, nick: str, key: str) -> None:
        """NICK: refuse a nick that is another's account (accounts.py)."""

    def _on_priv(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        b = req.body
        target = self.registry.holder(m.nick_key(b["to"]))
        if target is None:  # connected (or an account registered) just now on another broker?
            yield self.registry.catch_up(accounts=True)
            target = self.registry.holder(m.nick_key(b["to"]))
        if target is None:  # an account: kept for it, under whatever nick, or until it is back
            target = self._account_recipient(b["to"])
        if target is None:
            raise ProtocolError(Code.NO_SUCH_NICK, f"nobody called {b['to']} is connected")
        duplicate = {"to": target.nick, "id": b["id"], "duplicate": True}
        if self.room_log.known_ids(s.ident.owner, [b["id"]])[b["id"]] is not None:
            return duplicate  # a retry
        if b["retry"] is not None:  # sent before: kept through another broker a while ago?
            since = self.clock.time() - min(b["retry"], RETRY_WINDOW) - RETRY_MARGIN
            if (yield self.room_log.private_kept(s.ident.owner, target.recipient, b["id"], since)):
                return duplicate
        self._charge(s, 1)
        ts = self.clock.time()
        event = {
            "kind": "private",
            "nick": s.nick,
            "to": target.nick,
            "text": b["text"],
            "ts": ts,
            "cmid": b["id"],
            "bot": s.ident.bot,
        }
        if b["hops"] is not None:
            event["hops"] = b["hops"]
        yield self.room_log.append_private(
            ts, s.ident.owner, target.recipient, b["id"], m.dumps(event), s.key
        )
        self.push_to(target, Reply.PRIVATE, {"event": event})
        self._tell_others(s, Reply.PRIVATE, {"event": event})  # its account's other devices
        return {"to": target.nick, "id": b["id"], "event": event}

    def _on_ping(self, s: Session, req: m.Request) -> dict[str, Any]:
        last = self.room_log.last
        return {"rooms": {name: last(name) for name in s.rooms}}

    def _on_bye(self, s: Session, req: m.Request) -> Generator[Op, Any, dict[str, Any]]:
        log_event(log, "quit", nick=s.nick, sid=s.sid, reason=req.body["reason"] or "")
        yield self._drop(s, Why.QUIT, req.body["reason"] or "")
        return {"bye": s.nick}
