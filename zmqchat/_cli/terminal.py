"""The terminal front end: a prompt_toolkit prompt that incoming lines never garble.

Lines are printed through `patch_stdout`, which draws them above the prompt and redraws the
line being typed. Tab completes commands, rooms and nicks; the bottom toolbar says whether we
are connected and which messages the broker has not yet acknowledged.

No key typed once the chat has begun is lost. The terminal never returns to its usual
(canonical) mode while the chat runs: in that mode the terminal itself handles what is typed
while nobody reads (before the first prompt, between two prompts, and while prompt_toolkit
prints a line above the prompt), and it turns Ctrl+D into an end-of-file mark that a raw read
then gets as a NUL byte: the key was gone. Held raw, every key waits unchanged for the prompt.
"""

from __future__ import annotations

import contextlib
import sys
import termios
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.input.vt100 import Vt100Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.output import ColorDepth
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.validation import ValidationError, Validator

from zmqchat._cli.render import escape
from zmqchat._client.library import ChatError, Client

ONLINE_EVERY: Final = 3.0  # seconds between asking who is online, for /msg's Tab

__all__ = ["Front", "keys_kept", "patch_stdout", "read_terminal"]


class Front(Protocol):
    """What the terminal needs of the chat it runs (chat.py's `Chat` is one)."""

    @property
    def client(self) -> Client: ...

    @property
    def room(self) -> str:
        """The current room."""

    @property
    def rooms(self) -> Collection[str]:
        """Every room, for completion."""

    @property
    def nicks(self) -> Collection[str]:
        """The nicks seen, for completion."""

    @property
    def commands(self) -> Mapping[str, Any]:
        """The slash commands, by name."""

    @property
    def quitting(self) -> bool: ...

    async def handle(self, line: str) -> None:
        """A typed line: a command or a message."""

    async def quit(self, reason: str | None) -> None:
        """Leave (Ctrl+D, Ctrl+C at the prompt)."""

    def cancel_transfers(self) -> bool:
        """Ctrl+C: cancel the file transfers under way; False if there were none."""

    def transfers_status(self) -> str:
        """The file transfers under way, for the toolbar ("" when none)."""

    ask_secret: Callable[[str], Awaitable[str]]  # how to ask for a password (set here)
    secret_typed: bool  # it is asked at this terminal's prompt (set here)

    def waiting(self) -> str:
        """An account's other rooms with unread messages, for the toolbar ("" if none)."""

    def unread_elsewhere(self) -> int:
        """How many messages an account has unread in its other rooms, for the prompt."""


@contextlib.contextmanager
def keys_kept() -> Iterator[None]:
    """The terminal in raw mode (as prompt_toolkit sets it) until the chat ends, Ctrl+C aside.

    Ctrl+C stays a signal (ISIG) outside a prompt, so that it interrupts a command waiting for
    the broker; the session takes that signal as leaving. At a prompt it is a key, as before.
    """
    fd = sys.stdin.fileno()
    before = termios.tcgetattr(fd)
    kept = termios.tcgetattr(fd)
    kept[0] &= ~(termios.IXON | termios.IXOFF | termios.ICRNL | termios.INLCR | termios.IGNCR)
    kept[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)
    kept[6][termios.VMIN], kept[6][termios.VTIME] = 1, 0  # a read returns each key at once
    termios.tcsetattr(fd, termios.TCSANOW, kept)  # not TCSAFLUSH: that drops typed keys
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)


class KeptInput(Vt100Input):
    """stdin for prompt_toolkit, left raw while a line is printed above the prompt.

    prompt_toolkit prints such lines in the terminal's usual mode (`cooked_mode`), meant for
    programs run from a prompt; we only print, and the output settings are the same in both.
    """

    def cooked_mode(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


async def read_terminal(chat: Front, colour: bool) -> None:
    """Read and handle typed lines until the user leaves (a leave word, Ctrl+D, Ctrl+C)."""
    session: PromptSession[str] = PromptSession(
        completer=ChatCompleter(chat),
        complete_while_typing=False,
        bottom_toolbar=lambda: toolbar(chat),
        refresh_interval=0.5,
        erase_when_done=True,  # the line comes back from the broker, timestamped: shown once
        color_depth=None if colour else ColorDepth.MONOCHROME,
        input=KeptInput(sys.stdin),
        validator=TooLong(chat),
        validate_while_typing=False,
        key_bindings=ctrl_c_clears_first(),
    )

    async def secret(prompt: str) -> str:  # /register, /password: never echoed
        asking: PromptSession[str] = PromptSession(input=KeptInput(sys.stdin))
        try:
            return await asking.prompt_async(prompt, is_password=True, handle_sigint=False)
        except (KeyboardInterrupt, EOFError):  # Ctrl+C, Ctrl+D: the command, not the chat
            raise ChatError("CANCELLED", "cancelled: nothing was changed") from None

    chat.ask_secret, chat.secret_typed = secret, True
    while not chat.quitting:
        try:
            # No SIGINT handler of prompt_toolkit's: at the prompt Ctrl+C is a key; a signal
            # (Ctrl+C between prompts, kill -INT) goes to asyncio's, which ends the session.
            # prompt_toolkit's stays a moment after the terminal leaves raw mode, and passes a
            # Ctrl+C pressed then to a prompt that has ended.
            line = await session.prompt_async(lambda: prompt(chat), handle_sigint=False)
        except KeyboardInterrupt:  # Ctrl+C: cancels the file transfers, if any; else leaves
            if chat.cancel_transfers():
                continue
            await chat.quit(None)
            return
        except EOFError:  # Ctrl+D
            await chat.quit(None)
            return
        await chat.handle(line)


def ctrl_c_clears_first() -> KeyBindings:
    """Ctrl+C with a line typed clears the line (as in a shell); on an empty line it is
    what it was: it cancels the transfers under way, else leaves."""
    keys = KeyBindings()

    @keys.add("c-c")
    def _(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    return keys


class TooLong(Validator):
    """A line longer than the broker takes is not accepted: it stays at the prompt to be
    shortened, the reason below it (the broker's limit, from its welcome)."""

    def __init__(self, chat: Front) -> None:
        self.chat = chat

    def validate(self, document: Document) -> None:
        line = document.text
        word, _, rest = line.partition(" ")
        if word.lower() == "/me":
            text = rest
        elif word.lower() in ("/msg", "/reply"):  # /msg NICK TEXT, /reply NICK TEXT
            text = rest.partition(" ")[2]
        elif line.startswith("/") and not line.startswith("//"):
            return  # another command: its own checks
        else:
            text = line[1:] if line.startswith("//") else line
        limit = int(self.chat.client.welcome.get("max_text", 0)) or len(text)
        if len(text) > limit:
            raise ValidationError(
                len(line), f"{len(text)} characters, the limit is {limit}: shorten it to send it"
            )


def prompt(chat: Front) -> str:
    """`work> `; an account with unread messages in its other rooms: `work (+13)> `."""
    elsewhere = chat.unread_elsewhere()
    return f"{chat.room} (+{elsewhere})> " if elsewhere else f"{chat.room}> "


def toolbar(chat: Front) -> str:
    """The bottom line: who and where we are, the connection, what is not yet delivered."""
    c = chat.client
    parts = [f"{c.nick} in {chat.room}" if chat.room else f"{c.nick}, in no room"]
    if not c.connected:
        parts.append("offline, reconnecting...")
    pending = c.pending()
    if pending:
        texts = " | ".join(t if len(t) <= 20 else t[:19] + "…" for _, t in pending[:3])
        parts.append(
            f"{len(pending)} message{'s' if len(pending) != 1 else ''} pending: {escape(texts)}"
        )
    moving = chat.transfers_status()
    if moving:
        parts.append(escape(moving) + " (Ctrl+C cancels)")
    waiting = chat.waiting()
    if waiting:  # an account's other rooms
        parts.append(waiting)
    parts.append("/help")
    return " " + "  ·  ".join(parts)


class ChatCompleter(Completer):
    """Tab: commands after '/', rooms after /join and /who, nicks elsewhere."""

    def __init__(self, chat: Front) -> None:
        self.chat = chat
        self.online: set[str] = set()  # everyone online, as the broker last said
        self.asked = -ONLINE_EVERY

    async def get_completions_async(
        self, document: Document, complete_event: CompleteEvent
    ) -> AsyncGenerator[Completion, None]:
        """As get_completions; the nick after /msg may be anyone online, in any room: the
        broker is asked who is (at most every ONLINE_EVERY seconds)."""
        before = document.text_before_cursor
        if before.lower().startswith("/msg ") and " " not in before[5:]:
            now = time.monotonic()
            if now - self.asked >= ONLINE_EVERY:
                self.asked = now
                try:
                    self.online = set(await self.chat.client.who(None))
                except ChatError:
                    pass
        for completion in self.get_completions(document, complete_event):
            yield completion

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        before = document.text_before_cursor
        if before.startswith("/") and " " not in before:
            for name in sorted(self.chat.commands):
                if name.startswith(before[1:].lower()):
                    yield Completion(f"/{name} ", -len(before), display=f"/{name}")
            return
        word = document.get_word_before_cursor(WORD=True)
        command = before.split(" ", 1)[0].lower() if before.startswith("/") else ""
        names = self.chat.rooms if command in ("/join", "/who") else set(self.chat.nicks) - {""}
        if command == "/msg":
            names = (set(names) | self.online) - {self.chat.client.nick}
        at_start = not command and before == word  # "bo<Tab>" -> "bob: "
        first_arg = bool(command) and " " not in before[len(command) + 1 :]  # "/msg bob "
        end = ": " if at_start else " " if first_arg else ""  # (mid-sentence: "hi bob")
        for name in sorted(names, key=str.lower):
            if name.lower().startswith(word.lower()):
                yield Completion(name + end, -len(word), display=name)
