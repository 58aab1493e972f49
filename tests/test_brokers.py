"""A client given several broker addresses: how they are written, and moving between brokers.

Two independent brokers stand in for a cluster here: these tests check that the client
moves to the other address and re-joins its rooms there, not that the brokers share state.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest
import zmq
import zmq.asyncio
from cli_helpers import Script, Terminal, joined
from test_chat import Chat, run, saw, until
from test_durability import Relay

from conftest import ROOT, free_ports
from zmqchat import protocol as m
from zmqchat._client.library import (
    BACKOFF_CAP,
    ChatError,
    Client,
    broker_addresses,
    failover_order,
    reconnect_delay,
    split_addresses,
)
from zmqchat.broker._loop import default_name

HOST = "127.0.0.1"


@pytest.mark.parametrize(
    "given, expected",
    [
        ("h1:9001,h2:9001", [("h1", 9001), ("h2", 9001)]),
        ("h1, h2:7", [("h1", 5000), ("h2", 7)]),
        ("10.1.2.3", [("10.1.2.3", 5000)]),
        (["h1", "h2:9002"], [("h1", 5000), ("h2", 9002)]),
        (["a:1,b", ("c", 3)], [("a", 1), ("b", 5000), ("c", 3)]),
        ("[::1]:9001,::1", [("::1", 9001), ("::1", 5000)]),
    ],
)
def test_addresses_are_read_with_the_default_port_for_bare_hosts(given, expected):
    """A list or a comma list of host[:port]; a bare host takes the port argument's port."""
    assert broker_addresses(given, 5000) == expected


@pytest.mark.parametrize(
    "bad", ["h1:x", "h1:0", "h1:65536", "", "h1,,h2", ":9001", "[::1", "[::1]9001", "h1:"]
)
def test_malformed_addresses_are_refused_with_a_reason(bad):
    """An address that cannot be read is a ValueError naming it, not a silent default."""
    with pytest.raises(ValueError):
        split_addresses(bad)
    with pytest.raises(ValueError):
        Client(bad, 9001, "ann")


def test_client_says_which_broker_it_uses():
    """Before connecting, the client is at its first address, which is also its broker."""
    c = Client("h1:9001,h2", 9005, "ann")
    assert c.addresses == [("h1", 9001), ("h2", 9005)]
    assert (c.host, c.port, c.address, c.broker) == ("h1", 9001, "h1:9001", "h1:9001")
    assert Client("[::1]:9001", nick="ann").address == "[::1]:9001"


def test_dead_first_address_is_passed_over(make_broker):
    """With nothing listening at the first address, the client connects through the second
    and chats there."""
    b = make_broker()
    dead = free_ports(1)[0]

    async def scenario(chat: Chat) -> None:
        ann = Client([f"{HOST}:{dead}", f"{HOST}:{b.port}"], nick="ann", timeout=1.0, ctx=chat.ctx)
        chat.clients.append(ann)
        await ann.connect()
        assert ann.address == f"{HOST}:{b.port}" and list(ann.rooms) == ["lobby"]
        await ann.say("lobby", "hello")
        await saw(ann, "hello")

    run(b, scenario)


def test_no_address_answering_is_a_timeout(make_broker):
    """When no address answers, connect() fails with TIMEOUT after trying each once."""
    b = make_broker()
    dead = free_ports(2)

    async def scenario(chat: Chat) -> None:
        ann = Client([(HOST, dead[0]), (HOST, dead[1])], nick="ann", timeout=0.5, ctx=chat.ctx)
        chat.clients.append(ann)
        with pytest.raises(ChatError) as info:
            await ann.connect()
        assert info.value.code == "TIMEOUT"

    run(b, scenario)


def test_client_moves_to_the_next_broker_when_its_broker_stops(make_broker, tmp_path):
    """ann is on b1 (the first address); b1 stops: she says so, reconnects through b2, is in
    her room there, and bob on b2 hears what she says next."""
    b1, b2 = make_broker(), make_broker(db=str(tmp_path / "b2.db"))

    async def scenario(chat: Chat) -> None:
        ann = Client([f"{HOST}:{b1.port}", f"{HOST}:{b2.port}"], nick="ann", ctx=chat.ctx)
        chat.clients.append(ann)
        await ann.connect()
        assert ann.address == f"{HOST}:{b1.port}"
        bob = Client(HOST, b2.port, "bob", ctx=chat.ctx)
        chat.clients.append(bob)
        await bob.connect()
        await asyncio.to_thread(b1.stop)
        moved = f"reconnected (via {default_name(b2.port)})"  # another broker: it says so
        statuses = [e.text for e in await saw(ann, moved, "status") if e.kind == "status"]
        assert "connection lost, reconnecting..." in statuses, statuses
        assert ann.address == f"{HOST}:{b2.port}" and ann.broker == default_name(b2.port)
        assert list(ann.rooms) == ["lobby"] and await ann.who("lobby") == ["ann", "bob"]
        await ann.say("lobby", "hello from b2")
        heard = await saw(bob, "hello from b2")
        assert heard[-1].nick == "ann"

    run(b1, scenario)


class Named(Relay):
    """A relay to a broker whose welcome carries the broker's name, as a cluster's will."""

    def __init__(self, ctx: zmq.asyncio.Context, broker_port: int, name: str) -> None:
        self.name = name
        super().__init__(ctx, broker_port)

    def down(self, rid: bytes, frames: list[bytes]) -> list[list[bytes]]:
        if frames[0] == b"OK":
            body: dict[str, Any] = json.loads(frames[2])
            if "pub_port" in body:  # the welcome
                frames = [*frames[:2], json.dumps({**body, "broker": self.name}).encode()]
        return [frames]


class Refusing(Relay):
    """A broker address that answers every HELLO at once with UNAVAILABLE (as a cluster
    broker cut off from its cluster does), counting them."""

    def __init__(self, ctx: zmq.asyncio.Context, broker_port: int) -> None:
        self.hellos = 0
        super().__init__(ctx, broker_port)

    def answer(self, rid: bytes, frames: list[bytes]) -> list[bytes] | None:
        self.hellos += frames[0] == b"HELLO"
        return m.encode_error(frames[1], m.ProtocolError(m.Code.UNAVAILABLE, "cut off"))


def test_a_lost_brokers_clients_spread_over_the_brokers_left(make_broker, tmp_path):
    """Twenty clients on b1, each given b1, b2 and b3 in that order; b1 stops: every one
    reconnects, and they spread over b2 and b3 instead of all moving to b2, the next address
    in their lists (all on one would be one chance in 2^19)."""
    b1 = make_broker()
    b2, b3 = (make_broker(db=str(tmp_path / f"b{i}.db")) for i in (2, 3))
    hosts = [f"{HOST}:{b.port}" for b in (b1, b2, b3)]

    async def scenario(chat: Chat) -> None:
        bots = [Client(hosts, nick=f"bot{i}", bot=True, ctx=chat.ctx) for i in range(20)]
        chat.clients += bots
        await asyncio.gather(*(c.connect() for c in bots))
        assert {c.address for c in bots} == {hosts[0]}
        await asyncio.to_thread(b1.stop)
        for c in bots:
            await until(c, lambda e: e.text.startswith("reconnected"), "reconnected", 15)
        spread = {h: sum(c.address == h for c in bots) for h in hosts}
        assert spread[hosts[0]] == 0 and spread[hosts[1]] and spread[hosts[2]], spread

    run(b1, scenario)


def test_a_resume_tries_each_other_broker_once_before_the_lost_one(make_broker, tmp_path):
    """ann's addresses: b1, two brokers that refuse every HELLO, then b2. When b1 stops, her
    resume goes round the others (in an order of its own, drawn once, not anew at each try)
    before it tries any twice: each refusing broker is asked at most once before she is
    back in her room through b2."""
    b1, b2 = make_broker(), make_broker(db=str(tmp_path / "b2.db"))

    async def scenario(chat: Chat) -> None:
        r1, r2 = Refusing(chat.ctx, b2.port), Refusing(chat.ctx, b2.port)
        try:
            hosts = [(HOST, b1.port), (HOST, r1.port), (HOST, r2.port), (HOST, b2.port)]
            ann = Client(hosts, nick="ann", ctx=chat.ctx)
            chat.clients.append(ann)
            await ann.connect()
            await asyncio.to_thread(b1.stop)
            await until(ann, lambda e: e.text.startswith("reconnected"), "reconnected", 15)
            assert ann.address == f"{HOST}:{b2.port}" and list(ann.rooms) == ["lobby"]
            assert r1.hellos <= 1 and r2.hellos <= 1, (r1.hellos, r2.hellos)
        finally:
            for relay in (r1, r2):
                relay.task.cancel()

    run(b1, scenario)


def test_failover_order_puts_the_others_first_in_every_order():
    """The lost broker comes last; the others come first in each of their orders."""
    orders = {tuple(failover_order(1, 4)) for _ in range(500)}
    assert all(o[-1] == 1 and sorted(o[:-1]) == [0, 2, 3] for o in orders)
    assert len(orders) == 6  # every order of three, over 500 draws
    assert failover_order(0, 1) == [0]


def test_reconnect_waits_grow_only_after_every_broker_failed():
    """With three brokers, the waits stay at most a quarter of a second until all three
    have failed once, and double with each round in which they all failed, up to the cap;
    with one broker, each failure is a round (0.5, 1, 2 s at most)."""
    waits = [[reconnect_delay(tried, 3) for _ in range(50)] for tried in range(9)]
    assert all(0.125 <= w <= 0.25 for row in waits[:3] for w in row)
    assert all(0.25 <= w <= 0.5 for row in waits[3:6] for w in row)
    assert all(0.5 <= w <= 1.0 for row in waits[6:9] for w in row)
    for t in (1, 2, 3):
        assert all(0.25 * 2 ** (t - 1) <= reconnect_delay(t, 1) <= 0.25 * 2**t for _ in range(50))
    assert all(BACKOFF_CAP / 2 <= reconnect_delay(40, 3) <= BACKOFF_CAP for _ in range(50))


def test_reconnected_status_names_the_broker_when_it_has_a_name(make_broker, tmp_path):
    """When the welcome names the broker, the client reports it, and after moving to the
    next broker the status says `reconnected (via b2)`."""
    b1, b2 = make_broker(), make_broker(db=str(tmp_path / "b2.db"))

    async def scenario(chat: Chat) -> None:
        r1, r2 = Named(chat.ctx, b1.port, "b1"), Named(chat.ctx, b2.port, "b2")
        try:
            ann = Client([(HOST, r1.port), (HOST, r2.port)], nick="ann", ctx=chat.ctx)
            chat.clients.append(ann)
            await ann.connect()
            assert ann.broker == "b1" and ann.address == f"{HOST}:{r1.port}"
            await asyncio.to_thread(b1.stop)
            await saw(ann, "reconnected (via b2)", "status")
            assert ann.broker == "b2" and list(ann.rooms) == ["lobby"]
        finally:
            for relay in (r1, r2):
                relay.task.cancel()

    run(b1, scenario)


def test_cli_takes_several_brokers_and_moves_on(make_broker_process, started, tmp_path):
    """`client.py -i h:p1,h:p2 -u alice` asks for no port, connects to the first broker, and
    when that one stops it goes on through the second, where its next line is heard."""
    b1, b2 = make_broker_process(), make_broker_process("--db", str(tmp_path / "b2.db"))
    t = Terminal("-i", f"{HOST}:{b1.port},{HOST}:{b2.port}", "-u", "alice")
    started.append(t.proc)
    t.expect("Welcome, alice!")
    assert "Port [" not in t.text
    t.ready()
    w = Script("--json", "-i", f"{HOST}:{b2.port}", "-u", "watcher")
    started.append(w.proc)
    joined(w, "watcher")
    assert b1.stop() == 0
    t.expect("reconnected", timeout=15)
    t.type("hello via b2\r")
    w.wait_event(lambda e: e["text"] == "hello via b2" and e["nick"] == "alice", "alice's line")


def test_cli_refuses_a_malformed_address():
    """A -i that cannot be read is a usage error (status 2) that names it."""
    proc = subprocess.run(
        [sys.executable, "client.py", "-i", "h1:port", "-u", "alice"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=10,
    )
    assert proc.returncode == 2 and "h1:port" in proc.stderr, proc.stderr
