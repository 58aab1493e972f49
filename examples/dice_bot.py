"""Dice bot: `!roll 2d6`, `!echo TEXT` and the generated `!help`, on the Bot framework.

python examples/dice_bot.py --port 9001 [--nick dice] [--rooms lobby,work]
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from zmqchat import Bot, Context  # noqa: E402

bot = Bot()  # prefix "!", ignores other bots, never sees its own messages


def parse_dice(spec: str) -> tuple[int, int]:
    """'2d6' -> (2, 6). As a parameter's annotation it converts the typed word; a ValueError
    makes the bot answer with the command's usage line."""
    found = re.fullmatch(r"(\d{0,3})d(\d{1,4})", spec.lower())
    if not found or not 1 <= int(found[1] or 1) <= 100 or not 2 <= int(found[2]) <= 1000:
        raise ValueError("write NdM: 1 to 100 dice of 2 to 1000 sides, like 2d6")
    return int(found[1] or 1), int(found[2])


@bot.command("roll")
def roll(ctx: Context, dice: parse_dice = (1, 6)) -> str:
    """Roll dice, e.g. !roll 2d6 (one six-sided die without an argument)."""
    # A plain `def` handler runs on a thread of its own: it could block without harm.
    count, sides = dice
    throws = [random.randint(1, sides) for _ in range(count)]
    detail = " + ".join(map(str, throws)) + " = " if count > 1 else ""
    return f"{ctx.nick} rolls {count}d{sides}: {detail}{sum(throws)}"  # returned: the reply


@bot.command("echo")
async def echo(ctx: Context, *text: str) -> str:
    """Say TEXT back (quotes keep spaces: !echo "a  b")."""
    return " ".join(text)


if __name__ == "__main__":
    args = Bot.arguments("dice", description=__doc__).parse_args()
    Bot.setup_logging(args.log_level)
    bot.run(args.host, args.port, args.nick, rooms=args.rooms)  # until Ctrl+C
