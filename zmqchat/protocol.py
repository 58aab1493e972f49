"""The chat wire protocol, version 1: message types, encode/decode, validation, limits.

No I/O here and no zmq import: this module turns frames into messages and back, so it is
tested without sockets. PROTOCOL.md explains the same in prose, with a worked session.

Command socket (client DEALER -> broker ROUTER), every message is exactly three frames:
    [kind, label, body]
    kind   ASCII upper-case command name (HELLO, JOIN, SAY, ...)
    label  1..64 bytes chosen by the client; the reply repeats it
    body   a UTF-8 JSON object (fields per kind below; unknown fields are ignored)

Broker -> client on the same socket, also three frames [kind, label, body]:
    OK    label  {fields of the reply}            exactly one reply per request, or
    ERROR label  {"code": CODE, "reason": "...", "retry_after": seconds (RATE_LIMITED only)}
    push  b""    {fields}                         unsolicited: PRIVATE, GRANT, LIVE, KICKED,
                                                  SHUTDOWN, EXPIRED, and an account's
                                                  JOINED, LEFT, MARKED (label is empty)

Room socket (broker XPUB -> client XSUB), two frames [topic, batch]:
    topic  room name + 0x00 + 16 hex digits of the room's current epoch (secret, changes
           whenever someone leaves); clients never subscribe to it directly, they send the
           subscription message 0x01 + grant, and the broker approves the topic for them
    batch  a UTF-8 JSON array of one or more events of that room, in sequence order

An event (room traffic, history, private messages) is a JSON object:
    room, seq (per-room 1, 2, 3...), id (broker message id), ts (UTC seconds since the epoch),
    nick (the sender, as the broker knows it), kind (msg, action, join, leave, nick, topic,
    kick, ban, notice, private, edit, delete, deleted), text, and optional cmid (the sender's
    client message id), bot (true when a bot sent it), to (private messages), reason and why
    (leaves: part, quit, lost, kick), new (nick changes), by (kicks, bans, removals by an
    operator), note and locked (topics), relay (copied by a bridge bot), hops (length of a bot
    reply chain), ref (edit, delete: the seq of the message changed), edited (a message as
    stored after an edit: when), re and re_nick (a reply: the seq answered, and its sender).

Edits, removals, replies and search (issue 23):
    EDIT   {room, seq, text}      -> OK {room, seq, ref}: an `edit` event (its own seq, `ref`
                                     the message's) replaces your message's text everywhere
    DELETE {room, seq}            -> OK {room, seq, ref}: a `delete` event; the message's text
                                     is gone from the store (a `deleted` event in its place)
    SAY    {..., re}              a reply: each message answers the room's message `re`
    SEARCH {query, room?, limit?} -> OK {query, room, results: [event + marks], more}
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import msgspec

VERSION: Final = 1
VERSIONS: Final = (1,)

# Limits, with the reason for each number.
MAX_TEXT: Final = 4000  # a long paragraph; anything longer is a paste that wants a file
MAX_FRAME: Final = 1 << 20  # the broker's MAXMSGSIZE (a file's chunk): larger never reach Python
MAX_REQUEST: Final = 96 * 1024  # whole request, all frames but a PUT's bytes: a batch of SAYs fits
MAX_LABEL: Final = 64  # enough for a counter or a UUID
MAX_BATCH: Final = 100  # messages in one SAY: bounds one request's work in the broker
MAX_HISTORY: Final = 500  # events in one HISTORY reply: keeps a reply's size reasonable
MAX_NICK: Final = 32
MAX_ROOM: Final = 32
MAX_REASON: Final = 200  # quit/kick reasons are one short line
MAX_TOPIC: Final = 300  # a room topic is a line, not a document
MAX_CMID: Final = 64  # client message ids: a UUID hex is 32
MAX_INT: Final = 2**63 - 1  # what SQLite stores: larger numbers would fail there
MAX_HOPS: Final = 16  # bot reply chains: a count carried so bots can stop loops
# Edits, removals, replies and search (issue 23)
MAX_QUERY: Final = 200  # characters in a search: a few words and phrases, never a paste
MAX_RESULTS: Final = 100  # search results in one reply: a screenful or five


class Kind(StrEnum):
    """Command kinds a client may send."""

    HELLO = "HELLO"
    JOIN = "JOIN"
    LEAVE = "LEAVE"
    SAY = "SAY"
    PRIV = "PRIV"
    ROOMS = "ROOMS"
    WHO = "WHO"
    NICK = "NICK"
    TOPIC = "TOPIC"
    HISTORY = "HISTORY"
    PING = "PING"
    BYE = "BYE"
    KICK = "KICK"
    BAN = "BAN"
    UNBAN = "UNBAN"
    # accounts and catching up (issue 21): see "Accounts" below
    AUTH = "AUTH"
    REGISTER = "REGISTER"
    PASSWORD = "PASSWORD"
    MARK = "MARK"
    UNREAD = "UNREAD"
    # Edits, removals and search (issue 23); a reply is a SAY with `re`
    EDIT = "EDIT"
    DELETE = "DELETE"
    SEARCH = "SEARCH"
    # files (issue 24): see "Files" below
    UPLOAD = "UPLOAD"
    PUT = "PUT"
    GET = "GET"
    FILES = "FILES"
    FILE = "FILE"
    RMFILE = "RMFILE"


class Reply(StrEnum):
    """Kinds the broker sends on the command socket."""

    OK = "OK"
    ERROR = "ERROR"
    PRIVATE = "PRIVATE"  # a private message for you: {"event": {...}}
    GRANT = "GRANT"  # a room's topic changed: {"room", "grant"}; subscribe with it
    LIVE = "LIVE"  # your subscription to room is live from seq on: {"room", "seq"}
    KICKED = "KICKED"  # you were removed from a room: {"room", "by", "reason"}
    SHUTDOWN = "SHUTDOWN"  # the broker is stopping: {"reason"}
    EXPIRED = "EXPIRED"  # the broker does not know you (any more): say HELLO again
    # An account on several devices at once (issue 21): what one of its sessions did, told
    # to the others (a private message it sent comes to them as PRIVATE).
    JOINED = "JOINED"  # your account joined a room: {"room"}; JOIN it too (no notice)
    LEFT = "LEFT"  # your account left a room: {"room"}; you are out of it already
    MARKED = "MARKED"  # your account read up to: {"room", "seq"} or {"with", "ts"}


class Code(StrEnum):
    """Stable error codes."""

    BAD_REQUEST = "BAD_REQUEST"
    BAD_VERSION = "BAD_VERSION"
    UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
    NO_HELLO = "NO_HELLO"
    ALREADY_HELLO = "ALREADY_HELLO"
    NICK_INVALID = "NICK_INVALID"
    NICK_TAKEN = "NICK_TAKEN"
    NO_SUCH_NICK = "NO_SUCH_NICK"
    ROOM_INVALID = "ROOM_INVALID"
    ROOM_UNKNOWN = "ROOM_UNKNOWN"
    NOT_MEMBER = "NOT_MEMBER"
    NOT_OPERATOR = "NOT_OPERATOR"
    BANNED = "BANNED"
    NOT_ALLOWED = "NOT_ALLOWED"  # the session cannot prove who it is (private history)
    TOO_LARGE = "TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"  # the shared state (a cluster) did not answer: retry
    # files (issue 24)
    NO_SUCH_FILE = "NO_SUCH_FILE"  # unknown, or not yours to download (the same answer)
    FILE_REMOVED = "FILE_REMOVED"  # an operator removed it
    BAD_OFFSET = "BAD_OFFSET"  # a chunk not where the upload is: resume at `offset`
    BAD_DIGEST = "BAD_DIGEST"  # the bytes uploaded do not have the SHA-256 announced
    QUOTA = "QUOTA"  # a sender's bytes per day are used up
    NO_SPACE = "NO_SPACE"  # the broker keeps its free disk space
    INTERNAL = "INTERNAL"
    # accounts (issue 21)
    AUTH_REQUIRED = "AUTH_REQUIRED"  # the nick is a registered account: log in
    AUTH_FAILED = "AUTH_FAILED"  # wrong password (or no AUTH exchange under way)
    NO_ACCOUNT = "NO_ACCOUNT"  # AUTH for a nick that is not registered
    ACCOUNTS_ONLY = "ACCOUNTS_ONLY"  # the broker admits registered accounts only
    # Edits, removals, replies (issue 23)
    NO_SUCH_MESSAGE = "NO_SUCH_MESSAGE"  # no message at that seq (or it was deleted)
    NOT_AUTHOR = "NOT_AUTHOR"  # someone else's message: only operators may remove it


class ProtocolError(Exception):
    """A request the broker refuses; becomes an ERROR reply with this code and reason."""

    def __init__(self, code: Code, reason: str, **extra: Any) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.extra = extra


# ---------------------------------------------------------------------------- names

NICK_PUNCT: Final = "_-[]{}|^"
ROOM_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")

# Letters from other scripts that look like Latin ones: folded before nicks are compared,
# so that a Cyrillic 'а' cannot pose as a Latin 'a'. (Lower-case forms; casefold runs first.)
_CONFUSABLES: Final = str.maketrans(
    {
        "а": "a",
        "в": "b",
        "е": "e",
        "к": "k",
        "м": "m",
        "н": "h",
        "о": "o",
        "р": "p",
        "с": "c",
        "т": "t",
        "у": "y",
        "х": "x",
        "ѕ": "s",
        "і": "i",
        "ј": "j",
        "ԁ": "d",
        "ԛ": "q",
        "ԝ": "w",
        "ӏ": "l",
        "һ": "h",
        "ɡ": "g",
        "α": "a",
        "β": "b",
        "ε": "e",
        "ι": "i",
        "κ": "k",
        "ν": "v",
        "ο": "o",
        "ρ": "p",
        "τ": "t",
        "υ": "u",
        "χ": "x",
        "ϲ": "c",
        "η": "n",
        "μ": "u",
    }
)


def check_nick(nick: object) -> str:
    """Return the nick, NFC-normalised, or raise NICK_INVALID with the reason."""
    if not isinstance(nick, str) or not nick:
        raise ProtocolError(Code.NICK_INVALID, "a nickname is 1 to 32 characters")
    nick = unicodedata.normalize("NFKC", nick)
    if len(nick) > MAX_NICK:
        raise ProtocolError(Code.NICK_INVALID, f"nickname is longer than {MAX_NICK} characters")
    for ch in nick:
        if not (ch.isalpha() or ch.isdigit() or ch in NICK_PUNCT):
            raise ProtocolError(
                Code.NICK_INVALID, f"nickname may hold letters, digits and {NICK_PUNCT}, not {ch!r}"
            )
    if nick[0].isdigit() or nick[0] == "-":
        raise ProtocolError(Code.NICK_INVALID, "nickname may not start with a digit or '-'")
    scripts = {_script(ch) for ch in nick if ch.isalpha()} - {"COMMON"}
    if len(scripts) > 1:
        raise ProtocolError(Code.NICK_INVALID, "nickname mixes letters of different scripts")
    return nick


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    for script in ("LATIN", "CYRILLIC", "GREEK"):
        if name.startswith(script):
            return script
    return name.split(" ")[0] if name else "COMMON"


def nick_key(nick: str) -> str:
    """The form two nicks are compared in: same key, same nick (case and look-alikes folded)."""
    folded = unicodedata.normalize("NFKC", nick).casefold().translate(_CONFUSABLES)
    return unicodedata.normalize("NFKC", folded)


def room_as_typed(text: str) -> str:
    """A room name as a person types it: `Lobby` and IRC's `#lobby` are lobby (room
    names are lowercase); what is left is checked by check_room."""
    return text.strip().removeprefix("#").lower()


def check_room(room: Any) -> str:
    """Return the room name or raise ROOM_INVALID."""
    if not isinstance(room, str) or not ROOM_RE.match(room):
        raise ProtocolError(
            Code.ROOM_INVALID,
            "a room name is 1 to 32 of a-z, 0-9, '_' and '-', starting with a letter or digit",
        )
    return room


def room_topic(room: str, epoch: str) -> bytes:
    """A room's publisher topic in one epoch; 0x00 ends the name so no room prefixes another."""
    return room.encode() + b"\x00" + epoch.encode()


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded command: its kind, label and validated body."""

    kind: Kind
    label: bytes
    body: dict[str, Any] = field(default_factory=dict)


def _text(
    body: dict[str, Any], key: str, limit: int, *, required: bool = True, allow_empty: bool = False
) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ProtocolError(Code.BAD_REQUEST, f"field {key!r} must be a string")
    if not value and not allow_empty:
        raise ProtocolError(Code.BAD_REQUEST, f"field {key!r} must not be empty")
    try:  # a lone surrogate ("\ud800") would break every later encode (ASCII: O(1) check)
        value.isascii() or value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(Code.BAD_REQUEST, f"field {key!r} is not valid Unicode") from None
    if len(value) > limit:
        raise ProtocolError(Code.TOO_LARGE, f"field {key!r} is longer than {limit} characters")
    return value


def _int(body: dict[str, Any], key: str, *, required: bool = False, low: int = 0) -> int | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_INT:
        raise ProtocolError(
            Code.BAD_REQUEST, f"field {key!r} must be an integer from {low} to {MAX_INT}"
        )
    return value


def _say_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    items = body.get("msgs")
    if not isinstance(items, list) or not items:
        raise ProtocolError(Code.BAD_REQUEST, "field 'msgs' must be a non-empty list")
    if len(items) > MAX_BATCH:
        raise ProtocolError(Code.TOO_LARGE, f"at most {MAX_BATCH} messages in one SAY")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(Code.BAD_REQUEST, "each message must be an object")
        text = _text(item, "text", MAX_TEXT)
        cmid = _text(item, "id", MAX_CMID)
        out.append({"id": cmid, "text": text, "action": item.get("action") is True})
    return out


def _seconds(b: dict[str, Any], name: str) -> float | None:
    """An optional duration: a number of seconds, 0 or more."""
    value = b.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e12:
        raise ProtocolError(
            Code.BAD_REQUEST, f"field {name!r} must be a number of seconds, 0 or more"
        )
    return float(value)


def _time(b: dict[str, Any], name: str) -> float | None:
    """An optional time (UTC seconds) as a float: SQLite takes any float, and no integer too
    large for one gets through."""
    value = b.get(name)
    if value is None:
        return None
    try:
        value = float(value) if not isinstance(value, (bool, str)) else math.nan
    except (TypeError, OverflowError):
        value = math.nan
    if not math.isfinite(value):
        raise ProtocolError(Code.BAD_REQUEST, f"field '{name}' must be a number (UTC seconds)")
    return value


# One validator per kind: checks the body and returns the fields the broker may rely on.
def _v_hello(b: dict[str, Any]) -> dict[str, Any]:
    version = b.get("version")
    if type(version) is not int or version not in VERSIONS:  # true == 1.0 == 1 in Python
        raise ProtocolError(
            Code.BAD_VERSION,
            f"protocol version {version!r} is not spoken here; "
            f"versions: {', '.join(map(str, VERSIONS))}",
            versions=list(VERSIONS),
        )
    return {
        "nick": check_nick(b.get("nick")),
        "bot": b.get("bot") is True,
        "resume": b.get("resume") is True,
        "token": _text(b, "token", MAX_CMID, required=False) or "",
        "privates_since": _time(b, "privates_since"),
        "proof": _text(b, "proof", MAX_SCRAM, required=False),  # accounts: SCRAM's last word
    }


def _v_join(b: dict[str, Any]) -> dict[str, Any]:
    return {
        "room": check_room(b.get("room")),
        "resume": b.get("resume") is True,
        "follow": b.get("follow") is True,  # after JOINED: only while the account is in it
    }


def _v_room(b: dict[str, Any]) -> dict[str, Any]:
    return {"room": check_room(b.get("room"))}


def _v_say(b: dict[str, Any]) -> dict[str, Any]:
    hops = _int(b, "hops")
    return {
        "room": check_room(b.get("room")),
        "msgs": _say_items(b),
        "relay": _text(b, "relay", MAX_NICK + MAX_ROOM + 1, required=False),
        "hops": min(hops, MAX_HOPS) if hops is not None else None,
        "re": _int(b, "re", low=1),  # a reply to the room's message with this seq (issue 23)
        "heard": _int(b, "heard"),  # the room's seq the sender had when it first sent them
    }


def _v_priv(b: dict[str, Any]) -> dict[str, Any]:
    hops = _int(b, "hops")
    return {
        "to": check_nick(b.get("to")),
        "text": _text(b, "text", MAX_TEXT),
        "id": _text(b, "id", MAX_CMID),
        "hops": min(hops, MAX_HOPS) if hops is not None else None,
        "retry": _seconds(b, "retry"),  # sent this long ago before, and its answer was lost
    }


def _v_none(b: dict[str, Any]) -> dict[str, Any]:
    return {}


def _v_who(b: dict[str, Any]) -> dict[str, Any]:
    return {"room": check_room(b["room"]) if b.get("room") is not None else None}


def _v_nick(b: dict[str, Any]) -> dict[str, Any]:
    return {"nick": check_nick(b.get("nick"))}


def _v_topic(b: dict[str, Any]) -> dict[str, Any]:
    lock = b.get("lock")
    if lock is not None and not isinstance(lock, bool):
        raise ProtocolError(Code.BAD_REQUEST, "field 'lock' must be true or false")
    return {
        "room": check_room(b.get("room")),
        "text": _text(b, "text", MAX_TOPIC, required=False, allow_empty=True),
        "lock": lock,
    }


def _v_history(b: dict[str, Any]) -> dict[str, Any]:
    limit = _int(b, "limit", low=1)
    peer = b.get("with")
    if peer is not None and b.get("room") is not None:
        raise ProtocolError(Code.BAD_REQUEST, "HISTORY takes a 'room' or a 'with', not both")
    return {
        "room": check_room(b.get("room")) if peer is None else None,
        "with": check_nick(peer) if peer is not None else None,
        "after": _int(b, "after"),
        "before": _int(b, "before"),
        "since": _time(b, "since"),
        "limit": min(limit or 50, MAX_HISTORY),
    }


def _v_bye(b: dict[str, Any]) -> dict[str, Any]:
    return {"reason": _text(b, "reason", MAX_REASON, required=False, allow_empty=True)}


def _v_mod(b: dict[str, Any]) -> dict[str, Any]:
    return {
        "room": check_room(b.get("room")),
        "nick": check_nick(b.get("nick")),
        "reason": _text(b, "reason", MAX_REASON, required=False, allow_empty=True),
    }


# ---------------------------------------------------------------- edits, removals, search
# (issue 23)


def _v_edit(b: dict[str, Any]) -> dict[str, Any]:
    return {
        "room": check_room(b.get("room")),
        "seq": _int(b, "seq", required=True, low=1),
        "text": _text(b, "text", MAX_TEXT),
    }


def _v_delete(b: dict[str, Any]) -> dict[str, Any]:
    return {"room": check_room(b.get("room")), "seq": _int(b, "seq", required=True, low=1)}


def _v_search(b: dict[str, Any]) -> dict[str, Any]:
    limit = _int(b, "limit", low=1)
    return {
        "query": _text(b, "query", MAX_QUERY),
        "room": check_room(b["room"]) if b.get("room") is not None else None,
        "limit": min(limit or 20, MAX_RESULTS),
    }


# ---------------------------------------------------------------------------- files (issue 24)
# A file's bytes never go to a room's publisher: they go over the command socket in chunks,
# each request answered once (zguide's credit-based transfer: at most WINDOW unanswered).
# 1 MiB: the per-request work of the broker and the client (a poll, a JSON body, a future)
# is paid once per MiB, not per 64 KiB (10 times the rate on localhost); 8 in flight fill a
# LAN and keep a transfer's memory at 8 MiB on each side. The broker's MAXMSGSIZE.
CHUNK: Final = MAX_FRAME  # bytes per PUT or GET at most (the first brokers took 65536)
WINDOW: Final = 8  # chunks a client may have unanswered per transfer
MAX_FILE_NAME: Final = 120  # characters of a saved name: any file system takes it
MAX_SIZE: Final = 1 << 40  # what the protocol can announce (1 TiB); brokers set their own cap
FILE_ID_RE: Final = re.compile(r"[0-9a-f]{8,16}\Z")
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}\Z")
UPLOAD_RE: Final = re.compile(r"[0-9a-f]{32}\Z")


def safe_name(name: str) -> str:
    """A file name that is safe to save anywhere: its last path part, no control characters,
    not hidden, not `..`, at most MAX_FILE_NAME characters (the extension kept)."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(
        "_" if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") else ch for ch in name
    )
    name = name.strip().lstrip(".").rstrip(". ").strip()
    if not name:
        return "file"
    if len(name) > MAX_FILE_NAME:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:16] if dot and stem else ""
        name = name[: MAX_FILE_NAME - len(ext) - (1 if ext else 0)].rstrip(". ")
        name = f"{name}.{ext}" if ext else name
    return name


def size_text(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024, as file managers on a LAN show them)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # unreachable


def _match(b: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = b.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError(Code.BAD_REQUEST, f"field {key!r} must be {what}")
    return value


def _file_id(b: dict[str, Any]) -> str:
    return _match(b, "file", FILE_ID_RE, "a file id (8 to 16 of 0-9a-f)")


def _v_upload(b: dict[str, Any]) -> dict[str, Any]:
    room, to = b.get("room"), b.get("to")
    if (room is None) == (to is None):
        raise ProtocolError(Code.BAD_REQUEST, "UPLOAD takes a 'room' or a 'to', one of them")
    size = _int(b, "size", required=True) or 0
    if size > MAX_SIZE:
        raise ProtocolError(Code.TOO_LARGE, f"a file is at most {MAX_SIZE} bytes")
    return {
        "id": _match(b, "id", UPLOAD_RE, "32 of 0-9a-f (the upload's own id)"),
        "room": check_room(room) if room is not None else None,
        "to": check_nick(to) if to is not None else None,
        "name": safe_name(_text(b, "name", 1000) or ""),
        "size": size,
        "sha256": _match(b, "sha256", SHA256_RE, "a SHA-256 in 64 of 0-9a-f"),
    }


def _v_put(b: dict[str, Any]) -> dict[str, Any]:
    return {
        "upload": _match(b, "upload", UPLOAD_RE, "the upload named by UPLOAD's reply"),
        "offset": _int(b, "offset", required=True),
    }


def _v_get(b: dict[str, Any]) -> dict[str, Any]:
    size = _int(b, "size", low=1) or CHUNK
    return {"file": _file_id(b), "offset": _int(b, "offset", required=True), "size": size}


def _v_file(b: dict[str, Any]) -> dict[str, Any]:
    return {"file": _file_id(b)}


def _v_files(b: dict[str, Any]) -> dict[str, Any]:
    peer = b.get("with")
    if (peer is None) == (b.get("room") is None):
        raise ProtocolError(Code.BAD_REQUEST, "FILES takes a 'room' or a 'with', one of them")
    return {
        "room": check_room(b.get("room")) if peer is None else None,
        "with": check_nick(peer) if peer is not None else None,
    }


VALIDATORS: Final[dict[Kind, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    Kind.HELLO: _v_hello,
    Kind.JOIN: _v_join,
    Kind.LEAVE: _v_room,
    Kind.SAY: _v_say,
    Kind.PRIV: _v_priv,
    Kind.ROOMS: _v_none,
    Kind.WHO: _v_who,
    Kind.NICK: _v_nick,
    Kind.TOPIC: _v_topic,
    Kind.HISTORY: _v_history,
    Kind.PING: _v_none,
    Kind.BYE: _v_bye,
    Kind.KICK: _v_mod,
    Kind.BAN: _v_mod,
    Kind.UNBAN: _v_mod,
    Kind.EDIT: _v_edit,
    Kind.DELETE: _v_delete,
    Kind.SEARCH: _v_search,
    Kind.UPLOAD: _v_upload,
    Kind.PUT: _v_put,
    Kind.GET: _v_get,
    Kind.FILES: _v_files,
    Kind.FILE: _v_file,
    Kind.RMFILE: _v_file,
}


# ---------------------------------------------------------------------------- accounts
# Accounts and catching up (issue 21). A registered nick is an account's name; logging in is
# SCRAM-SHA-256 (RFC 5802/7677): AUTH carries the client's first message and gets the
# broker's, HELLO carries the client's proof (`proof`) and its welcome the broker's own
# (`verify`). REGISTER and PASSWORD send SCRAM's salted keys, never a password. MARK keeps
# how far an account has read a room (a seq) or a private conversation (a time); UNREAD
# counts what is after the marks. An account may be logged in on several devices at once:
# each is a session under the account's nick, and what one of them joins, leaves or marks
# the others are told (the pushes JOINED, LEFT, MARKED).

MAX_SCRAM: Final = 512  # characters in a SCRAM message: nonces, a proof and a nick fit in 200
MIN_ITERATIONS: Final = 4096  # SCRAM's iteration count, lowest (RFC 7677's minimum)...
MAX_ITERATIONS: Final = 10_000_000  # ...and highest: a login must not take a client minutes
SCRAM_KEY: Final = 32  # bytes in a SCRAM-SHA-256 stored or server key
SALT_BYTES: Final = (8, 64)  # a salt's length in bytes, at least and at most


def _b64(b: dict[str, Any], key: str, sizes: tuple[int, int]) -> bytes:
    value = b.get(key)
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or not sizes[0] <= len(raw) <= sizes[1]:
        low, high = sizes
        size = f"{low}" if low == high else f"{low} to {high}"
        raise ProtocolError(Code.BAD_REQUEST, f"field {key!r} must be {size} bytes in base64")
    return raw


def _keys(b: dict[str, Any]) -> dict[str, Any]:
    """SCRAM's salted keys of a password (REGISTER, PASSWORD), checked for shape."""
    iterations = b.get("iterations")
    if type(iterations) is not int or not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ProtocolError(
            Code.BAD_REQUEST,
            f"field 'iterations' must be an integer from {MIN_ITERATIONS} to {MAX_ITERATIONS}",
        )
    return {
        "salt": _b64(b, "salt", SALT_BYTES),
        "stored_key": _b64(b, "stored_key", (SCRAM_KEY, SCRAM_KEY)),
        "server_key": _b64(b, "server_key", (SCRAM_KEY, SCRAM_KEY)),
        "iterations": iterations,
    }


def _v_auth(b: dict[str, Any]) -> dict[str, Any]:
    return {"account": check_nick(b.get("account")), "first": _text(b, "first", MAX_SCRAM)}


def _v_password(b: dict[str, Any]) -> dict[str, Any]:
    return {"proof": _text(b, "proof", MAX_SCRAM), **_keys(b)}


def _v_mark(b: dict[str, Any]) -> dict[str, Any]:
    if (b.get("room") is None) == (b.get("with") is None):
        raise ProtocolError(Code.BAD_REQUEST, "MARK takes a 'room' (with 'seq') or a 'with'")
    if b.get("room") is not None:
        seq = _int(b, "seq", required=True)
        return {"room": check_room(b["room"]), "seq": seq, "with": None, "ts": None}
    ts = _time(b, "ts")
    if ts is None:
        raise ProtocolError(Code.BAD_REQUEST, "field 'ts' must be a number (UTC seconds)")
    return {"room": None, "seq": None, "with": check_nick(b["with"]), "ts": ts}


def _v_unread(b: dict[str, Any]) -> dict[str, Any]:
    room = b.get("room")
    return {"room": check_room(room) if room is not None else None, "after": _int(b, "after")}


def mentions(text: str, nick: str) -> bool:
    """Whether `text` names `nick` as a word: folded as nicks are compared (case and
    look-alike letters), and not inside a longer run of the characters a nick may hold."""
    return bool(nick) and names(fold(text), nick_key(nick))


def fold(text: str) -> str:
    """A text folded as nicks are (nick_key), to look for nicks in (names())."""
    return text.lower() if text.isascii() else nick_key(text)


def names(folded: str, key: str) -> bool:
    """Whether a folded text (fold()) holds the nick key `key` as a word."""
    at = folded.find(key) if key else -1
    while at >= 0:
        end = at + len(key)
        if (at == 0 or not _in_nick(folded[at - 1])) and (
            end == len(folded) or not _in_nick(folded[end])
        ):
            return True
        at = folded.find(key, at + 1)
    return False


def _in_nick(ch: str) -> bool:
    return ch.isalnum() or ch in NICK_PUNCT


VALIDATORS.update(
    {
        Kind.AUTH: _v_auth,
        Kind.REGISTER: _keys,
        Kind.PASSWORD: _v_password,
        Kind.MARK: _v_mark,
        Kind.UNREAD: _v_unread,
    }
)

_KINDS: Final = {k.value.encode(): k for k in Kind}
# A request body is plain JSON: decoded by msgspec (in C, about three times json's speed)
# into the same dicts, lists and numbers, then checked by the validators above.
_BODY: Final = msgspec.json.Decoder()


def decode_label(frames: list[bytes]) -> bytes:
    """The label of a request, as far as it can be read, so even a bad request gets its reply."""
    if len(frames) >= 2 and 0 < len(frames[1]) <= MAX_LABEL:
        return frames[1]
    return b""


def decode_request(frames: list[bytes]) -> Request:
    """Frames from a client (routing id already removed) -> Request, or ProtocolError.
    A PUT's bytes may come as any buffer (the broker takes them without a copy)."""
    data = None
    if len(frames) == 4 and frames[0] == b"PUT":  # a file chunk: [PUT, label, body, bytes]
        *frames, data = frames
    if len(frames) != 3:
        raise ProtocolError(Code.BAD_REQUEST, f"a request is 3 frames, not {len(frames)}")
    if sum(len(f) for f in frames) > MAX_REQUEST:
        raise ProtocolError(Code.TOO_LARGE, f"a request is at most {MAX_REQUEST} bytes")
    kind_b, label, body_b = frames
    if not label or len(label) > MAX_LABEL:
        raise ProtocolError(Code.BAD_REQUEST, f"the label is 1 to {MAX_LABEL} bytes")
    kind = _KINDS.get(kind_b)
    if kind is None:
        raise ProtocolError(
            Code.UNKNOWN_COMMAND,
            f"unknown command {kind_b[:32]!r}; commands: {', '.join(k.value for k in Kind)}",
        )
    try:
        body = _BODY.decode(body_b)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: deep nesting
        raise ProtocolError(Code.BAD_REQUEST, "the body must be a UTF-8 JSON object") from None
    if not isinstance(body, dict):
        raise ProtocolError(Code.BAD_REQUEST, "the body must be a JSON object")
    fields = VALIDATORS[kind](body)
    if kind is Kind.PUT:
        if data is None:
            raise ProtocolError(Code.BAD_REQUEST, "PUT carries its bytes in a fourth frame")
        if not 0 < len(data) <= CHUNK:
            raise ProtocolError(Code.TOO_LARGE, f"a chunk is 1 to {CHUNK} bytes")
        fields["data"] = data
    return Request(kind, label, fields)


def encode_request(
    kind: Kind | str, label: bytes, body: dict[str, Any], data: bytes | None = None
) -> list[bytes]:
    """Request -> the three frames a client sends (four for PUT: its bytes last)."""
    frames = [str(kind).encode("ascii"), label, dumps(body)]
    if data is not None:
        frames.append(data)
    return frames


# ---------------------------------------------------------------------------- replies


def encode_reply(kind: Reply | str, label: bytes, body: dict[str, Any]) -> list[bytes]:
    """A reply or push -> three frames (label b"" for pushes)."""
    return [str(kind).encode("ascii"), label, dumps(body)]


def encode_error(label: bytes, err: ProtocolError) -> list[bytes]:
    body = {"code": str(err.code), "reason": err.reason, **err.extra}
    return encode_reply(Reply.ERROR, label, body)


@dataclass(frozen=True, slots=True)
class Response:
    """A decoded message from the broker on the command socket."""

    kind: str
    label: bytes
    body: dict[str, Any]
    data: bytes = b""  # a GET's chunk (a fourth frame)


def decode_response(frames: list[bytes]) -> Response:
    """Broker frames -> Response; raises ProtocolError for anything malformed."""
    data = b""
    if len(frames) == 4 and frames[3]:  # an OK to GET: the chunk's bytes last
        *frames, data = frames
    if len(frames) != 3:
        raise ProtocolError(Code.BAD_REQUEST, f"a reply is 3 frames, not {len(frames)}")
    try:
        body = json.loads(frames[2])
        kind = frames[0].decode("ascii")
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deep nesting
        raise ProtocolError(Code.BAD_REQUEST, "a reply body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ProtocolError(Code.BAD_REQUEST, "a reply body must be a JSON object")
    return Response(kind, frames[1], body, data)


# ---------------------------------------------------------------------------- events


class EventKind(StrEnum):
    MSG = "msg"
    ACTION = "action"
    JOIN = "join"
    LEAVE = "leave"
    NICK = "nick"
    TOPIC = "topic"
    KICK = "kick"
    BAN = "ban"
    NOTICE = "notice"
    PRIVATE = "private"
    # Edits and removals (issue 23)
    EDIT = "edit"  # a message's new text; `ref` is the message's seq
    DELETE = "delete"  # a message was removed (`ref`); `by` the operator, if not its sender
    DELETED = "deleted"  # what is left at a removed message's (or its edits') place
    FILE = "file"  # a file offer (issue 24): file, name, size, sha256 (and to, if private)


class Why(StrEnum):
    """Why a member left a room (a leave event's `why`)."""

    PART = "part"  # /leave, or /join to another room
    QUIT = "quit"  # BYE: the client said goodbye (with an optional reason)
    LOST = "lost"  # missed its heartbeats, or its broker died and it did not come back


_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_quote: Final = json.encoder.encode_basestring  # str -> JSON string, as dumps writes it
quote: Final = _quote


def encode_event(
    room: str,
    seq: int,
    ts: float,
    nick: str,
    kind: str,
    text: str,
    cmid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """One room event as the broker publishes and stores it: the same bytes as dumps() of
    {room, seq, id, ts, nick, kind, text, [cmid], **extra}, written directly (the broker
    encodes every message once; room names and kinds need no escaping)."""
    return numbered(room, seq, encode_event_tail(ts, nick, kind, text, cmid, extra))


def encode_event_tail(
    ts: float,
    nick: str,
    kind: str,
    text: str,
    cmid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """An event without its room and number: `"ts":...,...}`. A cluster stores this and
    numbers it once its stream has given it a place (numbered())."""
    head = f'"ts":{ts!r},"nick":{_quote(nick)},"kind":"{kind}","text":{_quote(text)}'
    if cmid is not None:
        head += ',"cmid":' + _quote(cmid)
    for key, value in extra.items() if extra else ():
        if value is True or value is False:
            head += f",{_quote(key)}:{'true' if value else 'false'}"
        elif type(value) is str:
            head += f",{_quote(key)}:{_quote(value)}"
        else:
            head += f",{_quote(key)}:{_ENCODER.encode(value)}"
    return (head + "}").encode("utf-8")


def numbered(room: str, seq: int, tail: bytes) -> bytes:
    """An event tail with its room, number and broker message id in front."""
    return f'{{"room":"{room}","seq":{seq},"id":"{room}:{seq}",'.encode() + tail


def encode_batch(room: str, epoch: str, events_json: list[bytes]) -> list[bytes]:
    """Room events already encoded one by one -> the two published frames (one encode each)."""
    return [room_topic(room, epoch), b"[" + b",".join(events_json) + b"]"]


def decode_batch(frames: list[bytes]) -> list[dict[str, Any]]:
    """Published frames -> list of event dicts; raises ProtocolError when malformed."""
    if len(frames) != 2:
        raise ProtocolError(Code.BAD_REQUEST, "a room batch is 2 frames")
    try:
        events = json.loads(frames[1])
    except (ValueError, RecursionError):  # RecursionError: deep nesting
        raise ProtocolError(Code.BAD_REQUEST, "a room batch is a JSON array") from None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ProtocolError(Code.BAD_REQUEST, "a room batch is a JSON array of objects")
    return events


DELETED_TEXT: Final = "(deleted)"  # a removed message's text from then on (issue 23)


def tombstone(room: str, seq: int, ts: float) -> bytes:
    """What stays at a removed message's place (and at its edits'): a `deleted` event with
    nothing of the message but its number and time, so that a room's numbers have no gap
    and the text is gone (issue 23)."""
    return encode_event(room, seq, ts, "", EventKind.DELETED, DELETED_TEXT)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the one encoding used on the wire (one encoder, made once)."""
    return _ENCODER.encode(obj).encode("utf-8")


# ---------------------------------------------------------------------------- grants


def grant_payload(room: str, epoch: str, sid: str, expiry: int, nonce: str) -> str:
    """The signed part of a grant; '.' never occurs in its fields."""
    return f"{room}.{epoch}.{sid}.{expiry}.{nonce}"


def parse_grant(data: bytes) -> tuple[str, str, str, int, str, str] | None:
    """A subscription body -> (room, epoch, sid, expiry, nonce, mac), or None if not a grant."""
    try:
        parts = data.decode("ascii").split(".")
    except UnicodeDecodeError:
        return None
    # int() refuses more than 4300 digits with ValueError; 20 digits hold any 64-bit expiry.
    if len(parts) != 6 or not parts[3].isdigit() or len(parts[3]) > 20:
        return None
    room, epoch, sid, expiry, nonce, mac = parts
    if not ROOM_RE.match(room):
        return None
    return room, epoch, sid, int(expiry), nonce, mac
