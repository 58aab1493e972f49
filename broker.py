"""The chat broker, from a checkout: `python broker.py --help` (installed: `zmqchat-broker`).

The code is in the package `zmqchat` (zmqchat/broker/ for the loop); this file only runs it.
"""

import sys

from zmqchat.broker import main

if __name__ == "__main__":
    sys.exit(main())
