"""The chat's file commands (issue 24): /send, /files, /get, /rmfile.

A transfer runs in the background: typing and the chat go on, the toolbar shows its
progress (percentage, rate, time left), and Ctrl+C at the prompt cancels the transfers
under way instead of leaving (a second Ctrl+C leaves).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from zmqchat._cli.errors import UsageError
from zmqchat._cli.render import Screen, escape
from zmqchat._client.library import ChatError, Client
from zmqchat.protocol import FILE_ID_RE, size_text

if TYPE_CHECKING:
    from collections.abc import Awaitable

# The file commands, in /help and the README's table of commands (see chat.COMMANDS).
COMMANDS: Final = (
    (
        "/send PATH",
        "offer a file to the room (the rest of the line is the path; see [Files](#files))",
    ),
    ("/send @NICK PATH", "offer a file to one person"),
    ("/files", "the room's files: id, name, size, sender, when"),
    ("/get ID", "download a file into the downloads folder (`--downloads`)"),
    ("/rmfile ID", "remove a room's file (operators)"),
)


def default_downloads() -> str:
    """~/Downloads where it exists, else the current folder."""
    home = os.path.expanduser("~/Downloads")
    return home if os.path.isdir(home) else os.getcwd()


@dataclass(eq=False)
class Transfer:
    """One transfer under way, as the toolbar shows it."""

    verb: str  # "sending" or "getting"
    name: str
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    total: int = 0
    first: int = -1  # bytes done at the first report (a resume starts part-way)

    def update(self, done: int, total: int) -> None:
        if self.first < 0:
            self.first, self.started = done, time.monotonic()
        self.done, self.total = done, total

    def status(self) -> str:
        pct = 100 * self.done / self.total if self.total else 100.0
        took = max(time.monotonic() - self.started, 1e-3)
        rate = max(self.done - max(self.first, 0), 0) / took
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = f", {left:.0f} s left" if left is not None and self.done < self.total else ""
        return f"{self.verb} {self.name} {pct:.0f}% ({size_text(rate)}/s{eta})"


def unquote(text: str) -> str:
    """A path as typed: the rest of the line, surrounding quotes taken off."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def offer_lines(offers: list[dict[str, Any]]) -> list[str]:
    """/files: a line per file, in columns (id, name, size, sender, when)."""
    rows = [
        (
            str(o["file"]),
            escape(str(o["name"])),
            size_text(int(o["size"])),
            f"from {escape(str(o['nick']))}",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(float(o.get("ts", 0)))),
            f"  (removed by {o.get('removed_by')})" if o.get("removed") else "",
        )
        for o in offers
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for *cells, when, gone in rows:
        padded = [
            cell.rjust(width) if i == 2 else cell.ljust(width)  # sizes to the right
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  " + "  ".join(padded) + f"  {when}{gone}")
    return lines


class FileCommands:
    """The file commands of the chat (mixed into Chat, which provides these)."""

    client: Client
    screen: Screen
    room: str
    downloads: str
    transfers: dict[asyncio.Task[Any], Transfer]

    def _run(self, transfer: Transfer, work: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await work
            except asyncio.CancelledError:
                self.screen.note(f"cancelled {transfer.verb} {transfer.name}", kind="cancelled")
            except ChatError as err:
                failed = "not sent" if transfer.verb == "sending" else "not downloaded"
                self.screen.error(f"{transfer.name} {failed}: {err.reason}", err.code)
            except OSError as err:
                self.screen.error(f"{transfer.name}: {err.strerror or err}", "OS_ERROR")

        task = asyncio.ensure_future(run())
        self.transfers[task] = transfer
        task.add_done_callback(lambda t: self.transfers.pop(t, None))

    def cancel_transfers(self) -> bool:
        """Ctrl+C: cancel the transfers under way; False if there were none."""
        tasks = list(self.transfers)
        for task in tasks:
            task.cancel()
        return bool(tasks)

    def transfers_status(self) -> str:
        return " | ".join(t.status() for t in self.transfers.values())

    async def cmd_send(self, arg: str) -> None:
        target, path = self.room, unquote(arg)
        if arg.startswith("@"):
            nick, _, rest = arg[1:].partition(" ")
            target, path = "@" + nick, unquote(rest)
        if not path or target in ("", "@"):
            raise UsageError("/send PATH  or  /send @NICK PATH")
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            self.screen.error(
                f"{escape(path)} is a folder: /send takes one file (zip or tar the folder)",
                "NO_SUCH_FILE",
            )
            return
        if not os.path.isfile(path):
            self.screen.error(f"{escape(path)}: no such file", "NO_SUCH_FILE")
            return
        name = os.path.basename(path)
        transfer = Transfer("sending", name)
        self.screen.note(
            f"sending {name} ({size_text(os.path.getsize(path))}) to {target.lstrip('@')}... "
            "(Ctrl+C cancels)",
            kind="sending",
            name=name,
        )

        async def send() -> None:
            offer = await self.client.send_file(target, path, progress=transfer.update)
            where = f"to {target[1:]}" if target.startswith("@") else f"to {target}"
            self.screen.note(
                f"sent {offer.get('name')} ({size_text(int(offer.get('size', 0)))}) {where}: "
                f"id {offer.get('file')}",
                kind="sent",
                file=offer.get("file"),
                name=offer.get("name"),
            )

        self._run(transfer, send())

    async def cmd_get(self, arg: str) -> None:
        fid = arg.strip().lower()
        if not fid:
            raise UsageError("/get ID   (/files lists the ids)")
        if not FILE_ID_RE.match(fid):  # said at once, not as a transfer that failed
            self.screen.error(
                f"'{escape(fid)}' is not a file id (8 to 16 of 0-9a-f; /files lists them)",
                "NO_SUCH_FILE",
            )
            return
        transfer = Transfer("getting", fid)
        self.screen.note(f"getting {fid}... (Ctrl+C cancels)", kind="getting", file=fid)

        async def get() -> None:
            path = await self.client.download(fid, self.downloads, progress=transfer.update)
            self.screen.note(
                f"saved {os.path.basename(path)} to {path}", kind="saved", file=fid, path=path
            )

        self._run(transfer, get())

    async def cmd_files(self, arg: str) -> None:
        nick = arg.strip().lstrip("@")
        offers = await (self.client.files(with_nick=nick) if nick else self.client.files(self.room))
        if self.screen.json_mode:
            count = f"{len(offers)} file{'' if len(offers) == 1 else 's'}"
            self.screen.note(count, kind="files", files=offers)
            return
        if not offers:
            self.screen.note(f"no files in {self.room}" if not nick else f"no files with {nick}")
            return
        lines = [f"files in {self.room}:" if not nick else f"files with {nick}:"]
        lines += offer_lines(offers)
        self.screen.note("\n".join(lines), kind="files", files=offers)

    async def cmd_rmfile(self, arg: str) -> None:
        fid = arg.strip().lower()
        if not fid:
            raise UsageError("/rmfile ID")
        offer = await self.client.remove_file(fid)
        self.screen.note(f"removed {offer.get('name')} ({fid})", kind="removed", file=fid)
