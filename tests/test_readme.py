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
    """The README's command bot is under 15 lines, says it is connected, and answers
    !weather and !help."""
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
    said = bot.stderr.read()
    assert f"weatherbot connected to 127.0.0.1:{proc.port}, in lobby" in said, said
    assert "weatherbot stopped" in said, said


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


def test_readme_file_bot_counts_the_errors_of_a_log(make_broker_process, tmp_path):
    """The README's @bot.on_file bot downloads a log offered to its room and answers with
    its name and how many lines say ERROR."""
    code = next(s for s in snippets() if "@bot.on_file" in s)
    folder = tmp_path / "bot-downloads"
    folder.mkdir()
    log = tmp_path / "build.log"
    log.write_text("ok\nERROR one\nfine\nERROR two\nERROR three\n")
    proc = make_broker_process()
    bot = run_snippet(code.replace('"/tmp"', repr(str(folder))), proc.port, tmp_path)

    async def scenario() -> str:
        async with Client("127.0.0.1", proc.port, "newuser", backlog=0) as me:
            for _ in range(100):  # until the bot is in the room
                if "logbot" in await me.who("lobby"):
                    break
                await asyncio.sleep(0.1)
            await me.send_file("lobby", str(log))
            while True:
                ev = await me.next_event(10)
                if ev.kind == "msg" and ev.bot:
                    return ev.text

    try:
        assert asyncio.run(scenario()) == "got your build.log, 3 errors in it"
        assert (folder / "build.log").read_bytes() == log.read_bytes()
    finally:
        bot.send_signal(signal.SIGINT)
        assert bot.wait(10) == 0, bot.stderr.read()


# ------------------------------------------------------------------ one text for both


def test_readme_tables_are_what_help_shows():
    """The README's tables of the broker's and the client's flags and of the chat's commands
    are the ones made from the texts --help and /help show (scripts/readme_tables.py --write
    puts them in)."""
    from scripts import readme_tables

    made = readme_tables.tables()
    assert readme_tables.in_readme(README) == made


def test_every_flag_and_command_is_in_a_table():
    """No flag is added beside the tables (it would be missing from the README), and every
    command the chat answers is in the commands' table."""
    from types import SimpleNamespace

    from zmqchat._cli import chat
    from zmqchat.broker import _main as broker

    for parser in (broker.parser(), chat.parser()):
        tabled = {
            name for table in parser.tables for a in table.actions for name in a.option_strings
        }
        flags = {name for a in parser._actions for name in a.option_strings} - {"-h", "--help"}
        assert flags == tabled
    session = chat.Chat(SimpleNamespace(welcome={}, account=None), None, "lobby", leave_words=True)
    documented = {
        word[1:]
        for usage, _ in chat.COMMANDS
        for word in usage.replace(",", "").split()
        if word[:1] == "/"
    }
    assert set(session.commands) <= documented


def help_text(*command: str) -> str:
    """A program's --help as a user reads it, lines joined back into one."""
    out = subprocess.run(
        [sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=10
    )
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.split())


def test_help_shows_each_flag_with_its_default():
    """`broker.py --help` and `client.py --help` give each flag the README's meaning (without
    its markdown) and its default, under the name the program was run by."""
    from zmqchat._cli import chat
    from zmqchat._usage import plain
    from zmqchat.broker import _main as broker

    for script, parser in (("broker.py", broker.parser()), ("client.py", chat.parser())):
        shown = help_text(str(ROOT / script))
        assert shown.startswith(f"usage: {script} [-h]")
        for table in parser.tables:
            for a in table.actions:
                meaning = " ".join(plain(a.help).split())
                assert meaning in shown, meaning
                if a.shown_default:
                    assert f"{meaning} (default: {plain(a.shown_default)})" in shown


def test_readme_synopsis_of_the_client_is_its_usage():
    """The README's `python client.py [...]` line lists the flags as --help's usage does."""
    usage = help_text(str(ROOT / "client.py")).split(" ZeroMQ chat client")[0]
    assert f"    python client.py {usage.removeprefix('usage: client.py [-h] ')}\n" in README


def test_the_layout_names_every_module_of_the_package():
    """The README's Layout table has a line for each module of zmqchat/ (a row may name
    several of one folder: `zmqchat/_cluster/log.py`, `registry.py`)."""
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in layout.splitlines() if line.startswith("| `zmqchat/")]
    named: set[str] = set()
    for row in rows:
        cell = row.split("|")[1]
        folder = ""
        for name in re.findall(r"`([^`]+\.py)`", cell):
            if "/" in name:
                folder = name.rsplit("/", 1)[0]
                named.add(name)
            else:
                named.add(f"{folder}/{name}")
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "zmqchat").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "zmqchat"
    }
    assert sorted(modules - named) == []
    assert sorted(named - modules) == []
