"""`python -m zmqchat.broker`: the broker."""

import sys

from zmqchat.broker._main import main

sys.exit(main())
