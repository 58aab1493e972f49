"""zmqchat: a chat system on ZeroMQ. This is the library for bots and scripts.

    from zmqchat import Client, BlockingClient, Bot, Event, ChatError

`Client` is the asyncio client (the terminal client is built on it), `BlockingClient` the
same with plain calls, `Bot` the command framework on top, `Event` what they deliver and
`ChatError` what they raise; a `Bot`'s handlers get a `Context` and may raise `UsageError`;
`curve_keys` loads the keys for an encrypted broker.
`zmqchat.protocol` holds the wire protocol's names for anyone writing their own client.
Everything else in the package is private.

The names are loaded on first use, so that the broker (`python -m zmqchat.broker`), which
imports this package too, does not load the client library.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zmqchat._bot import Bot, Context, UsageError
    from zmqchat._client.library import BlockingClient, ChatError, Client, Event, curve_keys

__all__ = [
    "BlockingClient",
    "Bot",
    "ChatError",
    "Client",
    "Context",
    "Event",
    "UsageError",
    "curve_keys",
]

_WHERE = {
    "Bot": "zmqchat._bot",
    "Context": "zmqchat._bot",
    "UsageError": "zmqchat._bot",
    "BlockingClient": "zmqchat._client.library",
    "ChatError": "zmqchat._client.library",
    "Client": "zmqchat._client.library",
    "Event": "zmqchat._client.library",
    "curve_keys": "zmqchat._client.library",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name]), name)
        globals()[name] = value  # once: later look-ups do not come here
        return value
    raise AttributeError(f"module 'zmqchat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
