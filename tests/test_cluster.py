"""Several brokers on one NATS JetStream cluster: real nats-server nodes, brokers as
processes (conftest: nats_nodes, make_cluster_broker), clients through the library."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import pytest
import zmq

from conftest import CLUSTER_HEARTBEAT, wait_for
from zmqchat import ChatError, Client, Event
from zmqchat import protocol as m


class Listener:
    """A member that keeps every event it is given."""

    def __init__(self, client: Client) -> None:
        self.client, self.events = client, []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for ev in self.client:
            self.events.append(ev)

    def room(self, room: str = "lobby") -> list[Event]:
        return [e for e in self.events if e.room == room and e.seq is not None]

    def seqs(self, room: str = "lobby") -> list[int]:
        return [e.seq for e in self.room(room)]


async def until(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def all_history(client: Client, room: str = "lobby") -> list[Event]:
    out: list[Event] = []
    while True:
        page = await client.history(room, after=out[-1].seq if out else 0, limit=500)
        if not page:
            return out
        out += page


def test_two_brokers_serve_one_room(make_cluster_broker):
    """Clients on two brokers chat in one room: a third hears both in one order, numbered
    without gaps; /who on either broker lists all three; a nick held on one broker is
    refused on the other."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b1.port, "alice") as alice,
            Client("127.0.0.1", b2.port, "bob") as bob,
            Client("127.0.0.1", b2.port, "carol") as carol,
        ):
            assert (alice.welcome["broker"], bob.welcome["broker"]) == ("b1", "b2")
            heard = Listener(carol)
            sent = await asyncio.gather(
                *(c.say("lobby", f"{c.nick} {i}") for i in range(10) for c in (alice, bob))
            )
            await until(
                lambda: (
                    {e.text for e in heard.room()}
                    >= {f"alice {i}" for i in range(10)} | {f"bob {i}" for i in range(10)}
                ),
                what="every message at carol",
            )
            seqs = heard.seqs()
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no repeat
            assert sorted(sent) == sorted(e.seq for e in heard.room() if e.kind == "msg")
            for c in (alice, bob):
                assert await c.who("lobby") == ["alice", "bob", "carol"]
            for port, nick in ((b2.port, "ALICE"), (b1.port, "Bob")):
                try:  # refused at once (not waiting for the holder to be lost: it is not)
                    await Client("127.0.0.1", port, nick, timeout=3, wait_for_nick=0).connect()
                    raise AssertionError(f"{nick} got in")
                except ChatError as err:
                    assert err.code == "NICK_TAKEN"

    asyncio.run(scenario())


def test_a_nick_held_on_another_broker_is_refused_once_its_holder_is_heard(make_cluster_broker):
    """A nick held by a live client on b1, asked for on b2: b2 asks b1 how long its holder
    has been silent and says so (`silent`, as for a holder of its own), so a client that
    would wait for a lost holder's nick is refused at its first look again, not at the end
    of the lost-holder wait (`free_in`: a cluster holds a lost nick longer, for failover)."""
    b1, b2 = make_cluster_broker("b1", wait=False), make_cluster_broker("b2", wait=False)
    b1.started(), b2.started()

    async def scenario() -> None:
        async with Client("127.0.0.1", b1.port, "alice"):
            began = time.monotonic()
            with pytest.raises(ChatError) as refused:
                await Client("127.0.0.1", b2.port, "alice", timeout=3).connect()
            took = time.monotonic() - began
            assert refused.value.code == "NICK_TAKEN"
            assert refused.value.body["silent"] < 3 * CLUSTER_HEARTBEAT
            assert took < refused.value.body["free_in"] < 4 * 3 * CLUSTER_HEARTBEAT
            os.kill(b1.proc.pid, signal.SIGSTOP)  # b1 cannot answer: b2 does not wait on it
            try:
                twin = Client("127.0.0.1", b2.port, "alice", timeout=3, wait_for_nick=0)
                with pytest.raises(ChatError) as refused:
                    await twin.connect()
                assert refused.value.code == "NICK_TAKEN" and "silent" not in refused.value.body
            finally:
                os.kill(b1.proc.pid, signal.SIGCONT)

    asyncio.run(scenario())


def test_same_nick_claimed_at_once_on_both_brokers(make_cluster_broker):
    """The same nick asked for at the same instant on both brokers, 50 times: exactly one
    HELLO wins each time."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")
    ctx = zmq.Context()
    ctx.linger = 0
    try:
        for i in range(50):
            socks = []
            for port in (b1.port, b2.port):
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.connect(f"tcp://127.0.0.1:{port}")
                socks.append(s)
            for s in socks:  # both connected before either asks
                s.send_multipart(m.encode_request("PING", b"p", {}))
                assert s.poll(5000)
                s.recv_multipart()
            go = threading.Barrier(2)

            def ask(s: zmq.Socket, go: threading.Barrier = go, nick: str = f"twin{i}") -> None:
                go.wait()
                s.send_multipart(m.encode_request("HELLO", b"h", {"version": 1, "nick": nick}))

            threads = [threading.Thread(target=ask, args=(s,)) for s in socks]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            kinds = []
            for s in socks:
                assert s.poll(15000), "no reply to HELLO"
                kinds.append(m.decode_response(s.recv_multipart()))
            assert sorted(r.kind for r in kinds) == ["ERROR", "OK"], kinds
            assert [r.body["code"] for r in kinds if r.kind == "ERROR"] == ["NICK_TAKEN"]
            for s in socks:
                s.close()
    finally:
        ctx.destroy(linger=0)


def test_a_nats_node_killed_loses_nothing_and_rejoins(make_cluster_broker, nats_nodes):
    """kill -9 of one NATS node (of 3) while bots on both brokers send: every acknowledged
    message is in the room once and in order; the brokers keep serving; the node rejoins
    when restarted (the cluster then keeps its quorum without another node)."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b1.port, "s1") as s1,
            Client("127.0.0.1", b2.port, "s2") as s2,
            Client("127.0.0.1", b1.port, "r1") as r1,
            Client("127.0.0.1", b2.port, "r2") as r2,
        ):
            heard = [Listener(r1), Listener(r2)]
            sends = [
                asyncio.ensure_future(c.say("lobby", f"{c.nick} {i}"))
                for i in range(60)
                for c in (s1, s2)
            ]
            await until(lambda: sum(f.done() for f in sends) >= 30, what="the first acks")
            nats_nodes[0].kill()
            acked = await asyncio.wait_for(asyncio.gather(*sends), 60)
            more = await s1.say("lobby", "after the kill")
            assert len(set(acked)) == len(acked)
            for h in heard:
                await until(lambda h=h: more in h.seqs(), 30, "the last message")
            nats_nodes[0].start()
            await asyncio.to_thread(wait_for, nats_nodes[0].healthy, 30, "the node back")
            nats_nodes[1].kill()  # quorum now needs the node that came back
            try:
                last = await asyncio.wait_for(s2.say("lobby", "with the node back"), 60)
            finally:
                nats_nodes[1].start()
            for h in heard:
                await until(lambda h=h: last in h.seqs(), 30, "the message after the rejoin")
                seqs = h.seqs()
                assert seqs == list(range(seqs[0], seqs[-1] + 1))
            history = await all_history(r1)
            assert [e.seq for e in history] == list(range(1, len(history) + 1))
            texts = [e.text for e in history if e.kind == "msg"]
            assert sorted(texts) == sorted(
                {f"s{n} {i}" for n in (1, 2) for i in range(60)}
                | {"after the kill", "with the node back"}
            )

    asyncio.run(scenario())
    wait_for(lambda: all(n.healthy() for n in nats_nodes.nodes), 30, "every node healthy")


def test_a_broker_cut_off_from_nats_acknowledges_nothing_until_it_is_back(
    make_cluster_broker, nats_nodes
):
    """Every NATS node paused (SIGSTOP): a broker acknowledges nothing it could not store,
    still answers pings, its client's sends stay pending, its log says the cluster fails
    what it asks; when NATS is back they are acknowledged, each stored once."""
    b1 = make_cluster_broker("b1")

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b1.port, "ann") as ann,
            Client("127.0.0.1", b1.port, "ben") as ben,
        ):
            heard = Listener(ben)
            await ann.say("lobby", "before")
            nats_nodes.pause()
            try:
                sends = [asyncio.ensure_future(ann.say("lobby", f"during {i}")) for i in range(5)]
                await asyncio.sleep(0)  # the sends are queued; now watch them not complete
                deadline = time.monotonic() + 3 * ann.heartbeat + 1
                while time.monotonic() < deadline:
                    assert not any(f.done() for f in sends), "acknowledged while cut off"
                    await asyncio.sleep(0.05)
                assert len(ann.pending()) == 5 and ann.connected  # pings still answered
                await until(  # and its operator is told why, not left with silence
                    lambda: (
                        "the NATS cluster is not carrying out what this broker asks"
                        in b1.log_path.read_text()
                    ),
                    10,
                    "the broker's warning",
                )
            finally:
                nats_nodes.resume()
            await asyncio.wait_for(asyncio.gather(*sends), 60)
            await until(
                lambda: {f"during {i}" for i in range(5)} <= {e.text for e in heard.room()},
                30,
                "the pending messages",
            )
            history = await all_history(ben)
            texts = [e.text for e in history if e.kind == "msg"]
            assert texts.count("before") == 1
            assert sorted(t for t in texts if t.startswith("during")) == [
                f"during {i}" for i in range(5)
            ]
            assert [e.seq for e in history] == list(range(1, len(history) + 1))

    asyncio.run(scenario())


def test_privates_nicks_new_rooms_and_history_across_brokers(make_cluster_broker):
    """A private message reaches its recipient on the other broker; a nick change on one
    broker frees the old nick on the other; a room made by /join on one broker is there
    on the other with its maker as operator; a broker started later reads the whole history
    from the cluster."""
    b1 = make_cluster_broker("b1", "--allow-new-rooms")
    b2 = make_cluster_broker("b2", "--allow-new-rooms")

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b1.port, "alice") as alice,
            Client("127.0.0.1", b2.port, "bob") as bob,
        ):
            heard = Listener(bob)
            sent = await alice.msg("bob", "psst")
            assert sent["to"] == "bob"
            await until(
                lambda: any(e.kind == "private" and e.text == "psst" for e in heard.events),
                what="the private message",
            )
            await alice.set_nick("alicia")
            assert "alicia" in await bob.who("lobby") and "alice" not in await bob.who()
            async with Client("127.0.0.1", b2.port, "alice") as newcomer:
                assert newcomer.nick == "alice"
            await alice.join("garden")
            assert "garden" in [r["name"] for r in await bob.list_rooms()]
            await bob.join("garden")
            assert (await bob.who("garden")) == ["alicia", "bob"]
            await alice.kick("garden", "bob", "mine")  # alicia made it: she is its operator
            await until(lambda: "garden" not in bob.rooms, what="bob out of garden")
            for i in range(30):
                await alice.say("lobby", f"line {i}")
            # started off the event loop: alice and bob go on beating meanwhile (a start
            # that blocked the loop past 3 heartbeats on a loaded host cut alice off)
            b3 = await asyncio.to_thread(make_cluster_broker, "b3")
            async with Client("127.0.0.1", b3.port, "carol", backlog=10) as carol:
                early = await carol.history("lobby", after=0, limit=5)
                late = await all_history(carol)
                mine = await all_history(alice)
                assert [e.data for e in late] == [e.data for e in mine]
                assert [e.seq for e in early] == [1, 2, 3, 4, 5]

    asyncio.run(scenario())


def test_a_broker_killed_its_clients_resume_on_the_other(make_cluster_broker):
    """kill -9 of one broker while bots on both brokers send: its clients resume on the
    other broker (quietly: nobody who resumed is announced as leaving); every acknowledged
    message is in every member's view and in the room's history exactly once, numbered
    1..M without a gap; a member that did not resume is announced as lost, once."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")
    first_b1 = f"127.0.0.1:{b1.port},127.0.0.1:{b2.port}"
    first_b2 = f"127.0.0.1:{b2.port},127.0.0.1:{b1.port}"

    async def scenario() -> None:
        bots = [
            Client(first_b1, nick="a0", bot=True),
            Client(first_b1, nick="a1", bot=True),
            Client(first_b2, nick="c0", bot=True),
        ]
        quiet = Client(f"127.0.0.1:{b1.port}", nick="quiet", reconnect=False)
        for c in [*bots, quiet]:
            await c.connect()
        assert [c.welcome["broker"] for c in bots] == ["b1", "b1", "b2"]
        views = [Listener(c) for c in bots]

        async def send(c: Client) -> list[int]:
            seqs = []
            for i in range(40):
                seqs.append(await c.say("lobby", f"{c.nick} {i}"))
                await asyncio.sleep(0.01)  # a steady pace, so the kill lands mid-stream
            return seqs

        sending = [asyncio.ensure_future(send(c)) for c in bots]
        await until(lambda: sum(len(v.room()) for v in views) > 60, what="traffic")
        b1.proc.kill()
        b1.proc.wait()
        acked = [
            seq for seqs in await asyncio.wait_for(asyncio.gather(*sending), 60) for seq in seqs
        ]
        assert len(set(acked)) == len(acked) == 120
        texts = {f"{c.nick} {i}" for c in bots for i in range(40)}
        for v in views:
            await until(lambda v=v: texts <= {e.text for e in v.room()}, 30, "every message")
        await until(
            lambda: any(e.text == "quiet left (connection lost)" for e in views[2].room()),
            30,
            "the lost member's notice",
        )
        for c in bots[:2]:
            assert c.welcome["broker"] == "b2"
            assert any(
                e.kind == "status" and e.text == "reconnected (via b2)"
                for v in views
                if v.client is c
                for e in v.events
            )
        history = await all_history(bots[2])
        assert [e.seq for e in history] == list(range(1, len(history) + 1))
        for view in [*(v.room() for v in views), history]:
            said = [e.text for e in view if e.kind == "msg"]
            assert sorted(said) == sorted(texts), "a message missing or twice"
            leaves = [e.text for e in view if e.kind == "leave"]
            assert all(t.startswith("quiet") for t in leaves), leaves
        assert [e.text for e in history if e.kind == "leave"] == ["quiet left (connection lost)"]
        for v in views:
            seqs = v.seqs()
            assert seqs == list(range(seqs[0], seqs[-1] + 1))
        for c in bots:
            await c.close()
        await quiet.close()

    asyncio.run(scenario())


def test_a_script_piping_into_a_cluster_sees_its_own_lines(make_cluster_broker):
    """`client.py --json -i b1,b2` with lines on stdin, as a script runs it: every line comes
    back as its own event (mine) before it exits 0, although in a cluster a message's
    acknowledgement can come back before its echo."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")
    lines = [f"deploy step {i}" for i in range(20)]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "client.py"),
            "--json",
            "-u",
            "deploybot",
            "-i",
            f"127.0.0.1:{b1.port},127.0.0.1:{b2.port}",
        ],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    mine = [e["text"] for e in events if e.get("kind") == "msg" and e.get("mine")]
    assert mine == lines


def test_the_failed_logins_a_cluster_keeps_expire(make_cluster_broker, nats_nodes):
    """The cluster's record of failed logins (per account and address; one counts for a
    minute) lets each go after 10 minutes, also in a bucket made before that rule: it does
    not grow with every address that ever tried a password."""
    import nats

    bucket = f"{make_cluster_broker.namespace}-logins"

    async def on_nats(what: Any) -> Any:
        nc = await nats.connect(nats_nodes.urls.split(","))
        try:
            return await what(nc.jetstream())
        finally:
            await nc.close()

    async def make_old(js: Any) -> None:  # as a broker of an earlier version made it
        await js.create_key_value(bucket=bucket, history=1)

    async def kept_for(js: Any) -> float:
        return (await js.stream_info(f"KV_{bucket}")).config.max_age

    asyncio.run(on_nats(make_old))
    assert not asyncio.run(on_nats(kept_for))
    make_cluster_broker("b1")
    assert asyncio.run(on_nats(kept_for)) == 600.0
