"""Faults around brokers of a cluster: one paused past the grace period, one restarted the
moment it was killed, a client's resumes racing each other (real nats-server nodes, brokers
as processes, clients through the library or raw sockets)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq
from test_cluster import Listener, all_history, until

from conftest import CLUSTER_HEARTBEAT, ROOT, free_ports, wait_for
from zmqchat import Client
from zmqchat import protocol as m

GRACE = 3 * CLUSTER_HEARTBEAT  # a broker silent this long is dead; its clients get as long


def test_a_paused_broker_blames_nobody_when_it_wakes(make_cluster_broker):
    """b2 stopped (SIGSTOP) for longer than a broker's grace and its clients' together,
    while b1 serves: b2's client resumes on b1 quietly; when b2 wakes it neither declares
    b1 dead nor announces its old client as gone; nobody sees a leave; every acknowledged
    message reaches b1's members once and in order; b2 serves again."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")

    async def scenario() -> None:
        alice = Client(f"127.0.0.1:{b1.port}", nick="alice")
        sender = Client(f"127.0.0.1:{b1.port}", nick="sender", bot=True)
        carol = Client(f"127.0.0.1:{b2.port},127.0.0.1:{b1.port}", nick="carol")
        for c in (alice, sender, carol):
            await c.connect()
        views = [Listener(alice), Listener(carol)]
        stop, acked = asyncio.Event(), []

        async def send() -> None:
            i = 0
            while not stop.is_set():
                acked.append(await sender.say("lobby", f"line {i}"))
                i += 1
                await asyncio.sleep(0.02)

        sending = asyncio.create_task(send())
        await until(lambda: len(acked) > 10, what="traffic")
        os.kill(b2.proc.pid, signal.SIGSTOP)
        try:
            await until(lambda: carol.welcome["broker"] == "b1", 20, "carol on b1")
            await asyncio.sleep(2 * GRACE + 1)  # the pause: past its grace and its clients'
        finally:
            os.kill(b2.proc.pid, signal.SIGCONT)
        # b2's stale view would show within its grace after waking: look after it
        await asyncio.sleep(GRACE + 2 * CLUSTER_HEARTBEAT)
        async with Client(f"127.0.0.1:{b2.port}", nick="dave") as dave:
            after = await dave.say("lobby", "b2 again")
        await until(lambda: after in views[0].seqs(), 10, "b2's message at alice")
        stop.set()
        await sending
        for view in views:
            await until(lambda view=view: acked[-1] in view.seqs(), 10, "the last line")
            # dave's leave, appended through b2, may come after the sender's last line
            await until(
                lambda view=view: any(e.kind == "leave" for e in view.events), 10, "dave's leave"
            )
            assert [e.text for e in view.events if e.kind == "leave"] == ["dave left"]
        seqs = views[0].seqs()
        assert seqs == list(range(seqs[0], seqs[-1] + 1))
        said = [e.seq for e in views[0].room() if e.kind == "msg" and e.nick == "sender"]
        assert said == [s for s in acked if s >= seqs[0]]
        history = await all_history(alice)
        assert [e.seq for e in history] == list(range(1, len(history) + 1))
        assert [e.text for e in history if e.kind == "leave"] == ["dave left"]
        for c in (alice, sender, carol):
            await c.close()

    asyncio.run(scenario())
    assert "stopped beating" not in b2.log_text()
    assert "did not run for" in b2.log_text()
    assert "stopped beating" in b1.log_text()  # b2 was dead to b1 meanwhile


def test_a_broker_restarted_at_once_takes_over_its_own_name(make_cluster_broker):
    """kill -9 of b2 and an immediate restart with the same --name (as a supervisor does):
    it starts (its own last beat is not another broker's) and settles what its last run
    left: the client that did not come back is announced as lost, once. A second broker
    given the name of one that is alive is refused."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")

    async def scenario() -> None:
        async with Client(f"127.0.0.1:{b1.port}", nick="watcher") as watcher:
            view = Listener(watcher)
            quiet = Client(f"127.0.0.1:{b2.port}", nick="quiet", reconnect=False)
            await quiet.connect()
            b2.proc.kill()
            b2.proc.wait()
            began = time.monotonic()
            # asserts that it started; on a thread, so that the loop goes on beating for
            # watcher meanwhile (blocked, b1 took watcher for lost under load)
            await asyncio.to_thread(b2.start)
            assert time.monotonic() - began < 3 * GRACE
            lost = "quiet left (connection lost)"
            await until(lambda: any(e.text == lost for e in view.room()), 15, "quiet lost")
            async with Client(f"127.0.0.1:{b2.port}", nick="late") as late:
                after = await late.say("lobby", "from the new b2")
            await until(lambda: after in view.seqs(), 10, "the new b2's message")
            await until(lambda: "late left" in [e.text for e in view.room()], 10, "late's leave")
            assert [e.text for e in view.room() if e.kind == "leave"] == [lost, "late left"]
            await quiet.close()

    asyncio.run(scenario())
    port, pub_port = free_ports()
    twin = subprocess.run(
        [
            sys.executable,
            str(ROOT / "broker.py"),
            "--cluster",
            b1.args[b1.args.index("--cluster") + 1],
        ]
        + ["--namespace", make_cluster_broker.namespace, "--name", "b1"]
        + ["--port", str(port), "--pub-port", str(pub_port), "--heartbeat", str(CLUSTER_HEARTBEAT)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert twin.returncode == 1
    assert "a broker named b1 is already in this cluster" in twin.stderr


@pytest.mark.parametrize("settled", [False, True], ids=["at once", "once settled"])
def test_a_paused_broker_replaced_under_its_name_stops_when_it_wakes(make_cluster_broker, settled):
    """b1 paused (SIGSTOP); a new b1 started meanwhile takes over (no beat comes from the
    paused one), at once or once b2 has taken the old one for dead and settled its
    sessions. Woken, the old b1 hears the newer one, says it was started again and exits
    1, instead of both beating under one name for ever; the new b1 serves on."""
    old = make_cluster_broker("b1")
    b2 = make_cluster_broker("b2")
    old.proc.send_signal(signal.SIGSTOP)
    try:
        if settled:
            wait_for(
                lambda: "broker b1 taken for dead" in b2.log_path.read_text(), 20, "b2 settling"
            )
        new = make_cluster_broker("b1")
    finally:
        old.proc.send_signal(signal.SIGCONT)
    assert old.proc.wait(20) == 1
    said = old.log_path.read_text()
    assert "broker b1 was started again elsewhere" in said, said[-2000:]
    assert new.proc.poll() is None

    async def chat() -> None:
        async with (
            Client(f"127.0.0.1:{new.port}", nick="on_new") as a,
            Client(f"127.0.0.1:{b2.port}", nick="on_b2") as b,
        ):
            seq = await a.say("lobby", "from the new b1")
            assert await b.heard("lobby", seq, 10)

    asyncio.run(chat())


def test_a_resume_always_wins_over_its_own_stale_session(make_cluster_broker):
    """A client's session held on one broker, then two resumes of it (its token) arriving at
    the same instant on both brokers, as when a resume read late overtakes the next one:
    neither is told the nick is taken, 20 times over; a HELLO without the token is."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")
    ctx = zmq.Context()
    ctx.linger = 0

    def hello(port: int, nick: str, token: str, resume: bool) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"tcp://127.0.0.1:{port}")
        body = {"version": 1, "nick": nick, "token": token, "resume": resume}
        s.send_multipart(m.encode_request("HELLO", b"h", body))
        return s

    def answer(s: zmq.Socket) -> m.Response:
        assert s.poll(15000), "no reply to HELLO"
        return m.decode_response(s.recv_multipart())

    try:
        for i in range(20):
            nick, token = f"twin{i}", f"secret-token-{i:04d}-xxxxxxxx"
            first = hello(b1.port, nick, token, False)
            assert answer(first).kind == "OK"
            socks = [ctx.socket(zmq.DEALER) for _ in (b1, b2)]
            for s, b in zip(socks, (b1, b2), strict=True):
                s.linger = 0
                s.connect(f"tcp://127.0.0.1:{b.port}")
                s.send_multipart(m.encode_request("PING", b"p", {}))
                assert s.poll(5000)
                s.recv_multipart()
            go = threading.Barrier(2)
            body = {"version": 1, "nick": nick, "token": token, "resume": True}

            def resume(s: zmq.Socket, go: threading.Barrier = go, body: dict = body) -> None:
                go.wait()
                s.send_multipart(m.encode_request("HELLO", b"h", body))

            threads = [threading.Thread(target=resume, args=(s,)) for s in socks]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            replies = [answer(s) for s in socks]
            assert [r.kind for r in replies] == ["OK", "OK"], [r.body for r in replies]
            stranger = hello(b2.port, nick, "another-token-xxxxxxxxxxxx", True)
            reply = answer(stranger)
            assert reply.kind == "ERROR" and reply.body["code"] == "NICK_TAKEN"
            for s in [first, *socks, stranger]:
                s.close()
    finally:
        ctx.destroy(linger=0)


def test_a_client_silent_past_its_heartbeats_may_still_resume_elsewhere(make_cluster_broker):
    """A client that goes silent on b1 (its resume there cut short, say) and resumes on b2
    a little after b1 stopped waiting for it is not announced as gone: b1 holds its nick
    and rooms for a grace period. A client that never comes back is announced as lost,
    once, after that grace."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")
    ctx = zmq.Context()
    ctx.linger = 0

    def ask(port: int, kind: str, body: dict) -> tuple[zmq.Socket, m.Response]:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"tcp://127.0.0.1:{port}")
        return s, request(s, kind, body)

    def request(s: zmq.Socket, kind: str, body: dict) -> m.Response:
        s.send_multipart(m.encode_request(kind, b"r", body))
        assert s.poll(15000), f"no reply to {kind}"
        reply = m.decode_response(s.recv_multipart())
        assert reply.kind == "OK", reply.body
        return reply

    async def scenario() -> None:
        async with Client(f"127.0.0.1:{b2.port}", nick="alice") as alice:
            view = Listener(alice)
            socks = []
            for nick in ("ghost", "quiet"):
                hello = {"version": 1, "nick": nick, "token": f"{nick}-token-xxxxxxxxxxxx"}
                s, _ = ask(b1.port, "HELLO", hello)
                request(s, "JOIN", {"room": "lobby"})
                socks.append(s)
            await until(
                lambda: {"ghost joined", "quiet joined"} <= {e.text for e in view.events},
                10,
                "both joined",
            )
            # both silent from here on: b1 stops waiting for them after three heartbeats
            await until(
                lambda: re.search(r"(held|lost) nick=ghost", b1.log_text()), 10, "b1 done waiting"
            )
            body = {"version": 1, "nick": "ghost", "token": "ghost-token-xxxxxxxxxxxx"}
            back, _ = ask(b2.port, "HELLO", {**body, "resume": True})
            request(back, "JOIN", {"room": "lobby", "resume": True})
            socks.append(back)

            async def keep_alive() -> None:  # ghost, on b2, beats from now on
                while True:
                    back.send_multipart(m.encode_request("PING", b"p", {}))
                    while back.poll(0):
                        back.recv_multipart()
                    await asyncio.sleep(CLUSTER_HEARTBEAT / 2)

            beating = asyncio.create_task(keep_alive())
            lost = "quiet left (connection lost)"
            await until(lambda: lost in [e.text for e in view.events], 20, "quiet's notice")
            await asyncio.sleep(GRACE)  # (ghost's would have come with quiet's)
            seq = await alice.say("lobby", "still here?")
            await until(lambda: seq in view.seqs(), 10, "alice's line")
            assert [e.text for e in view.events if e.kind == "leave"] == [lost]
            assert "ghost" in await alice.who("lobby")
            history = await all_history(alice)
            assert [e.text for e in history if e.kind == "leave"] == [lost]
            beating.cancel()
            for s in socks:
                s.close()

    try:
        asyncio.run(scenario())
    finally:
        ctx.destroy(linger=0)


def test_a_broker_paused_while_it_writes_keeps_its_nats_server(make_cluster_broker):
    """A broker stopped (SIGSTOP) for two seconds, twice, while its client's messages are being
    stored: when it wakes, the answers it has not read yet are waiting in its connection,
    behind what its subscriptions got meanwhile. Its own pause is no reason to think its
    NATS server gone and leave it (a reconnect that fails whatever was under way); it goes
    on, and every message is stored once, in order."""
    b1 = make_cluster_broker("b1", "--rate", "0")  # (the sender as fast as it can)

    async def scenario() -> None:
        sender = Client(f"127.0.0.1:{b1.port}", nick="sender", bot=True)
        alice = Client(f"127.0.0.1:{b1.port}", nick="alice")
        for c in (sender, alice):
            await c.connect()
        view = Listener(alice)
        acked: list[int] = []
        stop = asyncio.Event()

        async def send() -> None:
            i = 0
            while not stop.is_set():
                sends = [sender.say("lobby", f"line {i}.{j}") for j in range(20)]
                acked.extend(await asyncio.gather(*sends))
                i += 1

        async def more(what: str) -> None:
            n = len(acked)
            await until(lambda: len(acked) > n + 200, 20, what)

        sending = asyncio.create_task(send())
        for _ in range(2):
            await more("traffic")
            os.kill(b1.proc.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(2.0)  # the pause (the client goes on sending)
            finally:
                os.kill(b1.proc.pid, signal.SIGCONT)
        await more("traffic after the pauses")
        stop.set()
        await sending
        await until(lambda: acked[-1] in view.seqs(), 10, "the last line")
        said = [e.seq for e in view.room() if e.kind == "msg" and e.nick == "sender"]
        assert said == sorted(acked) and len(set(said)) == len(said)
        for c in (sender, alice):
            await c.close()

    asyncio.run(scenario())
    assert b1.log_text().count("did not run for") == 2
    assert "our NATS server does not answer" not in b1.log_text()
    assert "encountered error" not in b1.log_text()
