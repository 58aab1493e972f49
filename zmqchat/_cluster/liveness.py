"""Which brokers are alive: each beats into the brokers bucket and watches the others'.

A broker that stops beating for three heartbeats is dead; its sessions that their clients
did not resume on another broker within three more are settled (announced as lost, once:
whoever settles one claims it with a compare-and-set on its record). A broker also settles
its own sessions that no connection of its holds any more (its last run's, after a
restart; one whose nick it could not let go while NATS was away).

A beat carries the broker's instance (new at every start), so a broker restarted under the
same name tells its own dead self, whose last beat may be seconds old, from a second broker
given the same name: it waits for one more beat of that name and takes over if none comes.
The one taken over from, if it was only paused, stops when it wakes and hears the newer one
(whose beats name the instance it took over from). A broker that did not run for a while
(stopped with SIGSTOP, or starved of CPU) heard nothing meanwhile: it does not hold that
silence against the others.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zmqchat._cluster.names import Beat, Bucket
from zmqchat._core.state import Op

if TYPE_CHECKING:
    from zmqchat._cluster.calls import Calls, CoreLink
    from zmqchat._cluster.registry import ClusterRegistry

logger = logging.getLogger("zmqchat.cluster")


class Liveness:
    """Our beats, the other brokers' as last heard, and the sessions to settle."""

    def __init__(
        self, calls: Calls, registry: ClusterRegistry, core: CoreLink, heartbeat: float
    ) -> None:
        self.probing = False
        self.calls, self.registry, self.core, self.heartbeat = calls, registry, core, heartbeat
        self.name = ""  # ours, once we join
        self.instance = uuid.uuid4().hex[:16]
        self.took_over = ""  # the instance of our name we took over from (in our beats)
        self.joined = False  # beating (a start refused never did)
        self.replaced = False  # a newer broker of our name took over while we did not run
        self.twins: dict[str, int] = {}  # other instances of our name -> beats heard
        # when each broker's beat last changed (our clock), and since when each dead one is
        self.seen: dict[str, float] = {}
        self.dead: dict[str, float] = {}
        self.heard: dict[str, int] = {}  # broker name -> beats heard
        self.healthy_since: float | None = None  # ours getting through without a break since
        self.trouble = 0.0  # when one of ours last failed, or was late, or was not heard back
        self.own_heard = 0.0  # when our own beat last came back through the watch
        self.orphans: dict[str, float] = {}  # sid of a session of ours no connection holds
        self.peers: dict[str, dict[str, Any]] = {}  # broker name -> its last beat
        self.settled: set[str] = set()  # brokers taken for dead whose sessions we settled

    @property
    def limit(self) -> float:
        """Three heartbeats: how long a broker may be silent, and its clients away."""
        return 3 * self.heartbeat

    def record(self, state: Beat) -> dict[str, Any]:
        beat = {"state": str(state), "at": time.time(), "instance": self.instance}
        return {**beat, "took_over": self.took_over} if self.took_over else beat

    # ------------------------------------------------------------------ joining
    def beaten_by_another(self) -> bool:
        """Whether the last beat under our name is an "up" less than three heartbeats old
        from another instance: a live broker of that name, or our own last run, killed."""
        mine = self.peers.get(self.name)
        return (
            mine is not None
            and mine.get("state") == Beat.UP
            and mine.get("instance") != self.instance
            and time.time() - float(mine.get("at", 0)) < self.limit
        )

    def waiting_for_beat(self) -> Callable[[], bool]:
        """A condition that turns true when a beat of our name comes from elsewhere."""
        name = self.name
        before = self.heard.get(name, 0)
        return lambda: self.heard.get(name, 0) > before

    def join(self, another_beat: bool) -> None:
        """Start beating, unless a live broker has our name (OSError)."""
        if another_beat:
            raise OSError(
                f"a broker named {self.name} is already in this cluster (it is "
                "beating): give each broker its own --name"
            )
        mine = self.peers.get(self.name) or {}
        last = mine.get("instance")
        if mine.get("state") in (Beat.UP, Beat.GONE) and last and last != self.instance:
            self.took_over = str(last)  # (told to it in our beats, should it wake)
        self.joined = True
        self._beat()

    # ------------------------------------------------------------------ every half heartbeat
    def tick(self) -> None:
        """Beat; find the brokers that stopped; settle what their clients left behind."""
        self._beat()
        now = time.monotonic()
        if now - self.own_heard > self.heartbeat:  # the watch of the beats is behind (its
            # consumer being moved off a node that died, say): we hear nobody's, ours neither
            self.healthy_since, self.trouble = None, now
        healthy = self.healthy_since is not None and now - self.healthy_since >= self.limit
        if healthy:
            for name, seen in list(self.seen.items()):
                if name not in self.dead and now - seen > self.limit:
                    logger.warning(
                        "broker %s stopped beating: its clients have %g s to resume elsewhere",
                        name,
                        self.limit,
                    )
                    self.dead[name] = now
        # A dead broker's clients get a grace period of a working cluster to resume: while
        # our beats or catch-ups fail or are slow (a NATS node down, a leader being
        # elected), so may their resumes.
        settled = now - self.trouble >= self.limit
        for name, since in list(self.dead.items()):
            if now - since >= self.limit and settled:
                self._reap_broker(name)
        if (self.dead or self.orphans) and not self.probing:
            self._probe_registry()
        self._reap_orphans(now)

    def woke(self, gap: float) -> None:
        """We did not run for `gap` seconds: what we did not hear meanwhile (the others'
        beats, waiting in NATS) is not their silence; nor do our own beats prove anything
        until they get through again."""
        for table in (self.seen, self.dead, self.orphans):
            for name in table:
                table[name] += gap
        self.healthy_since = None
        self.trouble = time.monotonic()

    def _beat(self) -> None:
        sent = time.monotonic()
        op = self.calls.put(Bucket.BROKERS, self.name, self.record(Beat.UP))

        def answered(op: Op) -> None:
            now = time.monotonic()
            if op.error is None and now - sent < self.heartbeat:
                if self.healthy_since is None:
                    self.healthy_since = now
            else:
                self.healthy_since = None  # we cannot tell who is dead while cut off
                self.trouble = now

        op.then(answered)

    def _probe_registry(self) -> None:
        """While sessions wait to be settled: can a client resume now? (A resume reads
        every registry bucket; a bucket whose leader is being elected stalls it.)"""
        self.probing = True
        asked = time.monotonic()

        def answered(op: Op) -> None:
            self.probing = False
            if op.error is not None or time.monotonic() - asked > self.heartbeat:
                self.trouble = time.monotonic()

        self.registry.catch_up().then(answered)

    def observe(self, name: str, value: bytes | None) -> None:
        """A broker's beat record changed (None: deleted)."""
        beat = json.loads(value) if value else {}
        self.peers[name] = beat
        if name == self.name:
            if beat.get("instance") == self.instance:
                self.own_heard = time.monotonic()
            else:
                self.heard[name] = self.heard.get(name, 0) + 1
                if beat.get("state") == Beat.UP and self.joined:
                    self._twin(beat)
            return
        self.heard[name] = self.heard.get(name, 0) + 1
        state = beat.get("state")
        if state == Beat.UP:
            self.seen[name] = time.monotonic()
            if self.dead.pop(name, None) is not None or name in self.settled:
                logger.warning("broker %s is beating again", name)
            self.settled.discard(name)
        elif state == Beat.STOPPED and name not in self.dead:
            self.dead[name] = time.monotonic()  # stopped on purpose: no need to wait
            self.seen.pop(name, None)

    def _twin(self, beat: dict[str, Any]) -> None:
        """Another broker beats under our name. One that took over from us (its beats say
        so: we did not run for longer than the others wait, and a supervisor started it):
        we stop, and our clients resume on the others. The one we took over from, woken:
        it stops when it hears us. Else two brokers were given one name."""
        instance = str(beat.get("instance"))
        if beat.get("took_over") == self.instance:
            if not self.replaced:
                self.replaced = True
                logger.error(
                    "broker %s was started again while this one did not run, and took "
                    "over: this one stops (its clients resume on the others)",
                    self.name,
                )
            return
        self.twins[instance] = self.twins.get(instance, 0) + 1
        if self.twins[instance] != 2:  # said once; a first one alone may be a beat of a
            return  # run killed just before we took over, stored late (a node away)
        if instance == self.took_over:
            logger.warning(
                "the run of broker %s that this one took over from beats again (it did not "
                "run for a while): it stops once it hears this one",
                self.name,
            )
        else:
            logger.error(
                "another broker beats under our name %s: give each its own --name", self.name
            )

    # ------------------------------------------------------------------ settling
    def _reap_broker(self, broker: str) -> None:
        """Settle the sessions a dead broker held and their clients did not take back:
        each is claimed with a compare-and-set on its record, so only one broker
        announces it."""
        del self.dead[broker]
        self.seen.pop(broker, None)
        self.settled.add(broker)
        logger.warning("broker %s taken for dead: settling the sessions it held", broker)
        registry = self.registry
        for ident in registry.every_session():
            if ident.broker == broker:
                registry.reap(ident)
        record = {"state": str(Beat.GONE), "at": time.time(), "by": self.name}
        instance = self.peers.get(broker, {}).get("instance")
        if instance:  # the run taken for dead: one that takes its name over says so to it
            record["instance"] = instance
        self.calls.put(Bucket.BROKERS, broker, record)

    def _reap_orphans(self, now: float) -> None:
        """Our own sessions that no connection of ours holds: our last run's (their
        clients get the grace period to resume), or one whose nick we could not let go
        when it was lost."""
        name, local = self.name, self.core.local_sids()
        current = set()
        for ident in self.registry.every_session():
            if ident.broker != name or ident.sid in local:
                continue
            current.add(ident.sid)
            since = self.orphans.setdefault(ident.sid, now)
            if now - since >= self.limit and now - self.trouble >= self.limit:
                self.orphans[ident.sid] = now  # once a grace period (it may be in flight)
                self.registry.reap(ident)
        for sid in [sid for sid in self.orphans if sid not in current]:
            del self.orphans[sid]
