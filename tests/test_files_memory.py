"""Files (issue 24): a client that asks for chunks and does not read them costs the broker a
bounded amount of memory, and nobody else notices it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import zmq
from test_files import payload, until
from test_operations import scrape
from test_security import call, hello

from conftest import free_ports, wait_for
from zmqchat import Client
from zmqchat import protocol as m
from zmqchat._core import files as core_files

MB = 1 << 20
BURST = 24  # GETs sent at once, under the GETs a connection may have being read


def deaf_dealer(ctx: zmq.Context, port: int, nick: str) -> zmq.Socket:
    """A client in lobby that will not read: its ZeroMQ takes in one message, its kernel
    little more, so what it is sent waits in the broker."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 1 << 16)
    sock.rcvtimeo = 5000  # a reply that never comes fails the test, not hangs it
    sock.connect(f"tcp://127.0.0.1:{port}")
    hello(sock, nick)
    call(sock, "JOIN", {"room": "lobby"})
    return sock


def ask(sock: zmq.Socket, fid: str, first: int, n: int, chunks: int) -> None:
    """GETs g<first>..g<first+n-1>, going round the file's `chunks` chunks."""
    for i in range(first, first + n):
        body = {"file": fid, "offset": (i % chunks) * m.CHUNK}
        sock.send_multipart(m.encode_request("GET", b"g%d" % i, body))


def read_all(sock: zmq.Socket, n: int, src: bytes, chunks: int) -> tuple[int, list[dict]]:
    """Read the answers to g0..g<n-1>: (chunks received, each checked against the file,
    refusals)."""
    got, refused, labels = 0, [], []
    while len(labels) < n:
        resp = m.decode_response(sock.recv_multipart())
        if resp.label[:1] != b"g":  # another request's
            continue
        i = int(resp.label[1:])
        labels.append(i)
        if resp.kind == "OK":
            at = (i % chunks) * m.CHUNK
            assert resp.body["offset"] == at and resp.data == src[at : at + m.CHUNK]
            got += 1
        else:
            refused.append(resp.body)
    assert sorted(labels) == list(range(n))  # every GET answered, once
    return got, refused


def memory_kb(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f) if k[:2] == "Vm"}


def test_a_client_that_never_reads_costs_the_broker_a_bounded_memory(make_broker_process, tmp_path):
    """A client asks for chunk after chunk of a 16 MB file, 240 of them, and reads none:
    the broker holds at most HELD_PER_CONNECTION for it (its peak resident memory grows by
    that and a few MB, not by 240 MB) and refuses the rest with RATE_LIMITED, while
    another client downloads the file and two others chat as usual, none of them refused;
    once it reads, every GET has its one answer and every chunk it was given is right."""
    (mport,) = free_ports(1)
    b = make_broker_process("--metrics-port", str(mport))
    chunks = 16
    src = payload(tmp_path, "big.bin", chunks * m.CHUNK)
    data = src.read_bytes()
    out = tmp_path / "dl"
    out.mkdir()

    async def offer() -> str:
        async with Client("127.0.0.1", b.port, "alice") as a:
            return str((await a.send_file("lobby", str(src)))["file"])

    fid = asyncio.run(offer())
    pid = b.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here: the upload's is not counted
    before = memory_kb(pid)["VmRSS"]
    ctx = zmq.Context()
    deaf = deaf_dealer(ctx, b.port, "mallory")
    key = 'zmqchat_requests_total{kind="GET"}'  # not there before the first GET
    gets = scrape(mport).get(key, 0)
    sent = 0
    for _ in range(10):  # a burst at a time, each read by the broker before the next
        ask(deaf, fid, sent, BURST, chunks)
        sent += BURST
        wait_for(
            lambda want=gets + sent: scrape(mport).get(key, 0) >= want,
            10,
            "the broker to take the GETs in",
        )

    async def meanwhile() -> None:
        async with (
            Client("127.0.0.1", b.port, "bob") as bob,
            Client("127.0.0.1", b.port, "carol") as carol,
            Client("127.0.0.1", b.port, "dave") as dave,
        ):
            saying = asyncio.gather(*(carol.say("lobby", f"line {i}") for i in range(10)))
            path = await bob.download(fid, str(out))
            assert Path(path).read_bytes() == data
            await saying
            heard = set()
            while len(heard) < 10:
                ev = await dave.next_event(5)
                if ev.kind == "msg" and ev.nick == "carol":
                    heard.add(ev.text)

    asyncio.run(meanwhile())
    grown = memory_kb(pid)["VmHWM"] - before
    limit = core_files.HELD_PER_CONNECTION + m.WINDOW * m.CHUNK + 12 * MB  # bob's window too
    assert grown * 1024 < limit, f"the broker grew by {grown >> 10} MB"
    got, refused = read_all(deaf, sent, data, chunks)
    assert core_files.HELD_PER_CONNECTION // m.CHUNK <= got < sent // 2  # held to its bound
    assert all(r["code"] == m.Code.RATE_LIMITED and r["retry_after"] > 0 for r in refused)
    assert scrape(mport)["zmqchat_rate_limited_total"] == len(refused)  # nobody else's
    deaf.close()
    ctx.term()


def test_a_new_session_on_the_same_connection_starts_nothing_afresh(make_local_broker, tmp_path):
    """What waits for a connection is counted for the connection, not its session: a
    client that holds its bound, says BYE and HELLO again and asks on, is refused all the
    same (ZeroMQ still holds what it was sent), and gets an answer to every GET."""
    b = make_local_broker()
    chunks = 8
    src = payload(tmp_path, "big.bin", chunks * m.CHUNK)
    stats, outflow = b.broker.core.stats, b.broker.outflow

    async def offer() -> str:
        async with Client("127.0.0.1", b.port, "alice") as a:
            return str((await a.send_file("lobby", str(src)))["file"])

    fid = asyncio.run(offer())
    ctx = zmq.Context()
    deaf = deaf_dealer(ctx, b.port, "mallory")
    sent = 0
    while outflow.total < core_files.HELD_PER_CONNECTION - m.CHUNK:
        assert sent < 20 * BURST, "the broker never held the bound"
        ask(deaf, fid, sent, BURST, chunks)
        sent += BURST
        wait_for(lambda want=sent: stats.requests[m.Kind.GET] >= want, 5, "the GETs taken in")
    deaf.send_multipart(m.encode_request("BYE", b"b", {}))
    deaf.send_multipart(m.encode_request("HELLO", b"h", {"version": 1, "nick": "mallory"}))
    deaf.send_multipart(m.encode_request("JOIN", b"j", {"room": "lobby"}))
    ask(deaf, fid, sent, BURST, chunks)
    sent += BURST
    wait_for(lambda: stats.requests[m.Kind.GET] >= sent, 5, "the last GETs taken in")
    assert outflow.total <= core_files.HELD_PER_CONNECTION
    got, refused = read_all(deaf, sent, src.read_bytes(), chunks)
    assert got <= core_files.HELD_PER_CONNECTION // m.CHUNK + 8  # and what the kernel took
    assert refused and all(r["code"] == m.Code.RATE_LIMITED for r in refused)  # a session
    deaf.close()
    ctx.term()


def test_all_connections_together_are_held_to_a_bound_that_readers_wait_out(
    make_local_broker, tmp_path, monkeypatch
):
    """Two clients that do not read hold what the broker may hold for all (HELD_LIMIT,
    made 12 MiB here) and never more: the rest of their GETs, and a reader's that come
    meanwhile, are refused with RATE_LIMITED. The reader's download waits, and completes
    whole once the two are gone (ZeroMQ lets go of what it held for them)."""
    monkeypatch.setattr(core_files, "HELD_LIMIT", 12 * MB)
    b = make_local_broker()
    chunks = 16
    src = payload(tmp_path, "big.bin", chunks * m.CHUNK)
    out = tmp_path / "dl"
    out.mkdir()
    stats, outflow = b.broker.core.stats, b.broker.outflow

    async def offer() -> str:
        async with Client("127.0.0.1", b.port, "alice") as a:
            return str((await a.send_file("lobby", str(src)))["file"])

    fid = asyncio.run(offer())
    ctx = zmq.Context()
    deaf = [deaf_dealer(ctx, b.port, nick) for nick in ("mallory", "trudy")]
    sent = stats.requests[m.Kind.GET]
    for n in range(6):
        ask(deaf[n % 2], fid, n // 2 * BURST, BURST, chunks)
        sent += BURST
        wait_for(lambda want=sent: stats.requests[m.Kind.GET] >= want, 5, "the GETs taken in")
        assert outflow.total <= 12 * MB
    wait_for(lambda: outflow.total > 10 * MB, 5, "the bound nearly taken")
    refused = stats.errors[m.Code.RATE_LIMITED]

    async def download() -> None:
        async with Client("127.0.0.1", b.port, "bob") as bob:
            task = asyncio.create_task(bob.download(fid, str(out)))
            await until(lambda: stats.errors[m.Code.RATE_LIMITED] > refused)  # bob's
            assert not task.done()
            for sock in deaf:
                sock.close()
            path = await asyncio.wait_for(task, 20)
            assert Path(path).read_bytes() == src.read_bytes()

    asyncio.run(download())
    wait_for(lambda: outflow.total == 0, 5, "all let go")
    ctx.term()


def test_long_replies_to_a_client_that_never_reads_are_dropped_past_the_bound(
    make_local_broker,
):
    """HISTORY of 500 long lines is a 2 MB reply: a client that asks for it again and
    again and reads none is sent replies until HELD_PER_CONNECTION is reached, the rest
    are dropped (as at ZeroMQ's high-water mark); once it reads it gets those, and its
    next request is answered as usual."""
    b = make_local_broker(rate=0, heartbeat=5.0)  # its session outlives the reading
    stats = b.broker.core.stats

    async def fill() -> None:
        async with Client("127.0.0.1", b.port, "alice") as a:
            lines = [f"{i:04d} " + "x" * (m.MAX_TEXT - 5) for i in range(m.MAX_HISTORY)]
            await asyncio.wait_for(asyncio.gather(*(a.say("lobby", t) for t in lines)), 20)

    asyncio.run(fill())
    ctx = zmq.Context()
    deaf = deaf_dealer(ctx, b.port, "mallory")
    asked = stats.requests[m.Kind.HISTORY]
    n = 40  # 80 MB of replies
    for i in range(n):
        body = {"room": "lobby", "limit": m.MAX_HISTORY}
        deaf.send_multipart(m.encode_request("HISTORY", b"h%d" % i, body))
        if i % 5 == 4:
            want = asked + i + 1
            wait_for(lambda want=want: stats.requests[m.Kind.HISTORY] >= want, 5, "taken in")
    deaf.send_multipart(m.encode_request("PING", b"p", {}))  # answered after them all
    replies = []
    while (resp := m.decode_response(deaf.recv_multipart())).label != b"p":
        replies.append(resp)
    assert resp.kind == "OK"
    size = len(m.dumps(replies[0].body))
    assert size > 2 * MB - 100_000 and all(len(r.body["events"]) == m.MAX_HISTORY for r in replies)
    held = core_files.HELD_PER_CONNECTION // size + 1  # the last one past the bound too
    assert held <= len(replies) <= held + 4, len(replies)  # and a few the kernel took
    deaf.close()
    ctx.term()
