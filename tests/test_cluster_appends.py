"""Two brokers appending to one room's stream at once (streams.py).

Each publishes a pass's messages as one stream message that expects the stream's end it
knows; appending at once, they refuse each other's messages again and again. Whatever they
do, every message is stored once, at the seq its sender was given, and the room's numbers
run on without a gap.
"""

from __future__ import annotations

import asyncio

import nats
from test_cluster import Listener, all_history, until

from zmqchat import Client
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
