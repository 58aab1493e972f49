"""The README's examples work as a new user would copy them."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys

from conftest import ROOT
from zmqchat import Client

README = (ROOT / "README.md").read_text()


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def run_snippet(code: str, port: int, tmp_path) -> subprocess.Popen:
    script = tmp_path / "snippet.py"
    script.write_text(code.replace("9001", str(port)))
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


async def ask(port: int, line: str, want: str) -> str:
    """Say line in lobby and wait for a bot's answer containing want."""
    async with Client("127.0.0.1", port, "newuser", backlog=0) as me:
        for _ in range(100):  # the bot may still be joining: ask until it answers
            await me.say("lobby", line)
            try:
                while True:
                    ev = await me.next_event(0.5)
                    if ev.kind == "msg" and ev.bot and want in ev.text:
                        return ev.text
            except TimeoutError:
                continue
    raise AssertionError(f"no answer to {line!r}")


def test_readme_weather_bot_is_short_and_works(make_broker_process, tmp_path):
    """The README's command bot is under 15 lines and answers !weather and !help."""
    code = next(s for s in snippets() if "@bot.command" in s)
    assert len([ln for ln in code.splitlines() if ln.strip()]) < 15
    proc = make_broker_process()
    bot = run_snippet(code, proc.port, tmp_path)
    try:
        assert asyncio.run(ask(proc.port, "!weather Oslo", "Oslo")) == "Oslo: sunny, 21 C"
        assert asyncio.run(ask(proc.port, "!weather New York", "York")) == "New York: sunny, 21 C"
        assert "Today's weather in CITY" in asyncio.run(ask(proc.port, "!help", "weather"))
    finally:
        bot.send_signal(signal.SIGINT)
        assert bot.wait(10) == 0, bot.stderr.read()


def test_readme_echo_bot_works(make_broker_process, tmp_path):
    """The README's echo bot on the plain library answers !echo."""
    code = next(s for s in snippets() if "!echo" in s)
    proc = make_broker_process()
    bot = run_snippet(code, proc.port, tmp_path)
    try:
        assert asyncio.run(ask(proc.port, "!echo hi there", "hi there")) == "hi there"
    finally:
        bot.kill()
        bot.wait()
