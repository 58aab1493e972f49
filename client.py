"""The chat client, from a checkout: `python client.py --help` (installed: `zmqchat`).

The code is in the package `zmqchat`; this file only runs it. Bots import the package:
`from zmqchat import Client` (this module re-exports those names for older scripts).
"""

import sys

from zmqchat import *  # noqa: F403
from zmqchat import __all__ as __all__

if __name__ == "__main__":
    from zmqchat._cli.chat import main

    sys.exit(main())
