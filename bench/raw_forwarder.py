"""Baseline: the fastest a Python broker of this design can go, a ROUTER in and a PUB out.

Every message [routing_id, topic, payload] received on the ROUTER is re-sent on the PUB as
[topic, payload], one published message per received message: no decoding, no validation,
no state, no replies. Whatever the real broker does on top of this costs throughput.

With --ack it also answers each message to its sender as the broker acknowledges a SAY
(OK, a label, a small JSON body): the same forwarding, plus the round trip of an
acknowledgement, which the broker cannot leave out (it is how a sender learns a message is
stored). W2 measures this one as `fwd+ack`.

    python bench/raw_forwarder.py --host 127.0.0.1 --port 0 --pub-port 0
    -> READY <router_port> <pub_port>
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Final

import zmq

POLL_MS: Final = 100  # how late a SIGTERM may be noticed when idle; no cost under load
DRAIN: Final = 10_000  # messages per wake-up before the stop flag is looked at again
ACK_BODY: Final = b'{"room":"bench","acks":[["sender.123456",123456]]}'  # a SAY's, in size
BACKLOG: Final = 1024  # as thread_server.py: a benchmark connects hundreds of clients at once


def bind(sock: zmq.Socket, host: str, port: int) -> int:
    """Bind on host:port (0 = a port the OS picks) and return the port actually bound."""
    sock.bind(f"tcp://{host}:{port or '*'}")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])


def main(argv: list[str] | None = None) -> int:
    """Bind both sockets, print READY, forward until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="ROUTER port (0: ephemeral)")
    parser.add_argument("--pub-port", type=int, default=0, help="PUB port (0: ephemeral)")
    parser.add_argument("--hwm", type=int, default=1000, help="high-water marks (ZeroMQ default)")
    parser.add_argument(
        "--ack", action="store_true", help="answer every message to its sender (4 frames)"
    )
    args = parser.parse_args(argv)

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    pub = ctx.socket(zmq.PUB)
    try:
        for sock in (router, pub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.BACKLOG, BACKLOG)  # ZeroMQ's default of 100 drops connections
        router.setsockopt(zmq.RCVHWM, args.hwm)
        pub.setsockopt(zmq.SNDHWM, args.hwm)
        router_port = bind(router, args.host, args.port)
        pub_port = bind(pub, args.host, args.pub_port)
        print(f"READY {router_port} {pub_port}", flush=True)

        recv, send, again = router.recv_multipart, pub.send_multipart, zmq.Again
        reply, ack = router.send_multipart, args.ack
        while not stopping:
            if not router.poll(POLL_MS):
                continue
            try:
                for _ in range(DRAIN):
                    frames = recv(zmq.NOBLOCK)
                    send(frames[1:])
                    if ack and frames[1][:1] != b"\x00":  # not a keep-alive nobody hears
                        reply([frames[0], b"OK", b"1", ACK_BODY], zmq.NOBLOCK)
            except again:
                pass
    finally:
        router.close(linger=0)
        pub.close(linger=0)
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
