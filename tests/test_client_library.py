"""The client library's events: what a bot reads from `Event`, decoded batches, delivery.

Room batches are decoded straight into Events; `ev.data` is still every field the broker
sent. Delivery wakes a reader once per batch; `next_event`, `async for` and timeouts behave
as before. The last test runs a real broker and a client that falls behind a busy room.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading

import msgspec
import pytest
from test_chat import Chat, run, saw

from zmqchat import BlockingClient, ChatError
from zmqchat import protocol as m
from zmqchat._client.library import Client, Event, _Inbox
from zmqchat._client.ordering import RoomOrder

ROOM_EPOCH = "0123456789abcdef"


def batch(*events: bytes) -> list[bytes]:
    """The two frames the broker publishes for these encoded events of lobby."""
    return m.encode_batch("lobby", ROOM_EPOCH, list(events))


def event(
    seq: int,
    nick: str = "ann",
    kind: str = "msg",
    text: str = "hi",
    cmid: str | None = None,
    **extra: object,
) -> bytes:
    return m.encode_event("lobby", seq, 1700000000.5, nick, kind, text, cmid, extra)


def test_event_fields_constructor_and_data():
    """Event is built as before (positional or by name, data included) and reads the same."""
    ev = Event("msg", "hello", "ann", "lobby", 4, 12.5, True, False, True, {"hops": 2})
    assert (ev.kind, ev.text, ev.nick, ev.room, ev.seq, ev.ts, ev.bot, ev.mine, ev.backlog) == (
        "msg",
        "hello",
        "ann",
        "lobby",
        4,
        12.5,
        True,
        False,
        True,
    )
    assert ev.data == {"hops": 2} and ev.data is ev.data
    status = Event("status", "reconnected", room=None, ts=1.0)
    assert status.data == {} and status.seq is None and not status.mine
    assert Event("msg", "x", seq=1) == Event("msg", "x", seq=1)
    assert Event("msg", "x", data={"a": 1}) != Event("msg", "x", data={"a": 2})
    with pytest.raises(TypeError):
        hash(ev)  # as before: an event holds a dict


def test_batch_becomes_events_with_every_field_as_sent():
    """A published batch gives Events whose data is exactly the broker's JSON (fields the
    library does not know included), ours marked mine by message id or, without one, by nick."""
    c = Client(nick="bob")
    c._mine["c-1"] = None
    frames = batch(
        event(1, "bob", "join", "bob joined"),
        event(2, "ann", text="yo", cmid="c-9", bot=True, relay="x@work", hops=2),
        event(3, "bob", text="mine", cmid="c-1"),
        b'{"room":"lobby","seq":4,"id":"lobby:4","ts":1,"nick":"ann","kind":"msg",'
        b'"text":"new","future":{"a":[1,2]}}',
    )
    events = c._decode_batch(frames)
    wire = json.loads(frames[1])
    assert [e.data for e in events] == wire
    assert [(e.seq, e.nick, e.kind, e.text, e.mine) for e in events] == [
        (1, "bob", "join", "bob joined", True),
        (2, "ann", "msg", "yo", False),
        (3, "bob", "msg", "mine", True),
        (4, "ann", "msg", "new", False),
    ]
    assert events[1].bot and not events[0].bot and events[3].ts == 1.0
    assert all(e.room == "lobby" and not e.backlog for e in events)
    again = c._decode_batch(frames)
    assert again == events and again[0] != events[1]  # equal as the same event, data too


def test_each_event_keeps_its_own_data_whatever_else_is_dropped():
    """Data is found per event, not by seq: in a batch with a repeated seq each event has its
    own, asked for in any order, also after the rest of the batch is gone, and a copy made
    with another text still has the data it came with."""
    c = Client(nick="bob")
    events = c._decode_batch(batch(event(1, text="one"), event(1, text="uno"), event(2)))
    last, first = events[2], events[0]
    del events
    gc.collect()
    filler = [Event("msg", str(i)) for i in range(1000)]  # new objects, maybe at old ids
    assert last.data["seq"] == 2 and first.data["text"] == "one" and len(filler) == 1000
    copy = msgspec.structs.replace(c._decode_batch(batch(event(7)))[0], text="changed")
    assert copy.text == "changed" and copy.data["text"] == "hi"  # data: as sent


def test_unusual_batch_is_decoded_the_general_way(caplog):
    """A batch with a field of an unexpected type still gives its events (an odd seq is
    then not ordered); frames that are not a batch give none, and a warning."""
    c = Client(nick="bob")
    frames = batch(event(1), b'{"room":"lobby","seq":"2","kind":"msg","text":"odd","bot":"y"}')
    events = c._decode_batch(frames)
    assert [(e.seq, e.text, e.bot) for e in events] == [(1, "hi", False), ("2", "odd", False)]
    assert events[1].data["bot"] == "y"
    with caplog.at_level(logging.WARNING, logger="client"):
        assert c._decode_batch([frames[0], b"[{"]) == []
        assert c._decode_batch([*frames, b"more"]) == []
        assert c._decode_batch([frames[0], b'{"room":"lobby"}']) == []
    assert len([r for r in caplog.records if "bad room frame" in r.message]) == 3


def test_batches_heard_come_out_once_in_order():
    """Batches heard late, twice and out of order reach the reader once each, in order."""

    async def scenario() -> list[int | None]:
        c = Client(nick="bob")
        c.rooms["lobby"] = RoomOrder(0)
        for seqs in ([1, 2], [4, 5], [1, 2], [3], [5, 6]):
            c._ingest("lobby", c._decode_batch(batch(*(event(s) for s in seqs))))
        return [(await c.next_event(1)).seq for _ in range(6)]

    assert asyncio.run(scenario()) == [1, 2, 3, 4, 5, 6]


def test_inbox_timeout_does_not_disturb_another_reader():
    """A next_event that times out leaves a reader waiting in `async for` waiting, and it
    gets the next events; an empty inbox times out."""

    async def scenario() -> None:
        inbox = _Inbox()
        got: list[str] = []

        async def reader() -> None:
            while len(got) < 2:
                got.append((await inbox.get()).text)

        task = asyncio.create_task(reader())
        await asyncio.sleep(0)
        try:
            await asyncio.wait_for(inbox.get(), 0.01)
            raise AssertionError("an empty inbox gave an event")
        except TimeoutError:
            pass
        inbox.extend([Event("msg", "a"), Event("msg", "b")])
        await asyncio.wait_for(task, 2)
        assert got == ["a", "b"] and inbox.empty()

    asyncio.run(scenario())


def test_client_behind_a_busy_room_catches_up_in_order(make_broker):
    """bob reads nothing while ann says 3,000 messages; then he reads them all, in order,
    once each, and only ann's are hers (mine for her, not for him)."""
    b = make_broker(rate=0)

    async def scenario(chat: Chat) -> None:
        ann = await chat.client("ann")
        bob = await chat.client("bob")
        await saw(ann, "bob joined")
        texts = [f"m{i}" for i in range(3000)]
        seqs = await asyncio.gather(*(ann.say("lobby", t) for t in texts))
        assert seqs == sorted(seqs) and len(set(seqs)) == 3000
        heard: list[Event] = []
        async for ev in bob:
            if ev.kind == "msg":
                heard.append(ev)
                if len(heard) == 3000:
                    break
        assert [e.text for e in heard] == texts and [e.seq for e in heard] == seqs
        assert not any(e.mine for e in heard) and all(e.nick == "ann" for e in heard)
        own = await saw(ann, "m2999")
        assert all(e.mine for e in own if e.kind == "msg")

    run(b, scenario)


def test_what_no_broker_could_be_sent_is_refused_at_the_call(broker):
    """Text that is not a str, or not valid Unicode (a lone surrogate, as os.fsdecode gives
    for a file name in another encoding), or a field that is not JSON: that call fails with
    BAD_REQUEST, and the sends after it go (each one stopped every later send, silently).
    A send before connect() says so instead of waiting; rooms="work" is one room."""

    async def scenario(chat: Chat) -> None:
        ann = await chat.client("ann", rooms="work")  # type: ignore[arg-type]
        assert list(ann.rooms) == ["work"]
        for bad in (
            lambda: ann.say("work", "a\ud800b"),
            lambda: ann.say("work", b"bytes"),  # type: ignore[arg-type]
            lambda: ann.msg("ann", "x", tags={1, 2}),
        ):
            with pytest.raises(ChatError) as refused:
                await bad()
            assert refused.value.code == "BAD_REQUEST", refused.value
        assert await ann.say("work", "still works") > 0
        late = Client("127.0.0.1", chat.broker.port, "late", ctx=chat.ctx)
        with pytest.raises(ChatError) as early:
            await late.say("lobby", "too soon")
        assert early.value.code == "DISCONNECTED" and "connect() first" in early.value.reason

    run(broker, scenario)


def test_blocking_client_closes_with_with_and_iterates_events(broker):
    """`with BlockingClient(...) as c:` closes it; `for event in c:` reads its events; a
    call after close() is ChatError CLOSED (it was the event loop's RuntimeError)."""
    with BlockingClient("127.0.0.1", broker.port, "script") as script:
        with BlockingClient("127.0.0.1", broker.port, "reader") as reader:
            watchdog = threading.Timer(10, reader.close)  # (a lost message ends the loop)
            watchdog.start()
            seq = script.say("lobby", "one for the loop")
            heard = None
            for ev in reader:
                if ev.text == "one for the loop":
                    heard = ev
                    break
            watchdog.cancel()
            assert heard is not None and (heard.nick, heard.seq) == ("script", seq)
    for call in (lambda: script.say("lobby", "after the end"), script.next_event):
        with pytest.raises(ChatError) as closed:
            call()
        assert closed.value.code == "CLOSED"
