"""--allow-keys: the client public keys that may connect under CURVE, read from a folder of
`*.key` files (as `zmq.auth` writes them) at start and again whenever the folder changes."""

from __future__ import annotations

import logging
import os
import time

import zmq.auth

log = logging.getLogger("zmqchat.broker")
REFUSAL_EVERY = 60.0  # seconds between lines about one refused client key

Signature = list[tuple[str, int, int, int, int]]


class AllowedKeys:
    """The folder's keys, and what its files looked like when they were last read."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.seen: Signature | None = None

    def _signature(self) -> Signature | None:
        """Each entry's name, inode, change and modification times, and size: a copy that
        keeps its modification time (`cp -p`, rsync) still changes the others."""
        out: Signature = []
        try:
            with os.scandir(self.folder) as entries:
                for e in entries:
                    try:
                        st = e.stat()  # (through a link: its target's)
                    except OSError:  # a broken link: seen, and seen again if it is mended
                        out.append((e.name, 0, 0, 0, -1))
                        continue
                    out.append((e.name, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size))
        except OSError as exc:
            log.error(
                "--allow-keys: cannot read %s (%s): the keys read before still count",
                self.folder,
                exc,
            )
            return None
        return sorted(out)

    def changed(self) -> dict[bytes, bool] | None:
        """The keys, if the folder changed since they were last read (or never was), else
        None. A file that holds no public key is left out, and said so."""
        now = self._signature()
        if now is None or now == self.seen:
            return None
        self.seen = now  # (looked at before it is read: a change meanwhile is seen next time)
        keys: dict[bytes, bool] = {}
        for name, *_ in now:
            if not name.endswith(".key"):
                continue
            path = os.path.join(self.folder, name)
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as exc:
                log.warning("--allow-keys: %s left out: %s", path, exc)
                continue
            keys[public] = True
        return keys


class RefusalLog(logging.LoggerAdapter[logging.Logger]):
    """The authenticator's log (pyzmq says everything at DEBUG): a client refused for a
    key not in --allow-keys is said at INFO, once a minute per key, so that an operator
    sees why someone cannot get in."""

    def __init__(self) -> None:
        super().__init__(log, {})
        self.told: dict[str, float] = {}

    def debug(self, msg: object, *args: object, **kw: object) -> None:
        if args and args[0] == "DENIED" and "(CURVE)" in str(msg):
            key = args[-1].decode() if isinstance(args[-1], bytes) else str(args[-1])
            now = time.monotonic()
            if now - self.told.get(key, -REFUSAL_EVERY) >= REFUSAL_EVERY:
                self.told[key] = now
                log.info("--allow-keys: a client with key %s was refused (not in the folder)", key)
            return
        log.debug(msg, *args)
