"""Files (issue 24): how fast a file goes through the broker, against the same sockets alone.

    python bench/files.py [--mb 200] [--big-mb 1024] [--rounds 3]

1. raw: two processes, a DEALER and a ROUTER on localhost, moving the file in 64 KiB chunks
   with 16 unanswered at most (the same chunk, credit and disk work as the broker's: the
   side that receives writes each chunk to a file, the side that sends reads it from one):
   the physical limit of these sockets here.
2. broker: `python broker.py` as a process; one client uploads the file (Client.send_file),
   another downloads it (Client.download). Rates count the transfer itself; the sender's
   SHA-256 pass over the file before it offers it is shown apart.
3. chat during a transfer: a process of its own with two clients, one saying a line to a
   room every 20 ms, the other timing each line from say() to its arrival (W2's measure),
   with the broker idle, beside raw transfers (the same load on the host, the broker not in
   their way), then while the --big-mb file goes up through the broker and down again.
4. memory: the broker's resident memory (VmRSS, sampled every 20 ms) before and during that
   upload and download of the --big-mb file.
5. what counting the chunks ZeroMQ holds costs (a MessageTracker per chunk, looked at each
   pass of the loop): the --mb file downloaded from broker.py and from the same broker with
   chunks lent untracked (bench/untracked_broker.py), both running, in turn --rounds times;
   and the CPU time the loop's thread spends handing a 1 MiB chunk to ZeroMQ either way
   (the broker's own send code, to a reader process, 10 rounds of 200 chunks in turn).

Everything it writes goes to a temporary folder, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import BrokerProcess  # noqa: E402
from zmqchat import Client  # noqa: E402
from zmqchat import protocol as m  # noqa: E402
from zmqchat._client.files import sha256_file  # noqa: E402

MB = 1 << 20
UNTRACKED = ROOT / "bench" / "untracked_broker.py"


def make_file(path: Path, size: int) -> None:
    block = os.urandom(4 * MB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])


# ---------------------------------------------------------------------------- raw


def raw_server(port_file: str, folder: str) -> None:
    """ROUTER: 'put' chunks are written to a file and answered; 'get' chunks are read and sent."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    Path(port_file).write_text(str(port))
    # A new file for each upload, deleted after the round, as the broker writes an upload
    # to a new file of its own and deletes it once it finds the content is there already.
    path = os.path.join(folder, f"raw-in-{os.getpid()}")
    out = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    while True:
        rid, kind, offset, *data = sock.recv_multipart()
        at = int(offset)
        if kind == b"put":
            os.pwrite(out, data[0], at)
            sock.send_multipart([rid, b"ok", offset])
        elif kind == b"get":
            sock.send_multipart([rid, b"ok", offset, os.pread(out, m.CHUNK, at)])
        else:
            sock.send_multipart([rid, b"bye", b"0"])
            break
    os.close(out)
    os.unlink(path)
    sock.close()
    ctx.term()


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used so far (user and system, all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_transfer(path: Path, size: int, folder: str) -> dict[str, float]:
    port_file = os.path.join(folder, "port")
    if os.path.exists(port_file):  # the last round's
        os.unlink(port_file)
    server = subprocess.Popen(
        [sys.executable, __file__, "--raw-server", port_file, folder], cwd=ROOT
    )
    try:
        while not os.path.exists(port_file) or not Path(port_file).read_text():
            time.sleep(0.01)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"tcp://127.0.0.1:{Path(port_file).read_text()}")
        rates, cpus = [], []
        for kind in (b"put", b"get"):
            cpu0 = cpu_s(server.pid) + time.process_time()
            fd = os.open(path, os.O_RDONLY) if kind == b"put" else -1
            out = os.open(os.path.join(folder, "raw-out"), os.O_WRONLY | os.O_CREAT, 0o600)
            started, sent, done, credit = time.perf_counter(), 0, 0, 0
            while done < size:
                while sent < size and credit < m.WINDOW:
                    if kind == b"put":
                        sock.send_multipart([kind, str(sent).encode(), os.pread(fd, m.CHUNK, sent)])
                    else:
                        sock.send_multipart([kind, str(sent).encode()])
                    sent += min(m.CHUNK, size - sent)
                    credit += 1
                reply = sock.recv_multipart()
                credit -= 1
                if kind == b"get":
                    os.pwrite(out, reply[2], int(reply[1]))
                    done += len(reply[2])
                else:
                    done = min(size, int(reply[1]) + m.CHUNK)
            rates.append(size / MB / (time.perf_counter() - started))
            cpus.append(cpu_s(server.pid) + time.process_time() - cpu0)
            for f in (fd, out):
                if f >= 0:
                    os.close(f)
            os.unlink(os.path.join(folder, "raw-out"))  # as the bench deletes each download
        sock.send_multipart([b"stop", b"0"])
        sock.recv_multipart()
        sock.close()
        ctx.term()
        return {"up": rates[0], "down": rates[1], "up_cpu": cpus[0], "down_cpu": cpus[1]}
    finally:
        server.wait(10)


# ---------------------------------------------------------------------------- chat


CHAT_EVERY = 0.02  # seconds between two lines of the chat probe


async def chat_probe(port: int, seconds: float) -> list[float]:
    """Latencies (ms) of lines said every CHAT_EVERY for `seconds` (or until a line comes in
    on stdin), from say() to arrival."""
    async with Client("127.0.0.1", port, "talker") as t, Client("127.0.0.1", port, "hearer") as h:
        sent: dict[str, float] = {}
        got: list[float] = []

        async def hear() -> None:
            while True:
                ev = await h.next_event()
                if ev.kind == "msg" and ev.text in sent:
                    got.append((time.perf_counter() - sent.pop(ev.text)) * 1000)

        hearing = asyncio.create_task(hear())
        told = asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end and not told.done():
            n += 1
            sent[f"probe {n}"] = time.perf_counter()
            await t.say("lobby", f"probe {n}")
            await asyncio.sleep(CHAT_EVERY)
        await asyncio.sleep(0.5)
        hearing.cancel()
        return got


class Probe:
    """bench/files.py --chat-probe as a process: its figures come back on its stdout."""

    def __init__(self, port: int, seconds: float = 600.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--chat-probe", str(port), str(seconds)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def result(self) -> str:
        out, _ = self.proc.communicate("stop\n", timeout=120)
        return out.strip()


def percentiles(ms: list[float]) -> str:
    if not ms:
        return "no line arrived"
    ms = sorted(ms)
    p = [ms[min(len(ms) - 1, int(len(ms) * q))] for q in (0.5, 0.99)]
    return f"p50 {p[0]:.2f} ms, p99 {p[1]:.2f} ms, max {ms[-1]:.2f} ms ({len(ms)} lines)"


def run_probe(port: int, seconds: float) -> None:
    print("ready", flush=True)
    print(percentiles(asyncio.run(chat_probe(port, seconds))), flush=True)


# ---------------------------------------------------------------------------- tracking


async def download_rate(broker: BrokerProcess, fid: str, size: int, folder: str) -> float:
    async with Client("127.0.0.1", broker.port, "getter") as b:
        b.timeout = 30.0
        t0 = time.perf_counter()
        got = await b.download(fid, folder)
        rate = size / MB / (time.perf_counter() - t0)
    os.unlink(got)
    return rate


async def offer(broker: BrokerProcess, path: Path) -> str:
    async with Client("127.0.0.1", broker.port, "sender") as a:
        a.timeout = 30.0
        return str((await a.send_file("lobby", str(path)))["file"])


def chunk_reader(endpoint: str) -> None:
    """--chunk-reader: a DEALER that reads what it is sent and drops it, until b"stop"."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.ROUTING_ID, b"reader")
    sock.connect(endpoint)
    sock.send(b"ready")
    while sock.recv(copy=False).bytes != b"stop":
        pass
    sock.close()
    ctx.term()


def send_cost(rounds: int = 10, n: int = 200) -> dict[str, float]:
    """Median microseconds of the loop thread's CPU to send a chunk: the first frame and the
    1 MiB lent untracked, or lent with a tracker and counted (queue, lend, prune)."""
    from zmqchat.broker._loop import _MORE, _NOBLOCK, _lend, _send
    from zmqchat.broker._outflow import Outflow

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a chunk the reader has no room for: an error
    port = router.bind_to_random_port("tcp://127.0.0.1")
    reader = subprocess.Popen(
        [sys.executable, __file__, "--chunk-reader", f"tcp://127.0.0.1:{port}"], cwd=ROOT
    )
    rid, _ = router.recv_multipart()
    chunks = [os.urandom(m.CHUNK) for _ in range(m.WINDOW)]
    spent: dict[str, list[float]] = {"tracked": [], "untracked": []}
    for r in range(rounds):
        for which in ("tracked", "untracked") if r % 2 == 0 else ("untracked", "tracked"):
            outflow, cpu = Outflow(), 0.0
            for i in range(n):
                t0 = time.thread_time()
                _send(router, rid, _MORE)
                if which == "tracked":
                    outflow.queue(rid, m.CHUNK)
                    outflow.lend(rid, _lend(router, chunks[i % m.WINDOW]), m.CHUNK, True)
                    outflow.prune()
                else:
                    _send(router, chunks[i % m.WINDOW], _NOBLOCK, False)
                cpu += time.thread_time() - t0
                if i % m.WINDOW == m.WINDOW - 1:
                    time.sleep(0.008)  # a window's worth, then the reader catches up
            spent[which].append(cpu / n * 1e6)
    router.send_multipart([rid, b"stop"])
    try:
        reader.wait(60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        router.close()
        ctx.term()
    return {which: statistics.median(v) for which, v in spent.items()}


def tracking_cost(path: Path, size: int, folder: str, rounds: int, flags: list[str]) -> None:
    """Downloads from broker.py and from it without tracking, in turn (see 5. above)."""
    brokers = {}
    for which, script in (("tracked", ROOT / "broker.py"), ("untracked", UNTRACKED)):
        home = Path(folder) / which
        home.mkdir()
        brokers[which] = BrokerProcess(home, *flags, script=script)
    try:
        fids = {which: asyncio.run(offer(b, path)) for which, b in brokers.items()}
        rates: dict[str, list[float]] = {"tracked": [], "untracked": []}
        cpu: dict[str, list[float]] = {"tracked": [], "untracked": []}
        for n in range(rounds):
            for which in ("tracked", "untracked") if n % 2 == 0 else ("untracked", "tracked"):
                b = brokers[which]
                cpu0 = cpu_s(b.proc.pid)
                rates[which].append(asyncio.run(download_rate(b, fids[which], size, folder)))
                cpu[which].append(cpu_s(b.proc.pid) - cpu0)
        t, u = (statistics.median(rates[w]) for w in ("tracked", "untracked"))
        tc, uc = (statistics.median(cpu[w]) for w in ("tracked", "untracked"))
        print(
            f"tracking what ZeroMQ holds, download of the {size // MB} MB file, median of "
            f"{rounds}: tracked {t:.1f} MB/s, untracked {u:.1f} MB/s ({t / u:.2f}x); the "
            f"broker's CPU seconds {tc:.3f} and {uc:.3f}"
        )
        print(
            "  rounds, MB/s: tracked "
            + " ".join(f"{r:.0f}" for r in rates["tracked"])
            + "; untracked "
            + " ".join(f"{r:.0f}" for r in rates["untracked"])
        )
        us = send_cost()
        print(
            f"  the loop's CPU to send a 1 MiB chunk (median): tracked {us['tracked']:.1f} us, "
            f"untracked {us['untracked']:.1f} us (+{us['tracked'] - us['untracked']:.1f} us)"
        )
    finally:
        for b in brokers.values():
            b.stop()


# ---------------------------------------------------------------------------- broker


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Sampler:
    """The broker's peak RSS while something runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.running = pid, 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


async def through_broker(
    broker: BrokerProcess, path: Path, size: int, folder: str
) -> dict[str, float]:
    port, pid = broker.port, broker.proc.pid
    async with Client("127.0.0.1", port, "sender") as a, Client("127.0.0.1", port, "getter") as b:
        a.timeout = b.timeout = 30.0
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, sha256_file, str(path))
        hashed = time.perf_counter() - t0
        marks: list[float] = []
        t0, cpu0 = time.perf_counter(), cpu_s(pid) + time.process_time()
        offer = await a.send_file(
            "lobby", str(path), progress=lambda d, t: marks or marks.append(time.perf_counter())
        )
        up = time.perf_counter() - (marks[0] if marks else t0)
        whole_up = time.perf_counter() - t0
        up_cpu = cpu_s(pid) + time.process_time() - cpu0
        t0, cpu0 = time.perf_counter(), cpu_s(pid) + time.process_time()
        got = await b.download(offer["file"], folder)
        down = time.perf_counter() - t0
        down_cpu = cpu_s(pid) + time.process_time() - cpu0
        os.unlink(got)
        return {
            "hash_s": hashed,
            "up": size / MB / up,
            "up_with_hash": size / MB / whole_up,
            "down": size / MB / down,
            "up_cpu": up_cpu - hashed,  # the sender's pass is counted apart (a core's worth)
            "down_cpu": down_cpu,
        }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--big-mb", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3, help="raw and broker in turn, this often")
    p.add_argument("--only-tracking", action="store_true", help="5. alone")
    p.add_argument("--raw-server", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--chat-probe", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--chunk-reader", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.chunk_reader:
        chunk_reader(a.chunk_reader)
        return
    if a.raw_server:
        raw_server(*a.raw_server)
        return
    if a.chat_probe:
        run_probe(int(a.chat_probe[0]), float(a.chat_probe[1]))
        return
    folder = tempfile.mkdtemp(prefix="zmqchat-files-bench-")
    try:
        size = a.mb * MB
        path = Path(folder) / "file.bin"
        make_file(path, size)
        flags = ["--max-file-size", "4G", "--keep-free", "1G", "--max-file-bytes-per-day", "1T"]
        if a.only_tracking:
            tracking_cost(path, size, folder, a.rounds, flags)
            return
        broker = BrokerProcess(Path(folder), *flags, "--rate", "100")
        try:
            base = rss_kb(broker.proc.pid)
            print(f"{a.mb} MB file, {m.CHUNK >> 10} KiB chunks, {m.WINDOW} in flight, localhost:")
            print("  MB/s          raw up   broker up   ratio    raw down  broker down  ratio")
            ratios: list[tuple[float, float]] = []
            rates: list[tuple[float, float, float, float]] = []
            cpu: list[tuple[float, float, float, float]] = []
            for n in range(a.rounds):  # alternating: a busy moment of the host hits both
                raw = raw_transfer(path, size, folder)
                r = asyncio.run(through_broker(broker, path, size, folder))
                ratios.append((r["up"] / raw["up"], r["down"] / raw["down"]))
                rates.append((raw["up"], r["up"], raw["down"], r["down"]))
                cpu.append((raw["up_cpu"], r["up_cpu"], raw["down_cpu"], r["down_cpu"]))
                print(
                    f"  round {n + 1}     {raw['up']:7.1f}    {r['up']:7.1f}    "
                    f"{ratios[-1][0]:5.2f}x   {raw['down']:7.1f}     {r['down']:7.1f}    "
                    f"{ratios[-1][1]:5.2f}x"
                )
            mr = [statistics.median(x[i] for x in rates) for i in range(4)]
            print(
                f"  median      {mr[0]:7.1f}    {mr[1]:7.1f}    {mr[1] / mr[0]:5.2f}x"
                f"   {mr[2]:7.1f}     {mr[3]:7.1f}    {mr[3] / mr[2]:5.2f}x   (medians' ratio)"
            )
            print(
                f"  median ratio of a round: upload {statistics.median(u for u, _ in ratios):.2f}x"
                f", download {statistics.median(d for _, d in ratios):.2f}x of raw"
            )
            med = [statistics.median(c[i] for c in cpu) for i in range(4)]
            print(
                f"  CPU seconds per file, both ends (median): upload raw {med[0]:.2f}, broker "
                f"{med[1]:.2f} (its SHA-256 included); download raw {med[2]:.2f}, broker "
                f"{med[3]:.2f} (the reader's SHA-256 included)"
            )
            print(
                f"  sender's SHA-256 pass before the upload: {r['hash_s']:.2f} s "
                f"(last round's upload with it: {r['up_with_hash']:.1f} MB/s)"
            )
            idle_probe = Probe(broker.port)
            time.sleep(3.0)
            idle = idle_probe.result()
            probe = Probe(broker.port)  # the same CPU load, without the broker in the way
            raw_transfer(path, size, folder)
            raw_transfer(path, size, folder)
            beside_raw = probe.result()
            os.unlink(path)
            big = Path(folder) / "big.bin"
            make_file(big, a.big_mb * MB)
            before = rss_kb(broker.proc.pid)
            sampler = Sampler(broker.proc.pid)
            probe = Probe(broker.port)  # until the file is up and down again
            rb = asyncio.run(through_broker(broker, big, a.big_mb * MB, folder))
            busy = probe.result()
            peak = sampler.stop()
            print(f"  a chat line every {CHAT_EVERY * 1000:.0f} ms, from say() to arrival:")
            print(f"    broker idle                  {idle}")
            print(f"    beside two raw transfers     {beside_raw}")
            print(f"    during the {a.big_mb} MB file   {busy}")
            print(
                f"broker RSS: {base / 1024:.1f} MB at start, {before / 1024:.1f} MB before the "
                f"{a.big_mb} MB transfer, peak {peak / 1024:.1f} MB during it "
                f"(+{(peak - before) / 1024:.1f} MB); its rates: up {rb['up']:.1f}, "
                f"down {rb['down']:.1f} MB/s"
            )
        finally:
            broker.stop()
        make_file(path, size)
        tracking_cost(path, size, folder, a.rounds, flags)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
