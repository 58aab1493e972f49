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
from test_chat import Chat, run, saw
from test_durability import Relay

from conftest import ROOT, free_ports
from zmqchat._client.library import ChatError, Client, broker_addresses, split_addresses
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
