"""Protocol tests for messages.py: frames in, frames out, no sockets."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqchat.protocol import (
    CHUNK,
    MAX_BATCH,
    MAX_CMID,
    MAX_HISTORY,
    MAX_LABEL,
    MAX_REASON,
    MAX_REQUEST,
    MAX_TEXT,
    MAX_TOPIC,
    VERSIONS,
    Code,
    EventKind,
    Kind,
    ProtocolError,
    Reply,
    Request,
    Response,
    check_nick,
    check_room,
    decode_batch,
    decode_label,
    decode_request,
    decode_response,
    dumps,
    encode_batch,
    encode_error,
    encode_event,
    encode_reply,
    encode_request,
    grant_payload,
    mentions,
    nick_key,
    parse_grant,
    room_topic,
)

LABEL = b"req-1"


def raw(kind: bytes | str, body: Any, label: bytes = LABEL) -> list[bytes]:
    """Three request frames with an arbitrary JSON body (json.dumps escapes surrogates)."""
    kind_b = kind.encode() if isinstance(kind, str) else kind
    return [kind_b, label, json.dumps(body).encode()]


def short(value: Any) -> str:
    """A test id that stays readable when the parameter is 5000 bytes long."""
    return repr(value)[:40]


def refused(frames: list[bytes]) -> ProtocolError:
    """The ProtocolError decode_request raises for these frames."""
    with pytest.raises(ProtocolError) as info:
        decode_request(frames)
    return info.value


# ---------------------------------------------------------------------------- round trips

# kind -> (body the client sends, fields the broker gets after validation)
ROUND_TRIPS: dict[Kind, tuple[dict[str, Any], dict[str, Any]]] = {
    Kind.HELLO: (
        {"version": 1, "nick": "alice", "bot": True, "privates_since": 1700000000},
        {
            "nick": "alice",
            "bot": True,
            "resume": False,
            "token": "",
            "privates_since": 1700000000.0,
            "proof": None,
        },
    ),
    Kind.JOIN: (
        {"room": "dev", "resume": True, "follow": True},
        {"room": "dev", "resume": True, "follow": True},
    ),
    Kind.LEAVE: ({"room": "dev"}, {"room": "dev"}),
    Kind.SAY: (
        {
            "room": "dev",
            "msgs": [
                {"id": "c1", "text": "héllo ✓"},
                {"id": "c2", "text": "waves", "action": True},
            ],
        },
        {
            "room": "dev",
            "relay": None,
            "hops": None,
            "re": None,
            "heard": None,
            "msgs": [
                {"id": "c1", "text": "héllo ✓", "action": False},
                {"id": "c2", "text": "waves", "action": True},
            ],
        },
    ),
    Kind.PRIV: (
        {"to": "bob", "text": "psst", "id": "c3", "retry": 2.5},
        {"to": "bob", "text": "psst", "id": "c3", "hops": None, "retry": 2.5},
    ),
    Kind.ROOMS: ({}, {}),
    Kind.WHO: ({"room": "dev"}, {"room": "dev"}),
    Kind.NICK: ({"nick": "alice_2"}, {"nick": "alice_2"}),
    Kind.TOPIC: (
        {"room": "dev", "text": "", "lock": True},
        {"room": "dev", "text": "", "lock": True},
    ),
    Kind.HISTORY: (
        {"room": "dev", "after": 3, "limit": 10, "since": 1.5},
        {"room": "dev", "with": None, "after": 3, "before": None, "since": 1.5, "limit": 10},
    ),
    Kind.PING: ({}, {}),
    Kind.BYE: ({"reason": "good night"}, {"reason": "good night"}),
    Kind.KICK: (
        {"room": "dev", "nick": "bob", "reason": "spam"},
        {"room": "dev", "nick": "bob", "reason": "spam"},
    ),
    Kind.BAN: ({"room": "dev", "nick": "bob"}, {"room": "dev", "nick": "bob", "reason": None}),
    Kind.UNBAN: (
        {"room": "dev", "nick": "bob", "reason": ""},
        {"room": "dev", "nick": "bob", "reason": ""},
    ),
    Kind.UPLOAD: (
        {"to": "bob", "id": "a" * 32, "name": "../x.txt", "size": 3, "sha256": "0" * 64},
        {"room": None, "to": "bob", "id": "a" * 32, "name": "x.txt", "size": 3, "sha256": "0" * 64},
    ),
    Kind.PUT: (
        {"upload": "b" * 32, "offset": 0},
        {"upload": "b" * 32, "offset": 0, "data": b"xyz"},
    ),
    Kind.GET: ({"file": "0123abcd", "offset": 5}, {"file": "0123abcd", "offset": 5, "size": CHUNK}),
    Kind.FILES: ({"with": "bob"}, {"room": None, "with": "bob"}),
    Kind.FILE: ({"file": "0123abcd"}, {"file": "0123abcd"}),
    Kind.RMFILE: ({"file": "0123abcd"}, {"file": "0123abcd"}),
}

KEYS = {
    "salt": "c2FsdHNhbHQ=",
    "stored_key": base64.b64encode(b"A" * 32).decode(),
    "server_key": base64.b64encode(b"B" * 32).decode(),
}
ROUND_TRIPS.update(  # accounts (issue 21)
    {
        Kind.AUTH: (
            {"account": "alice", "first": "n,,n=alice,r=abc"},
            {"account": "alice", "first": "n,,n=alice,r=abc"},
        ),
        Kind.REGISTER: (
            {**KEYS, "iterations": 4096},
            {
                "salt": b"saltsalt",
                "stored_key": b"A" * 32,
                "server_key": b"B" * 32,
                "iterations": 4096,
            },
        ),
        Kind.PASSWORD: (
            {**KEYS, "iterations": 5000, "proof": "c=biws,r=abc,p=xyz"},
            {
                "salt": b"saltsalt",
                "stored_key": b"A" * 32,
                "server_key": b"B" * 32,
                "iterations": 5000,
                "proof": "c=biws,r=abc,p=xyz",
            },
        ),
        Kind.MARK: (
            {"room": "dev", "seq": 7},
            {"room": "dev", "seq": 7, "with": None, "ts": None},
        ),
        Kind.UNREAD: ({}, {"room": None, "after": None}),
    }
)
# Edits, removals, replies and search (issue 23)
ROUND_TRIPS.update(
    {
        Kind.EDIT: (
            {"room": "dev", "seq": 7, "text": "fixed"},
            {"room": "dev", "seq": 7, "text": "fixed"},
        ),
        Kind.DELETE: ({"room": "dev", "seq": 7}, {"room": "dev", "seq": 7}),
        Kind.SEARCH: (
            {"query": 'deploy* "build failed"', "limit": 500},
            {"query": 'deploy* "build failed"', "room": None, "limit": 100},
        ),
    }
)


def test_round_trip_table_covers_every_kind() -> None:
    """Every command Kind has a round-trip case below, so a new kind cannot go untested."""
    assert set(ROUND_TRIPS) == set(Kind)


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_request_round_trips(kind: Kind) -> None:
    """encode_request then decode_request gives the kind, the label and the validated fields."""
    body, expected = ROUND_TRIPS[kind]
    frames = encode_request(kind, LABEL, body, b"xyz" if kind is Kind.PUT else None)
    assert frames[0] == kind.value.encode("ascii")
    assert frames[1] == LABEL
    assert json.loads(frames[2]) == body
    assert decode_request(frames) == Request(kind, LABEL, expected)


def test_request_ignores_unknown_fields() -> None:
    """Unknown body fields are dropped, not refused, so newer clients still talk to this broker."""
    req = decode_request(encode_request(Kind.JOIN, LABEL, {"room": "dev", "colour": "red"}))
    assert req.body == {"room": "dev", "resume": False, "follow": False}


def test_who_without_room_means_everyone() -> None:
    """WHO with no room decodes to room None (the whole broker)."""
    assert decode_request(encode_request(Kind.WHO, LABEL, {})).body == {"room": None}


def test_history_limit_defaults_and_is_capped() -> None:
    """HISTORY limit defaults to 50 and never exceeds MAX_HISTORY."""
    assert decode_request(encode_request(Kind.HISTORY, LABEL, {"room": "dev"})).body["limit"] == 50
    big = decode_request(encode_request(Kind.HISTORY, LABEL, {"room": "dev", "limit": 10**6}))
    assert big.body["limit"] == MAX_HISTORY


def test_label_of_64_bytes_is_accepted() -> None:
    """A label of exactly MAX_LABEL bytes is allowed (the limit is inclusive)."""
    label = b"x" * MAX_LABEL
    assert decode_request(encode_request(Kind.PING, label, {})).label == label


@pytest.mark.parametrize("kind", list(Reply), ids=str)
def test_reply_round_trips(kind: Reply) -> None:
    """encode_reply then decode_response gives back kind, label and body for every reply kind."""
    label = LABEL if kind in (Reply.OK, Reply.ERROR) else b""
    body = {"room": "dev", "seq": 7, "text": "héllo ✓", "nested": {"a": [1, None, True]}}
    frames = encode_reply(kind, label, body)
    assert frames[0] == kind.value.encode("ascii")
    assert decode_response(frames) == Response(kind.value, label, body)


def test_batch_round_trips() -> None:
    """encode_batch then decode_batch gives the same events, under the room's epoch topic."""
    events = [
        {"room": "dev", "seq": 1, "nick": "alice", "kind": "msg", "text": "hi ✓"},
        {"room": "dev", "seq": 2, "nick": "bob", "kind": "join", "text": ""},
    ]
    frames = encode_batch("dev", "00000000deadbeef", [dumps(e) for e in events])
    assert frames[0] == b"dev\x00" + b"00000000deadbeef"
    assert decode_batch(frames) == events


def test_room_topic_is_not_a_prefix_of_a_longer_room() -> None:
    """The 0x00 delimiter stops room 'dev' from matching 'devops' traffic by prefix."""
    epoch = "0123456789abcdef"
    assert not room_topic("devops", epoch).startswith(room_topic("dev", epoch))
    assert not room_topic("devops", epoch).startswith(b"dev\x00")


def test_error_carries_code_reason_and_retry_after() -> None:
    """encode_error puts code, reason and retry_after in the body and keeps the label."""
    frames = encode_error(LABEL, ProtocolError(Code.RATE_LIMITED, "slow down", retry_after=2.5))
    resp = decode_response(frames)
    assert (resp.kind, resp.label) == ("ERROR", LABEL)
    assert resp.body == {"code": "RATE_LIMITED", "reason": "slow down", "retry_after": 2.5}


def test_bad_version_error_names_the_versions_spoken() -> None:
    """A HELLO with an unknown version becomes an ERROR whose body lists the versions spoken."""
    err = refused(encode_request(Kind.HELLO, LABEL, {"version": 99, "nick": "alice"}))
    assert err.code == Code.BAD_VERSION
    body = decode_response(encode_error(LABEL, err)).body
    assert body["code"] == "BAD_VERSION"
    assert body["versions"] == list(VERSIONS)
    assert "versions: 1" in body["reason"] and "99" in body["reason"]


def test_decode_label_recovers_label_of_bad_request() -> None:
    """Even a refused request yields its label (so it gets its reply); a bad label yields b''."""
    assert decode_label([b"NOPE", LABEL, b"not json"]) == LABEL
    assert decode_label([b"PING", b"x" * (MAX_LABEL + 1), b"{}"]) == b""
    assert decode_label([b"PING"]) == b""


# ---------------------------------------------------------------------------- refusals


def say(*texts: str, room: str = "dev") -> dict[str, Any]:
    """A SAY body with one message per text."""
    return {"room": room, "msgs": [{"id": f"c{i}", "text": t} for i, t in enumerate(texts)]}


BAD_REQUESTS: list[tuple[str, list[bytes], Code]] = [
    # frame count
    ("no frames", [], Code.BAD_REQUEST),
    ("one frame", [b"PING"], Code.BAD_REQUEST),
    ("two frames", [b"PING", LABEL], Code.BAD_REQUEST),
    ("four frames", [b"PING", LABEL, b"{}", b"{}"], Code.BAD_REQUEST),
    # label
    ("empty label", [b"PING", b"", b"{}"], Code.BAD_REQUEST),
    ("label too long", [b"PING", b"x" * (MAX_LABEL + 1), b"{}"], Code.BAD_REQUEST),
    # command
    ("unknown command", raw("SHOUT", {}), Code.UNKNOWN_COMMAND),
    ("lower-case command", raw("ping", {}), Code.UNKNOWN_COMMAND),
    ("empty command", raw(b"", {}), Code.UNKNOWN_COMMAND),
    ("non-ascii command", raw(b"P\xc3\x8dNG", {}), Code.UNKNOWN_COMMAND),
    # body encoding and shape
    ("body not utf-8", [b"PING", LABEL, b'{"x": "\xff"}'], Code.BAD_REQUEST),
    ("body not json", [b"PING", LABEL, b"{ping"], Code.BAD_REQUEST),
    ("body empty", [b"PING", LABEL, b""], Code.BAD_REQUEST),
    ("body is a list", raw("PING", []), Code.BAD_REQUEST),
    ("body is a string", raw("PING", "hi"), Code.BAD_REQUEST),
    ("body is null", raw("PING", None), Code.BAD_REQUEST),
    ("body is a number", raw("PING", 42), Code.BAD_REQUEST),
    ("body nested too deep", [b"PING", LABEL, b"[" * 5000], Code.BAD_REQUEST),
    # wrong field types
    ("priv text not string", raw("PRIV", {"to": "bob", "text": 5, "id": "c"}), Code.BAD_REQUEST),
    ("priv id not string", raw("PRIV", {"to": "bob", "text": "x", "id": 5}), Code.BAD_REQUEST),
    ("say msgs not list", raw("SAY", {"room": "dev", "msgs": "hi"}), Code.BAD_REQUEST),
    ("say msg not object", raw("SAY", {"room": "dev", "msgs": ["hi"]}), Code.BAD_REQUEST),
    (
        "say text is list",
        raw("SAY", {"room": "dev", "msgs": [{"id": "c", "text": ["x"]}]}),
        Code.BAD_REQUEST,
    ),
    ("say relay not string", raw("SAY", {**say("x"), "relay": 1}), Code.BAD_REQUEST),
    ("say heard negative", raw("SAY", {**say("x"), "heard": -1}), Code.BAD_REQUEST),
    ("say heard string", raw("SAY", {**say("x"), "heard": "7"}), Code.BAD_REQUEST),
    ("history limit string", raw("HISTORY", {"room": "dev", "limit": "10"}), Code.BAD_REQUEST),
    ("history room and with", raw("HISTORY", {"room": "dev", "with": "bob"}), Code.BAD_REQUEST),
    ("history with a bad nick", raw("HISTORY", {"with": "b b"}), Code.NICK_INVALID),
    ("history limit bool", raw("HISTORY", {"room": "dev", "limit": True}), Code.BAD_REQUEST),
    ("history limit zero", raw("HISTORY", {"room": "dev", "limit": 0}), Code.BAD_REQUEST),
    ("history after negative", raw("HISTORY", {"room": "dev", "after": -1}), Code.BAD_REQUEST),
    ("history before float", raw("HISTORY", {"room": "dev", "before": 2.5}), Code.BAD_REQUEST),
    ("history since string", raw("HISTORY", {"room": "dev", "since": "today"}), Code.BAD_REQUEST),
    ("history since bool", raw("HISTORY", {"room": "dev", "since": False}), Code.BAD_REQUEST),
    (
        "hello privates_since string",
        raw("HELLO", {"version": 1, "nick": "alice", "privates_since": "now"}),
        Code.BAD_REQUEST,
    ),
    (
        "hello privates_since huge",
        raw("HELLO", {"version": 1, "nick": "alice", "privates_since": 10**400}),
        Code.BAD_REQUEST,
    ),
    ("bye reason number", raw("BYE", {"reason": 3}), Code.BAD_REQUEST),
    ("topic text number", raw("TOPIC", {"room": "dev", "text": 3}), Code.BAD_REQUEST),
    ("join room number", raw("JOIN", {"room": 5}), Code.ROOM_INVALID),
    ("nick nick list", raw("NICK", {"nick": ["alice"]}), Code.NICK_INVALID),
    (
        "lone surrogate in text",
        raw("PRIV", {"to": "bob", "text": "a\ud800b", "id": "c"}),
        Code.BAD_REQUEST,
    ),
    # missing fields
    ("priv without text", raw("PRIV", {"to": "bob", "id": "c"}), Code.BAD_REQUEST),
    (
        "priv retry not seconds",
        raw("PRIV", {"to": "bob", "text": "x", "id": "c", "retry": True}),
        Code.BAD_REQUEST,
    ),
    (
        "priv retry negative",
        raw("PRIV", {"to": "bob", "text": "x", "id": "c", "retry": -1}),
        Code.BAD_REQUEST,
    ),
    ("priv without id", raw("PRIV", {"to": "bob", "text": "x"}), Code.BAD_REQUEST),
    ("priv empty text", raw("PRIV", {"to": "bob", "text": "", "id": "c"}), Code.BAD_REQUEST),
    ("say without msgs", raw("SAY", {"room": "dev"}), Code.BAD_REQUEST),
    ("say empty msgs", raw("SAY", {"room": "dev", "msgs": []}), Code.BAD_REQUEST),
    ("say msg without id", raw("SAY", {"room": "dev", "msgs": [{"text": "x"}]}), Code.BAD_REQUEST),
    ("say msg without text", raw("SAY", {"room": "dev", "msgs": [{"id": "c"}]}), Code.BAD_REQUEST),
    ("join without room", raw("JOIN", {}), Code.ROOM_INVALID),
    ("kick without nick", raw("KICK", {"room": "dev"}), Code.NICK_INVALID),
    ("hello without nick", raw("HELLO", {"version": 1}), Code.NICK_INVALID),
    ("hello without version", raw("HELLO", {"nick": "alice"}), Code.BAD_VERSION),
    # sizes
    ("text too long", raw("SAY", say("x" * (MAX_TEXT + 1))), Code.TOO_LARGE),
    (
        "priv text too long",
        raw("PRIV", {"to": "bob", "text": "é" * (MAX_TEXT + 1), "id": "c"}),
        Code.TOO_LARGE,
    ),
    (
        "topic too long",
        raw("TOPIC", {"room": "dev", "text": "t" * (MAX_TOPIC + 1)}),
        Code.TOO_LARGE,
    ),
    ("reason too long", raw("BYE", {"reason": "r" * (MAX_REASON + 1)}), Code.TOO_LARGE),
    (
        "cmid too long",
        raw("PRIV", {"to": "bob", "text": "x", "id": "i" * (MAX_CMID + 1)}),
        Code.TOO_LARGE,
    ),
    ("too many messages", raw("SAY", say(*["x"] * (MAX_BATCH + 1))), Code.TOO_LARGE),
    ("request too big", raw("SAY", say(*["x" * 1000] * MAX_BATCH)), Code.TOO_LARGE),
    # versions
    ("version 2", raw("HELLO", {"version": 2, "nick": "alice"}), Code.BAD_VERSION),
    ("version 0", raw("HELLO", {"version": 0, "nick": "alice"}), Code.BAD_VERSION),
    ("version string", raw("HELLO", {"version": "1", "nick": "alice"}), Code.BAD_VERSION),
    ("version true", raw("HELLO", {"version": True, "nick": "alice"}), Code.BAD_VERSION),
    ("version float", raw("HELLO", {"version": 1.0, "nick": "alice"}), Code.BAD_VERSION),
    # control characters
    ("nul in nick", raw("NICK", {"nick": "al\x00ice"}), Code.NICK_INVALID),
    ("newline in nick", raw("HELLO", {"version": 1, "nick": "alice\n"}), Code.NICK_INVALID),
    ("escape in nick", raw("NICK", {"nick": "\x1b[31mred"}), Code.NICK_INVALID),
    ("bidi override in nick", raw("NICK", {"nick": "ab\u202ecd"}), Code.NICK_INVALID),
    ("nul in room", raw("JOIN", {"room": "dev\x00"}), Code.ROOM_INVALID),
    ("newline after room", raw("JOIN", {"room": "dev\n"}), Code.ROOM_INVALID),
    ("tab in room", raw("SAY", say("x", room="d\tv")), Code.ROOM_INVALID),
    (
        "priv to control nick",
        raw("PRIV", {"to": "bo\x07b", "text": "x", "id": "c"}),
        Code.NICK_INVALID,
    ),
]


@pytest.mark.parametrize(
    "frames,code", [(f, c) for _, f, c in BAD_REQUESTS], ids=[name for name, _, _ in BAD_REQUESTS]
)
def test_bad_request_is_refused_with_its_code(frames: list[bytes], code: Code) -> None:
    """Each class of bad input raises ProtocolError with the documented code, nothing else."""
    err = refused(frames)
    assert err.code == code
    assert err.reason  # the user sees a reason, not just a code


def test_request_size_limit_is_exact() -> None:
    """A request of exactly MAX_REQUEST bytes passes; one byte more is TOO_LARGE."""

    def ping(pad: int) -> list[bytes]:
        return [b"PING", LABEL, b'{"pad":"' + b"x" * pad + b'"}']

    overhead = sum(map(len, ping(0)))
    assert decode_request(ping(MAX_REQUEST - overhead)).kind == Kind.PING
    assert refused(ping(MAX_REQUEST - overhead + 1)).code == Code.TOO_LARGE


def test_text_and_batch_limits_are_inclusive() -> None:
    """A text of exactly MAX_TEXT characters and a SAY of exactly MAX_BATCH messages pass."""
    assert decode_request(raw("SAY", say("é" * MAX_TEXT))).body["msgs"][0]["text"] == "é" * MAX_TEXT
    assert len(decode_request(raw("SAY", say(*["x"] * MAX_BATCH))).body["msgs"]) == MAX_BATCH


# ---------------------------------------------------------------------------- nicks and rooms


@pytest.mark.parametrize(
    "nick",
    [
        "a",
        "x" * 32,
        "alice",
        "Alice",
        "_bot",
        "[away]",
        "a-b_c[d]{e}|f^g",
        "alice2",
        "Élodie",
        "Алиса",
        "αβγ",
        "李雷",
    ],
)
def test_valid_nicks_are_accepted(nick: str) -> None:
    """Nicks of 1..32 letters, digits and _-[]{}|^ in one script are accepted unchanged."""
    assert check_nick(nick) == nick


@pytest.mark.parametrize(
    "nick",
    [
        "",
        "x" * 33,
        "1alice",
        "-alice",
        "al ice",
        "al.ice",
        "al@ice",
        "alice!",
        "al\x00ice",
        "al\u200bice",
        "аlice",
        "alicε",
        None,
        5,
        ["alice"],
    ],
    ids=repr,
)
def test_invalid_nicks_are_refused(nick: Any) -> None:
    """Empty, too long, leading digit or '-', other punctuation, control or mixed-script nicks
    and non-strings raise NICK_INVALID."""
    with pytest.raises(ProtocolError) as info:
        check_nick(nick)
    assert info.value.code == Code.NICK_INVALID


def test_check_nick_normalises_compatibility_forms() -> None:
    """Full-width letters are NFKC-normalised to the plain nick they look like."""
    assert check_nick("ａｌｉｃｅ") == "alice"


def test_nick_key_is_case_insensitive() -> None:
    """Alice and alice are the same nick; alice and alicf are not."""
    assert nick_key("Alice") == nick_key("alice") == nick_key("ALICE")
    assert nick_key("alice") != nick_key("alicf")


def test_nick_key_folds_cyrillic_and_greek_look_alikes() -> None:
    """A Cyrillic 'а' or Greek 'Α' posing as Latin 'a' gets the same key as the Latin nick."""
    cyrillic_a = "\u0430lice"
    greek_alpha = "\u0391LICE"
    assert cyrillic_a != "alice"
    assert nick_key(cyrillic_a) == nick_key("alice")
    assert nick_key(greek_alpha) == nick_key("alice")
    # all-Cyrillic 'асе' is a legal nick on its own, but collides with Latin 'ace'
    all_cyrillic = "\u0430\u0441\u0435"
    assert check_nick(all_cyrillic) == all_cyrillic
    assert nick_key(all_cyrillic) == nick_key("ace")


def test_mixed_script_nick_is_refused() -> None:
    """A nick that mixes Latin and Cyrillic letters is refused with NICK_INVALID."""
    with pytest.raises(ProtocolError) as info:
        check_nick("\u0430lice")
    assert info.value.code == Code.NICK_INVALID
    assert "scripts" in info.value.reason


@pytest.mark.parametrize("room", ["dev", "0day", "a" * 32, "dev-ops_2"])
def test_valid_rooms_are_accepted(room: str) -> None:
    """Room names of 1..32 of a-z, 0-9, '_', '-' starting with a letter or digit pass."""
    assert check_room(room) == room


@pytest.mark.parametrize(
    "room",
    ["", "a" * 33, "Dev", "-dev", "_dev", "dev ops", "dev\n", "dév", "dev.ops", None, 7],
    ids=repr,
)
def test_invalid_rooms_are_refused(room: Any) -> None:
    """Anything else, including a trailing newline, raises ROOM_INVALID."""
    with pytest.raises(ProtocolError) as info:
        check_room(room)
    assert info.value.code == Code.ROOM_INVALID


# ---------------------------------------------------------------------------- grants


def test_grant_round_trips() -> None:
    """grant_payload plus '.mac' parses back into its six parts."""
    data = (grant_payload("dev", "00000000deadbeef", "s1", 1700000000, "n0") + ".mac").encode()
    assert parse_grant(data) == ("dev", "00000000deadbeef", "s1", 1700000000, "n0", "mac")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"dev.e.s.1.n",
        b"dev.e.s.1.n.m.x",
        b"dev.e.s.soon.n.m",
        b"dev.e.s.-1.n.m",
        b"Dev.e.s.1.n.m",
        b"d\xc3\xa9v.e.s.1.n.m",
        b"dev.e.s." + b"9" * 5000 + b".n.m",
    ],
    ids=short,
)
def test_malformed_grant_is_none(data: bytes) -> None:
    """Wrong part count, non-numeric or absurdly long expiry, bad room or non-ASCII -> None."""
    assert parse_grant(data) is None


# ---------------------------------------------------------------------------- malformed replies


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"OK", LABEL],
        [b"OK", LABEL, b"{}", b""],
        [b"OK", LABEL, b"[]"],
        [b"OK", LABEL, b"x"],
        [b"\xff", LABEL, b"{}"],
        [b"OK", LABEL, b"\xff"],
        [b"OK", LABEL, b"[" * 5000],
    ],
    ids=short,
)
def test_malformed_response_is_refused(frames: list[bytes]) -> None:
    """Replies that are not three frames with an ASCII kind and a JSON object raise BAD_REQUEST."""
    with pytest.raises(ProtocolError) as info:
        decode_response(frames)
    assert info.value.code == Code.BAD_REQUEST


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"t"],
        [b"t", b"[]", b""],
        [b"t", b"{}"],
        [b"t", b"[1]"],
        [b"t", b"[{}, 2]"],
        [b"t", b"\xff"],
        [b"t", b""],
        [b"t", b"[" * 5000],
    ],
    ids=short,
)
def test_malformed_batch_is_refused(frames: list[bytes]) -> None:
    """Batches that are not two frames with a JSON array of objects raise BAD_REQUEST."""
    with pytest.raises(ProtocolError) as info:
        decode_batch(frames)
    assert info.value.code == Code.BAD_REQUEST


# ---------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=300, deadline=None)

# Any character, lone surrogates included: json.dumps escapes them, the decoder must cope.
any_text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=20)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    any_text,
    st.sampled_from(["dev", "alice", "", "x" * (MAX_TEXT + 1)]),
)
json_values = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=3),
    st.dictionaries(any_text, json_scalars, max_size=3),
)
FIELDS = [
    "version",
    "nick",
    "bot",
    "resume",
    "room",
    "msgs",
    "relay",
    "to",
    "text",
    "id",
    "action",
    "limit",
    "since",
    "after",
    "before",
    "reason",
    "privates_since",
]
say_item = st.one_of(
    st.dictionaries(st.sampled_from(["id", "text", "action"]), json_scalars, max_size=3),
    json_scalars,
)
bodies = st.one_of(
    json_values,
    st.tuples(
        st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5),
        st.sampled_from([1, 2, True, 1.0, "1", None]),
        st.one_of(st.none(), st.lists(say_item, max_size=3)),
    ).map(lambda t: {**t[0], "version": t[1], **({"msgs": t[2]} if t[2] is not None else {})}),
)
# Arbitrary frames, plus deeply nested JSON (the json module recurses on nesting).
deep_json = st.integers(min_value=0, max_value=3000).map(lambda n: b"[" * n + b"{" + b"]" * n)
frames_lists = st.lists(st.one_of(st.binary(max_size=64), deep_json), max_size=5)


def assert_wire_safe(obj: Any) -> None:
    """Whatever a decoder accepts must encode back to UTF-8 JSON (the broker echoes it)."""
    assert isinstance(json.loads(dumps(obj)), (dict, list))


@FUZZ
@given(frames_lists)
def test_fuzz_decode_request_raw_frames(frames: list[bytes]) -> None:
    """decode_request on arbitrary frames gives a Request or raises ProtocolError, nothing else."""
    try:
        req = decode_request(frames)
    except ProtocolError as err:
        assert isinstance(err.code, Code)
    else:
        assert isinstance(req, Request)


@FUZZ
@given(st.sampled_from(list(Kind)), st.binary(min_size=1, max_size=MAX_LABEL), bodies)
def test_fuzz_decode_request_json_bodies(kind: Kind, label: bytes, body: Any) -> None:
    """Random JSON bodies for every Kind are accepted (and then re-encodable) or refused with
    ProtocolError, never another exception."""
    try:
        req = decode_request(raw(kind, body, label))
    except ProtocolError as err:
        assert isinstance(err.code, Code)
    else:
        assert (req.kind, req.label) == (kind, label)
        assert_wire_safe(req.body)


@FUZZ
@given(
    st.one_of(
        frames_lists,
        st.tuples(
            st.sampled_from([r.value.encode() for r in Reply]), st.binary(max_size=8), bodies
        ).map(lambda t: [t[0], t[1], json.dumps(t[2]).encode()]),
    )
)
def test_fuzz_decode_response(frames: list[bytes]) -> None:
    """decode_response on arbitrary frames returns a Response or raises ProtocolError."""
    try:
        resp = decode_response(frames)
    except ProtocolError as err:
        assert err.code == Code.BAD_REQUEST
    else:
        assert isinstance(resp, Response) and isinstance(resp.body, dict)


@FUZZ
@given(
    st.one_of(
        frames_lists,
        st.tuples(st.binary(max_size=24), st.lists(json_values, max_size=4)).map(
            lambda t: [t[0], json.dumps(t[1]).encode()]
        ),
    )
)
def test_fuzz_decode_batch(frames: list[bytes]) -> None:
    """decode_batch on arbitrary frames returns a list of dicts or raises ProtocolError."""
    try:
        events = decode_batch(frames)
    except ProtocolError as err:
        assert err.code == Code.BAD_REQUEST
    else:
        assert isinstance(events, list) and all(isinstance(e, dict) for e in events)


grant_parts = st.one_of(
    st.text(st.sampled_from("abc09-_.Z é"), max_size=12),
    st.integers(min_value=-5, max_value=10**30).map(str),
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=80),
        st.lists(grant_parts, min_size=4, max_size=8).map(
            lambda parts: ".".join(parts).encode("utf-8")
        ),
    )
)
def test_fuzz_parse_grant(data: bytes) -> None:
    """parse_grant on arbitrary bytes returns None or a well-typed six-tuple, never raises."""
    result = parse_grant(data)
    if result is not None:
        room, epoch, sid, expiry, nonce, mac = result
        assert check_room(room) == room
        assert isinstance(expiry, int) and expiry >= 0
        assert all(isinstance(p, str) for p in (epoch, sid, nonce, mac))


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    room=st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,31}\Z"),
    seq=st.integers(1, 2**53),
    ts=st.floats(0, 4e9),
    nick=_text,
    kind=st.sampled_from(list(EventKind)),
    text=_text,
    cmid=st.none() | _text,
    extra=st.dictionaries(
        st.sampled_from(["bot", "why", "reason", "hops", "relay"]),
        st.booleans() | st.integers(0, 9) | _text,
        max_size=3,
    ),
)
def test_encode_event_writes_what_dumps_writes(room, seq, ts, nick, kind, text, cmid, extra):
    """The broker's direct event encoder gives the bytes of the general JSON encoding, so a
    receiver decodes the same event whichever wrote it."""
    event = {
        "room": room,
        "seq": seq,
        "id": f"{room}:{seq}",
        "ts": ts,
        "nick": nick,
        "kind": str(kind),
        "text": text,
    }
    if cmid is not None:
        event["cmid"] = cmid
    event.update(extra)
    assert encode_event(room, seq, ts, nick, kind, text, cmid, extra) == dumps(event)


# ---------------------------------------------------------------------------- accounts (issue 21)


@pytest.mark.parametrize(
    ("text", "nick", "named"),
    [
        ("alice: the build is red", "alice", True),
        ("thanks ALICE!", "alice", True),
        ("@Alice, look", "alice", True),
        ("аlice (a Cyrillic a)", "alice", True),  # folded as nicks are
        ("alicea is not her", "alice", False),
        ("alice_ neither", "alice", False),
        ("malice", "alice", False),
        ("bob[m] and bob", "bob[m]", True),
        ("", "alice", False),
        ("alice", "", False),
    ],
)
def test_a_mention_is_the_nick_as_a_word_folded_like_nicks(text, nick, named) -> None:
    """mentions() finds a nick as a whole word, whatever its case or look-alike letters."""
    assert mentions(text, nick) is named


@pytest.mark.parametrize(
    ("kind", "body", "code"),
    [
        (Kind.REGISTER, {**KEYS, "iterations": 1000}, Code.BAD_REQUEST),
        (Kind.REGISTER, {**KEYS, "iterations": True}, Code.BAD_REQUEST),
        (Kind.REGISTER, {**KEYS, "iterations": 4096, "salt": "c2FsdA=="}, Code.BAD_REQUEST),
        (
            Kind.REGISTER,
            {**KEYS, "iterations": 4096, "stored_key": "not base64!"},
            Code.BAD_REQUEST,
        ),
        (Kind.AUTH, {"account": "9lives", "first": "n,,n=x,r=y"}, Code.NICK_INVALID),
        (Kind.AUTH, {"account": "ann", "first": "x" * 600}, Code.TOO_LARGE),
        (Kind.MARK, {"room": "dev"}, Code.BAD_REQUEST),
        (Kind.MARK, {"room": "dev", "seq": 1, "with": "bob", "ts": 1.0}, Code.BAD_REQUEST),
        (Kind.MARK, {"with": "bob"}, Code.BAD_REQUEST),
        (Kind.UNREAD, {"room": "Bad Room"}, Code.ROOM_INVALID),
    ],
)
def test_account_requests_are_checked(kind, body, code) -> None:
    """Malformed account requests are refused with a stable code before the broker acts."""
    err = refused(encode_request(kind, b"1", body))
    assert err.code == code
