"""Files (issue 24): offers in a room or to one person, contents moved in chunks over the
command socket, on one broker and on two brokers of a cluster."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from test_security import call, hello, raw_dealer

from conftest import wait_for
from zmqchat import ChatError, Client
from zmqchat import protocol as m

MB = 1 << 20


@pytest.fixture(params=["one broker", "two brokers"])
def make_broker(request, make_local_broker):
    """One broker, and two brokers of a cluster with the clients spread over both."""
    if request.param == "one broker":
        return make_local_broker
    return request.getfixturevalue("make_broker_pair")


def payload(tmp: Path, name: str, size: int) -> Path:
    path = tmp / name
    path.write_bytes(os.urandom(size))
    return path


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def until(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def next_kind(c: Client, kind: str, timeout: float = 5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ev = await c.next_event(max(0.01, deadline - loop.time()))
        if ev.kind == kind:
            return ev


def test_room_file_arrives_byte_identical(make_broker, tmp_path):
    """A 5 MB file offered to a room: every member sees the offer (name, size, id) and gets
    the very same bytes, under its name, in the folder asked for; on two brokers of a
    cluster the file goes in through one and comes out through the other."""
    b = make_broker()
    src = payload(tmp_path, "slides v2.pdf", 5 * MB + 17)
    out = tmp_path / "downloads"
    out.mkdir()

    async def scenario() -> None:
        async with Client("127.0.0.1", b.port, "alice") as a:
            async with Client("127.0.0.1", b.port, "bob") as bob:
                seen = []
                offer = await a.send_file("lobby", str(src), progress=lambda d, t: seen.append(d))
                assert offer["name"] == "slides v2.pdf" and offer["size"] == 5 * MB + 17
                assert seen[-1] == 5 * MB + 17
                ev = await next_kind(bob, "file")
                assert ev.nick == "alice" and ev.data["file"] == offer["file"]
                assert "slides v2.pdf" in ev.text and ev.data["sha256"] == digest(src)
                path = await bob.download(ev.data["file"], str(out))
                assert path == str(out / "slides v2.pdf")
                assert Path(path).read_bytes() == src.read_bytes()
                again = await bob.download(ev.data["file"], str(out))
                assert again == str(out / "slides v2 (1).pdf")  # nothing overwritten
                listed = await bob.files("lobby")
                assert [o["file"] for o in listed] == [offer["file"]]
                history = await bob.history("lobby")
                assert any(e.kind == "file" and e.data["file"] == offer["file"] for e in history)
        assert sorted(os.listdir(out)) == ["slides v2 (1).pdf", "slides v2.pdf"]

    asyncio.run(scenario())


def test_outsiders_are_refused_whatever_id_they_try(make_broker, tmp_path):
    """A room's file is for its members, a private file for its two people: a non-member,
    a third party and an id guessed all get the same refusal, and no bytes."""
    b = make_broker()
    src = payload(tmp_path, "log.txt", 200_000)

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b.port, "alice") as a,
            Client("127.0.0.1", b.port, "bob") as bob,
            Client("127.0.0.1", b.port, "carol", rooms=["work"]) as carol,
        ):
            room_file = (await a.send_file("lobby", str(src)))["file"]
            private = (await a.send_file("@bob", str(src)))["file"]
            for fid in (room_file, private, "0123abcd"):
                with pytest.raises(ChatError) as err:
                    await carol.download(fid, str(tmp_path / "carol"))
                assert err.value.code == m.Code.NO_SUCH_FILE
                with pytest.raises(ChatError) as err:
                    await carol.request(m.Kind.GET, {"file": fid, "offset": 0})
                assert err.value.code == m.Code.NO_SUCH_FILE
            assert await carol.files(with_nick="bob") == []
            assert await carol.files(with_nick="alice") == []
            with pytest.raises(ChatError) as err:
                await carol.files("lobby")
            assert err.value.code == m.Code.NOT_MEMBER
            got = await bob.download(private, str(tmp_path / "bob"))
            assert Path(got).read_bytes() == src.read_bytes()

    (tmp_path / "bob").mkdir()
    (tmp_path / "carol").mkdir()
    asyncio.run(scenario())
    assert os.listdir(tmp_path / "carol") == []  # not even a partial file


def test_private_file_reaches_only_its_recipient(broker, tmp_path):
    """/send @bob: bob is told (a private event with the id), carol in the same room hears
    nothing of it, and the room's log has no trace of it."""
    src = payload(tmp_path, "patch.diff", 3000)

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", broker.port, "alice") as a,
            Client("127.0.0.1", broker.port, "bob") as bob,
            Client("127.0.0.1", broker.port, "carol") as carol,
        ):
            offer = await a.send_file("@bob", str(src))
            ev = await next_kind(bob, "file")
            assert ev.data["to"] == "bob" and ev.data["file"] == offer["file"] and ev.room is None
            await a.say("lobby", "done")
            while (ev := await carol.next_event(2)).text != "done":
                assert ev.kind != "file" and offer["file"] not in ev.text
            assert all(e.kind != "file" for e in await carol.history("lobby"))
            assert [o["file"] for o in await bob.files(with_nick="alice")] == [offer["file"]]

    asyncio.run(scenario())


def test_a_private_file_is_for_the_client_it_was_sent_to_not_its_nick(make_broker, tmp_path):
    """A private file follows the identity of its two parties, as private history does:
    bob under another nick still gets it; a guest who takes the nick 'bob' once bob has
    left gets the same refusal as anyone, and no listing of it."""
    b = make_broker()
    src = payload(tmp_path, "patch.diff", 3000)
    for folder in ("bob", "guest"):
        (tmp_path / folder).mkdir()

    async def scenario() -> None:
        async with Client("127.0.0.1", b.port, "alice") as a:
            bob = Client("127.0.0.1", b.port, "bob")
            await bob.connect()
            fid = (await a.send_file("@bob", str(src)))["file"]
            await bob.set_nick("robert")
            got = await bob.download(fid, str(tmp_path / "bob"))
            assert Path(got).read_bytes() == src.read_bytes()
            assert [o["file"] for o in await bob.files(with_nick="alice")] == [fid]
            await bob.close()
            async with Client("127.0.0.1", b.port, "robert") as guest:
                with pytest.raises(ChatError) as err:
                    await guest.download(fid, str(tmp_path / "guest"))
                assert err.value.code == m.Code.NO_SUCH_FILE
                assert await guest.files(with_nick="alice") == []
            async with Client("127.0.0.1", b.port, "bob") as guest:
                with pytest.raises(ChatError) as err:
                    await guest.request(m.Kind.GET, {"file": fid, "offset": 0})
                assert err.value.code == m.Code.NO_SUCH_FILE
                assert await guest.files(with_nick="alice") == []
            assert [o["file"] for o in await a.files(with_nick="bob")] == [fid]

    asyncio.run(scenario())
    assert os.listdir(tmp_path / "guest") == []


def test_a_busy_disk_slows_an_upload_down_and_never_fails_it(
    make_local_broker, tmp_path, monkeypatch
):
    """When the broker's disk is behind (its queue of chunks full) a PUT is refused with
    RATE_LIMITED: the sender waits as told and goes on, and the file arrives whole."""
    import zmqchat._core.files as core_files

    monkeypatch.setattr(core_files, "IO_LIMIT", 1)  # one chunk queued: the next is refused
    b = make_local_broker()
    size = 3 * m.WINDOW * m.CHUNK // 2
    src = payload(tmp_path, "big.bin", size)

    async def scenario() -> None:
        async with Client("127.0.0.1", b.port, "alice") as a:
            offer = await a.send_file("lobby", str(src))
            got = await a.download(offer["file"], str(tmp_path))
            assert Path(got).read_bytes() == src.read_bytes()

    asyncio.run(scenario())
    assert b.broker.core.stats.requests[m.Kind.UPLOAD] > 1  # it was refused, and went on


def test_many_downloads_at_once_from_one_client_all_arrive(broker, tmp_path):
    """Six downloads at once by one client ask for more chunks than the broker serves one
    connection at a time: the ones over are told to wait, and every copy arrives whole."""
    src = payload(tmp_path, "data.bin", 2 * m.WINDOW * m.CHUNK)
    out = tmp_path / "dl"
    out.mkdir()

    async def scenario() -> None:
        async with Client("127.0.0.1", broker.port, "alice") as a:
            fid = (await a.send_file("lobby", str(src)))["file"]
            async with Client("127.0.0.1", broker.port, "bob") as bob:
                dirs = [out / str(i) for i in range(6)]
                for d in dirs:
                    d.mkdir()
                got = await asyncio.gather(*(bob.download(fid, str(d)) for d in dirs))
        for path in got:
            assert Path(path).read_bytes() == src.read_bytes()

    asyncio.run(scenario())


def test_dangerous_names_are_saved_as_plain_names(broker, tmp_path):
    """Names a sender chooses (sent raw, past any client's care) are saved as plain names in
    the downloads folder: no path, no '..', no control characters, not hidden."""
    ctx = zmq.Context()
    sock = raw_dealer(ctx, broker.port)
    hello(sock, "mallory")
    call(sock, "JOIN", {"room": "lobby"})
    data = b"#!/bin/sh\necho owned\n"
    sha = hashlib.sha256(data).hexdigest()
    names = {"../../evil": "evil", "/etc/passwd": "passwd", "a\nb": "a_b", ".bashrc": "bashrc"}
    ids = []
    for i, name in enumerate(names):
        up = call(
            sock,
            "UPLOAD",
            {"room": "lobby", "id": f"{i:032x}", "name": name, "size": len(data), "sha256": sha},
            label=b"u%d" % i,
        )
        assert up.kind == "OK", up.body
        sock.send_multipart(
            m.encode_request("PUT", b"p%d" % i, {"upload": up.body["upload"], "offset": 0}, data)
        )
        while True:
            resp = m.decode_response(sock.recv_multipart())
            if resp.label == b"p%d" % i:
                break
        assert resp.kind == "OK", resp.body
        ids.append(resp.body["offer"]["file"])
    out = tmp_path / "dl"
    out.mkdir()

    async def fetch() -> list[str]:
        async with Client("127.0.0.1", broker.port, "bob") as bob:
            return [await bob.download(fid, str(out)) for fid in ids]

    paths = asyncio.run(fetch())
    assert [os.path.basename(p) for p in paths] == list(names.values())
    assert sorted(os.listdir(out)) == sorted(names.values())
    assert not (tmp_path / "evil").exists() and all(Path(p).read_bytes() == data for p in paths)
    sock.close()
    ctx.term()


def test_size_limit_refuses_cleanly_and_leaves_nothing(make_local_broker, tmp_path):
    """A file over --max-file-size is refused before a byte moves, with the limit said:
    no offer, no event, nothing on disk."""
    b = make_local_broker(files=m_rules(max_size=MB))
    src = payload(tmp_path, "big.iso", 2 * MB)

    async def scenario() -> None:
        async with Client("127.0.0.1", b.port, "alice") as a:
            with pytest.raises(ChatError) as err:
                await a.send_file("lobby", str(src))
            assert err.value.code == m.Code.TOO_LARGE and "1.0 MB" in err.value.reason
            assert await a.files("lobby") == []
            assert all(e.kind != "file" for e in await a.history("lobby"))

    asyncio.run(scenario())
    assert stored(b) == ([], [])


def test_the_daily_limit_counts_uploads_under_way(make_local_broker, tmp_path):
    """Files sent at once each count against what one sender may send a day while they are
    still being uploaded (four 900-byte files against a 3,000-byte day: the fourth was let
    in when they went together)."""
    b = make_local_broker(files=m_rules(daily=3000))
    sources = [payload(tmp_path, f"s{i}.bin", 900) for i in range(4)]

    async def scenario() -> None:
        async with Client("127.0.0.1", b.port, "alice") as a:
            got = await asyncio.gather(
                *(a.send_file("lobby", str(src)) for src in sources), return_exceptions=True
            )
            refused = [g for g in got if isinstance(g, ChatError)]
            assert len(refused) == 1 and refused[0].code == m.Code.QUOTA, got
            assert len(await a.files("lobby")) == 3

    asyncio.run(scenario())


def m_rules(**kw):
    from zmqchat._core.files_state import FileRules

    return FileRules(**kw)


def stored(b) -> tuple[list[str], list[str]]:
    folder = b.cfg.files_folder()
    return sorted(os.listdir(f"{folder}/objects")), sorted(os.listdir(f"{folder}/uploads"))


def test_liars_and_quitters_leave_nothing(make_local_broker, tmp_path):
    """An upload whose bytes do not match their digest, one that sends more than it said,
    and one abandoned half-way: each refused or dropped, nothing kept (the abandoned one
    after the grace period), no offer; the broker serves on."""
    b = make_local_broker(files=m_rules(grace=0.3))
    ctx = zmq.Context()
    sock = raw_dealer(ctx, b.port)
    hello(sock, "mallory")
    call(sock, "JOIN", {"room": "lobby"})

    def upload(uid: int, size: int, sha: str) -> str:
        body = {"room": "lobby", "id": f"{uid:032x}", "name": "x", "size": size, "sha256": sha}
        resp = call(sock, "UPLOAD", body, label=b"u")
        assert resp.kind == "OK", resp.body
        return resp.body["upload"]

    def put(key: str, offset: int, data: bytes) -> m.Response:
        sock.send_multipart(m.encode_request("PUT", b"p", {"upload": key, "offset": offset}, data))
        while True:
            resp = m.decode_response(sock.recv_multipart())
            if resp.label == b"p":
                return resp

    lie = upload(1, 10, "0" * 64)
    resp = put(lie, 0, b"0123456789")
    assert (resp.kind, resp.body["code"]) == ("ERROR", m.Code.BAD_DIGEST)
    over = upload(2, 4, "1" * 64)
    resp = put(over, 0, b"too many bytes")
    assert resp.kind == "ERROR"
    assert put(over, 0, b"abcd").body["code"] == m.Code.NO_SUCH_FILE  # dropped
    gap = upload(3, 100, "2" * 64)
    assert put(gap, 50, b"x").body["code"] == m.Code.BAD_OFFSET
    half = upload(4, 1000, "3" * 64)
    assert put(half, 0, b"y" * 500).kind == "OK"
    assert stored(b)[1]  # the half upload is kept for a while, for a resume
    wait_for(lambda: stored(b) == ([], []), 5.0, "abandoned upload deleted")
    assert call(sock, "FILES", {"room": "lobby"}).body == {"files": []}
    assert call(sock, "PING", {}).kind == "OK"
    sock.close()
    ctx.term()


def test_same_content_is_stored_once_and_removal_deletes_it(make_local_broker, tmp_path):
    """Two offers of the same bytes keep one copy; an operator's /rmfile marks each offer
    removed (FILE says so, GET refuses) and the bytes go with the last one."""
    b = make_local_broker(operators=("alice",))
    src = payload(tmp_path, "a.bin", 100_000)

    async def scenario() -> None:
        async with (
            Client("127.0.0.1", b.port, "alice") as a,
            Client("127.0.0.1", b.port, "bob") as bob,
        ):
            one = (await a.send_file("lobby", str(src)))["file"]
            two = (await bob.send_file("lobby", str(src), name="copy.bin"))["file"]
            assert len(stored(b)[0]) == 1
            with pytest.raises(ChatError) as err:
                await bob.remove_file(one)
            assert err.value.code == m.Code.NOT_OPERATOR
            await a.remove_file(one)
            assert (await bob.file_info(one))["removed"] is True
            with pytest.raises(ChatError) as err:
                await bob.download(one, str(tmp_path))
            assert err.value.code == m.Code.FILE_REMOVED
            assert len(stored(b)[0]) == 1  # still the other offer's
            await a.remove_file(two)
            await until(lambda: stored(b)[0] == [])
            notice = [e for e in await bob.history("lobby") if e.data.get("removed")]
            assert len(notice) == 2 and "removed by alice" in notice[0].text

    asyncio.run(scenario())


def test_transfers_resume_after_the_broker_is_killed(make_broker_process, tmp_path):
    """kill -9 of the broker in the middle of an upload, and again in the middle of a
    download: each goes on from where it stopped once the broker is back, and the file
    arrives whole (checked against its SHA-256)."""
    b = make_broker_process("--heartbeat", "0.3")
    size = 3 * m.WINDOW * m.CHUNK  # a third still to send when the broker dies mid-way
    src = payload(tmp_path, "dump.bin", size)
    out = tmp_path / "dl"
    out.mkdir()
    restarts: list[int] = []

    def kill_and_restart() -> None:
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        b.start()

    def at_half(done: int, total: int) -> None:
        if done >= total // 2 and len(restarts) < want[0]:
            restarts.append(done)
            threading.Thread(target=kill_and_restart).start()

    want = [1]
    seen: list[list[int]] = [[], []]

    async def scenario() -> None:
        async with Client("127.0.0.1", b.port, "alice") as a:
            async with Client("127.0.0.1", b.port, "bob") as bob:
                a.timeout = bob.timeout = 2.0

                def up(done: int, total: int) -> None:
                    seen[0].append(done)
                    at_half(done, total)

                offer = await a.send_file("lobby", str(src), progress=up)
                assert len(restarts) == 1
                want[0] = 2

                def down(done: int, total: int) -> None:
                    seen[1].append(done)
                    at_half(done, total)

                path = await bob.download(offer["file"], str(out), progress=down)
                assert Path(path).read_bytes() == src.read_bytes()

    asyncio.run(scenario())
    assert len(restarts) == 2
    for progress in seen:  # went on from where it was, never from the start again
        assert progress == sorted(progress) and progress[-1] == size


def test_transfers_go_on_through_the_other_broker_of_a_cluster(make_cluster_broker, tmp_path):
    """kill -9 of the broker taking an upload: the client goes on through the other broker
    from the last segment the first one shared, not from the start; kill -9 of the broker
    serving a download: it goes on through the other from where it got to. The file
    arrives whole (checked against its SHA-256)."""
    from zmqchat._cluster.file_parts import SEGMENT

    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")
    size = 3 * SEGMENT + 12345
    src = payload(tmp_path, "dump.bin", size)
    out = tmp_path / "dl"
    out.mkdir()
    seen: dict[str, list[int]] = {"up": [], "down": []}
    at_kill: dict[str, int] = {}

    def hold_until_killed(what: str, broker, ready) -> Callable[[int, int], None]:
        """A progress callback that, past two segments, kills `broker` once `ready()` and
        holds the client until it is dead (so the transfer cannot finish first)."""

        def kill() -> None:
            wait_for(ready, 30, f"{broker.name} ready to be killed")
            broker.proc.kill()
            broker.proc.wait()

        def progress(done: int, total: int) -> None:
            seen[what].append(done)
            if done >= 2 * SEGMENT and what not in at_kill:
                at_kill[what] = done
                killer = threading.Thread(target=kill)
                killer.start()
                killer.join(40)

        return progress

    def shared_twice() -> bool:
        return b1.log_text().count("upload-shared") >= 2

    async def scenario() -> None:
        async with Client(f"127.0.0.1:{b1.port},127.0.0.1:{b2.port}", nick="alice") as a:
            assert a.welcome["broker"] == "b1"
            offer = await a.send_file(
                "lobby", str(src), progress=hold_until_killed("up", b1, shared_twice)
            )
            assert a.welcome["broker"] == "b2"
        b1.start()
        async with Client(f"127.0.0.1:{b2.port},127.0.0.1:{b1.port}", nick="bob") as bob:
            path = await bob.download(
                offer["file"], str(out), progress=hold_until_killed("down", b2, lambda: True)
            )
            assert bob.welcome["broker"] == "b1"
        assert Path(path).read_bytes() == src.read_bytes()

    asyncio.run(scenario())
    assert "upload-restored" in b2.log_text()
    for what, progress in seen.items():
        assert progress[-1] == size, what
        after = progress[progress.index(at_kill[what]) + 1 :]
        assert after and min(after) >= 2 * SEGMENT, (what, after[:3])  # not from the start
    assert seen["down"] == sorted(seen["down"])  # a download loses nothing it had
