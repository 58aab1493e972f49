"""How a broker was started: its flags, as one record (zmqchat.broker._main builds it).

The broker's loop and the state implementations read it; the core is given only its
`Rules` (the rules it enforces), never this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from zmqchat._core.files_state import FileRules
from zmqchat._core.rules import Rules

DEFAULT_ROOMS: Final = ("lobby", "work", "support", "team")


@dataclass
class Config:
    """A broker's settings; see `zmqchat-broker --help` for each."""

    host: str = "127.0.0.1"
    port: int = 9001
    pub_port: int = 9002
    rooms: tuple[str, ...] = DEFAULT_ROOMS
    allow_new_rooms: bool = Rules.allow_new_rooms
    heartbeat: float = Rules.heartbeat
    db: str = "chat.db"
    fsync: bool = False
    motd: str | None = None
    operators: tuple[str, ...] = ()  # nicks that operate the fixed rooms
    rate: float = Rules.rate
    burst: int = Rules.burst
    curve_key: str | None = None  # the broker's secret key file: serve only CURVE
    allow_keys: str | None = None  # directory of client public keys allowed in
    name: str = ""  # shown in logs and in the welcome; made up if empty
    cluster_urls: str | None = None  # NATS URLs: share the rooms with other brokers
    replicas: int = 0  # copies of each stream in a cluster (0: 3 on a cluster, 1 on one server)
    namespace: str = "zmqchat"  # prefix of our streams and buckets in NATS
    metrics_port: int | None = None  # serve Prometheus metrics over HTTP on this port
    registered_only: bool = Rules.registered_only  # accounts only (issue 21)
    scram_iterations: int = Rules.scram_iterations  # SCRAM rounds new passwords use at least
    files: FileRules = field(default_factory=FileRules)  # limits on files (issue 24)
    files_dir: str | None = None  # file contents (default: DB-files beside the database)

    def files_folder(self) -> str:
        """Where this broker keeps file contents (in a cluster: its cache of them)."""
        if self.files_dir:
            return self.files_dir
        return self.db + "-files" + (f"-{self.name}" if self.cluster_urls and self.name else "")

    def rules(self) -> Rules:
        """What the core enforces of these settings."""
        return Rules(
            rate=self.rate,
            burst=self.burst,
            heartbeat=self.heartbeat,
            allow_new_rooms=self.allow_new_rooms,
            keys_required=self.curve_key is not None,
            registered_only=self.registered_only,
            scram_iterations=self.scram_iterations,
        )
