"""A chat client written from PROTOCOL.md alone: plain Python and pyzmq, nothing imported from
this project, to show what a client in any language has to do.

It says HELLO, joins one room, subscribes with the grant, says one line and shows its echo,
then prints the room as it goes (in order, no duplicates, gaps fetched from history),
PINGing every heartbeat and subscribing again whenever a GRANT push comes, until Ctrl+C.

    python examples/minimal_client.py --port 9001 [--nick mini] [--room lobby] [--say TEXT] [-v]

Exit status: 0 after Ctrl+C, 1 if the broker refuses us, 3 if the broker is lost (this client
does not reconnect; PROTOCOL.md section 9 says how a full client does).
"""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import sys
import time

import zmq


class Refused(Exception):
    """An ERROR reply: code, reason and the whole body."""

    def __init__(self, body: dict) -> None:
        super().__init__(f"{body.get('code')}: {body.get('reason')}")
        self.body = body


class Lost(Exception):
    """The broker is gone, or has forgotten us."""


class MinimalClient:
    def __init__(self, host: str, port: int, nick: str, room: str, verbose: bool) -> None:
        self.host, self.nick, self.room, self.verbose = host, nick, room, verbose
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)  # section 1: commands
        self.dealer.linger = 0
        self.dealer.connect(f"tcp://{host}:{port}")
        self.sub: zmq.Socket | None = None  # section 1: room traffic, an XSUB
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.labels = itertools.count(1)
        self.sent: dict[bytes, str] = {}  # label -> kind, for replies we await
        self.replies: dict[bytes, tuple[str, dict]] = {}
        self.token = secrets.token_hex(16)  # section 4, HELLO: our secret
        self.ids = itertools.count(1)
        self.mine: set[str] = set()  # our message ids: our echoes carry them
        self.last = 0  # section 8: highest seq shown
        self.kept: dict[int, dict] = {}  # events past a gap, until it is filled
        self.repairing = False
        self.live = False
        self.heartbeat = 2.0
        self.heard = time.monotonic()

    # -------------------------------------------------------------- the command socket
    def send(self, kind: str, body: dict) -> bytes:
        """Three frames: kind, a label of our choosing, a JSON body (section 2)."""
        label = str(next(self.labels)).encode()
        self.sent[label] = kind
        self.dealer.send_multipart([kind.encode(), label, json.dumps(body).encode()])
        return label

    def call(self, kind: str, body: dict, timeout: float = 5.0) -> dict:
        """Send a request and wait for its reply, handling whatever else arrives meanwhile."""
        label = self.send(kind, body)
        deadline = time.monotonic() + timeout
        while label not in self.replies:
            if time.monotonic() > deadline:
                self.sent.pop(label, None)
                raise TimeoutError(f"no reply to {kind}")
            self.pump(deadline - time.monotonic())
        reply, body = self.replies.pop(label)
        if reply == "ERROR":
            raise Refused(body)
        return body

    def pump(self, timeout: float) -> None:
        """Wait up to timeout seconds for traffic on either socket, and handle all of it."""
        ready = dict(self.poller.poll(max(0.0, timeout) * 1000))
        if self.dealer in ready:
            while self.dealer.poll(0):
                self.on_command(self.dealer.recv_multipart())
        if self.sub is not None and self.sub in ready:
            while self.sub.poll(0):
                self.on_batch(self.sub.recv_multipart())

    def on_command(self, frames: list[bytes]) -> None:
        self.heard = time.monotonic()  # section 9: anything at all is a sign of life
        kind, label, body = frames[0].decode(), frames[1], json.loads(frames[2])
        if not label:  # section 5: a push
            self.on_push(kind, body)
            return
        sent = self.sent.pop(label, None)
        if kind == "ERROR" and body.get("code") == "NO_HELLO":
            raise Lost("the broker has forgotten our session")
        if sent == "PING" and kind == "OK":
            self.say_verbose(f"PONG {json.dumps(body['rooms'])}")
            if body["rooms"].get(self.room, 0) > self.last:  # section 8: a tail we lack
                self.repair()
        elif sent == "HISTORY":
            self.repairing = False
            if kind == "OK":
                for event in body["events"]:
                    self.on_event(event)
                if body["seq"] > self.last and body["events"]:
                    self.repair()
        else:
            self.replies[label] = (kind, body)

    def on_push(self, kind: str, body: dict) -> None:
        if kind == "GRANT" and body["room"] == self.room:
            # Someone left: the room has a new topic. Subscribe with the new grant (section 6).
            print(f"GRANT {self.room}: subscribing again", flush=True)
            self.subscribe(body["grant"])
        elif kind == "LIVE" and body["room"] == self.room:
            self.live = True
            print(f"LIVE {self.room} at {body['seq']}", flush=True)
            if body["seq"] > self.last:  # said before our subscription took effect
                self.repair()
        elif kind == "PRIVATE":
            ev = body["event"]
            print(f"[private] {clean(ev['nick'])}: {clean(ev['text'])}", flush=True)
        elif kind == "KICKED":
            raise Lost(f"kicked from {body['room']} by {body['by']}")
        elif kind in ("SHUTDOWN", "EXPIRED"):
            raise Lost(f"broker: {kind} {body.get('reason', '')}")

    # -------------------------------------------------------------- the room socket
    def subscribe(self, grant: str) -> None:
        assert self.sub is not None
        self.sub.send(b"\x01" + grant.encode("ascii"))

    def on_batch(self, frames: list[bytes]) -> None:
        self.heard = time.monotonic()
        for event in json.loads(frames[1]):  # [topic, batch]: the topic needs no parsing
            if event.get("room") == self.room:
                self.on_event(event)

    def on_event(self, event: dict) -> None:
        """Show events in sequence order, once each; fetch what is missing (section 8)."""
        seq = event["seq"]
        if seq <= self.last:
            return  # a duplicate
        if seq > self.last + 1:
            self.kept[seq] = event  # a gap: keep it, fetch what comes before
            self.repair()
            return
        self.show(event)
        while self.last + 1 in self.kept:
            self.show(self.kept.pop(self.last + 1))

    def show(self, event: dict) -> None:
        self.last = event["seq"]
        where = f"<{event['room']}#{event['seq']}>"
        if event["kind"] == "msg":
            echo = "  (echo)" if event.get("cmid") in self.mine else ""
            print(f"{where} {clean(event['nick'])}: {clean(event['text'])}{echo}", flush=True)
        else:
            print(f"{where} * {clean(event['text'])}", flush=True)

    def repair(self) -> None:
        if not self.repairing:
            self.repairing = True
            self.send("HISTORY", {"room": self.room, "after": self.last, "limit": 500})

    # -------------------------------------------------------------- the session
    def say(self, text: str) -> int:
        """Send until acknowledged: the same id on every try, so the broker stores it once."""
        cmid = f"{self.token[:8]}-{next(self.ids)}"
        self.mine.add(cmid)
        while True:
            try:
                reply = self.call("SAY", {"room": self.room, "msgs": [{"id": cmid, "text": text}]})
                return reply["acks"][0][1]
            except Refused as err:
                if err.body.get("code") != "RATE_LIMITED":
                    raise
                self.wait(float(err.body["retry_after"]))
            except TimeoutError:
                pass  # lost on the way? send it again, same id

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump(end - time.monotonic())

    def run(self, greeting: str) -> None:
        welcome = self.call(
            "HELLO", {"version": 1, "nick": self.nick, "bot": False, "token": self.token}
        )
        self.nick, self.heartbeat = welcome["nick"], float(welcome["heartbeat"])
        print(
            f"WELCOME {self.nick}: heartbeat {self.heartbeat:g} s, "
            f"rooms {', '.join(welcome['rooms'])}",
            flush=True,
        )
        self.sub = self.ctx.socket(zmq.XSUB)
        self.sub.linger = 0
        self.sub.connect(f"tcp://{self.host}:{welcome['pub_port']}")
        self.poller.register(self.sub, zmq.POLLIN)
        joined = self.call("JOIN", {"room": self.room})
        self.last = joined["seq"]  # the events we are entitled to follow this
        print(f"JOINED {self.room} at {self.last}: {', '.join(joined['members'])}", flush=True)
        self.subscribe(joined["grant"])
        deadline = time.monotonic() + 5
        while not self.live and time.monotonic() < deadline:
            self.pump(0.1)
        seq = self.say(greeting)
        print(f"SENT {self.room}#{seq}", flush=True)
        next_ping = time.monotonic()
        while True:  # section 9: PING every heartbeat
            now = time.monotonic()
            if now - self.heard > 3 * self.heartbeat:
                raise Lost(f"nothing heard for {3 * self.heartbeat:g} s")
            if now >= next_ping:
                self.send("PING", {})
                next_ping = now + self.heartbeat
            self.pump(min(next_ping - now, self.heartbeat))

    def close(self) -> None:
        try:
            self.call("BYE", {"reason": "bye"}, timeout=1.0)
        except (Refused, TimeoutError, Lost):
            pass
        self.ctx.destroy(linger=0)

    def say_verbose(self, line: str) -> None:
        if self.verbose:
            print(line, flush=True)


def clean(text: str) -> str:
    """Text from the network, minus control characters, before it reaches a terminal."""
    return "".join(c for c in text if c.isprintable() or c == " ")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001, help="the broker's command port")
    p.add_argument("--nick", default="mini")
    p.add_argument("--room", default="lobby")
    p.add_argument("--say", default="hello from a minimal client")
    p.add_argument("-v", "--verbose", action="store_true", help="show every PING reply")
    a = p.parse_args()
    client = MinimalClient(a.host, a.port, a.nick, a.room, a.verbose)
    try:
        client.run(a.say)
    except KeyboardInterrupt:
        client.close()
        return 0
    except Refused as err:
        print(f"refused: {err}", file=sys.stderr)
        client.close()
        return 1
    except (Lost, TimeoutError) as err:
        print(f"lost: {err}", file=sys.stderr)
        client.ctx.destroy(linger=0)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
