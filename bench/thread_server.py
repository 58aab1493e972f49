"""Baseline: the classroom chat server, one thread per TCP client and a shared list under a lock.

Each newline-terminated UTF-8 line a client sends is written with `sendall` to every connected
client, the sender included. If the client's first line is `JOIN <room>`, it joins that room:
its lines then go only to clients in that room, and it receives only that room's lines. Lines
from a client that never joined go to everyone. The broadcast holds the lock while it writes,
so lines never interleave, and one slow reader slows everyone down: that is the design.

    python bench/thread_server.py --host 127.0.0.1 --port 0
    -> READY <port>
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Final

ACCEPT_TIMEOUT: Final = 0.2  # seconds; how late a SIGTERM may be noticed by the accept loop
BACKLOG: Final = 1024  # a benchmark connects hundreds of clients at once


@dataclass(eq=False, slots=True)
class Client:
    """One connected client: its socket and room (None until it sends JOIN)."""

    sock: socket.socket
    room: str | None = None


class ThreadServer:
    """Accepts clients and runs one thread per client that broadcasts each line it reads."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.clients: list[Client] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def serve(self) -> None:
        """Accept clients until stop() is called, then disconnect them all."""
        threads: list[threading.Thread] = []
        self.listener.settimeout(ACCEPT_TIMEOUT)
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ZeroMQ does
            client = Client(sock)
            with self.lock:
                self.clients.append(client)
            thread = threading.Thread(target=self.handle, args=(client,), daemon=True)
            thread.start()
            threads = [t for t in threads if t.is_alive()] + [thread]
        self.listener.close()
        for client in list(self.clients):  # no lock: a broadcast may hold it, blocked in sendall
            shutdown(client.sock)
        for thread in threads:
            thread.join(timeout=2.0)

    def stop(self) -> None:
        self.stopping.set()

    def handle(self, client: Client) -> None:
        """Read lines from one client until it disconnects, broadcasting each one."""
        try:
            with client.sock.makefile("rb") as lines:
                first = True
                for line in lines:
                    if not line.endswith(b"\n"):
                        break  # a last line without its newline is not a line
                    if first and line.startswith(b"JOIN "):
                        client.room = line[5:].decode("utf-8", "replace").strip()
                    else:
                        self.broadcast(client.room, line)
                    first = False
        except OSError:
            pass
        finally:
            with self.lock:
                if client in self.clients:
                    self.clients.remove(client)
            client.sock.close()

    def broadcast(self, room: str | None, line: bytes) -> None:
        """Send one line to every client of the room (everyone when room is None)."""
        gone: list[Client] = []
        with self.lock:
            for client in self.clients:
                if room is None or client.room == room:
                    try:
                        client.sock.sendall(line)
                    except OSError:
                        gone.append(client)
            for client in gone:
                self.clients.remove(client)
        for client in gone:
            shutdown(client.sock)  # its own thread sees EOF, then closes it


def shutdown(sock: socket.socket) -> None:
    """Shut a socket both ways, waking any thread blocked on it; ignore if already gone."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Bind, print READY, serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: ephemeral)")
    args = parser.parse_args(argv)

    listener = socket.create_server((args.host, args.port), backlog=BACKLOG)
    server = ThreadServer(listener)

    def stop(signum: int, frame: FrameType | None) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"READY {listener.getsockname()[1]}", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
