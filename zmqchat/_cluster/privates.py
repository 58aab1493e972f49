"""Private messages on the bridge's side: one stream for all of them, each message a stream
message of its own on a subject that names its two parties (hashed), so that a resuming
client's missed ones and a conversation's history are read by subject."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from zmqchat._cluster.names import Failure

logger = logging.getLogger("zmqchat.cluster")

READ_BATCH: Final = 500  # messages per direct-get request
LEADER_WAIT: Final = 0.5  # seconds the leader may take to answer (a resume waits for it)
LEADER_BUDGET: Final = 1.0  # seconds of reading what the replicas lacked, one at a time
NOT_FOUND: Final = 404
AGAIN_AFTER: Final = 0.05  # seconds before a duplicate of one in flight is asked about again


class Host(Protocol):
    """What private messages use of the bridge."""

    nc: Any
    ns: str

    def spawn(self, coro: Awaitable[Any]) -> None: ...

    def reply_to(self, handler: Callable[[Any], None]) -> tuple[str, str]: ...

    def forget_reply(self, reply_id: str) -> None: ...

    def done(self, call: bytes, value: Any) -> None: ...

    def done_list(self, call: bytes, items: list[bytes]) -> None: ...

    def fail(self, call: bytes, failure: Failure, reason: str) -> None: ...

    async def direct(self, stream: str, request: dict[str, Any]) -> list[Any]: ...


class Private:
    """A private message being stored: answered by its seq, or failed at its deadline."""

    __slots__ = ("call", "subject", "payload", "headers", "deadline", "reply_id", "done")

    def __init__(self, call: bytes, subject: str, payload: bytes, msgid: str, deadline: float):
        self.call, self.subject, self.payload, self.deadline = call, subject, payload, deadline
        self.headers = {"Nats-Msg-Id": msgid}
        self.reply_id = ""
        self.done = False


class Privates:
    """PRIV and PRIVREAD, and the deadlines of what is being stored."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.storing: set[Private] = set()

    async def store(self, frames: list[bytes]) -> None:
        """PRIV id subject-hashes msgid data: keep a private message."""
        call, hashes, msgid, data = frames[1], frames[2].decode(), frames[3].decode(), frames[4]
        subject = f"{self.host.ns}.priv.{hashes}"
        private = Private(call, subject, data, msgid, time.monotonic() + 2.0)
        self.storing.add(private)
        await self._publish(private)

    async def _publish(self, private: Private) -> None:
        if private.done:
            return
        if private.reply_id:
            self.host.forget_reply(private.reply_id)
        private.reply_id, inbox = self.host.reply_to(lambda msg: self._answered(private, msg))
        try:
            await self.host.nc.publish(
                private.subject, private.payload, reply=inbox, headers=private.headers
            )
        except Exception as exc:  # noqa: BLE001 - the connection's buffer is full
            self._finish(private, f"the cluster did not store it: {exc}")

    def _answered(self, private: Private, msg: Any) -> None:
        try:
            answer = json.loads(msg.data) if msg.data else {}
        except ValueError:
            answer = {}
        if "error" in answer or "seq" not in answer:  # (an error's answer has "seq": 0 too)
            error = (answer.get("error") or {}).get("description") or "no stream answered"
            self._finish(private, f"the cluster did not store it: {error}")
            return
        if answer["seq"] == 0:  # a duplicate of one in flight: ask again for its number
            asyncio.get_running_loop().call_later(
                AGAIN_AFTER, lambda: self.host.spawn(self._publish(private))
            )
            return
        self._finish(private, None, answer["seq"])

    def _finish(self, private: Private, error: str | None, seq: int = 0) -> None:
        if private.done:
            return
        private.done = True
        self.storing.discard(private)
        self.host.forget_reply(private.reply_id)
        if error is None:
            self.host.done(private.call, [seq])
        else:
            self.host.fail(private.call, Failure.UNAVAILABLE, error)

    def expire(self, now: float) -> None:
        for private in [p for p in self.storing if p.deadline < now]:
            self._finish(private, "the cluster did not store it: no answer in time")

    async def read(self, frames: list[bytes]) -> None:
        """PRIVREAD id filter since limit: the latest private messages whose subject matches
        N.priv.<filter> (wildcards allowed), at or after since."""
        call, pattern = frames[1], frames[2].decode()
        since, limit = float(frames[3]), int(frames[4])
        self.host.spawn(self._reading(call, pattern, since, limit))

    async def _reading(self, call: bytes, pattern: str, since: float, limit: int) -> None:
        stream, subject = f"{self.host.ns}-privates", f"{self.host.ns}.priv.{pattern}"
        start = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))
            + f".{int((since % 1) * 1e9):09d}Z"
        )
        request: dict[str, Any] = {
            "start_time": start,
            "next_by_subj": subject,
            "batch": READ_BATCH,
        }
        out: list[bytes] = []
        try:
            last = 0  # the stream sequence of the latest one read
            while True:
                got = await self.host.direct(stream, request)
                out = (out + [msg.data for msg in got])[-limit:]
                last = int(got[-1].headers["Nats-Sequence"]) if got else last
                if len(got) < READ_BATCH:
                    break
                request = {"seq": last + 1, "next_by_subj": subject, "batch": READ_BATCH}
        except Exception as exc:  # noqa: BLE001
            self.host.fail(call, Failure.UNAVAILABLE, f"private messages not read: {exc}")
            return
        # any replica answers a direct get, and one behind the leader (a node just started
        # or woken) lacks the latest: whatever follows, from the leader
        # (one message a request: a walk that takes longer than LEADER_BUDGET stops there)
        after: dict[str, Any] = {"seq": last + 1} if last else {"start_time": start}
        until = time.monotonic() + LEADER_BUDGET
        try:
            while found := await self._leader_next(stream, {**after, "next_by_subj": subject}):
                out = (out + [found[1]])[-limit:]
                after = {"seq": found[0] + 1}
                if time.monotonic() > until:
                    raise TimeoutError(f"more than {LEADER_BUDGET:g} s")
        except Exception as exc:  # noqa: BLE001 - no leader now (one being elected): as read
            logger.info("private messages read without the stream's leader: %r", exc)
        self.host.done_list(call, out)

    async def _leader_next(self, stream: str, request: dict[str, Any]) -> tuple[int, bytes] | None:
        """The stream leader's first message that the request names (its sequence and
        data); None if there is none."""
        answer = await self.host.nc.request(
            f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps(request).encode(), timeout=LEADER_WAIT
        )
        body = json.loads(answer.data)
        error = body.get("error")
        if error is not None:
            if error.get("code") == NOT_FOUND:
                return None
            raise OSError(error.get("description", "the stream's leader did not answer"))
        message = body["message"]
        return int(message["seq"]), base64.b64decode(message.get("data") or "")
