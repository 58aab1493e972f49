"""Soak test (not in CI): bots talk while the broker is killed and paused at random.

    python scripts/soak.py --minutes 3

Prints messages sent, acknowledged, delivered (to every member), lost and duplicated;
lost and duplicated must be 0. Exit status 1 if they are not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_durability import Member, db_events, until  # noqa: E402

from conftest import BrokerProcess  # noqa: E402


async def bot_loop(member: Member, stop: asyncio.Event, sent: list, acked: dict) -> None:
    """Send a message every few milliseconds until told to stop; record acknowledgements."""
    i = 0
    pending = set()
    while not stop.is_set():
        text = f"{member.client.nick} {i}"
        i += 1
        sent.append(text)
        fut = asyncio.ensure_future(member.client.say(member.room, text))
        fut.add_done_callback(
            lambda f, t=text: acked.__setitem__(t, f.result()) if not f.exception() else None
        )
        pending.add(fut)
        await asyncio.sleep(random.uniform(0.002, 0.02))
    await asyncio.gather(*pending, return_exceptions=True)


async def chaos(proc: BrokerProcess, stop: asyncio.Event, log: list) -> None:
    """Every few seconds: kill and restart the broker, or pause it, or leave it be."""
    while not stop.is_set():
        await asyncio.sleep(random.uniform(1.5, 4.0))
        action = random.choice(["kill", "pause", "none"])
        log.append(action)
        if action == "kill":
            proc.proc.kill()
            proc.proc.wait()
            proc.start()
        elif action == "pause":
            os.kill(proc.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(random.uniform(0.2, 2.0))
            os.kill(proc.proc.pid, signal.SIGCONT)


async def soak(minutes: float, bots: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    proc = BrokerProcess(tmp, "--heartbeat", "0.5", "--rate", "0")
    try:
        members = [await Member(proc.port, f"soak{i}").start() for i in range(bots)]
        watcher = await Member(proc.port, "watcher").start()
        stop, sent, acked, actions = asyncio.Event(), [], {}, []
        tasks = [asyncio.create_task(bot_loop(mb, stop, sent, acked)) for mb in members]
        tasks.append(asyncio.create_task(chaos(proc, stop, actions)))
        await asyncio.sleep(minutes * 60)
        stop.set()
        await asyncio.gather(*tasks)
        everyone = [*members, watcher]
        last = len(db_events(tmp / "chat.db"))
        await until(
            lambda: all(mb.seqs() and mb.seqs()[-1] >= last for mb in everyone),
            60,
            "every member to catch up",
        )
        lost = dup = 0
        for mb in everyone:
            texts = [e.text for e in mb.events if e.kind == "msg"]
            seen = set(texts)
            dup += len(texts) - len(seen)
            lost += sum(1 for t in acked if t not in seen and acked[t] >= mb.seqs()[0])
        print(f"chaos actions: {actions.count('kill')} kills, {actions.count('pause')} pauses")
        print(
            f"sent {len(sent)}  acknowledged {len(acked)}  "
            f"delivered {sum(len([e for e in mb.events if e.kind == 'msg']) for mb in everyone)}"
            f" (to {len(everyone)} members)  lost {lost}  duplicated {dup}"
        )
        for mb in everyone:
            await mb.client.close()
        return 0 if lost == 0 and dup == 0 else 1
    finally:
        proc.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--bots", type=int, default=3)
    a = ap.parse_args()
    sys.exit(asyncio.run(soak(a.minutes, a.bots)))
