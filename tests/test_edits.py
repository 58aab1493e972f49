"""Edits, removals, replies and search (issue 23) with the client library against a real
broker, and against two brokers of a cluster with the clients spread over both (conftest's
BrokerPair): what each member sees, what history and search give, who may do what."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from zmqchat import ChatError, Client, Event


@pytest.fixture(params=["one broker", "two brokers"])
def make_broker(request, make_local_broker):
    if request.param == "one broker":
        return make_local_broker
    return request.getfixturevalue("make_broker_pair")


class Heard:
    """Every event a client is given."""

    def __init__(self, client: Client) -> None:
        self.client, self.events = client, []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for ev in self.client:
            self.events.append(ev)

    async def seq(self, seq: int, room: str = "lobby", timeout: float = 5.0) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev.room == room and ev.seq == seq and not ev.backlog:
                    return ev
            assert time.monotonic() < deadline, f"{self.client.nick} never got {room}:{seq}"
            await asyncio.sleep(0.01)


async def texts(client: Client, query: str, room: str | None = "lobby") -> list[str]:
    return [ev.text for ev in (await client.search(query, room=room)).events]


async def search_until(
    client: Client, query: str, ok: Callable[[list[str]], bool], room: str | None = "lobby"
) -> list[str]:
    """Search until the answer is as wanted: through another broker, what was just said
    reaches its index a moment later."""
    deadline = time.monotonic() + 5
    while not ok(got := await texts(client, query, room)):
        assert time.monotonic() < deadline, f"search {query!r}: {got}"
        await asyncio.sleep(0.02)
    return got


async def code_of(call: Any) -> str:
    with pytest.raises(ChatError) as err:
        await call
    return err.value.code


def test_an_edit_is_seen_by_the_room_and_kept_in_history(make_broker):
    """Bob sees alice's edit live (naming the message it changes); history and a later
    joiner's backlog show the message with its new text, marked edited."""
    b = make_broker()

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b.port, "alice") as alice,
            Client("127.0.0.1", b.port, "bob") as bob,
        ):
            heard = Heard(bob)
            seq = await alice.say("lobby", "teh build is green")
            edit = await alice.edit("lobby", seq, "the build is green")
            live = await heard.seq(edit)
            assert (live.kind, live.nick, live.text, live.data["ref"]) == (
                "edit",
                "alice",
                "the build is green",
                seq,
            )
            async with Client("127.0.0.1", b.port, "carol") as carol:
                backlog = {ev.seq: ev for ev in await carol.history("lobby")}
                assert backlog[seq].text == "the build is green"
                assert backlog[seq].data["edited"] == live.ts
            await search_until(bob, "build", lambda t: t == ["the build is green"])
            assert await texts(bob, "teh") == []

    asyncio.run(scenario())


def test_only_the_sender_edits_and_operators_only_remove(make_broker):
    """Nobody edits or deletes another's message; an operator may remove it (the room sees
    by whom) but not edit it; joins and removed messages are not messages to change."""
    b = make_broker(operators=("boss",))

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b.port, "alice") as alice,
            Client("127.0.0.1", b.port, "bob") as bob,
            Client("127.0.0.1", b.port, "boss") as boss,
        ):
            heard = Heard(alice)
            seq = await alice.say("lobby", "buy cheap pills")
            assert await code_of(bob.edit("lobby", seq, "mine")) == "NOT_AUTHOR"
            assert await code_of(bob.delete("lobby", seq)) == "NOT_AUTHOR"
            assert await code_of(boss.edit("lobby", seq, "mine")) == "NOT_AUTHOR"
            assert await code_of(alice.edit("lobby", 1, "a join")) == "NO_SUCH_MESSAGE"
            removal = await boss.delete("lobby", seq)
            notice = await heard.seq(removal)
            assert (notice.kind, notice.nick, notice.data["by"], notice.data["ref"]) == (
                "delete",
                "alice",
                "boss",
                seq,
            )
            assert notice.text == "a message by alice was removed by boss"
            assert await code_of(alice.edit("lobby", seq, "again")) == "NO_SUCH_MESSAGE"
            assert await code_of(alice.delete("lobby", seq)) == "NO_SUCH_MESSAGE"
            # bob reads history once his broker has heard the removal (in a cluster it may
            # be on the other broker, which hears it a moment later)
            assert await bob.heard("lobby", removal, timeout=5)
            history = {ev.seq: ev for ev in await bob.history("lobby")}
            assert history[seq].kind == "deleted" and "pills" not in json.dumps(
                [ev.data for ev in history.values()]
            )

    asyncio.run(scenario())


def test_purge_removes_a_nicks_last_messages_for_operators_only(make_broker):
    """/purge's library call: an operator removes bob's last two messages and nothing
    else; anyone else is refused and nothing is removed."""
    b = make_broker(operators=("boss",))

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b.port, "alice") as alice,
            Client("127.0.0.1", b.port, "bob") as bob,
            Client("127.0.0.1", b.port, "boss") as boss,
        ):
            said = [await bob.say("lobby", f"spam {i}") for i in range(3)]
            kept = await alice.say("lobby", "not spam")
            assert await code_of(alice.purge("lobby", "bob", 2)) == "NOT_AUTHOR"
            assert await boss.purge("lobby", "BOB", 2) == [said[2], said[1]]
            history = {ev.seq: ev for ev in await alice.history("lobby")}
            assert [history[s].kind for s in said] == ["msg", "deleted", "deleted"]
            assert history[kept].text == "not spam"
            assert await search_until(alice, "spam", lambda t: len(t) == 2) == [
                "not spam",
                "spam 0",
            ]

    asyncio.run(scenario())


def test_a_reply_names_what_it_answers(make_broker):
    """A reply carries the seq it answers and its sender's nick, live and in history; a
    reply to nothing (or to a join) is refused and nothing is stored."""
    b = make_broker()

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b.port, "alice") as alice,
            Client("127.0.0.1", b.port, "bob") as bob,
        ):
            heard = Heard(alice)
            asked = await alice.say("lobby", "is the deploy done?")
            answer = await bob.reply("lobby", asked, "yes, at five")
            live = await heard.seq(answer)
            assert (live.kind, live.data["re"], live.data["re_nick"]) == ("msg", asked, "alice")
            stored = await alice.message("lobby", answer)
            assert stored is not None and stored.data["re"] == asked
            assert await code_of(bob.reply("lobby", 999, "to nothing")) == "NO_SUCH_MESSAGE"
            assert await code_of(bob.reply("lobby", 1, "to a join")) == "NO_SUCH_MESSAGE"
            last = (await bob.history("lobby", limit=1))[0]
            assert last.seq == answer

    asyncio.run(scenario())


def test_search_words_prefixes_phrases_newest_first(make_broker):
    """Whole words in any case (and without their accents), prefixes and phrases; newest
    first, at most the limit, and how many more; the match marked in each text."""
    b = make_broker(rate=0)

    async def scenario() -> None:
        async with Client("127.0.0.1", b.port, "alice") as alice:
            await alice.say("lobby", "The BUILD failed on main")
            await alice.say("lobby", "rebuild tomorrow")
            await alice.say("lobby", "failed build of the docs")
            await alice.say("lobby", "Café at noon")
            for i in range(25):
                await alice.say("lobby", f"deploy number {i}")
            await alice.say("lobby", "deployment done")
            assert await texts(alice, "build") == [
                "failed build of the docs",
                "The BUILD failed on main",
            ]
            assert await texts(alice, '"build failed"') == ["The BUILD failed on main"]
            assert await texts(alice, "cafe") == ["Café at noon"]
            found = await alice.search("deploy*", room="lobby")
            assert [ev.text for ev in found.events][:2] == ["deployment done", "deploy number 24"]
            assert (len(found.events), found.more) == (20, 6)
            assert found.events[1].data["marks"] == [[0, 6]]
            assert (await alice.search("deploy", limit=5)).more == 20
            assert await code_of(alice.search("*** !!")) == "BAD_REQUEST"
            assert await code_of(alice.search("a*")) == "BAD_REQUEST"

    asyncio.run(scenario())


def test_search_finds_only_what_its_asker_could_read(make_broker):
    """A room one is not in is refused, and left out of a search of all one's rooms;
    private messages are found by their two parties only."""
    b = make_broker()

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b.port, "ann", rooms=["lobby", "work"]) as ann,
            Client("127.0.0.1", b.port, "ben") as ben,
            Client("127.0.0.1", b.port, "eve") as eve,
        ):
            await ann.say("work", "the vault code is 1234")
            await ann.msg("ben", "the vault key is under the mat")
            await ann.say("lobby", "the vault is closed today")
            assert await code_of(eve.search("vault", room="work")) == "NOT_MEMBER"
            everywhere = await search_until(ann, "vault", lambda t: len(t) == 3, room=None)
            assert everywhere == [
                "the vault is closed today",
                "the vault key is under the mat",
                "the vault code is 1234",
            ]
            await search_until(ben, "vault", lambda t: len(t) == 2, room=None)
            assert await texts(eve, "vault", room=None) == ["the vault is closed today"]
            await ann.leave("work")
            assert await texts(ann, "code", room=None) == []

    asyncio.run(scenario())


def test_bad_edits_and_searches_are_refused_and_change_nothing(make_broker):
    """Malformed edits, removals and searches get a clear error; the room is unchanged."""
    b = make_broker()

    async def scenario() -> None:
        async with Client("127.0.0.1", b.port, "alice") as alice:
            seq = await alice.say("lobby", "hello")
            bad = [
                ("EDIT", {"room": "lobby", "seq": 0, "text": "x"}, "BAD_REQUEST"),
                ("EDIT", {"room": "lobby", "seq": seq, "text": ""}, "BAD_REQUEST"),
                ("EDIT", {"room": "lobby", "seq": seq, "text": "x" * 4001}, "TOO_LARGE"),
                ("EDIT", {"room": "lobby", "seq": "1", "text": "x"}, "BAD_REQUEST"),
                ("EDIT", {"room": "work", "seq": seq, "text": "x"}, "NOT_MEMBER"),
                ("DELETE", {"room": "lobby"}, "BAD_REQUEST"),
                ("DELETE", {"room": "lobby", "seq": 10**6}, "NO_SUCH_MESSAGE"),
                ("SEARCH", {"query": ""}, "BAD_REQUEST"),
                ("SEARCH", {"query": "x" * 201}, "TOO_LARGE"),
                ("SEARCH", {"query": "x", "room": "nowhere"}, "ROOM_UNKNOWN"),
                (
                    "SAY",
                    {"room": "lobby", "msgs": [{"id": "r1", "text": "x"}], "re": 0},
                    "BAD_REQUEST",
                ),
            ]
            for kind, body, code in bad:
                assert await code_of(alice.request(kind, body)) == code, (kind, body)
            assert [ev.seq for ev in await alice.history("lobby")][-1] == seq
            assert (await alice.message("lobby", seq)).text == "hello"

    asyncio.run(scenario())
