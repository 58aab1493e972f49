"""Echo bot on the plain client library (no Bot framework): `!echo TEXT` in any of its rooms."""

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from zmqchat import ChatError, Client  # noqa: E402


async def main(a: argparse.Namespace) -> None:  # backlog=0: old commands are not answered
    async with Client(a.host, a.port, a.nick, rooms=a.rooms.split(","), bot=True, backlog=0) as c:
        async for ev in c:  # all our rooms, in order, across reconnects
            text = ev.text.removeprefix("!echo ").strip()
            # never our own messages (no loops) nor other bots'; hops=1 starts a bot chain
            if ev.kind == "msg" and text and text != ev.text.strip() and not (ev.mine or ev.bot):
                with contextlib.suppress(ChatError):  # e.g. kicked from that room meanwhile
                    await c.say(ev.room, text, hops=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    flags = {"--host": "127.0.0.1", "--port": 9001, "--nick": "echo", "--rooms": "lobby"}
    for flag, default in flags.items():
        p.add_argument(flag, default=default, type=type(default))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: `async with` has said BYE
        asyncio.run(main(p.parse_args()))
