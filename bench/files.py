"""Files (issue 24): how fast a file goes through the broker, against the same sockets alone.

    python bench/files.py [--mb 200] [--big-mb 1024]

1. raw: two processes, a DEALER and a ROUTER on localhost, moving the file in 64 KiB chunks
   with 16 unanswered at most (the same chunk, credit and disk work as the broker's: the
   side that receives writes each chunk to a file, the side that sends reads it from one):
   the physical limit of these sockets here.
2. broker: `python broker.py` as a process; one client uploads the file (Client.send_file),
   another downloads it (Client.download). Rates count the transfer itself; the sender's
   SHA-256 pass over the file before it offers it is shown apart.
3. memory: the broker's resident memory (VmRSS, sampled every 20 ms) before and during the
   upload and the download of a --big-mb file.

Everything it writes goes to a temporary folder, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
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
    out = os.open(os.path.join(folder, "raw-in"), os.O_WRONLY | os.O_CREAT, 0o600)
    src = -1
    while True:
        rid, kind, offset, *data = sock.recv_multipart()
        at = int(offset)
        if kind == b"put":
            os.pwrite(out, data[0], at)
            sock.send_multipart([rid, b"ok", offset])
        elif kind == b"get":
            if src < 0:
                src = os.open(os.path.join(folder, "raw-in"), os.O_RDONLY)
            sock.send_multipart([rid, b"ok", offset, os.pread(src, m.CHUNK, at)])
        else:
            sock.send_multipart([rid, b"bye", b"0"])
            break
    sock.close()
    ctx.term()


def raw_transfer(path: Path, size: int, folder: str) -> tuple[float, float]:
    port_file = os.path.join(folder, "port")
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
        rates = []
        for kind in (b"put", b"get"):
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
            for f in (fd, out):
                if f >= 0:
                    os.close(f)
        sock.send_multipart([b"stop", b"0"])
        sock.recv_multipart()
        sock.close()
        ctx.term()
        return rates[0], rates[1]
    finally:
        server.wait(10)


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


async def through_broker(port: int, path: Path, size: int, folder: str) -> dict[str, float]:
    async with Client("127.0.0.1", port, "sender") as a, Client("127.0.0.1", port, "getter") as b:
        a.timeout = b.timeout = 30.0
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, sha256_file, str(path))
        hashed = time.perf_counter() - t0
        marks: list[float] = []
        t0 = time.perf_counter()
        offer = await a.send_file(
            "lobby", str(path), progress=lambda d, t: marks or marks.append(time.perf_counter())
        )
        up = time.perf_counter() - (marks[0] if marks else t0)
        whole_up = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = await b.download(offer["file"], folder)
        down = time.perf_counter() - t0
        os.unlink(got)
        return {
            "hash_s": hashed,
            "up": size / MB / up,
            "up_with_hash": size / MB / whole_up,
            "down": size / MB / down,
        }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--big-mb", type=int, default=1024)
    p.add_argument("--raw-server", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.raw_server:
        raw_server(*a.raw_server)
        return
    folder = tempfile.mkdtemp(prefix="zmqchat-files-bench-")
    try:
        size = a.mb * MB
        path = Path(folder) / "file.bin"
        make_file(path, size)
        raw_up, raw_down = raw_transfer(path, size, folder)
        broker = BrokerProcess(Path(folder), "--max-file-size", "4G", "--keep-free", "1G")
        try:
            base = rss_kb(broker.proc.pid)
            r = asyncio.run(through_broker(broker.port, path, size, folder))
            print(f"{a.mb} MB file, 64 KiB chunks, 16 in flight, localhost:")
            print(f"  raw pyzmq        upload {raw_up:7.1f} MB/s   download {raw_down:7.1f} MB/s")
            print(
                f"  through broker   upload {r['up']:7.1f} MB/s   download {r['down']:7.1f} MB/s"
                f"   ({r['up'] / raw_up:.2f}x, {r['down'] / raw_down:.2f}x of raw)"
            )
            print(
                f"  sender's SHA-256 pass first: {r['hash_s']:.2f} s "
                f"(upload with it: {r['up_with_hash']:.1f} MB/s)"
            )
            os.unlink(path)
            big = Path(folder) / "big.bin"
            make_file(big, a.big_mb * MB)
            before = rss_kb(broker.proc.pid)
            sampler = Sampler(broker.proc.pid)
            rb = asyncio.run(through_broker(broker.port, big, a.big_mb * MB, folder))
            peak = sampler.stop()
            print(
                f"broker RSS: {base / 1024:.1f} MB at start, {before / 1024:.1f} MB before the "
                f"{a.big_mb} MB transfer, peak {peak / 1024:.1f} MB during it "
                f"(+{(peak - before) / 1024:.1f} MB); its rates: up {rb['up']:.1f}, "
                f"down {rb['down']:.1f} MB/s"
            )
        finally:
            broker.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
