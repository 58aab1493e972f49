"""The wire protocol's names, from a checkout: the same module as `zmqchat.protocol`
(no I/O; PROTOCOL.md explains it for other languages)."""

import sys

from zmqchat import protocol

sys.modules[__name__] = protocol
