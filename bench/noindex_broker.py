"""The broker without its search index, for bench/search.py only: the same broker.py with
the index's triggers left out of the history database, so what indexing costs is measured
against the same code."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zmqchat import _index as messages  # noqa: E402

messages.SCHEMA = messages.SCHEMA[: messages.SCHEMA.index("CREATE TRIGGER")]

from zmqchat.broker._main import main  # noqa: E402

sys.exit(main())
