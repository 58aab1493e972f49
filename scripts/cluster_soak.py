"""Cluster soak (not in CI): bots on three brokers talk while brokers and NATS nodes fail.

    python scripts/cluster_soak.py --minutes 10

Starts its own 3-node NATS JetStream cluster (scripts/nats_local.py) and three brokers, and
puts bots on every broker (each given all three addresses, its own broker first), all in
the same rooms, each sending acknowledged messages. Meanwhile it injects faults at random,
in two lanes that run side by side, so that at most one broker and one NATS node are down
at any moment (and often one of each at once):

    brokers: kill -9 and restart (at once or a few seconds later), or SIGSTOP / SIGCONT
             (sometimes for longer than the grace period, so the others settle its clients)
    nodes:   kill -9 and restart, or SIGSTOP / SIGCONT

At the end it brings everything back, waits for the last acknowledgements, and checks that
every acknowledged message reached every bot exactly once and in seq order, that each
room's history holds each once at the seq it was acknowledged with and has no gap, that no
bot was announced as leaving while connected and none lost its nick, and that
acknowledgements never stalled. It prints sent, acknowledged, delivered, lost, duplicated,
the faults injected and the longest waits; exit status 1 on any loss, duplicate, lost nick
or stall, or a bot announced as gone while it was connected (one cut off from every broker
for longer than its grace is announced, rightly: that is reported, not failed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.nats_local import LocalNats, free_ports  # noqa: E402
from zmqchat import ChatError, Client, Event  # noqa: E402

ROOMS = ("lobby", "work")
STALL = 20.0  # seconds without any acknowledgement, while bots send, that count as a stall
OUTSTANDING = 100  # unacknowledged messages a bot may have before it waits
SETTLE = 120.0  # seconds the end waits for the last acknowledgements and deliveries


# ---------------------------------------------------------------------------- processes


class Broker:
    """`broker.py --cluster ...` as a process, restartable on the same ports and name."""

    def __init__(self, folder: Path, name: str, urls: str, heartbeat: float) -> None:
        self.name, self.folder = name, folder
        self.port, self.pub_port = free_ports(2)
        self.args = [
            sys.executable,
            str(ROOT / "broker.py"),
            "--cluster",
            urls,
            "--name",
            name,
            "--port",
            str(self.port),
            "--pub-port",
            str(self.pub_port),
            "--db",
            str(folder / f"{name}.db"),
            "--heartbeat",
            str(heartbeat),
            "--rate",
            "0",
            "--log-level",
            "INFO",
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.paused = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.folder / f"{self.name}.log", "a") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("Broker started"):
            self.proc.wait()
            said = (self.folder / f"{self.name}.log").read_text().splitlines()
            raise RuntimeError(f"{self.name} did not start: {said[-1] if said else '?'}")
        self.proc.stdout.readline()  # "In the cluster at ..."

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


# ---------------------------------------------------------------------------- faults


@dataclass
class Faults:
    """What was injected, and when (seconds since the start)."""

    began: float = field(default_factory=time.monotonic)
    log: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, what
    failed_starts: list[str] = field(default_factory=list)

    def count(self, prefix: str) -> int:
        return sum(1 for _, _, what in self.log if what.startswith(prefix))

    def during(self, start: float, end: float) -> list[str]:
        return [f"{what} ({a:.1f}-{b:.1f} s)" for a, b, what in self.log if a < end and b > start]

    def now(self) -> float:
        return time.monotonic() - self.began


async def broker_lane(brokers: list[Broker], faults: Faults, stop: asyncio.Event) -> None:
    """One broker fault at a time: kill -9 and restart, or a pause (some past the grace)."""
    rng = random.Random()
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(2.0, 6.0))
        if stop.is_set():
            return
        b = rng.choice(brokers)
        start = faults.now()
        if rng.random() < 0.5:
            b.kill()
            await asyncio.sleep(rng.choice([0.0, 0.0, rng.uniform(0.5, 4.0)]))
            while True:  # as a supervisor would: a start that fails is tried again
                try:
                    await asyncio.to_thread(b.start)
                    break
                except RuntimeError as err:
                    faults.failed_starts.append(f"{faults.now():.0f} s: {err}")
            faults.log.append((start, faults.now(), f"kill -9 {b.name} and restart"))
        else:
            pause = rng.choice([rng.uniform(0.5, 3.0), rng.uniform(3.0, 9.0)])
            b.signal(signal.SIGSTOP)
            b.paused = True
            await asyncio.sleep(pause)
            b.signal(signal.SIGCONT)
            b.paused = False
            faults.log.append((start, faults.now(), f"SIGSTOP {b.name} {pause:.1f} s"))


async def node_lane(nodes: LocalNats, faults: Faults, stop: asyncio.Event) -> None:
    """One NATS node fault at a time: kill -9 and restart, or a pause."""
    rng = random.Random()
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(3.0, 8.0))
        if stop.is_set():
            return
        node = rng.choice(nodes.nodes)
        start = faults.now()
        if rng.random() < 0.5:
            node.kill()
            await asyncio.sleep(rng.uniform(1.0, 5.0))
            node.start()
            faults.log.append((start, faults.now(), f"kill -9 NATS {node.name} and restart"))
            deadline = time.monotonic() + 30  # back in the cluster before the next one
            while not node.healthy() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        else:
            pause = rng.uniform(0.5, 6.0)
            node.signal(signal.SIGSTOP)
            await asyncio.sleep(pause)
            node.signal(signal.SIGCONT)
            faults.log.append((start, faults.now(), f"SIGSTOP NATS {node.name} {pause:.1f} s"))


# ---------------------------------------------------------------------------- bots


@dataclass
class Bot:
    client: Client
    events: list[Event] = field(default_factory=list)
    sent: int = 0
    acked: dict[str, tuple[str, int]] = field(default_factory=dict)  # text -> room, seq
    failed: list[str] = field(default_factory=list)

    async def listen(self) -> None:
        async for ev in self.client:
            self.events.append(ev)

    def room(self, room: str) -> list[Event]:
        return [e for e in self.events if e.room == room and e.seq is not None]


class Acks:
    """Every acknowledgement's time, for the stalls and the latency."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.latencies: list[float] = []

    def longest_gaps(self, n: int = 3) -> list[tuple[float, float]]:
        pairs = list(zip(self.times, self.times[1:], strict=False))
        return sorted(pairs, key=lambda p: p[1] - p[0], reverse=True)[:n]


async def send(bot: Bot, stop: asyncio.Event, acks: Acks, began: float) -> None:
    """Say something every 10 to 50 ms into one of the rooms, without waiting for each
    acknowledgement (at most OUTSTANDING at once), until told to stop."""
    rng = random.Random()
    pending: set[asyncio.Future[int]] = set()

    def done(fut: asyncio.Future[int], room: str, text: str, sent_at: float) -> None:
        pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            bot.failed.append(f"{text}: {fut.exception()!r}" if not fut.cancelled() else text)
            return
        now = time.monotonic()
        bot.acked[text] = (room, fut.result())
        acks.times.append(now - began)
        acks.latencies.append(now - sent_at)

    i = 0
    while not stop.is_set():
        while len(pending) >= OUTSTANDING and not stop.is_set():
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED, timeout=1.0)
        room, text = rng.choice(ROOMS), f"{bot.client.nick} {i}"
        i += 1
        bot.sent += 1
        fut = asyncio.ensure_future(bot.client.say(room, text))
        pending.add(fut)
        sent_at = time.monotonic()
        fut.add_done_callback(partial(done, room=room, text=text, sent_at=sent_at))
        await asyncio.sleep(rng.uniform(0.01, 0.05))

    if pending:
        await asyncio.wait(pending, timeout=SETTLE)


# ---------------------------------------------------------------------------- the checks


async def history(client: Client, room: str) -> list[Event]:
    """The room's whole history (asked again while the client is still resuming)."""
    out: list[Event] = []
    deadline = time.monotonic() + SETTLE
    while True:
        try:
            page = await client.history(room, after=out[-1].seq if out else 0, limit=500)
        except ChatError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
            continue
        if not page:
            return out
        out += page


async def until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@dataclass
class Findings:
    lost: int = 0
    dup: int = 0
    problems: list[str] = field(default_factory=list)


async def check_history(
    client: Client, room: str, acked: dict[str, tuple[str, int]], found: Findings
) -> int:
    """The room's history: numbered 1..N, each acknowledged message once, at its
    acknowledged seq. Returns N."""
    events = await history(client, room)
    seqs = [e.seq or 0 for e in events]
    if seqs != list(range(1, len(seqs) + 1)):
        found.problems.append(f"{room}: history's numbers are not 1..{len(seqs)}")
    said: dict[str, list[int]] = {}
    for e in events:
        if e.kind == "msg":
            said.setdefault(e.text, []).append(e.seq or 0)
    for text, (r, seq) in acked.items():
        where = said.get(text, [])
        if r != room or where == [seq]:
            continue
        if not where:
            found.lost += 1
        found.problems.append(f"{room}: '{text}' acknowledged at {seq}, stored at {where}")
    found.dup += sum(len(v) - 1 for v in said.values())
    return seqs[-1] if seqs else 0


async def check_view(
    bot: Bot, room: str, end: int, acked: dict[str, tuple[str, int]], found: Findings
) -> None:
    """What one bot heard of a room: up to its end, in order, without gaps, each
    acknowledged message (from when it joined) once."""
    nick = bot.client.nick
    if not await until(
        lambda: bool(bot.room(room)) and (bot.room(room)[-1].seq or 0) >= end, SETTLE
    ):
        found.problems.append(f"{nick} never got to the end of {room}")
    view = bot.room(room)
    seqs = [e.seq or 0 for e in view]
    if seqs and seqs != list(range(seqs[0], seqs[-1] + 1)):
        found.problems.append(f"{nick}: {room} out of order or with a gap")
    texts = [e.text for e in view if e.kind == "msg"]
    found.dup += len(texts) - len(set(texts))
    first, seen = (seqs[0] if seqs else 1), set(texts)
    at = {e.seq: e for e in view}
    for text, (r, seq) in acked.items():
        if r == room and seq >= first and text not in seen:
            found.lost += 1
            had = at.get(seq)
            instead = f"{had.kind} '{had.text}'" if had is not None else "nothing"
            found.problems.append(f"{nick} never got '{text}' ({room} {seq}; it has {instead})")


def away(bot: Bot) -> list[tuple[float, float]]:
    """When a bot was not connected: from each "connection lost" to the next "reconnected"."""
    spans, since = [], None
    for e in bot.events:
        if e.kind != "status":
            continue
        if e.text.startswith("connection lost") and since is None:
            since = e.ts
        elif e.text.startswith("reconnected") and since is not None:
            spans.append((since, e.ts))
            since = None
    return spans + ([(since, float("inf"))] if since is not None else [])


def leaves(bots: list[Bot]) -> dict[str, list[str]]:
    """Each bot announced as gone, once per notice: "unfair" while it was connected (or a
    moment after it was cut off: a client that resumed elsewhere must never be announced),
    "away" once it had been cut off for longer than its grace (two sets of 3 heartbeats,
    the time a cluster holds its nick): say so, but that is the rule working."""
    by_nick = {b.client.nick: b for b in bots}
    notices = {
        (e.nick or e.text.split(" ")[0], round(e.ts, 3))
        for b in bots
        for e in b.events
        if e.kind == "leave"
    }
    out: dict[str, list[str]] = {"unfair": [], "away": []}
    for nick, ts in sorted(notices, key=lambda n: n[1]):
        gone = by_nick.get(nick)
        spans = away(gone) if gone is not None else []
        since = next((a for a, b in spans if a - 0.5 <= ts <= b + 0.5), None)
        if since is None:
            out["unfair"].append(f"{nick} announced as gone while connected (at {ts:.1f})")
        else:
            out["away"].append(f"{nick} announced as gone after {ts - since:.1f} s away")
    return out


async def check(bots: list[Bot]) -> dict[str, Any]:
    """Every acknowledged message, in every bot's view and in each room's history: once,
    at its acknowledged seq, in order, without gaps; no leave; no nick lost."""
    acked = {text: where for bot in bots for text, where in bot.acked.items()}
    found = Findings()
    for room in ROOMS:
        end = await check_history(bots[0].client, room, acked, found)
        for bot in bots:
            await check_view(bot, room, end, acked, found)
    return {
        "lost": found.lost,
        "dup": found.dup,
        "problems": found.problems,
        "leaves": leaves(bots),
        "renamed": [
            f"{b.client.nick}: {e.text}"
            for b in bots
            for e in b.events
            if e.kind == "status" and ("was taken" in e.text or "could not rejoin" in e.text)
        ],
        "delivered": sum(
            1 for b in bots for e in b.events if e.kind == "msg" and e.seq is not None
        ),
        "acked": len(acked),
    }


# ---------------------------------------------------------------------------- the run


async def soak(minutes: float, per_broker: int, heartbeat: float, folder: Path) -> int:
    nodes = LocalNats(folder / "nats", 3)
    nodes.start()
    brokers = [Broker(folder, f"b{i + 1}", nodes.urls, heartbeat) for i in range(3)]
    bots: list[Bot] = []
    try:
        for b in brokers:
            b.start()
        addresses = [b.address for b in brokers]
        for i in range(3 * per_broker):
            home = i % 3
            hosts = addresses[home:] + addresses[:home]
            client = Client(hosts, nick=f"bot{i}", rooms=ROOMS, bot=True, backlog=0)
            await client.connect()
            bots.append(Bot(client))
        listeners = [asyncio.create_task(bot.listen()) for bot in bots]
        faults, acks, stop = Faults(), Acks(), asyncio.Event()
        senders = [asyncio.create_task(send(bot, stop, acks, faults.began)) for bot in bots]
        lanes = [
            asyncio.create_task(broker_lane(brokers, faults, stop)),
            asyncio.create_task(node_lane(nodes, faults, stop)),
        ]
        print(f"soaking for {minutes:g} minutes: {len(bots)} bots, 3 brokers, 3 NATS nodes")
        deadline = time.monotonic() + minutes * 60
        while time.monotonic() < deadline:
            await asyncio.sleep(min(30.0, max(0.0, deadline - time.monotonic())))
            print(
                f"  {faults.now():6.0f} s: sent {sum(b.sent for b in bots)}, acknowledged "
                f"{len(acks.times)}, faults {len(faults.log)}",
                flush=True,
            )
        stop.set()
        await asyncio.gather(*lanes)
        restore(nodes, brokers)
        sending_ended = faults.now()
        await asyncio.gather(*senders)
        result = await check(bots)
        keep_statuses(bots, folder / "statuses.log")
        for task in listeners:
            task.cancel()
        for bot in bots:
            await bot.client.close()
    finally:
        for b in brokers:
            b.stop()
        nodes.stop()
    return report(bots, faults, acks, result, sending_ended)


def restore(nodes: LocalNats, brokers: list[Broker]) -> None:
    """Everything back: stopped processes go on, dead ones start again."""
    for node in nodes.nodes:
        node.signal(signal.SIGCONT)
        if node.died() is not None:
            node.start()
    for b in brokers:
        b.signal(signal.SIGCONT)
        if b.proc is None or b.proc.poll() is not None:
            b.start()


def keep_statuses(bots: list[Bot], path: Path) -> None:
    """What each bot was told (its statuses, the joins and leaves it saw): for --keep."""
    with open(path, "w") as out:
        for bot in bots:
            for e in bot.events:
                if e.kind in ("status", "leave", "join"):
                    print(f"{e.ts:.3f} {bot.client.nick} {e.kind} {e.text}", file=out)
    with open(path.with_name("views.log"), "w") as out:  # everything each bot heard, in order
        for bot in bots:
            for e in bot.events:
                print(f"{bot.client.nick} {e.room} {e.seq} {e.kind} {e.ts:.3f} {e.text}", file=out)


def report(
    bots: list[Bot], faults: Faults, acks: Acks, result: dict[str, Any], ended: float
) -> int:
    sent = sum(b.sent for b in bots)
    unacked = sum(len(b.failed) for b in bots) + sum(
        b.sent - len(b.acked) - len(b.failed) for b in bots
    )
    gaps = acks.longest_gaps()
    stalled = [(a, b) for a, b in gaps if b - a > STALL and a < ended]
    lat = sorted(acks.latencies)
    print(
        f"faults: {faults.count('kill -9 b')} broker kills, {faults.count('SIGSTOP b')} broker "
        f"pauses, {faults.count('kill -9 NATS')} node kills, {faults.count('SIGSTOP NATS')} node "
        f"pauses ({len(faults.log)} in all)"
    )
    print(
        f"sent {sent}  acknowledged {result['acked']}  not acknowledged {unacked}  "
        f"delivered {result['delivered']} (to {len(bots)} bots)  lost {result['lost']}  "
        f"duplicated {result['dup']}"
    )
    if lat:
        print(
            f"acknowledgement: p50 {statistics.median(lat) * 1000:.0f} ms, p99 "
            f"{lat[int(len(lat) * 0.99)] * 1000:.0f} ms, max {lat[-1]:.1f} s"
        )
    for a, b in gaps:
        print(
            f"longest wait for any acknowledgement: {b - a:.1f} s at {a:.0f} s, during: "
            + (", ".join(faults.during(a, b)) or "no fault")
        )
    print(f"broker starts that failed (tried again at once): {len(faults.failed_starts)}")
    for line in faults.failed_starts:
        print("  " + line)
    unfair, gone = result["leaves"]["unfair"], result["leaves"]["away"]
    print(
        f"announced as gone: {len(unfair)} while connected (must be 0), {len(gone)} after "
        f"being cut off longer than the grace;  nicks or rooms lost: {len(result['renamed'])}"
    )
    for line in (result["problems"] + unfair + result["renamed"])[:20] + gone[:10]:
        print("  " + line)
    bad = result["lost"] or result["dup"] or result["problems"] or unfair or result["renamed"]
    bad = bad or stalled or unacked
    print("FAILED" if bad else "OK: nothing lost, nothing twice, no unfair leave notice, no stall")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--bots", type=int, default=2, help="bots per broker")
    ap.add_argument("--heartbeat", type=float, default=1.0, help="the brokers' heartbeat")
    ap.add_argument("--keep", action="store_true", help="keep the logs and NATS data")
    a = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cluster-soak-"))
    try:
        return asyncio.run(soak(a.minutes, a.bots, a.heartbeat, folder))
    finally:
        if a.keep:
            print(f"logs and data in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
