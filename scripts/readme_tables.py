"""The README's tables of flags and chat commands, made from the texts `--help` and `/help`
show (zmqchat/_usage.py), so that the two cannot disagree.

    python scripts/readme_tables.py           # print them
    python scripts/readme_tables.py --write   # put them in README.md

Each table in the README follows a comment `<!-- made by scripts/readme_tables.py: NAME -->`
and ends at the next blank line; tests/test_readme.py fails when one differs from what this
makes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zmqchat._cli import chat  # noqa: E402
from zmqchat._usage import command_table  # noqa: E402
from zmqchat.broker import _main as broker  # noqa: E402

README = ROOT / "README.md"
MARK = "<!-- made by scripts/readme_tables.py: {} -->"


def tables() -> dict[str, str]:
    """Each table's name and its markdown."""
    broker_flags, files_flags, cluster_flags = broker.parser().tables
    (client_flags,) = chat.parser().tables
    return {
        "broker flags": broker_flags.markdown(),
        "files flags": files_flags.markdown(),
        "cluster flags": cluster_flags.markdown(),
        "client flags": client_flags.markdown(),
        "chat commands": command_table(chat.COMMANDS),
    }


def in_readme(text: str) -> dict[str, str]:
    """The tables the README holds now, by name."""
    found = {}
    for name in tables():
        match = re.search(re.escape(MARK.format(name)) + r"\n(.*?)(?:\n\n|\n?\Z)", text, re.S)
        if match:
            found[name] = match[1]
    return found


def written(text: str) -> str:
    """The README with each marked table replaced by what tables() makes."""
    for name, table in tables().items():
        mark = re.escape(MARK.format(name))
        text, n = re.subn(
            mark + r"\n.*?(?=\n\n|\n?\Z)",
            lambda _m, name=name, table=table: MARK.format(name) + "\n" + table,
            text,
            flags=re.S,
        )
        if n != 1:
            raise SystemExit(f"README.md: {n} places marked {MARK.format(name)}")
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="update README.md in place")
    if p.parse_args().write:
        README.write_text(written(README.read_text()))
        return 0
    for name, table in tables().items():
        print(f"{MARK.format(name)}\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
