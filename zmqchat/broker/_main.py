"""`zmqchat-broker` / `python broker.py`: the broker's flags, checked, then one Broker run."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from typing import Final

import zmq
import zmq.auth

from zmqchat import protocol as m
from zmqchat._config import DEFAULT_ROOMS, Config
from zmqchat._core.files_state import FileRules
from zmqchat._local.store import StoreError
from zmqchat._ops import logs
from zmqchat._usage import Parser
from zmqchat.broker import _accounts_cli as accounts_cli
from zmqchat.broker._loop import Broker
from zmqchat.broker._preflight import preflight, usage_problem

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
log = logging.getLogger("zmqchat.broker")


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


def parser() -> Parser:
    """The broker's flags, in the README's three tables (tests/test_readme.py checks them)."""
    p = Parser("zmqchat.broker", "ZeroMQ chat broker")
    flag = p.table()
    flag(
        "--host",
        default=Config.host,
        metavar="HOST",
        help="address to bind; `0.0.0.0` serves a LAN",
    )
    flag("--port", type=int, default=Config.port, metavar="N", help="the command (ROUTER) port")
    flag(
        "--pub-port",
        type=int,
        default=Config.pub_port,
        metavar="N",
        help="the room-traffic (XPUB) port",
    )
    flag("--rooms", default=",".join(DEFAULT_ROOMS), metavar="a,b,c", help="the fixed rooms")
    flag(
        "--allow-new-rooms",
        action="store_true",
        help="`/join` may create a room; its creator is its operator",
    )
    flag(
        "--ops",
        default="",
        metavar="NICK,...",
        help="operators of the fixed rooms (`/kick`, `/ban`, topic lock)",
    )
    flag(
        "--heartbeat",
        type=float,
        default=Config.heartbeat,
        metavar="S",
        help="heartbeat interval in seconds; a client silent for 3 intervals is dropped",
    )
    flag(
        "--db",
        default=Config.db,
        metavar="PATH",
        shown="`chat.db` in the directory you start it from",
        help="the SQLite history file (WAL mode), with its log `PATH-log.NNNNNN` beside it",
    )
    flag(
        "--fsync",
        action="store_true",
        help="fdatasync the log before each acknowledgement: survives power loss, not only "
        "a crash (its cost is measured in the source's bench/README.md)",
    )
    flag(
        "--motd",
        metavar="FILE",
        shown="the built-in banner",
        help="a text that replaces the built-in ASCII-art banner",
    )
    flag(
        "--rate",
        type=float,
        default=Config.rate,
        metavar="N",
        help="messages per second per client (0 = unlimited)",
    )
    flag(
        "--burst",
        type=int,
        default=Config.burst,
        metavar="N",
        help="messages a client may send at once",
    )
    flag(
        "--gen-keys",
        metavar="DIR",
        shown="",
        help="write a CURVE key pair to DIR (`broker.key`, `broker.key_secret`) and exit "
        "(see Security)",
    )
    flag(
        "--curve-key",
        metavar="FILE",
        shown="no encryption",
        help="serve only encrypted, authenticated connections (CURVE), with this secret key",
    )
    flag(
        "--allow-keys",
        metavar="DIR",
        shown="any client key",
        help="with `--curve-key`: only the client public keys in DIR get in",
    )
    flag(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        shown="`WARNING`, or `INFO` with `--log-format json`",
        help="`DEBUG`, `INFO` (a line per connection event: hello, quit, lost, replaced, "
        "...; per operator's act: kicked, banned, unbanned, topic, locked; the start and the "
        "stop; and per malformed request, at most 10 a second), `WARNING`, `ERROR`",
    )
    flag(
        "--log-format",
        choices=("text", "json"),
        default="text",
        metavar="FORMAT",
        help="`text`, or `json`: one JSON object a line, for log shippers; what a client "
        "sent is escaped and cut to 200 characters either way",
    )
    flag(
        "--metrics-port",
        type=int,
        metavar="N",
        shown="off",
        help="serve Prometheus metrics on `http://HOST:N/metrics` (see Metrics)",
    )
    flag = p.table("files (see the README: Files)")
    flag(
        "--max-file-size",
        type=size_arg,
        default=FileRules.max_size,
        metavar="SIZE",
        shown="`100M`",
        help="the largest file a client may send (`100M`, `2G`, bytes)",
    )
    flag(
        "--max-file-bytes-per-day",
        type=size_arg,
        default=FileRules.daily,
        metavar="SIZE",
        shown="`2G`",
        help="what one sender may send in 24 hours",
    )
    flag(
        "--keep-free",
        type=size_arg,
        default=FileRules.keep_free,
        metavar="SIZE",
        shown="`1G`",
        help="free disk space that uploads never take",
    )
    flag(
        "--upload-grace",
        type=float,
        default=FileRules.grace,
        metavar="S",
        help="how long an unfinished upload is kept for a resume, in seconds",
    )
    flag(
        "--files-dir",
        metavar="DIR",
        shown="`DB-files` beside `--db`",
        help="where file contents are kept",
    )
    accounts_cli.add_flags(p)
    flag = p.table("several brokers (see the README: Several brokers)")
    flag(
        "--cluster",
        metavar="URLS",
        shown="off: one broker with SQLite",
        help="NATS servers, comma-separated (`nats://h1:4222,...`; any of them will do: the "
        "others are found): serve the same rooms as every broker of that NATS JetStream "
        "cluster (the history is there, not in `--db`, which then names only where this broker "
        "caches file contents: `DB-files-NAME`, or `--files-dir`)",
    )
    flag(
        "--name",
        type=name_arg,
        metavar="NAME",
        shown="this machine's name and the command port: `lab-9001`",
        help="this broker's name (logs, the welcome, other brokers' view)",
    )
    flag(
        "--replicas",
        type=int,
        default=Config.replicas,
        metavar="N",
        shown="3 on a NATS cluster (one of 2 nodes needs `--replicas 2`), 1 on a single server",
        help="copies of each room's history and of the registry",
    )
    flag(
        "--namespace",
        type=name_arg,
        default=Config.namespace,
        metavar="NS",
        help="prefix of the streams and buckets this chat makes, so several chats can share "
        "one NATS",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["accounts"]:  # the operator's accounts command (issue 21)
        return accounts_cli.main(argv[1:])
    return serve(argv)


def serve(argv: list[str]) -> int:
    """The broker, with these flags: until it is stopped."""
    p = parser()
    a = p.parse_args(argv)
    say = Say(p.prog)
    # JSON logs are for a log shipper, which wants the connection events: INFO unless told.
    logs.setup(a.log_level or ("INFO" if a.log_format == "json" else "WARNING"), a.log_format)
    if a.gen_keys:
        return gen_keys(a.gen_keys, say)
    rooms = tuple(r.strip() for r in a.rooms.split(",") if r.strip())
    problem = usage_problem(a, rooms)
    if problem:
        return say(2, problem)
    rooms = tuple(m.check_room(r) for r in rooms)
    problem = preflight(a)  # before anything is created: a failed start leaves no files
    if problem:
        return say(1, problem)
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
        **accounts_cli.config(a),
    )
    try:
        broker = Broker(cfg)
    except StoreError as err:
        return say(4, f"cannot use the history database: {err}")
    except zmq.ZMQError as err:
        return say(1, f"cannot bind on {a.host} (ports {a.port}, {a.pub_port}): {err}")
    except OSError as err:
        return say(1, str(err))
    stops = [signal.SIGINT, signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)  # its terminal closed; unless nohup ignores it
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        stops.append(hangup)
    for sig in stops:
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
    started = {"port": broker.port, "pub_port": broker.pub_port, "broker": broker.name}
    logs.event(log, "started", db=cfg.db if not cfg.cluster_urls else "", **started)
    broker.run()
    logs.event(log, "stopped", broker=broker.name)
    with contextlib.suppress(OSError):  # (a terminal that hung up)
        print("Broker stopped", flush=True)
    return say(1, broker.failure) if broker.failure else 0


class Say:
    """A start error on stderr, under the program's name as the user ran it; its status."""

    def __init__(self, prog: str) -> None:
        self.prog = prog

    def __call__(self, status: int, text: str) -> int:
        print(f"{self.prog}: {text}", file=sys.stderr, flush=True)
        return status


def gen_keys(folder: str, say: Say) -> int:
    """--gen-keys DIR: a new key pair, never over an existing one."""
    if os.path.exists(os.path.join(folder, "broker.key_secret")):
        return say(
            2,
            f"{folder} already holds a broker key pair; clients trust its public key, so it "
            f"is kept (remove it first to make a new one)",
        )
    try:
        os.makedirs(folder, exist_ok=True)
        public, secret = zmq.auth.create_certificates(folder, "broker")
        os.chmod(secret, 0o600)
    except FileExistsError:
        return say(2, f"--gen-keys {folder}: a file, not a folder")
    except OSError as err:
        return say(1, f"--gen-keys {folder}: {err.strerror or err}")
    print(f"wrote {public} (give to clients: --server-key) and {secret} (keep secret)")
    return 0
