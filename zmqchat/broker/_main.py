"""`zmqchat-broker` / `python broker.py`: the broker's flags, checked, then one Broker run."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import zmq
import zmq.auth

from zmqchat import protocol as m
from zmqchat._config import DEFAULT_ROOMS, Config
from zmqchat._core.files_state import FileRules
from zmqchat._local.store import StoreError
from zmqchat._ops import logs
from zmqchat.broker._loop import Broker
from zmqchat.protocol import ProtocolError


def name_arg(text: str) -> str:
    """A broker name or namespace: it becomes part of NATS subjects and stream names."""
    if not text or not all(c.isascii() and (c.isalnum() or c in "-_") for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '-' and '_'")
    return text


def size_arg(text: str) -> int:
    """A number of bytes: 1048576, 100M, 2G, 512K (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    scale = units.get(t[-1:], 1)
    try:
        n = float(t[:-1] if t[-1:] in units else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a size, like 100M, 2G or 512K") from None
    if not 0 <= n * scale <= m.MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r}: from 0 to 1T")
    return int(n * scale)


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
    p.add_argument(
        "--log-level",
        default="WARNING",
        help="DEBUG, INFO (a line per connection event), WARNING or ERROR",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text, or one JSON object each for log shippers",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus metrics on http://HOST:N/metrics (off by default)",
    )
    f = p.add_argument_group("files (see README: Files)")
    f.add_argument(
        "--max-file-size",
        type=size_arg,
        default=FileRules.max_size,
        metavar="SIZE",
        help="largest file a client may send (default 100M)",
    )
    f.add_argument(
        "--max-file-bytes-per-day",
        type=size_arg,
        default=FileRules.daily,
        metavar="SIZE",
        help="bytes one sender may send a day (default 2G)",
    )
    f.add_argument(
        "--keep-free",
        type=size_arg,
        default=FileRules.keep_free,
        metavar="SIZE",
        help="free disk space that uploads never take (default 1G)",
    )
    f.add_argument(
        "--upload-grace",
        type=float,
        default=FileRules.grace,
        metavar="S",
        help="seconds an unfinished upload is kept for a resume (default 600)",
    )
    f.add_argument(
        "--files-dir",
        metavar="DIR",
        help="where file contents are kept (default: DB-files beside --db)",
    )
    c = p.add_argument_group("several brokers (see README: Several brokers)")
    c.add_argument(
        "--cluster",
        metavar="URLS",
        help="NATS servers, comma-separated (nats://h1:4222,...): serve the same "
        "rooms as every broker on that NATS JetStream cluster (no --db then)",
    )
    c.add_argument(
        "--name",
        type=name_arg,
        default=None,
        help="this broker's name in the cluster, logs and welcome (default: host-port)",
    )
    c.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="copies of each room's history in the cluster (default 3, or fewer "
        "if the cluster is smaller)",
    )
    c.add_argument(
        "--namespace",
        type=name_arg,
        default="zmqchat",
        help="prefix of the streams and buckets in NATS (several chats on one NATS)",
    )
    a = p.parse_args(argv)
    logs.setup(a.log_level, a.log_format)
    if a.gen_keys:
        if os.path.exists(os.path.join(a.gen_keys, "broker.key_secret")):
            print(
                f"broker: {a.gen_keys} already holds a broker key pair; clients trust its "
                f"public key, so it is kept (remove it first to make a new one)",
                file=sys.stderr,
            )
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
    cfg = Config(
        host=a.host,
        port=a.port,
        pub_port=a.pub_port,
        rooms=rooms,
        allow_new_rooms=a.allow_new_rooms,
        heartbeat=a.heartbeat,
        db=a.db,
        fsync=a.fsync,
        motd=a.motd,
        operators=tuple(n for n in a.ops.split(",") if n),
        rate=a.rate,
        burst=a.burst,
        curve_key=a.curve_key,
        allow_keys=a.allow_keys,
        name=a.name or "",
        cluster_urls=a.cluster,
        replicas=a.replicas,
        namespace=a.namespace,
        metrics_port=a.metrics_port,
        files=FileRules(a.max_file_size, a.max_file_bytes_per_day, a.keep_free, a.upload_grace),
        files_dir=a.files_dir,
    )
    try:
        broker = Broker(cfg)
    except StoreError as err:
        print(f"broker: cannot use the history database: {err}", file=sys.stderr)
        return 4
    except zmq.ZMQError as err:
        print(
            f"broker: cannot bind on {a.host} (ports {a.port}, {a.pub_port}): {err}",
            file=sys.stderr,
        )
        return 1
    except OSError as err:
        print(f"broker: {err}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stop())
    print(
        f"Broker started on tcp://{a.host}:{broker.port} (commands) and "
        f"tcp://{a.host}:{broker.pub_port} (rooms)",
        flush=True,
    )
    if cfg.cluster_urls:
        print(f"In the cluster at {cfg.cluster_urls} as {broker.name}", flush=True)
    if cfg.metrics_port is not None:
        print(f"Metrics on http://{a.host}:{cfg.metrics_port}/metrics", flush=True)
    if cfg.curve_key:
        print(
            "CURVE encryption on: clients need --server-key with the public key"
            + (f"; only the keys in {cfg.allow_keys} may connect" if cfg.allow_keys else ""),
            flush=True,
        )
    broker.run()
    return 0
