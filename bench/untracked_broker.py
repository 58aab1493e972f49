"""The broker without its count of what ZeroMQ holds for each connection, for
bench/files.py only: chunks and long replies lent to ZeroMQ untracked, as before that count
(issue 24), so that what it costs a download is measured against the same code."""

import sys
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zmqchat.broker import _loop, _outflow  # noqa: E402


def _lend(sock: zmq.Socket, data: bytes) -> zmq.MessageTracker:
    _loop._send(sock, data, _loop._NOBLOCK, False)  # lent, not tracked
    return zmq._FINISHED_TRACKER


def _forget(self: _outflow.Outflow, rid: bytes, tracker: object, n: int, queued: bool = False):
    if queued:
        self.unqueue(rid, n)  # nothing kept: prune() has nothing to look at


_loop._lend = _lend
_outflow.Outflow.lend = _forget

from zmqchat.broker._main import main  # noqa: E402

sys.exit(main())
