"""A room's stream, on the bridge's side: the batches this broker appends to it, the
events it follows in it, and reads of its history.

One stream message holds events of one room, numbered a..b (the room's seqs): those one
broker had for the room while its previous message was in flight, so that a pass's
messages share one publish and one Raft round. Its header `Zc-First` says a; `Zc-Kinds`
and `Zc-Ids` give each event's kind and message id; the body is their stored tails, one a
line. (A message without `Zc-First` is one event numbered by its stream sequence, as
streams written before batches hold.)

Who numbers them: the broker that appends, from what it knows of the stream's end (its
last message: stream sequence L, room seq N). It publishes its next message as a..b with
a = N + 1 and `Nats-Expected-Last-Sequence: L`, so JetStream stores it only if nothing
came in between; if something did, the publish is refused, the broker reads what it had
missed and tries again. One message of a room is in flight from a broker at a time; what
arrives meanwhile waits and goes in the next. (A second one in flight would need to be
stored only right after the first, which `Nats-Expected-Last-Msg-Id` says; but nats-server
2.15.1 leaves a replicated stream without a leader once it refuses a message by that
header: bench/README.md, "Issue 22 on a quiet host"; and two in flight without any guard
gave W1F nothing and W2 worse: "Issue 22, a fourth stop".) A message that gets no answer
is published again (same `Nats-Msg-Id`: JetStream stores it once) until it is answered.

De-duplication: a client message's id is remembered once it is stored (SeenIds); an event
whose id is stored, queued or in flight is not published again, its sender gets the seq it
has. The expected-last-sequence rule makes this complete: a message is stored only by a
broker that had read everything before it. What a broker knows reaches back to the last
`WINDOW_EVENTS` events before it began writing to or following the room; further for a
client's message whose SAY says the room's seq its client had heard when it first sent it
(`heard`: its first copy, if any, is after that): a broker that knows ids only from later
reads the room back to there first (from the newest, until it finds them; MAX_READBACK
events at most), so that a retry after a long outage, to a broker that came to the room
since, is still recognised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from zmqchat import protocol as m
from zmqchat._cluster.history import History, Stored, parse, stored_of
from zmqchat._cluster.names import News, SeenIds, room_stream, room_subject

logger = logging.getLogger("zmqchat.cluster")

MAX_EVENTS: Final = 1000  # events in one stream message
MAX_BYTES: Final = 512 * 1024  # bytes in one (NATS's default max_payload is 1 MiB)
RETRY_EVERY: Final = 0.5  # seconds an unanswered message waits before it is published again
PROBE_AFTER: Final = 1.0  # seconds one may wait before we ask whether our server is there
WINDOW_EVENTS: Final = 1000  # events read back when a broker first writes to or follows a room
MAX_READBACK: Final = 20_000  # events read further back for a retry whose sender heard less
READBACK_CHUNK: Final = 2000  # events of one read of them
INDEX_MESSAGES: Final = 100_000  # stream messages whose first seq a room remembers
READ_BATCH: Final = 500  # messages per direct-get request
WRONG_LAST: Final = 10071  # JetStream: "wrong last sequence: N"
DEPARTURES: Final = frozenset({"leave", "kick", "ban"})
CLIENT_KINDS: Final = frozenset({"msg", "action"})


class Host(Protocol):
    """What a room's stream uses of the bridge."""

    nc: Any
    js: Any
    ns: str
    seen: SeenIds
    erased: Any

    def send(self, frames: list[bytes]) -> None: ...

    def spawn(self, coro: Awaitable[Any]) -> None: ...

    def reply_to(self, handler: Callable[[Any], None]) -> tuple[str, str]: ...

    def forget_reply(self, reply_id: str) -> None: ...

    def answer(self, call: Call) -> None: ...

    async def direct(self, stream: str, request: dict[str, Any]) -> list[Any]: ...


@dataclass(eq=False)
class Call:
    """An APPEND command: its events' seqs, filled as each is stored."""

    id: bytes
    room: str
    seqs: list[int]
    left: int
    deadline: float
    done: bool = False


@dataclass(eq=False)
class Pending:
    """An event waiting to be stored, and who waits for its seq."""

    msgid: str
    kind: str
    tail: bytes
    waiters: list[tuple[Call, int]] = field(default_factory=list)
    keep_until: float = 0.0  # a notice of ours: kept trying for until then, whoever waits


@dataclass(eq=False)
class Flight:
    """The stream message in flight: its events, what it expects the stream's end to be."""

    id: str
    events: list[Pending]
    expected: int
    first: int
    payload: bytes
    headers: dict[str, str]
    sent_at: float
    born: float
    reply_id: str = ""


class RoomStream:
    """One room's stream: see the module docstring."""

    def __init__(self, host: Host, room: str) -> None:
        self.host, self.room = host, room
        self.stream, self.subject = room_stream(host.ns, room), room_subject(host.ns, room)
        self.known_seq = -1  # every stream message up to this one is learned (-1: not loaded)
        self.known_room = 0  # and the room's seqs up to this one
        self.loading: asyncio.Future[None] | None = None
        self.queue: list[Pending] = []
        self.by_id: dict[str, Pending] = {}  # queued or in flight
        self.flight: Flight | None = None
        self.refreshing = False
        self.index: list[tuple[int, int]] = []  # (first seq, stream seq), ascending
        self.history = History(host, room, self.index)
        self.recent: deque[Stored] = deque()  # the last WINDOW_EVENTS events' messages
        self.recent_events = 0
        self.ids_from = 0  # the room's first seq whose message ids we know (0: not loaded)
        self.floor = 0  # the room's seq no read back goes before
        self.checking: list[tuple[Call, list[tuple[str, str, bytes]], float, int | None]] | None
        self.checking = None  # APPENDs held while the room is read back (_look_back)
        # following
        self.following = False
        self.sub: Any = None
        self.handed = 0  # the highest seq handed to the broker
        self.outgoing: list[Stored] = []
        self.flush_soon = False

    # ------------------------------------------------------------------ knowing the end
    async def loaded(self) -> None:
        """Know the stream's end and the last WINDOW_EVENTS events' ids (once)."""
        if self.known_seq >= 0:
            return
        if self.loading is None:
            self.loading = asyncio.get_running_loop().create_future()
            try:
                window = await self._window()
            except BaseException as exc:
                future, self.loading = self.loading, None
                future.set_exception(exc)
                future.exception()  # retrieved: whoever waits gets it too
                raise
            if self.known_seq < 0:
                self.known_seq, self.known_room = (
                    (window[0].seq - 1, window[0].first - 1) if window else (0, 0)
                )
                self.ids_from = self.known_room + 1
                self.floor = self.ids_from - MAX_READBACK  # (read back no further, ever)
            for stored in window:
                self.learn(stored)
            self.loading.set_result(None)
        await asyncio.shield(self.loading)

    async def _window(self) -> list[Stored]:
        """The stream's last messages, back to WINDOW_EVENTS events, read from its leader
        (a replica may lag: the end must be the end). Each get may be answered by another
        replica: one that lags answers short, and what it lacks is read from the leader, not
        taken for erased messages (a hole would be filled with `deleted` events)."""
        info = await self.host.js.stream_info(self.stream)
        last = info.state.last_seq
        if last == 0:
            return []
        out: list[Stored] = []
        start, events, size = last + 1, 0, 50
        while start > 1 and events < WINDOW_EVENTS:
            size = min(READ_BATCH, start - 1, size)
            start -= size
            request = {"seq": start, "batch": size}
            upper = out[0].seq if out else last + 1  # (read already from there on)
            got = [stored_of(m) for m in await self.host.direct(self.stream, request)]
            got = [g for g in got if g.seq < upper]
            end = got[-1].seq if got else start - 1
            if end < upper - 1:  # answered by a replica behind the one before: the rest
                got += await self.history.messages(end + 1, upper - 1)  # (not erased ones)
            out = got + out
            events += sum(len(g.tails) for g in got)
            per_message = max(1.0, events / max(1, len(out)))
            size = max(10, int((WINDOW_EVENTS - events) / per_message) + 1)
        if not out or out[-1].seq < last:  # a replica that lags: the rest from the leader
            out += await self.history.messages((out[-1].seq if out else start - 1) + 1, last)
        return await self.history.filled(out)

    def learn(self, stored: Stored) -> None:
        """The stream's next message (in stream order; others are ignored): its ids are
        stored, the end moves on, and a room we follow gets its events."""
        if stored.seq <= self.known_seq or stored.last <= self.known_room:
            return  # (a stream's sequence skips what was deleted from it)
        self.known_seq, self.known_room = stored.seq, stored.last
        seen = self.host.seen
        for i, msgid in enumerate(stored.ids):
            if msgid:
                seen.add(msgid, self.room, stored.first + i)
        self.index.append((stored.first, stored.seq))
        if len(self.index) > INDEX_MESSAGES:
            del self.index[: len(self.index) // 10]
        self.recent.append(stored)
        self.recent_events += len(stored.tails)
        while self.recent_events - len(self.recent[0].tails) >= WINDOW_EVENTS:
            self.recent_events -= len(self.recent.popleft().tails)
        for i, msgid in enumerate(stored.ids):
            pending = self.by_id.get(msgid)
            if pending is not None and (self.flight is None or pending not in self.flight.events):
                self._stored(pending, stored.first + i)  # someone else's copy got in first
        if self.following and stored.last > self.handed:
            self.outgoing.append(stored)
            if not self.flush_soon:
                self.flush_soon = True
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand what was learned to the broker: one EVENTS per run of messages."""
        self.flush_soon = False
        out, self.outgoing = self.outgoing, []
        if not out or not self.following:
            return
        prefix = self.room.encode()
        frames: list[bytes] = []
        departures: list[int] = []
        ids: list[list[Any]] = []
        first = 0
        for stored in out:
            skip = max(0, self.handed - stored.first + 1)
            if skip >= len(stored.tails):
                continue
            if not frames:
                first = stored.first + skip
            for i in range(skip, len(stored.tails)):
                seq = stored.first + i
                kind = stored.kinds[i] if i < len(stored.kinds) else ""
                if kind in DEPARTURES:
                    departures.append(seq)
                msgid = stored.ids[i] if i < len(stored.ids) else ""
                if msgid and kind in CLIENT_KINDS:
                    ids.append([msgid, seq])
                frames.append(m.numbered(self.room, seq, stored.tails[i]))
            self.handed = stored.last
        if frames:
            meta = json.dumps({"departures": departures, "ids": ids}).encode()
            self.host.send([News.EVENTS, prefix, str(first).encode(), meta, *frames])

    # ------------------------------------------------------------------ following
    async def follow(self) -> None:
        """Follow the room: the last WINDOW_EVENTS events to the broker, then each new
        message as it is stored (an ordered consumer from the end on). Followed already:
        what the stream has now is read first (a subscription may lag, and a client that
        resumes here must not be told the room is at an older seq than it has seen)."""
        if self.following:
            await self.caught_up()
            return
        again = self.known_seq >= 0  # followed before (or written to): what came since
        await self.loaded()
        if again:  # first, or the broker is told the room is where it was then
            for stored in await self.history.messages(self.known_seq + 1, None):
                self.learn(stored)
        if self.following:
            await self.caught_up()
            return
        self.handed = (self.recent[0].first if self.recent else self.known_room + 1) - 1
        self.host.send([News.LAST, self.room.encode(), str(self.handed).encode()])
        self.following = True
        self.outgoing = list(self.recent)  # the broker gets the window first
        self.flush()
        try:
            await self._subscribe()
        except BaseException:
            self.following = False
            raise

    async def caught_up(self) -> None:
        """Everything the stream's leader has now, learned (and handed over)."""
        for stored in await self.history.messages(self.known_seq + 1, None):
            self.learn(stored)
        self.flush()

    async def _subscribe(self) -> None:
        from nats.js import api

        async def arrived(msg: Any) -> None:
            self._arrived(msg)

        self.sub = await self.host.js.subscribe(
            self.subject,
            stream=self.stream,
            cb=arrived,
            ordered_consumer=True,
            idle_heartbeat=1.0,  # one that hears nothing for two starts over
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.known_seq + 1,
            ),
            pending_msgs_limit=1 << 20,
            pending_bytes_limit=1 << 30,
        )

    def _arrived(self, msg: Any) -> None:
        """A message from our subscription, in stream order."""
        seq = msg.metadata.sequence.stream
        if seq <= self.known_seq:
            return
        stored = parse(seq, msg.headers, msg.data or b"")
        if stored.first > self.known_room + 1:  # missed some (a consumer that started over
            self.host.spawn(self._catch_up_to(stored))  # past them): read them first
            return
        self.learn(stored)
        if self.sub is not None and not self.sub.pending_msgs:  # the last that came
            self.flush()  # now, not a turn of the loop later

    async def _catch_up_to(self, stored: Stored) -> None:
        logger.warning(
            "%s: stream messages %d..%d skipped by the subscription; reading them",
            self.room,
            self.known_seq + 1,
            stored.seq - 1,
        )
        for missing in await self.history.messages(self.known_seq + 1, stored.seq):
            self.learn(missing)
        self.flush()

    async def unfollow(self) -> None:
        self.following = False
        self.outgoing = []
        sub, self.sub = self.sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection is gone: so is the consumer
                pass

    # ------------------------------------------------------------------ appending
    def append(
        self,
        call: Call,
        events: list[tuple[str, str, bytes]],
        keep_until: float,
        heard: int | None = None,
    ) -> None:
        """An APPEND's events (msgid, kind, tail), in order, into the queue. One whose
        client messages may be retries of copies stored before the ids we know (their
        sender had heard less than that when it first sent them) waits while the room is
        read back to there, one such APPEND at a time; the others go on. (A client has one
        SAY per room waiting for its reply, PROTOCOL.md says, if its order is to hold.)"""
        if heard is None or not self._before_known(heard, events):
            self._enqueue(call, events, keep_until)
            return
        if self.checking is None:
            self.checking = []
            self.host.spawn(self._look_back())
        self.checking.append((call, events, keep_until, heard))

    def _known_from(self) -> int:
        """The room's first seq from which every stored message's id is known here (0:
        the stream not read yet)."""
        return max(self.ids_from, self.host.seen.forgot.get(self.room, 0) + 1)

    def _before_known(self, heard: int, events: list[tuple[str, str, bytes]]) -> bool:
        """Whether a client message of these, its id unknown here, may have been stored
        before the ids we know: its sender had heard only up to `heard`."""
        if self.known_seq >= 0 and heard + 1 >= self._known_from():
            return False
        return bool(self._unknown(events))

    def _unknown(self, events: list[tuple[str, str, bytes]]) -> set[str]:
        """The client messages' ids among these that are neither stored nor queued here."""
        seen = self.host.seen
        return {
            msgid
            for msgid, kind, _ in events
            if kind in CLIENT_KINDS and seen.get(msgid) is None and msgid not in self.by_id
        }

    async def _look_back(self) -> None:
        """The held APPENDs, in turn: the room read back for each that still needs it."""
        try:
            while self.checking:
                call, events, keep_until, heard = self.checking[0]
                found: dict[str, int] = {}
                if heard is not None and not call.done and self._before_known(heard, events):
                    try:
                        await self.loaded()
                        found = await self._read_back(heard, self._unknown(events))
                    except Exception as exc:  # noqa: BLE001 - the cluster is away: again soon
                        logger.info("%s: could not read back to seq %d (%s)", self.room, heard, exc)
                        await asyncio.sleep(RETRY_EVERY)
                        continue
                del self.checking[0]
                if call.done:  # failed meanwhile: its client sends them again
                    events = [e for e in events if e[1] not in CLIENT_KINDS]
                self._enqueue(call, events, keep_until, found)
        finally:
            self.checking = None

    async def _read_back(self, heard: int, wanted: set[str]) -> dict[str, int]:
        """Learn the ids of the room's messages from seq heard + 1 up to those we know,
        READBACK_CHUNK events at a time from the newest, until the `wanted` ids are found
        (MAX_READBACK events at most, and never before `floor`): where each wanted one is.
        (Kept apart too: learned ids may push older ones out of SeenIds, these among them.)"""
        known_from = self._known_from()
        lo = max(heard + 1, known_from - MAX_READBACK, self.floor, 1)
        found: dict[str, int] = {}
        if self.known_seq < 0 or lo >= known_from:
            return found
        seen, hi = self.host.seen, known_from - 1
        while hi >= lo and len(found) < len(wanted):
            start = max(lo, hi - READBACK_CHUNK + 1)
            for seq, _, kind, msgid in await self.history.events(start, hi, hi):
                if msgid and kind in CLIENT_KINDS:
                    seen.add(msgid, self.room, seq)
                    if msgid in wanted:
                        found[msgid] = seq
            self.ids_from = min(self.ids_from, start)  # every id from there on is learned
            hi = start - 1
        logger.info("%s: read back to seq %d for a retry's first copy", self.room, hi + 1)
        return found

    def _enqueue(
        self,
        call: Call,
        events: list[tuple[str, str, bytes]],
        keep_until: float,
        found: dict[str, int] | None = None,
    ) -> None:
        for slot, (msgid, kind, tail) in enumerate(events):
            hit = self.host.seen.get(msgid)
            if found and msgid in found:  # read back for it just now
                hit = (self.room, found[msgid])
            if hit is not None and hit[0] == self.room:  # stored already: its seq
                self._fill(call, slot, hit[1])
                continue
            pending = self.by_id.get(msgid)
            if pending is None:
                pending = self.by_id[msgid] = Pending(msgid, kind, tail)
                self.queue.append(pending)
            if kind not in CLIENT_KINDS:
                pending.keep_until = max(pending.keep_until, keep_until)
            pending.waiters.append((call, slot))
        self.host.answer(call)
        self.kick()

    def _fill(self, call: Call, slot: int, seq: int) -> None:
        if not call.done and call.seqs[slot] == 0:
            call.seqs[slot] = seq
            call.left -= 1

    def _stored(self, pending: Pending, seq: int) -> None:
        self.by_id.pop(pending.msgid, None)
        if pending in self.queue:
            self.queue.remove(pending)
        for call, slot in pending.waiters:
            self._fill(call, slot, seq)
            self.host.answer(call)

    def expire(self, now: float) -> None:
        """Queued events nobody waits for any more (their calls failed) and that are not
        notices of ours still being tried: dropped."""
        for pending in list(self.queue):
            pending.waiters = [(c, s) for c, s in pending.waiters if not c.done]
            if not pending.waiters and pending.keep_until < now:
                self.queue.remove(pending)
                del self.by_id[pending.msgid]

    def kick(self) -> None:
        """Publish the next message, if none is in flight and something waits."""
        if self.flight is not None or self.refreshing or not self.queue:
            return
        if self.known_seq < 0:
            self.refreshing = True
            self.host.spawn(self._load_then_kick())
            return
        for pending in [p for p in self.queue if self.host.seen.get(p.msgid) is not None]:
            hit = self.host.seen.get(pending.msgid)
            if hit is not None and hit[0] == self.room:  # stored by another broker meanwhile
                self._stored(pending, hit[1])
        if not self.queue:
            return
        events: list[Pending] = []
        size = 0
        for pending in self.queue:
            if events and (len(events) >= MAX_EVENTS or size + len(pending.tail) > MAX_BYTES):
                break
            events.append(pending)
            size += len(pending.tail) + 40
        del self.queue[: len(events)]
        flight_id = uuid.uuid4().hex
        headers = {
            "Nats-Msg-Id": flight_id,
            "Nats-Expected-Last-Sequence": str(self.known_seq),
            "Zc-First": str(self.known_room + 1),
            "Zc-Kinds": ",".join(p.kind for p in events),
            "Zc-Ids": ",".join(p.msgid for p in events),
        }
        payload = b"\n".join(p.tail for p in events)
        self.flight = Flight(
            flight_id,
            events,
            self.known_seq,
            self.known_room + 1,
            payload,
            headers,
            time.monotonic(),  # (published by the task below: not yet due again)
            time.monotonic(),
        )
        self.host.spawn(self._publish(self.flight))

    async def _load_then_kick(self) -> None:
        try:
            await self.loaded()
        except Exception as exc:  # noqa: BLE001 - the cluster is away: again soon
            logger.info("%s: the stream's end not read yet (%s)", self.room, exc)
            await asyncio.sleep(RETRY_EVERY)
        finally:
            self.refreshing = False
        self.kick()

    async def _publish(self, flight: Flight) -> None:
        if self.flight is not flight:
            return
        if flight.reply_id:
            self.host.forget_reply(flight.reply_id)
        flight.reply_id, inbox = self.host.reply_to(lambda msg: self._answered(flight, msg))
        flight.sent_at = time.monotonic()
        try:
            await self.host.nc.publish(
                self.subject, flight.payload, reply=inbox, headers=flight.headers
            )
        except Exception as exc:  # noqa: BLE001 - the connection's buffer is full: later
            logger.info("%s: publish failed (%s); trying again", self.room, exc)

    def retry_due(self, now: float) -> bool:
        """Whether the message in flight went unanswered for RETRY_EVERY."""
        return self.flight is not None and now - self.flight.sent_at >= RETRY_EVERY

    def woke(self, gap: float) -> None:
        """The process did not run for `gap` seconds: the message in flight did not wait
        for our server meanwhile."""
        if self.flight is not None:
            self.flight.born += gap

    def waiting(self, now: float) -> float:
        """How long the message in flight has waited for its answer (0: none in flight)."""
        return now - self.flight.born if self.flight is not None else 0.0

    def retry(self) -> None:
        if self.flight is not None:
            self.host.spawn(self._publish(self.flight))

    def _answered(self, flight: Flight, msg: Any) -> None:
        if self.flight is not flight:
            return
        try:
            answer = json.loads(msg.data) if msg.data else {}
        except ValueError:
            answer = {}
        error = answer.get("error")  # (an error's answer says "seq": 0 too)
        if error is not None:
            if error.get("err_code") == WRONG_LAST:  # someone appended first
                self.host.forget_reply(flight.reply_id)
                self.flight = None
                self._requeue(flight.events)
                self.refreshing = True
                self.host.spawn(self._refresh())
            return  # else a leader being elected, ...: published again when due
        seq = answer.get("seq")
        if seq:  # stored (by this publish, or an earlier one of it: a duplicate)
            self.host.forget_reply(flight.reply_id)
            self.flight = None
            self._landed(flight, int(seq))
            self.kick()
        # 0: a duplicate of a publish of it still in flight (its answer comes); none: no
        # stream answered (a status, no body): published again when due

    def _landed(self, flight: Flight, seq: int) -> None:
        if seq == self.known_seq + 1 and flight.expected == self.known_seq:
            stored = parse(seq, flight.headers, flight.payload)
            for i, pending in enumerate(flight.events):
                self._stored(pending, flight.first + i)
            self.learn(stored)
            return
        # stored earlier than we learned it (the subscription or a read was first): the
        # ids say where each went
        self._requeue(flight.events)
        if self.queue:
            self.refreshing = True
            self.host.spawn(self._refresh())

    def _requeue(self, events: list[Pending]) -> None:
        """A flight's events back in front of the queue, but for those stored meanwhile
        (learned while they were in flight: they get that seq)."""
        back = []
        for pending in events:
            hit = self.host.seen.get(pending.msgid)
            if hit is not None and hit[0] == self.room:
                self._stored(pending, hit[1])
            else:
                back.append(pending)
        self.queue[:0] = back

    async def _refresh(self) -> None:
        """Read what others stored since what we know (then publish again)."""
        try:
            for stored in await self.history.messages(self.known_seq + 1, None):
                self.learn(stored)
            self.flush()
        except Exception as exc:  # noqa: BLE001 - the cluster is away: again soon
            logger.info("%s: could not read the stream's end (%s)", self.room, exc)
            await asyncio.sleep(RETRY_EVERY)
        finally:
            self.refreshing = False
        self.kick()
