"""Which brokers are alive: each beats into the brokers bucket and watches the others'.

A broker that stops beating for three heartbeats is dead; its sessions that their clients
did not resume on another broker within three more are settled (announced as lost, once:
whoever settles one claims it with a compare-and-set on its record).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from zmqchat._cluster.names import Beat, Bucket
from zmqchat._core.state import Op

if TYPE_CHECKING:
    from zmqchat._cluster.state import Cluster

logger = logging.getLogger("zmqchat.cluster")


class Liveness:
    """Our beats, the other brokers' as last heard, and the dead brokers to settle."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        # when each broker's beat last changed (our clock), and since when each dead one is
        self.seen: dict[str, float] = {}
        self.dead: dict[str, float] = {}
        self.beat_ok = 0.0  # when our last beat got through
        self.healthy_since: float | None = None  # ours getting through without a break since
        self.started_at = 0.0
        self.peers: dict[str, dict[str, Any]] = {}  # broker name -> its last beat

    @property
    def limit(self) -> float:
        """Three heartbeats: how long a broker may be silent, and its clients away."""
        return 3 * self.cluster.heartbeat

    def start(self) -> None:
        """Joining: refuse a name a live broker has; settle our last run's sessions."""
        name = self.cluster.name
        self.started_at = time.monotonic()
        mine = self.peers.get(name)
        if (
            mine is not None
            and mine.get("state") == Beat.UP
            and time.time() - float(mine.get("at", 0)) < self.limit
        ):
            raise OSError(
                f"a broker named {name} is already in this cluster: give each broker its own --name"
            )
        if any(i.broker == name for i in self.cluster.registry.identities()):
            self.dead[name] = self.started_at  # our last run's sessions: settle them too
        self._beat()

    def record(self, state: Beat) -> dict[str, Any]:
        return {"state": str(state), "at": time.time()}

    def tick(self) -> None:
        """Every half heartbeat: beat, and settle the sessions of brokers that stopped."""
        self._beat()
        now = time.monotonic()
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
        for name, since in list(self.dead.items()):
            if now - since >= self.limit:
                self._reap(name)

    def _beat(self) -> None:
        sent = time.monotonic()
        op = self.cluster.put(Bucket.BROKERS, self.cluster.name, self.record(Beat.UP))

        def answered(op: Op) -> None:
            now = time.monotonic()
            if op.error is None and now - sent < self.cluster.heartbeat:
                self.beat_ok = now
                if self.healthy_since is None:
                    self.healthy_since = now
            else:
                self.healthy_since = None  # we cannot tell who is dead while cut off

        op.then(answered)

    def observe(self, name: str, value: bytes | None) -> None:
        """A broker's beat record changed (None: deleted)."""
        beat = json.loads(value) if value else {}
        self.peers[name] = beat
        if name == self.cluster.name:
            return
        state = beat.get("state")
        if state == Beat.UP:
            self.seen[name] = time.monotonic()
            if self.dead.pop(name, None) is not None:
                logger.warning("broker %s is beating again", name)
        elif state == Beat.STOPPED and name not in self.dead:
            self.dead[name] = time.monotonic()  # stopped on purpose: no need to wait
            self.seen.pop(name, None)

    def _reap(self, broker: str) -> None:
        """Settle the sessions a dead broker held and their clients did not take back:
        each is claimed with a compare-and-set on its record, so only one broker
        announces it."""
        del self.dead[broker]
        self.seen.pop(broker, None)
        registry, local = self.cluster.registry, self.cluster.core.local_sids()
        for ident in list(registry.identities()):
            if ident.broker == broker and ident.sid not in local:
                registry.reap(ident)
        if broker != self.cluster.name:
            record = {**self.record(Beat.GONE), "by": self.cluster.name}
            self.cluster.put(Bucket.BROKERS, broker, record)
