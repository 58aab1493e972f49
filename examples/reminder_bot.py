"""Reminder bot: `!remind 10m stand-up` answers "ann: stand-up" ten minutes later, where it
was asked (a room, or privately). Durations: 30s, 10m, 2h, 1d, or combined like 1h30m.

    python examples/reminder_bot.py --port 9001 [--nick remind] [--rooms lobby,work]

Reminders live in memory: a restarted bot has forgotten them.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from zmqchat import Bot, Context, UsageError  # noqa: E402

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LONGEST = 7 * 86400  # a week: a chat bot is not a calendar

bot = Bot()


def duration(text: str) -> float:
    """'1h30m' -> 5400.0 seconds (used as an annotation: it converts the typed word)."""
    parts = re.findall(r"(\d+)([smhd])", text.lower())
    if not parts or "".join(n + u for n, u in parts) != text.lower():
        raise ValueError("a duration is like 30s, 10m, 2h or 1h30m")
    seconds = sum(int(n) * UNITS[u] for n, u in parts)
    if not 0 < seconds <= LONGEST:
        raise ValueError("between 1 second and 7 days")
    return float(seconds)


@bot.command("remind")
async def remind(ctx: Context, when: duration, *what: str) -> None:
    """Remind you of WHAT after WHEN, e.g. !remind 10m stand-up."""
    if not what:
        raise UsageError("what should I remind you of?")  # answered with the usage line
    note = " ".join(what)
    await ctx.reply(f"OK {ctx.nick}, in {ctx.args[0]}: {note}")
    # Replies keep the order of the commands, so the bot's answers to the commands after this
    # one would wait for this handler to return: detach lets them go now.
    ctx.detach()
    await asyncio.sleep(when)
    await ctx.reply(f"{ctx.nick}: {note}")


if __name__ == "__main__":
    args = Bot.arguments("remind", description=__doc__).parse_args()
    Bot.setup_logging(args.log_level)
    bot.run(args.host, args.port, args.nick, rooms=args.rooms)
