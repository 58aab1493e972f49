"""The broker's core: sessions, rooms and every command's handler, with no I/O.

`Core` is its parts put together, each a module of its own: the machinery every handler
uses (base.py: dispatch, exactly one reply, publishing, subscriptions, liveness), and the
commands about a person (sessions.py), about rooms (rooms.py), of room operators
(moderation.py), about files (files.py), those that edit, delete, answer and find messages
(edits.py), of accounts (accounts.py), an account's several devices (devices.py) and of
catching up (catchup.py). What belongs to this
broker alone is in session.py; what brokers share goes through the interfaces of state.py
(and of files_state.py, edits_state.py and accounts_state.py); the rules,
the clock and randomness come in from outside (rules.py).
"""

from __future__ import annotations

from zmqchat._core.accounts import Accounts
from zmqchat._core.catchup import CatchUp
from zmqchat._core.devices import Devices
from zmqchat._core.edits import Edits
from zmqchat._core.files import Files
from zmqchat._core.moderation import Moderation
from zmqchat._core.rooms import Rooms
from zmqchat._core.sessions import Sessions

__all__ = ["Core"]


class Core(CatchUp, Devices, Accounts, Sessions, Edits, Rooms, Moderation, Files):
    """The broker's state and rules; see base.py for how a request is answered."""
