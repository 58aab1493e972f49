"""Long fuzz run against a live broker process (not in CI).

    python scripts/fuzz_broker.py --minutes 2

Sends random and half-valid multipart requests from several connections, then checks the
broker still answers. Prints requests sent, replies and errors returned, and crashes: the
broker process dying or logging a handler exception (must be 0). Exit 1 on any crash.

Two more connections never read: they ask for chunks of a real file and long HISTORY
replies all along. The broker's peak resident memory must stay within what it may hold for
them (HELD_PER_CONNECTION each) and a margin; past it the run fails too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import BrokerProcess  # noqa: E402
from zmqchat import Client  # noqa: E402
from zmqchat import protocol as m  # noqa: E402
from zmqchat._core.files import HELD_PER_CONNECTION  # noqa: E402

DEAF = 2  # connections that never read
MARGIN = 64 << 20  # bytes of peak memory over the start, beside what the deaf may hold

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
    # files (issue 24)
    "upload",
    "offset",
    "size",
    "sha256",
    "file",
    "name",
    "with",
]
UPLOADS: list[str] = []  # upload names the broker answered with: PUTs aim at them
FILE_IDS: list[str] = ["0123abcd"]  # file ids seen in answers: GETs aim at them


def file_request(rng: random.Random, i: int) -> list[bytes]:
    """Half-valid file requests: lying sizes and digests, chunks out of place or too big,
    garbage in the fourth frame, uploads left half-way, GETs of ids seen and guessed."""
    label = str(i).encode()
    pick = rng.random()
    if pick < 0.3:
        body: dict = {
            "room": rng.choice(["lobby", "work"]),
            "id": f"{rng.randrange(8):032x}",
            "name": rng.choice(["../../x", "a\nb", ".rc", "x" * 2000, "ok.txt", ""]),
            "size": rng.choice([0, 1, 70_000, 2**40, -5, 2**64]),
            "sha256": rng.choice(
                ["0" * 64, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "zz"]
            ),
        }
        return [b"UPLOAD", label, json.dumps(body).encode()]
    if pick < 0.7:
        body = {
            "upload": rng.choice(UPLOADS or ["0" * 32]),
            "offset": rng.choice([0, 1, 65536, m.CHUNK, -1, 2**70]),
        }
        # (a frame over m.MAX_FRAME never reaches the broker: ZeroMQ drops the connection)
        data = rng.randbytes(rng.choice([0, 1, 100, 65536, 65537, m.CHUNK]))
        extra = [rng.randbytes(5)] if rng.random() < 0.1 else []
        return [b"PUT", label, json.dumps(body).encode(), data, *extra]
    body = {
        "file": rng.choice(FILE_IDS),
        "offset": rng.choice([0, 5, 2**40, -1]),
        "size": rng.choice([1, 65536, m.CHUNK, m.CHUNK + 1, 10**9, 0]),
    }
    return [rng.choice([b"GET", b"FILE", b"RMFILE", b"FILES"]), label, json.dumps(body).encode()]


def remember(frames: list[bytes]) -> None:
    """Note the upload names and file ids that answers carry."""
    if len(frames) < 3 or frames[0] != b"OK":
        return
    try:
        body = json.loads(frames[2])
    except ValueError:
        return
    if isinstance(body, dict):
        if isinstance(body.get("upload"), str):
            UPLOADS.append(body["upload"])
        offer = body.get("offer")
        if isinstance(offer, dict) and isinstance(offer.get("file"), str):
            FILE_IDS.append(offer["file"])


def random_request(rng: random.Random, i: int) -> list[bytes]:
    kinds = [k.value.encode() for k in m.Kind] + [b"", b"NOPE", b"\xff"]
    shape = rng.random()
    if shape < 0.25:
        return file_request(rng, i)
    if shape < 0.35:  # raw garbage
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


def peak_kb(pid: int, reset: bool = False) -> int:
    """The process's peak resident memory (VmHWM) so far; `reset` starts it again."""
    if reset:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def offer_file(port: int, folder: Path) -> str:
    """A real 8 MB file in lobby, for the deaf connections to ask for."""
    path = folder / "real.bin"
    path.write_bytes(os.urandom(8 << 20))

    async def send() -> str:
        async with Client("127.0.0.1", port, "uploader") as a:
            for i in range(m.MAX_HISTORY // 10):  # and a lobby whose HISTORY is long
                await a.say("lobby", f"{i} " + "h" * 3000)
            return str((await a.send_file("lobby", str(path)))["file"])

    return asyncio.run(send())


def deaf_request(rng: random.Random, i: int, fid: str) -> list[bytes]:
    if rng.random() < 0.8:
        body = {"file": fid, "offset": rng.randrange(8) * m.CHUNK}
        return m.encode_request("GET", str(i).encode(), body)
    return m.encode_request("HISTORY", str(i).encode(), {"room": "lobby", "limit": 500})


def collect(socks: list[zmq.Socket], wait_ms: int) -> tuple[int, int]:
    """Read what has come on every socket: (replies and pushes, errors among them)."""
    replies = errors = 0
    for s in socks:
        while s.poll(wait_ms):
            frames = s.recv_multipart()
            remember(frames)
            replies += 1
            errors += frames[0] == b"ERROR"
    return replies, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    proc = BrokerProcess(folder, "--rate", "0", "--log-level", "ERROR")
    fid = offer_file(proc.port, folder)
    ctx = zmq.Context()
    deaf = []
    for n in range(DEAF):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.setsockopt(zmq.RCVHWM, 1)  # and the kernel's buffer small: it all waits in the broker
        s.setsockopt(zmq.RCVBUF, 1 << 16)
        s.connect(f"tcp://127.0.0.1:{proc.port}")
        s.send_multipart(m.encode_request("HELLO", b"h", {"version": 1, "nick": f"deaf{n}"}))
        s.send_multipart(m.encode_request("JOIN", b"j", {"room": "lobby"}))
        deaf.append(s)
    start_kb = peak_kb(proc.proc.pid, reset=True)
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
        if rng.random() < 0.2:
            rng.choice(deaf).send_multipart(deaf_request(rng, i, fid))
        got, failed = collect(socks, 0)
        replies, errors = replies + got, errors + failed
        if i % 50 == 0:  # each connection a session in lobby: file requests get past HELLO
            for n, s in enumerate(socks):
                s.send_multipart(m.encode_request("HELLO", b"h", {"version": 1, "nick": f"fs{n}"}))
                s.send_multipart(m.encode_request("JOIN", b"j", {"room": "lobby"}))
                sent += 2
        if i % 200 == 0:
            time.sleep(0.01)
    deadline = time.monotonic() + 2  # collect the replies still on their way
    while time.monotonic() < deadline and replies < sent:
        got, failed = collect(socks, 10)
        replies, errors = replies + got, errors + failed
    alive = proc.proc.poll() is None
    grown = (peak_kb(proc.proc.pid) - start_kb) << 10 if alive else 0
    bound = DEAF * HELD_PER_CONNECTION + MARGIN
    check = ctx.socket(zmq.DEALER)
    check.linger = 0
    check.connect(f"tcp://127.0.0.1:{proc.port}")
    check.send_multipart(m.encode_request("HELLO", b"final", {"version": 1, "nick": "checker"}))
    answers = alive and bool(check.poll(3000))
    proc.stop()
    log = proc.proc.stderr.read()
    crashes = (not alive) + log.count("Traceback") + (not answers)
    if crashes:
        print(log[-3000:], file=sys.stderr)
    print(
        f"seed {a.seed}: requests sent {sent}, replies and pushes {replies}, "
        f"errors returned {errors}, "
        f"crashes {crashes}; the broker's peak memory grew by {grown >> 20} MB "
        f"(at most {bound >> 20} MB with {DEAF} connections that never read)"
    )
    for s in [*socks, *deaf, check]:
        s.close()
    ctx.term()
    return 1 if crashes or grown > bound else 0


if __name__ == "__main__":
    sys.exit(main())
