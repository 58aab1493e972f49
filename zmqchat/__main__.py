"""`python -m zmqchat`: the terminal client."""

import sys

from zmqchat._cli.chat import main

sys.exit(main())
