"""Two brokers appending to one room's stream at once (streams.py).

Each publishes a pass's messages as one stream message that expects the stream's end it
knows; appending at once, they refuse each other's messages again and again. Whatever they
do, every message is stored once, at the seq its sender was given, and the room's numbers
run on without a gap.
"""

from __future__ import annotations

import asyncio
import time

import nats
import zmq
from test_cluster import Listener, all_history, until

from zmqchat import Client
from zmqchat import protocol as m
from zmqchat._cluster.history import Stored, parse


async def stream_messages(urls: str, stream: str) -> list[Stored]:
    """Every message of a stream, as stored, read straight from NATS."""
    nc = await nats.connect(urls.split(","))
    try:
        js = nc.jetstream()
        last = (await js.stream_info(stream)).state.last_seq
        out = []
        for seq in range(1, last + 1):
            raw = await js.get_msg(stream, seq)
            out.append(parse(seq, raw.headers, raw.data or b""))
        return out
    finally:
        await nc.close()


def test_two_brokers_appending_to_one_room_at_once_number_it_without_gaps(
    make_cluster_broker, nats_nodes
):
    """Six clients on two brokers send 40 messages each into one room, all at once: each is
    acknowledged with its own seq, both brokers' listeners hear the same room in order, history
    holds each message once at its seq, and the stream's messages follow one another (each
    starts right after the one before it)."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")

    async def scenario() -> None:
        clients = [Client("127.0.0.1", b.port, f"{b.name}s{i}") for b in (b1, b2) for i in range(3)]
        ears = [Client("127.0.0.1", b.port, f"ear{b.name}") for b in (b1, b2)]
        for c in clients + ears:
            await c.connect()
        try:
            heard = [Listener(e) for e in ears]

            async def burst(c: Client) -> list[tuple[int, str]]:
                texts = [f"{c.nick} {i}" for i in range(40)]
                seqs = await asyncio.gather(*(c.say("lobby", t) for t in texts))
                return list(zip(seqs, texts, strict=True))

            sent = [pair for got in await asyncio.gather(*map(burst, clients)) for pair in got]
            seqs = [seq for seq, _ in sent]
            assert len(set(seqs)) == len(sent) == 240  # one seq each

            def msgs(listener: Listener) -> dict[int, str]:
                return {e.seq: e.text for e in listener.room() if e.kind == "msg"}

            for listener in heard:
                await until(lambda lis=listener: len(msgs(lis)) >= 240, 20, "every message")
                numbers = listener.seqs()
                assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
                assert msgs(listener) == dict(sent)
            history = await all_history(ears[0])
            assert [e.seq for e in history] == list(range(1, len(history) + 1))
            assert {e.seq: e.text for e in history if e.kind == "msg"} == dict(sent)
        finally:
            for c in clients + ears:
                await c.close()
        stored = await stream_messages(
            nats_nodes.urls, f"{make_cluster_broker.namespace}-room-lobby"
        )
        assert stored[0].first == 1
        for before, after in zip(stored, stored[1:], strict=False):
            assert after.first == before.last + 1, (before.seq, before.last, after.first)
        assert len(stored) < 240 + 20  # messages went in batches (joins and leaves alone)

    asyncio.run(scenario())


def test_a_retry_from_long_ago_to_a_broker_new_to_the_room_is_stored_once(make_cluster_broker):
    """A message stored through b1, whose acknowledgement its client never got; 1,200 more
    messages after it (more than the 1,000 events a broker reads back when it comes to a
    room); then the client resumes on b2, started only now, and sends it again with the same
    id and the room's seq it had heard when it first sent it. b2 reads the room back to there
    and acknowledges the first copy's seq: history holds the message once. A new message
    after it is stored at the room's next seq."""
    b1 = make_cluster_broker("b1", "--rate", "0")
    ctx = zmq.Context()
    ctx.linger = 0
    token = "resume-token-of-ann-" + "x" * 12

    def ask(s: zmq.Socket, kind: str, body: dict) -> dict:
        s.send_multipart(m.encode_request(kind, b"t", body))
        assert s.poll(15000), f"no reply to {kind}"
        reply = m.decode_response(s.recv_multipart())
        assert reply.kind == "OK", (kind, reply.body)
        return reply.body

    def dealer(port: int) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"tcp://127.0.0.1:{port}")
        return s

    def say(s: zmq.Socket, msgs: list[tuple[str, str]], heard: int) -> list[int]:
        body = {"room": "lobby", "msgs": [{"id": i, "text": t} for i, t in msgs], "heard": heard}
        return [seq for _, seq in ask(s, "SAY", body)["acks"]]

    try:
        s1 = dealer(b1.port)
        ask(s1, "HELLO", {"version": 1, "nick": "ann", "token": token})
        heard = ask(s1, "JOIN", {"room": "lobby"})["seq"]
        [first] = say(s1, [("late-1", "said once")], heard)
        for k in range(60):  # (one stream message each: a broker reads back 50 at first)
            say(s1, [(f"fill-{k}-{i}", f"fill {k} {i}") for i in range(20)], first)
        end = ask(s1, "HISTORY", {"room": "lobby", "limit": 1})["seq"]
        assert end >= first + 1200
        s1.close()  # (its SAY's reply lost with it, as far as its client knows)

        b2 = make_cluster_broker("b2", "--rate", "0")
        s2 = dealer(b2.port)
        ask(s2, "HELLO", {"version": 1, "nick": "ann", "token": token, "resume": True})
        ask(s2, "JOIN", {"room": "lobby", "resume": True})
        assert say(s2, [("late-1", "said once")], heard) == [first]
        [after] = say(s2, [("after-1", "said later")], end)
        assert after > end
        tail = ask(s2, "HISTORY", {"room": "lobby", "after": first, "limit": 500})["events"]
        tail += ask(s2, "HISTORY", {"room": "lobby", "after": first + 500, "limit": 500})["events"]
        tail += ask(s2, "HISTORY", {"room": "lobby", "after": first + 1000, "limit": 500})["events"]
        texts = [e["text"] for e in tail if e["kind"] == "msg"]
        assert "said once" not in texts and texts.count("said later") == 1
        assert len([t for t in texts if t.startswith("fill ")]) == 1200
    finally:
        ctx.destroy(linger=0)


async def raw_messages(urls: str, stream: str) -> list[bytes]:
    """The data of every message of a stream, read straight from NATS."""
    nc = await nats.connect(urls.split(","))
    try:
        js = nc.jetstream()
        last = (await js.stream_info(stream)).state.last_seq
        return [(await js.get_msg(stream, seq)).data or b"" for seq in range(1, last + 1)]
    finally:
        await nc.close()


DUPLICATE_WINDOW = 0.2  # seconds: the privates stream's, made short (JetStream's default: 2 min)


async def make_privates_stream(urls: str, namespace: str) -> None:
    """The cluster's privates stream, made before its brokers with a short duplicate window,
    so that a retry the stream no longer recognises comes in a test's seconds."""
    nc = await nats.connect(urls.split(","))
    try:
        await nc.jetstream().add_stream(
            name=f"{namespace}-privates",
            subjects=[f"{namespace}.priv.>"],
            allow_direct=True,
            duplicate_window=DUPLICATE_WINDOW,
        )
    finally:
        await nc.close()


def test_a_private_message_retried_past_the_duplicate_window_is_kept_once(
    make_cluster_broker, nats_nodes
):
    """ann's private message to bob is kept through b1, and its acknowledgement never reaches
    her; she resumes on b2 and sends it again with the same id, saying how long ago she first
    sent it, after the stream's duplicate window (here 0.2 s; JetStream's default is 2 minutes:
    a client away that long). b2 finds it kept and answers `duplicate`: bob hears it once, and
    the privates stream holds it once. A new private message after it is delivered."""
    namespace = make_cluster_broker.namespace
    asyncio.run(make_privates_stream(nats_nodes.urls, namespace))
    b1, b2 = make_cluster_broker("b1", wait=False), make_cluster_broker("b2", wait=False)
    b1.started(), b2.started()
    ctx = zmq.Context()
    ctx.linger = 0
    token = "resume-token-of-ann-" + "x" * 12

    def dealer(port: int) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"tcp://127.0.0.1:{port}")
        return s

    def ask(s: zmq.Socket, kind: str, body: dict) -> dict:
        s.send_multipart(m.encode_request(kind, b"t", body))
        while True:
            assert s.poll(15000), f"no reply to {kind}"
            reply = m.decode_response(s.recv_multipart())
            if reply.label == b"t":  # (pushes have none)
                assert reply.kind == "OK", (kind, reply.body)
                return reply.body
            if reply.kind == "PRIVATE":
                heard.append(reply.body["event"]["text"])

    heard: list[str] = []
    try:
        bob = dealer(b1.port)
        ask(bob, "HELLO", {"version": 1, "nick": "bob"})
        s1 = dealer(b1.port)
        ask(s1, "HELLO", {"version": 1, "nick": "ann", "token": token})
        psst = {"to": "bob", "text": "psst", "id": "p-1"}
        assert "event" in ask(s1, "PRIV", psst)
        kept_at = time.monotonic()
        s1.close()  # (its reply lost with it, as far as its client knows)
        # the scenario is a retry later than the window (not a wait for anything to happen)
        time.sleep(max(0.0, kept_at + 2 * DUPLICATE_WINDOW - time.monotonic()))
        s2 = dealer(b2.port)
        ask(s2, "HELLO", {"version": 1, "nick": "ann", "token": token, "resume": True})
        again = ask(s2, "PRIV", {**psst, "retry": round(time.monotonic() - kept_at, 3)})
        assert again.get("duplicate") is True and "event" not in again, again
        assert "event" in ask(s2, "PRIV", {"to": "bob", "text": "and then", "id": "p-2"})
        ask(bob, "PING", {})  # (the pushes before its answer are read meanwhile)
        deadline = 10.0
        while "and then" not in heard:
            assert bob.poll(deadline * 1000), f"bob heard only {heard}"
            reply = m.decode_response(bob.recv_multipart())
            if reply.kind == "PRIVATE":
                heard.append(reply.body["event"]["text"])
        assert heard == ["psst", "and then"]
        kept = asyncio.run(raw_messages(nats_nodes.urls, f"{namespace}-privates"))
        assert sum(b'"p-1"' in data for data in kept) == 1, kept
    finally:
        ctx.destroy(linger=0)
