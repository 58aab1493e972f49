"""The broker's own work per request, without sockets: the core (core.py) and the local room
log with the real history store (on tmpfs), driven directly.

    python bench/core_cost.py            # microseconds per SAY of 1 message, per message of 100
    python bench/core_cost.py profile    # and where the time goes (cProfile)

It leaves out what ZeroMQ does (bench.py measures the whole broker, sockets included): this
is the part a change to the broker's Python code can make smaller.
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zmqchat import protocol as m  # noqa: E402
from zmqchat._config import DEFAULT_ROOMS  # noqa: E402
from zmqchat._core.core import Core  # noqa: E402
from zmqchat._core.rules import Rules  # noqa: E402
from zmqchat._local.state import LocalLog, LocalPresence, LocalRegistry  # noqa: E402
from zmqchat._local.store import Store  # noqa: E402

d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
store = Store(os.path.join(d, "c.db"))
log = LocalLog(store)
reg = LocalRegistry(store, DEFAULT_ROOMS, (), False)
core = Core(Rules(rate=0), log, reg, LocalPresence(), name="b", pub_port=1, motd="")
rid = b"r1"
core.request(rid, m.encode_request("HELLO", b"h", {"version": 1, "nick": "ann"}))
core.request(rid, m.encode_request("JOIN", b"j", {"room": "lobby"}))
for dl in log.follow():
    core.deliver(dl)
core.outbox.clear()
core.pubs.clear()


def run(n: int, batch: int = 1, prefix: str = "c") -> float:
    """Microseconds per request: n SAYs of `batch` messages each, ids starting `prefix`."""
    reqs = [
        m.encode_request(
            "SAY",
            str(i).encode(),
            {
                "room": "lobby",
                "msgs": [{"id": f"{prefix}{i}-{k}", "text": "x" * 100} for k in range(batch)],
            },
        )
        for i in range(n)
    ]
    t = time.perf_counter()
    for f in reqs:
        core.request(rid, f)
        for dl in log.follow():
            core.deliver(dl)
        core.outbox.clear()
        core.pubs.clear()
    return (time.perf_counter() - t) / n * 1e6


run(5000, prefix="w")
print(f"SAY of 1 message: {run(30000, 1, 'a'):.1f} us per request")
print(f"SAY of 100 messages: {run(300, 100, 'b') / 100:.1f} us per message")
if len(sys.argv) > 1:
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    run(20000, 1, "p")
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
store.close()
shutil.rmtree(d)
