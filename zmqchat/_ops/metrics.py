"""What a broker counts, and its Prometheus metrics (`broker.py --metrics-port N`).

The loop only bumps plain counters (`Stats`); prometheus_client's HTTP server, a thread of
its own, reads them when scraped (`BrokerCollector`), so a request costs the loop a dict
increment and no lock. prometheus_client is imported only when metrics are served.
"""

from __future__ import annotations

import bisect
import sqlite3
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from zmqchat.broker._loop import Broker

# Upper bounds (seconds) of the acknowledgement-latency histogram: 0.1 ms to 5 s.
ACK_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Stats:
    """Counters the broker's loop keeps; read, never written, by the metrics thread."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # by command kind
        self.events: Counter[str] = Counter()  # appended by this broker, by event kind
        self.errors: Counter[str] = Counter()  # error replies, by code
        self.ack_counts = [0] * (len(ACK_BUCKETS) + 1)
        self.ack_sum = 0.0

    def acknowledged(self, seconds: float) -> None:
        """A SAY acknowledged `seconds` after it arrived."""
        self.ack_counts[bisect.bisect_left(ACK_BUCKETS, seconds)] += 1
        self.ack_sum += seconds


class BrokerCollector:
    """Turns a broker's counters into Prometheus metric families at scrape time."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        b, core = self.broker, self.broker.core
        stats = core.stats
        info = GaugeMetricFamily("zmqchat_broker_info", "This broker", labels=["broker", "mode"])
        info.add_metric([b.name, "cluster" if b.cluster is not None else "single"], 1)
        yield info
        yield GaugeMetricFamily(
            "zmqchat_connected_clients", "Sessions on this broker", value=len(core.by_rid)
        )
        members = GaugeMetricFamily(
            "zmqchat_room_members", "Members of each room on this broker", labels=["room"]
        )
        for name, room in list(core.rooms.items()):
            members.add_metric([name], len(room.members))
        yield members
        for name, doc, counts, label in (
            ("zmqchat_requests", "Requests by command", stats.requests, "kind"),
            ("zmqchat_events", "Room events this broker appended, by kind", stats.events, "kind"),
            ("zmqchat_errors", "Error replies by code", stats.errors, "code"),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, n in sorted(dict(counts).items()):
                family.add_metric([key], n)
            yield family
        yield CounterMetricFamily(
            "zmqchat_rate_limited",
            "Requests refused by the rate limit",
            value=stats.errors.get("RATE_LIMITED", 0),
        )
        acks, running, buckets = list(stats.ack_counts), 0, []
        for bound, n in zip([*map(str, ACK_BUCKETS), "+Inf"], acks, strict=True):
            running += n
            buckets.append((bound, running))
        yield HistogramMetricFamily(
            "zmqchat_ack_seconds",
            "From a SAY's arrival to its acknowledgement (stored)",
            buckets=buckets,
            sum_value=stats.ack_sum,
        )
        if b.store is not None:
            yield GaugeMetricFamily(
                "zmqchat_history_lag_events",
                "Events logged but not yet in SQLite (the history writer's lag)",
                value=self._history_lag(),
            )
        if b.cluster is not None:
            yield GaugeMetricFamily(
                "zmqchat_cluster_commands_pending",
                "Commands to NATS waiting for an answer",
                value=len(b.cluster.calls),
            )

    def _history_lag(self) -> int:
        logged = dict(self.broker.log.seqs)
        con = sqlite3.connect(f"file:{self.broker.cfg.db}?mode=ro", uri=True, timeout=1)
        try:
            stored = dict(con.execute("SELECT room, MAX(seq) FROM events GROUP BY room"))
        except sqlite3.Error:
            return -1
        finally:
            con.close()
        return sum(max(0, seq - stored.get(room, 0)) for room, seq in logged.items())


def serve(broker: Broker, host: str, port: int) -> Any:
    """Serve /metrics over HTTP on a thread; returns the server (shutdown() to stop)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
