"""The broker: `python -m zmqchat.broker` (or `zmqchat-broker`) runs one.

Its parts: `_loop` owns the sockets and the one event loop around the sans-I/O core
(`zmqchat._core`); `_outflow` counts what ZeroMQ still holds for each connection; `_main`
reads the flags. What brokers share sits behind the state interfaces, implemented by
`zmqchat._local` (one broker, SQLite) and `zmqchat._cluster` (several, NATS JetStream).
"""

from __future__ import annotations

from zmqchat.broker._main import main

__all__ = ["main"]
