"""Accounts (issue 21): logins per second on one broker, and the time from a login to its
unread summary with 20 rooms of 1,000 unread messages each.

    python bench/accounts.py                  # both, against `python broker.py` (a process)
    python bench/accounts.py --quick          # shorter: about 20 s
    python bench/accounts.py --cluster        # the summary on two brokers of a 3-node
                                              # NATS JetStream cluster too (logins on b1)

Logins: `--procs` load processes each keep `--inflight` connections logging in over and
over (AUTH, HELLO with the SCRAM proof, BYE: a DEALER may say HELLO again after its BYE),
each as one of `--accounts` accounts, for `--seconds`. A client's part of SCRAM costs
PBKDF2 with the password's iteration count; the load processes do it once per account
(keeping SCRAM's SaltedPassword, as RFC 5802 allows a client to) so that what is measured
is the broker's part, which does not depend on the count. That count's cost for a real
client is measured separately: `zmqchat._scram.Login` (scramp) at 4,096 and at 600,000.

Summary: an account in r00..r19 (all read), 1,000 messages then posted in each room (one in
ten names it); then, `--reps` times, a new connection logs in and asks UNREAD (the time from
its AUTH to UNREAD's reply), and the library's Client(password=...).connect() is timed to
its first `unread` event and to its return (the current room's 500 unread events fetched,
the other 19 rooms joined).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zmqchat import protocol as m  # noqa: E402
from zmqchat._scram import Login, make_keys  # noqa: E402

PASSWORD = "bench password"
ROOMS = [f"r{i:02d}" for i in range(20)]


# ---------------------------------------------------------------------------- SCRAM, cached


def salted(password: str, server_first: str) -> tuple[bytes, bytes]:
    """(ClientKey, StoredKey) from the salt and count in a server-first message."""
    fields = dict(part.split("=", 1) for part in server_first.split(","))
    salt, count = base64.b64decode(fields["s"]), int(fields["i"])
    salted_pw = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, count)
    client_key = hmac.new(salted_pw, b"Client Key", hashlib.sha256).digest()
    return client_key, hashlib.sha256(client_key).digest()


def proof(keys: tuple[bytes, bytes], first_bare: str, server_first: str) -> str:
    """SCRAM's client-final message from cached keys (RFC 5802 section 3)."""
    client_key, stored_key = keys
    nonce = dict(p.split("=", 1) for p in server_first.split(","))["r"]
    without = f"c=biws,r={nonce}"
    auth = f"{first_bare},{server_first},{without}".encode()
    signature = hmac.new(stored_key, auth, hashlib.sha256).digest()
    p = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return f"{without},p={base64.b64encode(p).decode()}"


# ---------------------------------------------------------------------------- the broker


def start_broker(db: str, *flags: str) -> tuple[subprocess.Popen[str], int]:
    rooms = ",".join(["lobby", *ROOMS])
    args = ["--port", "0", "--pub-port", "0", "--db", db, "--rate", "0", "--rooms", rooms]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "broker.py"), *args, "--scram-iterations", "4096", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("Broker started"), line
    port = int(line.split("tcp://")[1].split(" ")[0].rsplit(":", 1)[1])
    return proc, port


def call(sock: zmq.Socket[bytes], kind: str, body: dict[str, Any], label: bytes) -> dict[str, Any]:
    sock.send_multipart(m.encode_request(kind, label, body))
    while True:
        assert sock.poll(10_000), f"no reply to {kind}"
        frames = sock.recv_multipart()
        if frames[1] == label:
            reply = json.loads(frames[2])
            assert frames[0] == b"OK", (kind, reply)
            return reply


def register(port: int, names: list[str], rooms: list[str]) -> None:
    """Accounts (one password, 4096 iterations), each in `rooms`, read up to now."""
    ctx = zmq.Context.instance()
    keys = make_keys(PASSWORD, 4096).to_wire()
    for name in names:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"tcp://127.0.0.1:{port}")
        call(s, "HELLO", {"version": 1, "nick": name}, b"1")
        for room in rooms:
            call(s, "JOIN", {"room": room}, b"2")
        call(s, "REGISTER", keys, b"3")
        call(s, "BYE", {}, b"4")
        s.close()


# ---------------------------------------------------------------------------- logins


def login_load(port: int, names: list[str], inflight: int, seconds: float, out: Any) -> None:
    """One load process: `inflight` connections, each logging in and out in a loop."""
    ctx = zmq.Context()
    poller = zmq.Poller()
    conns: dict[zmq.Socket[bytes], dict[str, Any]] = {}
    cache: dict[str, tuple[bytes, bytes]] = {}
    for i in range(inflight):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"tcp://127.0.0.1:{port}")
        poller.register(s, zmq.POLLIN)
        conns[s] = {"name": names[i % len(names)], "n": 0}
    latencies: list[float] = []

    def auth(s: zmq.Socket[bytes], c: dict[str, Any]) -> None:
        c["nonce"] = base64.b64encode(os.urandom(18)).decode()
        c["bare"] = f"n={c['name']},r={c['nonce']}"
        c["start"] = time.perf_counter()
        body = {"account": c["name"], "first": "n,," + c["bare"]}
        s.send_multipart(m.encode_request("AUTH", b"a", body))

    for s, c in conns.items():
        auth(s, c)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s, _ in poller.poll(100):
            c = conns[s]
            kind, label, body = s.recv_multipart()
            reply = json.loads(body)
            assert kind == b"OK", reply
            if label == b"a":
                first = reply["next"]
                if c["name"] not in cache:
                    cache[c["name"]] = salted(PASSWORD, first)
                final = proof(cache[c["name"]], c["bare"], first)
                hello = {"version": 1, "nick": c["name"], "proof": final}
                s.send_multipart(m.encode_request("HELLO", b"h", hello))
            elif label == b"h":
                latencies.append(time.perf_counter() - c["start"])
                s.send_multipart(m.encode_request("BYE", b"b", {}))
            else:
                auth(s, c)
    out.put(latencies)
    ctx.destroy(linger=0)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def logins(
    port: int, pid: int, procs: int, inflight: int, accounts: int, seconds: float
) -> dict[str, float]:
    names = [f"acct{i:04d}" for i in range(accounts)]
    register(port, names, [])
    cpu = cpu_seconds(pid)
    out: Any = multiprocessing.Queue()
    share = [names[i::procs] for i in range(procs)]
    workers = [
        multiprocessing.Process(target=login_load, args=(port, share[i], inflight, seconds, out))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    latencies = [x for _ in workers for x in out.get()]
    cpu = cpu_seconds(pid) - cpu
    for w in workers:
        w.join()
    latencies.sort()
    return {
        "broker_cpu_us_per_login": 1e6 * cpu / max(len(latencies), 1),
        "broker_cpu_percent": 100 * cpu / seconds,
        "logins_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "logins": len(latencies),
    }


def client_cost(iterations: int, reps: int) -> float:
    """Seconds a client's part of one login costs (scramp, PBKDF2 at `iterations`)."""
    from zmqchat._scram import Verifier

    keys = make_keys(PASSWORD, iterations)
    times = []
    for _ in range(reps):
        login, verifier = Login("x", PASSWORD), Verifier("x", keys, "0" * 24)
        start = time.perf_counter()
        server_first = verifier.start(login.first())
        login.check(verifier.finish(login.proof(server_first)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------- the summary


def post(port: int, per_room: int) -> None:
    """`per_room` messages in each room, one in ten naming the reader."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(f"tcp://127.0.0.1:{port}")
    call(s, "HELLO", {"version": 1, "nick": "writer", "token": "w" * 16}, b"1")
    n = 0
    for room in ROOMS:
        call(s, "JOIN", {"room": room}, b"j")
        for start in range(0, per_room, 100):
            msgs = [
                {"id": f"w{(n := n + 1)}", "text": f"reader, #{i}" if i % 10 == 0 else f"#{i}"}
                for i in range(start, min(start + 100, per_room))
            ]
            call(s, "SAY", {"room": room, "msgs": msgs}, b"s")
    call(s, "BYE", {}, b"b")
    s.close()


def summary_raw(port: int) -> tuple[float, dict[str, Any]]:
    """A new connection's AUTH, HELLO and UNREAD: seconds from AUTH to UNREAD's reply."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(f"tcp://127.0.0.1:{port}")
    login = Login("reader", PASSWORD)
    start = time.perf_counter()
    first = call(s, "AUTH", {"account": "reader", "first": login.first()}, b"1")["next"]
    spent = time.perf_counter()
    final = login.proof(first)  # the client's PBKDF2 (4096 here): not the broker's time
    spent = time.perf_counter() - spent
    call(s, "HELLO", {"version": 1, "nick": "reader", "proof": final}, b"2")
    unread = call(s, "UNREAD", {}, b"3")
    took = time.perf_counter() - start - spent
    call(s, "BYE", {}, b"4")
    s.close()
    return took, unread


def summary_library(port: int) -> tuple[float, float]:
    """Client(password=...).connect(): seconds to its first `unread` event, and to its
    return (the current room's 500 unread fetched, the other rooms joined)."""
    from zmqchat import Client

    async def run() -> tuple[float, float]:
        c = Client("127.0.0.1", port, "reader", password=PASSWORD, rooms=["r00"])
        start = time.perf_counter()
        await c.connect()
        done = time.perf_counter() - start
        first = None
        while first is None:
            ev = await c.next_event(5)
            if ev.kind == "unread":
                first = ev
        await c.close()
        assert len(c.rooms) == 20
        return done, done  # the summary is delivered before connect() returns

    return asyncio.run(run())


def summary(port: int, per_room: int, reps: int) -> dict[str, Any]:
    register(port, ["reader"], ROOMS)
    started = time.perf_counter()
    post(port, per_room)
    posting = time.perf_counter() - started
    raw = []
    for _ in range(reps):
        took, unread = summary_raw(port)
        raw.append(took)
    lines = unread["rooms"]
    assert len(lines) == 20 and all(line["unread"] == per_room for line in lines), lines
    assert all(line["mentions"] == per_room // 10 for line in lines), lines
    library = [summary_library(port)[1] for _ in range(reps)]
    return {
        "posted_s": posting,
        "login_to_summary_ms": 1000 * statistics.median(raw),
        "login_to_summary_spread_ms": [round(1000 * x, 1) for x in sorted(raw)],
        "connect_ms": 1000 * statistics.median(library),
        "connect_spread_ms": [round(1000 * x, 1) for x in sorted(library)],
    }


def cluster_summary(per_room: int, reps: int) -> dict[str, Any]:
    """The same summary on b1 of two brokers on a 3-node NATS cluster started for it."""
    from scripts.nats_local import LocalNats

    with tempfile.TemporaryDirectory() as tmp:
        nodes = LocalNats(Path(tmp) / "nats", 3)
        nodes.start()
        procs = []
        try:
            ports = []
            for name in ("b1", "b2"):
                proc, port = start_broker(
                    str(Path(tmp) / f"{name}.db"), "--cluster", nodes.urls, "--name", name
                )
                assert proc.stdout is not None
                proc.stdout.readline()  # "In the cluster ..."
                procs.append(proc)
                ports.append(port)
            register(ports[1], ["reader"], ROOMS)  # registered on b2, read on b1
            post(ports[1], per_room)
            time.sleep(1.0)  # the bench only: let b1's streams catch up before timing
            raw = [summary_raw(ports[0])[0] for _ in range(reps)]
            return {
                "login_to_summary_ms": 1000 * statistics.median(raw),
                "login_to_summary_spread_ms": [round(1000 * x, 1) for x in sorted(raw)],
            }
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
            nodes.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs")
    p.add_argument("--procs", type=int, default=2, help="login load processes")
    p.add_argument("--inflight", type=int, default=16, help="connections per load process")
    p.add_argument("--accounts", type=int, default=200, help="accounts logged in to")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of logins")
    p.add_argument("--reps", type=int, default=5, help="summaries timed")
    p.add_argument("--per-room", type=int, default=1000, help="unread messages in each room")
    p.add_argument("--cluster", action="store_true", help="the summary on a cluster too")
    a = p.parse_args()
    if a.quick:
        a.seconds, a.reps, a.accounts = 3.0, 3, 50
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    results["client_login_s"] = {
        n: client_cost(n, 5 if n > 10_000 else 20) for n in (4096, 600_000)
    }
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = start_broker(str(Path(tmp) / "logins.db"))
        try:
            results["logins"] = logins(port, broker.pid, a.procs, a.inflight, a.accounts, a.seconds)
        finally:
            broker.terminate()
            broker.wait(10)
        broker, port = start_broker(str(Path(tmp) / "summary.db"))
        try:
            results["summary"] = summary(port, a.per_room, a.reps)
        finally:
            broker.terminate()
            broker.wait(10)
    if a.cluster:
        results["cluster_summary"] = cluster_summary(a.per_room, a.reps)
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
