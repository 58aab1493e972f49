"""PROTOCOL.md stays true: it names every command, push, error code, event kind and limit
that messages.py defines; its field tables match what the broker reads and replies; and its
worked session, replayed frame by frame against a fresh broker, gets the replies it shows.
examples/minimal_client.py, written from the document alone, imports nothing of ours.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import time
from typing import Any

import pytest
import scramp
import zmq

from conftest import ROOT
from zmqchat import protocol as m
from zmqchat._scram import Login, make_keys

DOC = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
VOLATILE = {"ts", "grant", "pub_port", "motd", "time", "broker", "edited"}  # vary by run


# ---------------------------------------------------------------------------- reading the doc


def chapter(number: int) -> str:
    found = re.search(rf"^## {number}\. [^\n]*\n(.*?)(?=^## |\Z)", DOC, re.M | re.S)
    assert found, f"PROTOCOL.md has no chapter {number}"
    return found.group(1)


def subsections(text: str) -> dict[str, str]:
    """`### NAME` -> the text under it."""
    parts = re.split(r"^### (\S+)[ \t]*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def table(text: str, after: str | None = None) -> list[list[str]]:
    """The body rows of the first table (after the line starting with `after`), cells stripped
    of spaces and of the backticks around a name."""
    lines = text.splitlines()
    start = 0 if after is None else next(i for i, s in enumerate(lines) if s.startswith(after))
    rows: list[list[str]] = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) >= 2, f"no table after {after!r}"
    return [[re.sub(r"^`([^`]*)`$", r"\1", c) for c in row] for row in rows[2:]]


def fields(text: str, after: str) -> tuple[set[str], set[str]]:
    """(all fields, the ones always present) of a field table; 'Only ...' marks the others."""
    rows = table(text, after)
    return {r[0] for r in rows}, {r[0] for r in rows if not r[-1].startswith("Only")}


COMMANDS = subsections(chapter(4))
PUSHES = subsections(chapter(5))
EVENT_FIELDS = {r[0] for r in table(chapter(7))}
EVENT_KINDS = {r[0] for r in table(chapter(7), "Kinds:")}


# ---------------------------------------------------------------------------- names and limits


def test_every_command_push_code_and_event_kind_is_documented():
    """The document's headings and tables name exactly what messages.py defines."""
    assert set(COMMANDS) == {k.value for k in m.Kind}
    assert set(PUSHES) == {r.value for r in m.Reply} - {"OK", "ERROR"}
    assert {r[0] for r in table(chapter(11))} == {c.value for c in m.Code}
    assert EVENT_KINDS == {k.value for k in m.EventKind}


def test_limits_table_matches_messages():
    """Every MAX_ constant of messages.py is in the limits table, with its value."""
    rows = {r[0]: int(r[1]) for r in table(chapter(12))}
    constants = {name: getattr(m, name) for name in dir(m) if name.startswith("MAX_")}
    assert rows == constants


PASSWORD = "correct horse battery"  # ann's, in section 15
KEYS = make_keys(PASSWORD, 4096).to_wire()

# Smallest valid body of each command: what the broker then reads is what the table must name.
MINIMAL = {
    m.Kind.HELLO: {"version": 1, "nick": "ann"},
    m.Kind.JOIN: {"room": "lobby"},
    m.Kind.LEAVE: {"room": "lobby"},
    m.Kind.SAY: {"room": "lobby", "msgs": [{"id": "c1", "text": "hi"}]},
    m.Kind.PRIV: {"to": "bob", "text": "hi", "id": "c2"},
    m.Kind.ROOMS: {},
    m.Kind.WHO: {},
    m.Kind.NICK: {"nick": "ann"},
    m.Kind.TOPIC: {"room": "lobby"},
    m.Kind.HISTORY: {"room": "lobby"},
    m.Kind.PING: {},
    m.Kind.BYE: {},
    m.Kind.KICK: {"room": "lobby", "nick": "bob"},
    m.Kind.BAN: {"room": "lobby", "nick": "bob"},
    m.Kind.UNBAN: {"room": "lobby", "nick": "bob"},
    # accounts (issue 21)
    m.Kind.AUTH: {"account": "ann", "first": "n,,n=ann,r=abc"},
    m.Kind.REGISTER: KEYS,
    m.Kind.PASSWORD: {"proof": "c=biws,r=abc,p=xyz", **KEYS},
    m.Kind.MARK: {"room": "lobby", "seq": 3},
    m.Kind.UNREAD: {},
    m.Kind.EDIT: {"room": "lobby", "seq": 2, "text": "fixed"},
    m.Kind.DELETE: {"room": "lobby", "seq": 2},
    m.Kind.SEARCH: {"query": "fixed"},
    m.Kind.UPLOAD: {"room": "lobby", "id": "a" * 32, "name": "x", "size": 1, "sha256": "0" * 64},
    m.Kind.PUT: {"upload": "b" * 32, "offset": 0},
    m.Kind.GET: {"file": "0123abcd", "offset": 0},
    m.Kind.FILES: {"room": "lobby"},
    m.Kind.FILE: {"file": "0123abcd"},
    m.Kind.RMFILE: {"file": "0123abcd"},
}
OPTIONAL = {"version", "to", "with"}  # read only when given (UPLOAD, FILES: one of two)


@pytest.mark.parametrize("kind", list(m.Kind), ids=str)
def test_request_table_names_what_the_broker_reads(kind: m.Kind):
    """Each command's request table lists exactly the fields its validator reads."""
    documented, _ = fields(COMMANDS[kind.value], "Request:")
    data = b"x" if kind is m.Kind.PUT else None  # a chunk: the fourth frame
    read = set(m.decode_request(m.encode_request(kind, b"1", MINIMAL[kind], data)).body)
    if kind in (m.Kind.UPLOAD, m.Kind.FILES):  # "room" or the other: the one given is read
        read -= {key for key in ("room", "to", "with") if key not in MINIMAL[kind]}
    assert read <= documented, f"{kind}: undocumented {read - documented}"
    assert documented - read <= OPTIONAL, f"{kind}: not read {documented - read - OPTIONAL}"


# ---------------------------------------------------------------------------- the live broker


class Raw:
    """A bare DEALER speaking the protocol as PROTOCOL.md describes it."""

    def __init__(self, ctx: zmq.Context, port: int) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.pushes: list[tuple[str, dict]] = []
        self.n = 0

    def send(self, kind: str, label: bytes, body: bytes) -> None:
        self.sock.send_multipart([kind.encode(), label, body])

    def reply(self, label: bytes, timeout: float = 5.0) -> tuple[str, dict]:
        while True:
            frames = self._recv(timeout, f"the reply labelled {label!r}")
            if frames[1] == label:
                return frames[0].decode(), json.loads(frames[2])
            assert frames[1] == b"", f"a reply to another request: {frames}"
            self.pushes.append((frames[0].decode(), json.loads(frames[2])))

    def push(self, kind: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, (k, _) in enumerate(self.pushes):
                if k == kind:
                    return self.pushes.pop(i)[1]
            frames = self._recv(deadline - time.monotonic(), f"a {kind} push")
            assert frames[1] == b"", f"an unexpected reply: {frames}"
            self.pushes.append((frames[0].decode(), json.loads(frames[2])))

    def call(self, kind: str, body: dict[str, Any]) -> tuple[str, dict]:
        self.n += 1
        label = f"r{self.n}".encode()
        self.send(kind, label, json.dumps(body).encode())
        return self.reply(label)

    def ok(self, kind: str, body: dict[str, Any]) -> dict:
        reply, answer = self.call(kind, body)
        assert reply == "OK", (kind, answer)
        return answer

    def _recv(self, timeout: float, what: str) -> list[bytes]:
        if timeout <= 0 or not self.sock.poll(timeout * 1000):
            raise AssertionError(f"no {what} within the time")
        return self.sock.recv_multipart()


def test_replies_pushes_and_events_have_the_documented_fields(make_broker):
    """Every command, run for real, replies with the fields its table lists (the 'Only'
    ones when they apply); every push and event carries only documented fields."""
    broker = make_broker(operators=("ann",), heartbeat=2.0, scram_iterations=4096)
    ctx = zmq.Context()
    try:
        ann, bob = Raw(ctx, broker.port), Raw(ctx, broker.port)
        replies: dict[str, list[dict]] = {}

        def ok(who: Raw, kind: str, body: dict[str, Any]) -> dict:
            answer = who.ok(kind, body)
            replies.setdefault(kind, []).append(answer)
            return answer

        welcome = ok(ann, "HELLO", {"version": 1, "nick": "ann", "token": "a1" * 8})
        ok(bob, "HELLO", {"version": 1, "nick": "bob", "bot": True, "token": "b1"})
        sub = ctx.socket(zmq.XSUB)
        sub.linger = 0
        sub.connect(f"tcp://127.0.0.1:{welcome['pub_port']}")
        sub.send(b"\x01" + ok(ann, "JOIN", {"room": "lobby"})["grant"].encode())
        pushes = [("LIVE", ann.push("LIVE"))]
        ok(bob, "JOIN", {"room": "lobby"})
        ok(
            bob,
            "SAY",
            {
                "room": "lobby",
                "msgs": [{"id": "b-1", "text": "copied", "action": True}],
                "relay": "cy@work",
                "hops": 2,
            },
        )
        ok(ann, "SAY", {"room": "lobby", "msgs": [{"id": "a-1", "text": "hi"}]})
        private = ok(ann, "PRIV", {"to": "BOB", "text": "psst", "id": "a-2"})
        ok(ann, "PRIV", {"to": "bob", "text": "psst", "id": "a-2"})  # duplicate
        pushes.append(("PRIVATE", bob.push("PRIVATE")))
        hi = replies["SAY"][-1]["acks"][0][1]  # edits, replies, search (section 16)
        ok(ann, "SAY", {"room": "lobby", "msgs": [{"id": "a-3", "text": "oops"}], "re": hi})
        oops = replies["SAY"][-1]["acks"][0][1]
        ok(ann, "EDIT", {"room": "lobby", "seq": hi, "text": "hi all"})
        ok(ann, "SEARCH", {"query": "hi*", "room": "lobby"})
        ok(ann, "SEARCH", {"query": "psst"})
        ok(ann, "DELETE", {"room": "lobby", "seq": oops})
        ok(ann, "ROOMS", {})
        ok(ann, "WHO", {"room": "lobby"})
        ok(ann, "WHO", {})
        ok(ann, "TOPIC", {"room": "lobby"})
        ok(ann, "TOPIC", {"room": "lobby", "text": "tea"})
        ok(ann, "TOPIC", {"room": "lobby", "lock": True})
        ok(ann, "PING", {})
        sha = hashlib.sha256(b"hi").hexdigest()
        up = {"room": "lobby", "id": "c" * 32, "name": "a.txt", "size": 2, "sha256": sha}
        upload = ok(ann, "UPLOAD", up)["upload"]
        for kind, body, data in (
            ("PUT", {"upload": upload, "offset": 0}, [b"hi"]),
            ("GET", {"file": "", "offset": 0}, []),
        ):
            if kind == "GET":
                body["file"] = replies["PUT"][0]["offer"]["file"]
            ann.sock.send_multipart([kind.encode(), b"f", json.dumps(body).encode(), *data])
            got_kind, got = ann.reply(b"f")
            assert got_kind == "OK", got
            replies.setdefault(kind, []).append(got)
        fid = replies["PUT"][0]["offer"]["file"]
        ok(ann, "FILES", {"room": "lobby"})
        ok(ann, "FILE", {"file": fid})
        ok(ann, "RMFILE", {"file": fid})
        ok(ann, "KICK", {"room": "lobby", "nick": "bob", "reason": "spam"})
        pushes += [("KICKED", bob.push("KICKED")), ("GRANT", ann.push("GRANT"))]
        ok(ann, "BAN", {"room": "lobby", "nick": "eve"})
        ok(bob, "JOIN", {"room": "lobby"})
        ok(ann, "BAN", {"room": "lobby", "nick": "bob", "reason": "again"})
        ok(ann, "UNBAN", {"room": "lobby", "nick": "bob"})
        ok(bob, "JOIN", {"room": "lobby"})
        ok(bob, "LEAVE", {"room": "lobby"})
        ok(ann, "NICK", {"nick": "ann"})
        ok(ann, "NICK", {"nick": "anna"})
        assert ok(ann, "HISTORY", {"with": "bob"})["events"][0]["text"] == "psst"
        ok(ann, "REGISTER", KEYS)  # accounts (issue 21): anna is one from here on
        anna = Raw(ctx, broker.port)
        login = Login("anna", PASSWORD)
        first = ok(anna, "AUTH", {"account": "anna", "first": login.first()})
        proof = login.proof(first["next"])
        ok(anna, "HELLO", {"version": 1, "nick": "anna", "proof": proof})
        ok(anna, "JOIN", {"room": "lobby"})  # a second session of the account (ann's on)
        ok(anna, "JOIN", {"room": "work"})
        pushes.append(("JOINED", ann.push("JOINED")))  # the account's other session is told
        ok(ann, "JOIN", {"room": "work"})
        ok(anna, "LEAVE", {"room": "work"})
        pushes.append(("LEFT", ann.push("LEFT")))
        ok(anna, "MARK", {"room": "lobby", "seq": 1})
        pushes.append(("MARKED", ann.push("MARKED")))
        ok(anna, "MARK", {"with": "bob", "ts": 1.0})
        ok(anna, "UNREAD", {})
        ok(anna, "UNREAD", {"room": "lobby", "after": 0})
        again = Login("anna", PASSWORD)
        first = ok(anna, "AUTH", {"account": "anna", "first": again.first()})
        ok(anna, "PASSWORD", {"proof": again.proof(first["next"]), **KEYS})
        ok(bob, "BYE", {"reason": "tired"})
        history = ok(anna, "HISTORY", {"room": "lobby", "after": 0, "limit": 500})
        broker.stop()
        pushes.append(("SHUTDOWN", anna.push("SHUTDOWN")))
    finally:
        ctx.destroy(linger=0)

    assert set(replies) == {k.value for k in m.Kind}
    for kind, bodies in replies.items():
        documented, always = fields(COMMANDS[kind], "Reply:")
        for body in bodies:
            assert set(body) <= documented, f"{kind} reply: undocumented {set(body) - documented}"
            assert always <= set(body), f"{kind} reply: missing {always - set(body)}"
    for kind, body in pushes:
        documented, always = fields(PUSHES[kind], "|")
        assert always <= set(body) <= documented, (kind, body)
    events = history["events"] + [private["event"]]
    assert {e["kind"] for e in events} == EVENT_KINDS  # every kind happened, documented
    for event in events:
        assert set(event) <= EVENT_FIELDS, f"undocumented {set(event) - EVENT_FIELDS}: {event}"
    results = [r for body in replies["SEARCH"] for r in body["results"]]
    assert {r["kind"] for r in results} == {"msg", "private"}
    for result in results:  # events as stored, with where they matched
        assert set(result) <= EVENT_FIELDS | {"marks"} and result["marks"], result


# ---------------------------------------------------------------------------- the worked session


def sessions() -> list[list[tuple[str, str]]]:
    """Every worked session of the document (each ```frames block)."""
    blocks = re.findall(r"^```frames\n(.*?)^```", DOC, re.M | re.S)
    assert blocks, "PROTOCOL.md has no worked session (a ```frames block)"
    return [[tuple(line.split(None, 1)) for line in b.splitlines()] for b in blocks]


def frame(text: str) -> bytes:
    return b"" if text == '""' else text.encode()


def steady(value: Any) -> Any:
    """The value without what changes from run to run (times, grants, ports, the banner)."""
    if isinstance(value, dict):
        return {k: steady(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [steady(v) for v in value]
    return value


@pytest.mark.parametrize("session", range(len(sessions())), ids=lambda i: f"session{i + 1}")
def test_worked_session_replays_against_a_fresh_broker(make_broker, session):
    """Every request of each worked session, sent to a fresh broker, gets the reply shown;
    every push and published frame shown arrives, with the contents shown."""
    lines = sessions()[session]
    broker = make_broker(heartbeat=2.0)
    ctx = zmq.Context()
    try:
        socks = {"": Raw(ctx, broker.port), "(bob)": Raw(ctx, broker.port)}
        sub = ctx.socket(zmq.XSUB)
        sub.linger = 0
        grant, checked = "", 0
        for who, rest in lines:
            actor = who[1:]
            if who[0] == "C":
                kind, label, body = rest.split(" | ", 2)
                json.loads(body)
                socks[actor].send(kind, frame(label), body.encode())
            elif who[0] == "B":
                kind, label, body = rest.split(" | ", 2)
                want = json.loads(body)
                if frame(label):
                    got_kind, got = socks[actor].reply(frame(label))
                    assert got_kind == kind, (rest, got)
                    if actor == "" and "pub_port" in got:  # ann's welcome
                        sub.connect(f"tcp://127.0.0.1:{got['pub_port']}")
                else:
                    got = socks[actor].push(kind)
                assert steady(got) == steady(want), f"{who} {rest[:60]}...: got {got}"
                if actor == "" and "grant" in got:
                    grant = got["grant"]
                checked += 1
            elif who == "S":
                assert rest.startswith("\\x01")
                sub.send(b"\x01" + grant.encode())
            elif who == "P":
                topic, batch = rest.split(" | ", 1)
                assert sub.poll(5000), f"nothing published for {rest[:60]}"
                got_topic, got_batch = sub.recv_multipart()
                assert got_topic.split(b"\x00")[0] == topic.split("\\x00")[0].encode()
                assert steady(json.loads(got_batch)) == steady(json.loads(batch))
                checked += 1
            else:
                raise AssertionError(f"unknown line {who} {rest}")
        assert checked == sum(who[0] in "BP" for who, _ in lines) >= 15
    finally:
        ctx.destroy(linger=0)


def test_files_session_replays_against_a_fresh_broker(make_broker):
    """Chapter 15's session, sent to a fresh broker, gets the replies shown (the file id,
    new every time, read from the broker's answer and used from there on), and the bytes."""
    block = re.search(r"^```files\n(.*?)^```", DOC, re.M | re.S)
    assert block, "PROTOCOL.md has no files session"
    broker = make_broker(heartbeat=2.0)
    ctx = zmq.Context()
    try:
        ann, ids, checked = Raw(ctx, broker.port), {}, 0
        for line in block.group(1).splitlines():
            who, rest = line.split(None, 1)
            kind, label, body, *data = rest.split(" | ", 3)
            for doc_id, real in ids.items():
                body = body.replace(doc_id, real)
            if who == "C":
                ann.sock.send_multipart(
                    [kind.encode(), label.encode(), body.encode()] + [d.encode() for d in data]
                )
                continue
            frames = ann._recv(5.0, f"the reply labelled {label}")
            while frames[1] != label.encode():
                frames = ann._recv(5.0, f"the reply labelled {label}")
            got = json.loads(frames[2])
            offer = got.get("offer", {})
            if "file" in offer:
                ids[json.loads(body)["offer"]["file"]] = offer["file"]
                body = body.replace(json.loads(body)["offer"]["file"], offer["file"])
            assert frames[0].decode() == kind and steady(got) == steady(json.loads(body)), got
            assert [f.decode() for f in frames[3:]] == data
            checked += 1
        assert checked == 6
    finally:
        ctx.destroy(linger=0)


def test_accounts_session_replays_against_a_fresh_broker(make_broker):
    """Section 15's session, sent to a fresh broker: every reply as shown (each proof
    computed from the password and the server-first message just received)."""
    block = re.search(r"^```accounts-frames\n(.*?)^```", DOC, re.M | re.S)
    assert block, "PROTOCOL.md has no accounts session (an ```accounts-frames block)"
    passwords = {"(ann2)": PASSWORD, "(ann3)": PASSWORD, "(eve)": "wrong guess here"}
    broker = make_broker(heartbeat=2.0, scram_iterations=4096)
    ctx = zmq.Context()
    socks: dict[str, Raw] = {}
    logins: dict[str, Any] = {}
    checked = 0
    try:
        for line in block.group(1).splitlines():
            who, rest = line.split(None, 1)
            actor = who[1:]
            sock = socks.setdefault(actor, Raw(ctx, broker.port))
            kind, label, text = rest.split(" | ", 2)
            body = json.loads(text)
            if who[0] == "C":
                if kind == "AUTH":  # the client nonce as shown
                    nonce = body["first"].rpartition("r=")[2]
                    logins[actor] = scramp.ScramClient(
                        ["SCRAM-SHA-256"], body["account"], passwords[actor], c_nonce=nonce
                    )
                    assert logins[actor].get_client_first() == body["first"]
                if "proof" in body:
                    body["proof"] = logins[actor].get_client_final()
                sock.send(kind, frame(label), json.dumps(body).encode())
                continue
            got_kind, got = sock.reply(frame(label))
            assert got_kind == kind, (line, got)
            if "next" in got:
                logins[actor].set_server_first(got["next"])
            if "verify" in got:
                logins[actor].set_server_final(got["verify"])  # the broker proved its keys
            volatile = {"next", "verify"}
            assert steady(drop(got, volatile)) == steady(drop(body, volatile)), line
            checked += 1
        assert checked >= 15
    finally:
        ctx.destroy(linger=0)


def drop(value: Any, keys: set[str]) -> Any:
    """The value without `keys`, and without marks that are times (floats)."""
    if isinstance(value, dict):
        return {
            k: drop(v, keys)
            for k, v in value.items()
            if k not in keys and not (k == "mark" and isinstance(v, float))
        }
    if isinstance(value, list):
        return [drop(v, keys) for v in value]
    return value


# ---------------------------------------------------------------------------- the minimal client


def test_minimal_client_uses_only_python_and_pyzmq():
    """examples/minimal_client.py imports the standard library and zmq, nothing of ours."""
    tree = ast.parse((ROOT / "examples" / "minimal_client.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported - {"__future__"} <= set(sys.stdlib_module_names) | {"zmq"}, imported
    assert "sys.path" not in (ROOT / "examples" / "minimal_client.py").read_text()
