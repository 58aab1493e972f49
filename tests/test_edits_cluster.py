"""Edits, removals, replies and search on two brokers of a cluster (issue 23): real
nats-server nodes, brokers as processes (conftest: make_cluster_broker), clients through
the library, one on each broker."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from test_cluster import Listener, all_history, until

from zmqchat import ChatError, Client


async def found(client: Client, query: str, room: str | None = "lobby") -> list[str]:
    return [ev.text for ev in (await client.search(query, room=room)).events]


async def eventually_found(client: Client, query: str, want: list[str], room: str = "lobby"):
    """Search until the broker's index has what the other broker stored (it follows the
    stream: a few milliseconds behind)."""
    for _ in range(200):
        got = await found(client, query, room)
        if got == want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"search {query!r} on {client.broker}: {got}, not {want}")


def test_edit_reply_delete_and_search_across_two_brokers(make_cluster_broker):
    """Alice on b1 edits, is answered by bob on b2, and deletes; carol on b2 sees the edit
    and the removal live and in history, and finds through b2's index what was said
    through b1, but never the deleted text."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b1.port, "alice") as alice,
            Client("127.0.0.1", b2.port, "bob") as bob,
            Client("127.0.0.1", b2.port, "carol") as carol,
        ):
            heard = Listener(carol)
            first = await alice.say("lobby", "the deploy failed at noon")
            second = await alice.say("lobby", "lunch at one")
            edit = await alice.edit("lobby", first, "the deploy worked at noon")
            answer = await bob.reply("lobby", first, "great, thanks")
            await until(lambda: answer in heard.seqs(), what="the reply at carol")
            live = {e.seq: e for e in heard.room()}
            assert live[edit].kind == "edit" and live[edit].data["ref"] == first
            assert live[edit].text == "the deploy worked at noon"
            assert live[answer].data["re"] == first and live[answer].data["re_nick"] == "alice"
            history = {e.seq: e for e in await carol.history("lobby", limit=20)}
            assert history[first].text == "the deploy worked at noon"
            assert history[first].data["edited"] == live[edit].ts
            await eventually_found(carol, "deploy", ["the deploy worked at noon"])
            assert await found(carol, "failed") == []
            with pytest.raises(ChatError) as refused:
                await bob.edit("lobby", first, "mine now")
            assert refused.value.code == "NOT_AUTHOR"
            with pytest.raises(ChatError) as refused:
                await bob.delete("lobby", second)
            assert refused.value.code == "NOT_AUTHOR"

            removal = await alice.delete("lobby", first)
            await until(lambda: removal in heard.seqs(), what="the removal at carol")
            notice = next(e for e in heard.room() if e.seq == removal)
            assert (notice.kind, notice.text) == ("delete", "alice deleted a message")
            assert notice.data["ref"] == first and "by" not in notice.data
            for reader in (alice, carol):  # through b1 and b2
                history = {e.seq: e for e in await all_history(reader)}
                assert history[first].kind == history[edit].kind == "deleted"
                assert "deploy" not in json.dumps([e.data for e in history.values()])
            await eventually_found(carol, "deploy", [])
            await eventually_found(alice, "lunch", ["lunch at one"])
            with pytest.raises(ChatError) as gone:
                await alice.edit("lobby", first, "back again")
            assert gone.value.code == "NO_SUCH_MESSAGE"

    asyncio.run(scenario())
    assert_erased(b1, make_cluster_broker.namespace, "lobby", "deploy")


def assert_erased(broker, namespace: str, room: str, word: str) -> None:
    """No message of the room's stream holds the word any more (read from NATS itself)."""

    async def read() -> list[bytes]:
        nc = await nats.connect(broker.args[broker.args.index("--cluster") + 1].split(","))
        try:
            js = nc.jetstream()
            info = await js.stream_info(f"{namespace}-room-{room}")
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    out.append((await js.get_msg(f"{namespace}-room-{room}", seq)).data)
                except nats.js.errors.NotFoundError:
                    pass
            return out
        finally:
            await nc.close()

    deadline = time.monotonic() + 10
    while True:
        stored = asyncio.run(read())
        if all(word.encode() not in data for data in stored):
            break
        assert time.monotonic() < deadline, f"{word!r} still in the stream: {stored}"
        time.sleep(0.05)
    assert stored  # the rest of the room is still there


def test_search_through_b2_finds_what_was_said_through_b1_and_nothing_private(
    make_cluster_broker,
):
    """b2's index follows the streams: a search there finds a message sent through b1
    (newest first, the word marked), a private message only for its two parties, and a
    room only for its members."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b1.port, "ann") as ann,
            Client("127.0.0.1", b2.port, "ben", rooms=["lobby", "work"]) as ben,
            Client("127.0.0.1", b2.port, "eve") as eve,
        ):
            await ann.say("lobby", "Deployment of the API is done")
            await ann.say("lobby", "the deploy window opens at five")
            await ben.say("work", "deploy keys are in the vault")
            await ann.msg("ben", "deploy password is hunter2")
            for _ in range(200):
                results = await ben.search("deploy*", room=None)
                if len(results.events) == 4:
                    break
                await asyncio.sleep(0.02)
            texts = [ev.text for ev in results.events]
            assert texts == [
                "deploy password is hunter2",
                "deploy keys are in the vault",
                "the deploy window opens at five",
                "Deployment of the API is done",
            ]
            assert results.events[0].kind == "private"
            assert results.events[3].data["marks"] == [[0, 10]]
            assert {ev.room for ev in results.events[1:]} == {"lobby", "work"}
            eve_sees = await eve.search("deploy*", room=None)  # not in work, not a party
            assert [ev.text for ev in eve_sees.events] == texts[2:]
            with pytest.raises(ChatError) as refused:
                await eve.search("vault", room="work")
            assert refused.value.code == "NOT_MEMBER"

    asyncio.run(scenario())


def test_b2_started_later_rebuilds_its_index_with_edits_and_removals(make_cluster_broker):
    """A broker that starts after the history was written (edits, a removal) rebuilds its
    index from the streams: it finds the edited text, not the old or the deleted one, and
    its history shows the edit in place."""
    b1 = make_cluster_broker("b1")

    async def write() -> tuple[int, int]:
        async with Client("127.0.0.1", b1.port, "ann") as ann:
            kept = await ann.say("lobby", "the build is red")
            gone = await ann.say("lobby", "my secret is swordfish")
            await ann.edit("lobby", kept, "the build is green")
            await ann.delete("lobby", gone)
            return kept, gone

    kept, gone = asyncio.run(write())
    b2 = make_cluster_broker("b2")

    async def read() -> None:
        async with Client("127.0.0.1", b2.port, "ben") as ben:
            await eventually_found(ben, "build", ["the build is green"])
            assert await found(ben, "red") == []
            assert await found(ben, "swordfish") == []
            history = {e.seq: e for e in await all_history(ben)}
            assert history[kept].text == "the build is green" and history[kept].data["edited"]
            assert history[gone].kind == "deleted"

    asyncio.run(read())


def test_a_removal_erases_one_message_of_a_batch_and_keeps_the_others(make_cluster_broker):
    """Three messages sent at once share one stream message (a batch); removing the middle
    one erases its text from NATS (the stream and the bucket that keeps what the batch held
    besides) while the two others stay, in history through either broker (b2 started
    later), and in search."""
    b1 = make_cluster_broker("b1")

    async def write() -> list[int]:
        async with Client("127.0.0.1", b1.port, "ann") as ann:
            await ann.say("lobby", "warm up")  # the room's stream message in flight is done
            seqs = await asyncio.gather(
                ann.say("lobby", "first of three"),
                ann.say("lobby", "the vault code is 8841"),
                ann.say("lobby", "third of three"),
            )
            await ann.delete("lobby", seqs[1])
            history = {e.seq: e for e in await all_history(ann)}
            assert [history[s].text for s in (seqs[0], seqs[2])] == [
                "first of three",
                "third of three",
            ]
            assert history[seqs[1]].kind == "deleted"
            return list(seqs)

    seqs = asyncio.run(write())
    assert_erased(b1, make_cluster_broker.namespace, "lobby", "vault")
    kept = f"KV_{make_cluster_broker.namespace}-erased"
    assert stream_texts(b1, kept, "vault") == []
    assert stream_texts(b1, kept, "of three") != []  # they were one stream message
    b2 = make_cluster_broker("b2")

    async def read() -> None:
        async with Client("127.0.0.1", b2.port, "ben") as ben:
            history = {e.seq: e for e in await all_history(ben)}
            assert history[seqs[0]].text == "first of three"
            assert history[seqs[2]].text == "third of three"
            assert history[seqs[1]].kind == "deleted"
            await eventually_found(ben, "three", ["third of three", "first of three"])
            assert await found(ben, "vault") == []

    asyncio.run(read())


def stream_texts(broker, stream: str, word: str) -> list[bytes]:
    """The messages of a stream (a bucket's, say) that hold the word."""

    async def read() -> list[bytes]:
        nc = await nats.connect(broker.args[broker.args.index("--cluster") + 1].split(","))
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    out.append((await js.get_msg(stream, seq)).data or b"")
                except nats.js.errors.NotFoundError:
                    pass
            return out
        finally:
            await nc.close()

    return [data for data in asyncio.run(read()) if word.encode() in data]
