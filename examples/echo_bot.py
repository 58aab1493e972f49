"""Echo bot on the plain client library (no Bot framework): `!echo TEXT` in any of its rooms."""
import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from client import ChatError, Client  # noqa: E402


async def main(a: argparse.Namespace) -> None:
    # bot=True marks what we send as a bot's; backlog=0: old commands are not answered again
    async with Client(a.host, a.port, a.nick, rooms=a.rooms.split(","), bot=True,
                      backlog=0) as c:
        async for ev in c:  # all our rooms, in order, across reconnects
            text = ev.text.removeprefix("!echo ").strip()
            # never our own messages (no loops) nor other bots'; hops=1 starts a bot chain
            if ev.kind == "msg" and text and text != ev.text.strip() and not (ev.mine or ev.bot):
                with contextlib.suppress(ChatError):  # e.g. kicked from that room meanwhile
                    await c.say(ev.room, text, hops=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    for flag, default in (("--host", "127.0.0.1"), ("--nick", "echo"), ("--rooms", "lobby")):
        p.add_argument(flag, default=default)
    p.add_argument("--port", type=int, default=9001)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: `async with` has said BYE
        asyncio.run(main(p.parse_args()))
