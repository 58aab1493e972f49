"""The terminal front end: a prompt_toolkit prompt that incoming lines never garble.

Lines are printed through `patch_stdout`, which draws them above the prompt and redraws the
line being typed. Tab completes commands, rooms and nicks; the bottom toolbar says whether we
are connected and which messages the broker has not yet acknowledged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.output import ColorDepth
from prompt_toolkit.patch_stdout import patch_stdout

from cli_render import escape

if TYPE_CHECKING:
    from chat_cli import Chat

__all__ = ["patch_stdout", "read_terminal"]


async def read_terminal(chat: Chat, colour: bool) -> None:
    """Read and handle typed lines until the user leaves (a leave word, Ctrl+D, Ctrl+C)."""
    session: PromptSession[str] = PromptSession(
        completer=ChatCompleter(chat), complete_while_typing=False,
        bottom_toolbar=lambda: toolbar(chat), refresh_interval=0.5,
        erase_when_done=True,  # the line comes back from the broker, timestamped: shown once
        color_depth=None if colour else ColorDepth.MONOCHROME)
    while not chat.quitting:
        try:
            line = await session.prompt_async(lambda: f"{chat.room}> ")
        except (EOFError, KeyboardInterrupt):   # Ctrl+D, Ctrl+C
            await chat.quit(None)
            return
        await chat.handle(line)


def toolbar(chat: Chat) -> str:
    """The bottom line: who and where we are, the connection, what is not yet delivered."""
    c = chat.client
    parts = [f"{c.nick} in {chat.room}"]
    if not c.connected:
        parts.append("offline, reconnecting...")
    pending = c.pending()
    if pending:
        texts = " | ".join(t if len(t) <= 20 else t[:19] + "…" for _, t in pending[:3])
        parts.append(f"{len(pending)} message{'s' if len(pending) != 1 else ''} "
                     f"pending: {escape(texts)}")
    parts.append("/help")
    return " " + "  ·  ".join(parts)


class ChatCompleter(Completer):
    """Tab: commands after '/', rooms after /join and /who, nicks elsewhere."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def get_completions(self, document: Document,
                        complete_event: CompleteEvent) -> Iterator[Completion]:
        before = document.text_before_cursor
        if before.startswith("/") and " " not in before:
            for name in sorted(self.chat.commands):
                if name.startswith(before[1:].lower()):
                    yield Completion(f"/{name} ", -len(before), display=f"/{name}")
            return
        word = document.get_word_before_cursor(WORD=True)
        command = before.split(" ", 1)[0].lower() if before.startswith("/") else ""
        names = self.chat.rooms if command in ("/join", "/who") else self.chat.nicks - {""}
        at_start = not command and before == word   # "bo<Tab>" -> "bob: "
        for name in sorted(names, key=str.lower):
            if name.lower().startswith(word.lower()):
                yield Completion(name + (": " if at_start else ""), -len(word), display=name)
