"""Several brokers serving the same rooms: the shared state on NATS JetStream.

This is the broker-loop side of cluster mode: the room log, the registry and presence of
_core/state.py (log.py, registry.py), over a bridge task that holds the NATS connection
(bridge.py), and the other brokers' liveness (liveness.py). They keep in memory what the
broker reads often (the registry's buckets, watched; each room's latest events), so that
reads answer at once as on a single broker; changes go to the bridge as commands and
complete their Op when NATS has answered.

`Cluster` here is what the broker's loop holds: the asyncio loop it runs on in cluster mode,
the bridge task on it, the queue of its news, and those parts put together (the commands
for the bridge and the one way back into the core are calls.py's).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from zmqchat._cluster.accounts import ClusterAccounts
from zmqchat._cluster.calls import Calls, CoreLink
from zmqchat._cluster.liveness import Liveness
from zmqchat._cluster.log import ClusterLog
from zmqchat._cluster.names import Beat, Bucket, News, SeenIds, Verb
from zmqchat._cluster.registry import ClusterPresence, ClusterRegistry

if TYPE_CHECKING:
    from zmqchat._cluster.bridge import Bridge
    from zmqchat._config import Config
    from zmqchat._core.state import Listener

logger = logging.getLogger("zmqchat.cluster")

READY_WAIT: Final = 75.0  # seconds a start waits for the cluster (its SETUP_PATIENCE, and more)
REPORT_EVERY: Final = 5  # heartbeats between warnings that the cluster fails what we ask
CALL_DEADLINE: Final = 10.0  # seconds after which an unanswered command fails (a stuck bridge)
STOP_WAIT: Final = 5.0  # seconds a stop waits for the bridge to let go of NATS
ASK_WAIT: Final = 1.0  # seconds a question to another broker waits (checked every half heartbeat)
TAKEOVER_WAIT: Final = 1.5  # heartbeats a start waits for another beat of its name (a beat
# comes every half heartbeat: three chances)


def require_nats() -> None:
    """Cluster mode needs nats-py, an extra: say how to get it rather than a traceback."""
    try:
        import nats  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "nats":
            raise OSError(
                "--cluster needs NATS's Python client, which is not installed: "
                "pip install 'zmqchat[cluster]' (from a checkout: pip install '.[cluster]')"
            ) from None
        raise


def check_server(server: str) -> None:
    """OSError for what cannot be a NATS server's address (said at once, not after a
    minute of trying to reach it): nats://HOST:PORT (tls://, ws://, wss://) or HOST:PORT."""
    if any(c.isspace() for c in server):
        raise OSError(f"--cluster {server!r}: separate the NATS servers with commas")
    scheme = server.split("://", 1)[0] if "://" in server else "nats"
    if scheme not in ("nats", "tls", "ws", "wss"):
        raise OSError(f"--cluster {server}: not a NATS server's address (nats://HOST:PORT)")


class Cluster:
    """The event loop the broker runs on in cluster mode, the bridge task on it, the queues
    between them, and the commands under way."""

    def __init__(self, cfg: Config) -> None:
        require_nats()
        self.cfg = cfg
        self.servers = [s.strip() for s in (cfg.cluster_urls or "").split(",") if s.strip()]
        for server in self.servers:
            check_server(server)
        self.namespace, self.replicas = cfg.namespace, cfg.replicas
        self.rooms, self.operators, self.heartbeat = cfg.rooms, cfg.operators, cfg.heartbeat
        self.loop = asyncio.new_event_loop()
        self.inbox: deque[list[bytes]] = deque()  # news and answers from the bridge
        self.calls = Calls()
        self.core = CoreLink()
        self.name = ""
        self.seen = SeenIds()  # stored message ids: the bridge's and the room log's
        self.log = ClusterLog(self.calls, self.seen)
        self.registry = ClusterRegistry(self.calls, self.core, self.rooms, self.log.follow_room)
        self.presence = ClusterPresence(self.calls, ASK_WAIT)
        self.accounts = ClusterAccounts(self.calls, self.log.privates_of)  # issue 21
        self.registry.appliers.update(self.accounts.appliers())
        self.liveness = Liveness(self.calls, self.registry, self.core, self.heartbeat)
        self.bridge: Bridge | None = None
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None  # the loop's, while it waits
        self.handlers: dict[bytes, Callable[[list[bytes]], None]] = {
            News.EVENTS: self.log.arrived,
            News.DONE: self.calls.answered,
            News.FAIL: self.calls.answered,
            News.KEY: self._key_changed,
            News.LAST: lambda frames: self.log.start_at(frames[1].decode(), int(frames[2])),
            News.ROUTED: self._routed,
            News.PRIVS: lambda frames: self.log.index.privates(frames[1:]),  # search
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self, name: str) -> None:
        """Connect to NATS (through the bridge) and load the shared state; OSError if the
        cluster cannot be reached or will not serve."""
        from zmqchat._cluster.bridge import Bridge, BridgeConfig

        self.name = self.liveness.name = self.registry.name = self.presence.name = name
        self.bridge = Bridge(
            BridgeConfig(self.servers, self.namespace, name, list(self.rooms), self.replicas),
            self._from_bridge,
            self.seen,
        )
        self.calls.take = self.bridge.take
        self.task = self.loop.create_task(self.bridge.main())
        try:
            replicas = self.loop.run_until_complete(asyncio.wait_for(self._ready(), READY_WAIT))
        except TimeoutError:
            raise OSError(
                f"the NATS cluster at {','.join(self.servers)} did not get ready within "
                f"{READY_WAIT:g} s"
            ) from None
        logger.info("in the cluster as %s (streams with %s replicas)", name, replicas)
        another = False
        if self.liveness.beaten_by_another():  # alive, or our own last run (killed)?
            logger.warning(
                "a broker named %s beat less than %g s ago: waiting %g s for its next beat "
                "(if none comes, that was this broker's last run, and this one takes over)",
                name,
                self.liveness.limit,
                TAKEOVER_WAIT * self.heartbeat,
            )
            heard = self.liveness.waiting_for_beat()
            another = self.loop.run_until_complete(
                self._news_until(heard, TAKEOVER_WAIT * self.heartbeat)
            )
            if not another:
                logger.warning("no beat came: this broker takes over from its last run")
        self.liveness.join(another)
        self.registry.seed(self.rooms, self.operators)
        self.calls.send_pending()

    async def _ready(self) -> str:
        """The bridge's news until it says READY (its replicas) or FATAL (OSError)."""
        while True:
            while not self.inbox:
                await self.wait(1.0)
            frames = self.inbox.popleft()
            if frames[0] == News.FATAL:
                raise OSError(f"cannot use the NATS cluster: {frames[1].decode()}")
            if frames[0] == News.READY:
                return frames[1].decode()
            self._dispatch(frames)

    async def _news_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Take the bridge's news until done() or `timeout` seconds; whether done()."""
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            await self.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            self.drain()
        return done()

    def run(self, serve: Coroutine[Any, Any, None]) -> None:
        """Run the broker's loop (a coroutine) on this event loop, beside the bridge."""
        self.loop.run_until_complete(serve)

    def attach(self, core: Listener) -> None:
        self.core.core = core

    def send_pending(self) -> None:
        """The commands of this pass go to the bridge now."""
        self.calls.send_pending()

    def commands_pending(self) -> int:
        """Commands to NATS waiting for an answer (for the metrics)."""
        return len(self.calls)

    def close(self) -> None:
        """Say we stopped (our clients' sessions are for the others to settle) and let go."""
        if self.task is not None and not self.task.done():
            if self.liveness.joined and not self.liveness.replaced:  # (else the name's
                # record is another's: a live broker's, or the one that took over from us)
                self.calls.put(Bucket.BROKERS, self.name, self.liveness.record(Beat.STOPPED))
            self.calls.tell([Verb.STOP])
            self.calls.send_pending()
            try:
                self.loop.run_until_complete(asyncio.wait_for(self.task, STOP_WAIT))
            except Exception:  # noqa: BLE001 - stopping anyway
                logger.warning("the bridge did not let go of NATS in %g s", STOP_WAIT)
        self.task = None
        if not self.loop.is_closed():
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
            self.loop.close()
        self.log.index.close()

    def woke(self, gap: float) -> None:
        """The broker's loop did not run for `gap` seconds (stopped, or starved): nothing
        that waited meanwhile is late for that, nobody is dead for it."""
        self.liveness.woke(gap)
        self.registry.woke(gap)
        self.calls.woke(gap)

    def tick(self) -> None:
        """Every half heartbeat: beat, settle dead brokers' sessions, fail what is stuck."""
        self.liveness.tick()
        now = time.monotonic()
        self.log.unfollow_idle(self.registry.has_local_members, now)
        self.calls.expire(now, CALL_DEADLINE)
        self.calls.report(now, REPORT_EVERY * self.heartbeat)
        self.presence.expire(now)
        self.log.index.retry()  # the search index (issue 23)
        self.log.index.settle()
        self.log.index._wake()  # (waits that are over by their deadline)
        self.registry.expire_catch_ups(now, CALL_DEADLINE)
        self.calls.send_pending()

    # ------------------------------------------------------------------ the bridge
    async def wait(self, timeout: float) -> None:
        """Until the bridge has news, wake() is called, or `timeout` seconds pass."""
        if self.inbox:
            return
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self.wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _from_bridge(self, frames: list[bytes]) -> None:
        self.inbox.append(frames)
        self.wake()

    def drain(self) -> None:
        """Everything the bridge has sent since the last look."""
        inbox = self.inbox
        for _ in range(10_000):
            if not inbox:
                return
            frames = inbox.popleft()
            try:
                self._dispatch(frames)
            except Exception:  # a bug must not end the broker
                logger.exception("cluster news %r failed", frames[:2])

    def _dispatch(self, frames: list[bytes]) -> None:
        handler = self.handlers.get(frames[0])
        if handler is not None:
            handler(frames)

    def _routed(self, frames: list[bytes]) -> None:
        """ROUTED push: for one of our sessions, or a question about one, or an answer."""
        push = json.loads(frames[1])
        if "ask" in push:
            self.presence.asked(push, self.core.silent_for(str(push["sid"])))
        elif "answer" in push:
            self.presence.answered(push)
        else:
            self.core.routed(push)

    def _key_changed(self, frames: list[bytes]) -> None:
        """KEY bucket key revision PUT|DEL value: a watched key's news."""
        bucket, key, rev, what = (f.decode() for f in frames[1:5])
        value = frames[5]
        if bucket == Bucket.BROKERS:
            self.liveness.observe(key, value if what == "PUT" else None)
        else:
            self.registry.apply(Bucket(bucket), key, int(rev), what == "PUT", value)
