"""Bridge bot: copies what is said in one room to another and back, e.g. lobby <-> work.

    python examples/bridge_bot.py --port 9001 [--rooms lobby,work] [--nick bridge]

Each copy is marked as relayed (the SAY body's `relay` field, "ann@lobby": who said it
where), reads "<ann> hello" for clients that do not show that field, and is never copied
again, so two rooms, or two bridges between the same rooms, cannot echo each other forever.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from zmqchat import Bot, Context  # noqa: E402


def make_bot(a: str, b: str) -> Bot:
    bot = Bot()  # other bots (and so other bridges) are ignored: only people are copied
    other = {a: b, b: a}

    @bot.on_message(room=[a, b])
    async def copy(ctx: Context) -> None:
        ev = ctx.event
        if ev.data.get("relay"):  # already a copy (from another bridge): never again
            return
        text = f"<{ev.nick}> {ev.text}" if ev.kind == "msg" else f"* {ev.nick} {ev.text}"
        await ctx.say(other[ev.room], text, relay=f"{ev.nick}@{ev.room}")

    return bot


if __name__ == "__main__":
    args = Bot.arguments("bridge", rooms=("lobby", "work"), description=__doc__).parse_args()
    if len(args.rooms) != 2:
        sys.exit("bridge_bot: --rooms takes exactly two rooms, like lobby,work")
    Bot.setup_logging(args.log_level)
    make_bot(*args.rooms).run(args.host, args.port, args.nick, rooms=args.rooms)
