"""Long fuzz run against a live broker process (not in CI).

    python scripts/fuzz_broker.py --minutes 2

Sends random and half-valid multipart requests from several connections, then checks the
broker still answers. Prints requests sent, replies and errors returned, and crashes: the
broker process dying or logging a handler exception (must be 0). Exit 1 on any crash.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import BrokerProcess  # noqa: E402
from zmqchat import protocol as m  # noqa: E402

VALUES = [
    None,
    0,
    -1,
    1,
    2**70,
    1e308,
    True,
    "",
    "lobby",
    "x" * 5000,
    "\x1b[2J",
    "\ud800",
    [],
    {},
    [{"id": "a", "text": "b"}],
    [{"id": 1}],
    "work",
    "alice",
    "../etc",
]
FIELDS = [
    "room",
    "nick",
    "msgs",
    "text",
    "version",
    "id",
    "limit",
    "after",
    "before",
    "since",
    "to",
    "reason",
    "grant",
    "resume",
    "token",
    "hops",
    "relay",
    "privates_since",
]


def random_request(rng: random.Random, i: int) -> list[bytes]:
    kinds = [k.value.encode() for k in m.Kind] + [b"", b"NOPE", b"\xff"]
    shape = rng.random()
    if shape < 0.15:  # raw garbage
        return [rng.randbytes(rng.randrange(0, 80)) for _ in range(rng.randrange(1, 6))]
    body = {rng.choice(FIELDS): rng.choice(VALUES) for _ in range(rng.randrange(0, 5))}
    if shape < 0.5:
        body.update(
            {
                "version": 1,
                "nick": f"fz{i % 500}",
                "room": rng.choice(["lobby", "work", "nope"]),
                "msgs": [{"id": f"{i}", "text": "hi"}],
            }
        )
    raw = json.dumps(body).encode() if rng.random() < 0.9 else rng.randbytes(30)
    return [rng.choice(kinds), str(i).encode() if rng.random() < 0.95 else b"", raw]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    proc = BrokerProcess(
        Path(tempfile.mkdtemp(prefix="fuzz-")), "--rate", "0", "--log-level", "ERROR"
    )
    ctx = zmq.Context()
    socks = []
    for _ in range(8):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"tcp://127.0.0.1:{proc.port}")
        socks.append(s)
    sent = replies = errors = 0
    end = time.monotonic() + a.minutes * 60
    i = 0
    while time.monotonic() < end and proc.proc.poll() is None:
        i += 1
        rng.choice(socks).send_multipart(random_request(rng, i))
        sent += 1
        for s in socks:
            while s.poll(0):
                frames = s.recv_multipart()
                replies += 1
                errors += frames[0] == b"ERROR"
        if i % 200 == 0:
            time.sleep(0.01)
    deadline = time.monotonic() + 2  # collect the replies still on their way
    while time.monotonic() < deadline and replies < sent:
        for s in socks:
            while s.poll(10):
                frames = s.recv_multipart()
                replies += 1
                errors += frames[0] == b"ERROR"
    alive = proc.proc.poll() is None
    check = ctx.socket(zmq.DEALER)
    check.linger = 0
    check.connect(f"tcp://127.0.0.1:{proc.port}")
    check.send_multipart(m.encode_request("HELLO", b"final", {"version": 1, "nick": "checker"}))
    answers = alive and bool(check.poll(3000))
    proc.stop()
    log = proc.proc.stderr.read()
    crashes = (not alive) + log.count("error handling") + (not answers)
    if crashes:
        print(log[-3000:], file=sys.stderr)
    print(
        f"seed {a.seed}: requests sent {sent}, replies and pushes {replies}, "
        f"errors returned {errors}, "
        f"crashes {crashes}"
    )
    for s in [*socks, check]:
        s.close()
    ctx.term()
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
