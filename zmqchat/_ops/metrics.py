"""A broker's Prometheus metrics (`broker.py --metrics-port N`).

The core only bumps plain counters (zmqchat._core.stats); prometheus_client's HTTP server, a
thread of its own, reads them when scraped (`BrokerCollector`), through the small `Source`
interface that the broker implements, so a request costs the loop a dict increment and no
lock. prometheus_client is imported only when metrics are served.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from zmqchat._core.stats import ACK_BUCKETS, Stats


class Source(Protocol):
    """What the exporter reads of a broker (the broker implements it); called from the
    exporter's thread, so each answer is a copy or a plain number."""

    name: str

    def mode(self) -> str:
        """'single' or 'cluster'."""

    def counters(self) -> Stats: ...

    def connected(self) -> int:
        """Sessions on this broker."""

    def room_members(self) -> dict[str, int]:
        """Members of each room on this broker."""

    def history_lag(self) -> int | None:
        """Events logged but not yet in SQLite (None: no local history)."""

    def commands_pending(self) -> int | None:
        """Commands to NATS waiting for an answer (None: not in a cluster)."""


class BrokerCollector:
    """Turns a broker's counters into Prometheus metric families at scrape time."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        src = self.source
        stats = src.counters()
        info = GaugeMetricFamily("zmqchat_broker_info", "This broker", labels=["broker", "mode"])
        info.add_metric([src.name, src.mode()], 1)
        yield info
        yield GaugeMetricFamily(
            "zmqchat_connected_clients", "Sessions on this broker", value=src.connected()
        )
        members = GaugeMetricFamily(
            "zmqchat_room_members", "Members of each room on this broker", labels=["room"]
        )
        for name, count in src.room_members().items():
            members.add_metric([name], count)
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
        lag = src.history_lag()
        if lag is not None:
            yield GaugeMetricFamily(
                "zmqchat_history_lag_events",
                "Events logged but not yet in SQLite (the history writer's lag)",
                value=lag,
            )
        pending = src.commands_pending()
        if pending is not None:
            yield GaugeMetricFamily(
                "zmqchat_cluster_commands_pending",
                "Commands to NATS waiting for an answer",
                value=pending,
            )


def serve(source: Source, host: str, port: int) -> Any:
    """Serve /metrics over HTTP on a thread; returns the server (shutdown() to stop)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(source))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
