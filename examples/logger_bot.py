"""Logger bot: writes each room it is in to DIR/ROOM.jsonl, one JSON line per event (the
event exactly as the broker sent it: room, seq, id, ts, nick, kind, text, ...).

    python examples/logger_bot.py --port 9001 [--dir logs] [--rooms lobby,work]

The library delivers each room complete and in order (gaps are fetched from the broker's
history, also after a reconnect), so the files have no holes and no duplicates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from zmqchat import Bot, Context  # noqa: E402


def make_bot(directory: Path) -> Bot:
    # listen_to_bots: a log keeps everything. It never sends, so it cannot start a loop.
    bot = Bot(listen_to_bots=True)
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, IO[str]] = {}

    @bot.on_event(*Bot.ROOM_KINDS)  # every room event; private messages are not logged
    async def write(ctx: Context) -> None:
        # async, not a plain def: one event at a time on the event loop keeps the lines in
        # order (plain handlers run on threads, which may finish in any order)
        ev = ctx.event
        out = files.get(ev.room)
        if out is None:
            out = files[ev.room] = open(directory / f"{ev.room}.jsonl", "a", encoding="utf-8")
        out.write(json.dumps(ev.data, ensure_ascii=False) + "\n")
        out.flush()

    return bot


if __name__ == "__main__":
    parser = Bot.arguments("logger", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("logs"), help="where the files go")
    args = parser.parse_args()
    Bot.setup_logging(args.log_level)
    make_bot(args.dir).run(args.host, args.port, args.nick, rooms=args.rooms)
