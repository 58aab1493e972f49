"""What the core counts. The loop only bumps plain counters; the metrics exporter
(zmqchat._ops.metrics), a thread of its own, reads them when scraped: a request costs the
loop a dict increment and no lock."""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Final

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
