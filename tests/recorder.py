"""A member that prints every event it is given as one JSON line: a client process to
pause, kill or inspect in durability tests.  python tests/recorder.py PORT NICK [ROOM]"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zmqchat import Client  # noqa: E402


async def main(port: int, nick: str, room: str) -> None:
    client = Client("127.0.0.1", port, nick, rooms=[room], backlog=0)
    await client.connect()
    print(json.dumps({"kind": "ready"}), flush=True)
    async for ev in client:
        print(
            json.dumps(
                {"kind": ev.kind, "seq": ev.seq, "text": ev.text, "nick": ev.nick, "room": ev.room}
            ),
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "lobby"))
