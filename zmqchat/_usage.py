"""How the programs describe themselves: under the name the user ran them by, and from one
text per flag and per chat command. `--help`, the chat's `/help` and the README's tables are
all made from these texts (tests/test_readme.py checks that the README holds what
`markdown()` renders), so they cannot drift apart.

A text may hold `code`, **bold** and [links](url): the README shows them, `--help` and
`/help` show them plain.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from collections.abc import Iterable
from typing import Any, Final

WIDTH: Final = 79  # columns of /help: a terminal's 80, less the cursor's


def program(module: str) -> str:
    """The command as the user ran it, for usage and error lines: `zmqchat`, `client.py`,
    `python -m zmqchat` (a module run with -m has `__main__.py` as its argv[0])."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if name in ("", "-c", "__main__.py"):
        python = os.path.basename(sys.executable) or "python"
        return f"{python} -m {module}"
    return name


def plain(text: str) -> str:
    """Markdown as a terminal shows it: `code` and **bold** lose their marks, a link its URL."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return text.replace("**", "").replace("`", "")


def cell(text: str) -> str:
    """Text for a cell of a markdown table (a `|`, even in code, would end the cell)."""
    return text.replace("|", "\\|")


def markdown_table(head: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- flags


class Formatter(argparse.HelpFormatter):
    """--help with every flag's default, as the README's table shows it, and plain text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain(action.help or "")
        shown = plain(getattr(action, "shown_default", ""))
        if shown:
            text += f" (default: {shown})"
        return text.replace("%", "%%")  # argparse formats help strings with %

    def _split_lines(self, text: str, width: int) -> list[str]:
        """Wrapped at spaces only: a path or a flag is never cut at its hyphen."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Table:
    """Flags added to a parser (or one of its groups) and remembered in order: the rows of
    one of the README's flag tables."""

    def __init__(self, into: Any) -> None:
        self.into = into  # an ArgumentParser or an argument group
        self.actions: list[argparse.Action] = []

    def __call__(self, *names: str, help: str, shown: str | None = None, **kw: Any) -> None:
        """add_argument, with the default as people should read it (`shown`; made from the
        default value if not given: `off` for a switch)."""
        action = self.into.add_argument(*names, help=help, **kw)
        if shown is None:
            shown = shown_default(action)
        action.shown_default = shown  # type: ignore[attr-defined,unused-ignore]
        self.actions.append(action)

    def markdown(self) -> str:
        return markdown_table(
            ("flag", "meaning", "default"),
            ((flag_names(a), a.help or "", getattr(a, "shown_default", "")) for a in self.actions),
        )


def shown_default(action: argparse.Action) -> str:
    """`off` for a switch, `none` for no value, else the value as code (`2`, not `2.0`)."""
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default in (None, ""):
        return "none"
    if isinstance(action.default, float):
        return f"`{action.default:g}`"
    return f"`{action.default}`"


def flag_names(action: argparse.Action) -> str:
    """`-i`, `--ip HOSTS`: the flag's names, the last with its metavar if it has one."""
    names = [f"`{name}`" for name in action.option_strings]
    if isinstance(action.metavar, str):
        names[-1] = f"`{action.option_strings[-1]} {action.metavar}`"
    return ", ".join(names)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser named as the user ran it, whose flags go in tables (`table()`)."""

    def __init__(self, module: str, description: str) -> None:
        super().__init__(prog=program(module), description=description, formatter_class=Formatter)
        self.tables: list[Table] = []

    def table(self, title: str | None = None) -> Table:
        """A new table of flags: the parser's own, or a titled group's."""
        table = Table(self.add_argument_group(title) if title else self)
        self.tables.append(table)
        return table


# ---------------------------------------------------------------------------- chat commands


def command_help(commands: Iterable[tuple[str, str]], width: int = WIDTH) -> str:
    """`/help`: one command a line, its meaning beside it (wrapped under itself)."""
    commands = list(commands)
    column = max(len(usage) for usage, _ in commands) + 4
    lines = ["commands:"]
    for usage, meaning in commands:
        lines += textwrap.wrap(
            plain(meaning),
            width,
            initial_indent=f"  {usage:<{column - 2}}",
            subsequent_indent=" " * column,
        )
    return "\n".join(lines)


def command_table(commands: Iterable[tuple[str, str]]) -> str:
    """The README's table of chat commands."""
    return markdown_table(
        ("command", "what it does"),
        ((", ".join(f"`{u}`" for u in usage.split(", ")), meaning) for usage, meaning in commands),
    )
