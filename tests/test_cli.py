"""End to end: the real `broker.py` and `client.py` as processes, used as people and scripts do.

Interactive runs go through a pseudo-terminal (stdin and stdout are a terminal, so the client
asks its questions and runs prompt_toolkit); scripted runs use pipes (plain and --json modes).
Nothing sleeps to synchronise: every wait is for output, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from cli_helpers import CLIENT, Script, Terminal, joined, watcher

from conftest import ROOT, free_ports, wait_for


def test_asks_for_ip_port_and_nick(chat):
    """Without flags a terminal user is asked IP, port and nick; Enter takes the default IP."""
    t = chat("terminal", connect=False)
    t.expect("Server IP [127.0.0.1]: ")
    t.type("\n")
    t.expect("Port [9001]: ")
    t.type(f"{chat.broker.port}\n")
    t.expect("Nickname: ")
    t.type("\n")  # a nickname has no default: asked again
    t.expect("Nickname: ")
    t.type("alice\n")
    t.expect("ZeroMQ chat")  # the broker's banner
    t.expect("Welcome, alice! You are in lobby. Type /help")
    t.ready()
    t.type(".exit\r")
    assert t.exit_status() == 0


def test_user_flag_asks_only_ip_and_port(chat):
    """With -u the nick is not asked, only IP and port; Ctrl+D leaves with status 0."""
    t = chat("terminal", "-u", "Bob", connect=False)
    t.expect("Server IP [127.0.0.1]: ")
    t.type("127.0.0.1\n")
    t.expect("Port [9001]: ")
    t.type(f"{chat.broker.port}\n")
    t.expect("Welcome, Bob!")
    assert "Nickname" not in t.text
    t.ready()
    t.type("\x04")
    assert t.exit_status() == 0


def test_welcome_names_the_broker_when_given_several(chat):
    """Given several brokers (-i A,B), the welcome says which of them took the client: its
    name, as --name sets it (here the default, host and port); given one, it does not."""
    import socket

    port = chat.broker.port
    t = chat("terminal", "-i", f"127.0.0.1:{port},127.0.0.1:{port + 1}", "-u", "ann", connect=False)
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    t.expect(f"Welcome, ann! You are in lobby (via {host}-{port}). Type /help")
    t.ready()
    t.type("\x04")
    assert t.exit_status() == 0


def test_taken_nick_is_asked_again(chat):
    """In a terminal, a taken nick gets the broker's reason and a new question; Ctrl+C leaves."""
    w = watcher(chat, "alice")
    t = chat("terminal", "-u", "ALICE")  # the same nick to the broker: case is folded
    t.expect("taken")
    t.expect("Nickname: ")
    t.type("alice2\n")
    t.expect("Welcome, alice2!")
    joined(w, "alice2")
    t.ready()
    t.type("\x03")
    assert t.exit_status() == 0
    w.wait_event(lambda e: e["kind"] == "leave" and e["nick"] == "alice2", "alice2 leaving")


def test_impossible_nick_is_asked_again_with_the_rule(chat):
    """Asked in a terminal, a nickname that can never be valid gets the rule and the question
    again at once, without connecting; a valid one then connects."""
    t = chat("terminal")
    t.expect("Nickname: ")
    t.type("bad nick!\r")
    t.expect("Sorry, nickname may hold letters, digits and _-[]{}|^, not ' '")
    t.expect("Nickname: ")
    t.type("9lives\r")
    t.expect("Sorry, nickname may not start with a digit or '-'")
    t.expect("Nickname: ")
    t.type("alice\r")
    t.expect("Welcome, alice!")
    assert t.text.count("Connecting to") == 1, t.text  # only as alice
    t.ready()
    t.type("\x04")
    assert t.exit_status() == 0


@pytest.mark.parametrize("stdin", ["pipe", "terminal"])
def test_impossible_nick_flag_exits_2_before_connecting(started, stdin):
    """-u with a nickname that can never be valid: the rule and status 2 at once, no broker."""
    port = str(free_ports(1)[0])  # nobody listens there
    args = ["-p", port, "-u", "bad nick!"]
    began = time.monotonic()
    if stdin == "pipe":
        proc = subprocess.run(
            [sys.executable, CLIENT, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=15,
        )
        status, said = proc.returncode, proc.stderr
    else:
        t = Terminal(*args)
        started.append(t.proc)
        status = t.exit_status(15)
        t.expect("client.py: error")
        said = t.text
        assert "Server IP" not in said  # refused before asking anything
    took = time.monotonic() - began
    assert status == 2
    assert (
        "-u/--user: 'bad nick!': nickname may hold letters, digits and _-[]{}|^, not ' '" in said
    ), said
    assert took < 4.0  # no wait for a broker: that takes 5 s to give up


def test_missing_nick_without_terminal_exits_2(chat):
    """With stdin not a terminal and no -u, it says to pass -u and exits with status 2."""
    proc = subprocess.run(
        [sys.executable, CLIENT, "-p", str(chat.broker.port)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=10,
    )
    assert proc.returncode == 2
    assert "-u" in proc.stderr and proc.stdout == ""


def test_taken_nick_without_terminal_exits_3(chat):
    """With stdin not a terminal, a taken nick is a clear error on stderr and status 3."""
    watcher(chat, "alice")
    s = chat("script", "-u", "alice")
    assert s.end_input() == 3
    assert any("taken" in line and "-u" in line for line in s.errors), s.errors
    assert not any("Traceback" in line for line in s.errors)
    assert not any("silent" in line for line in s.errors), s.errors  # alice is there: not gone


def test_unreachable_broker_is_an_error_not_a_hang(chat):
    """With no broker at the address, it gives up after a few seconds: one line, status 1."""
    port = free_ports(1)[0]
    proc = subprocess.run(
        [sys.executable, CLIENT, "-p", str(port), "-u", "alice"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=15,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "cannot reach the broker" in proc.stderr


# ---------------------------------------------------------------------------- leaving


@pytest.mark.parametrize(
    "words, notice",
    [
        (".exit", "bob left"),
        ("bye", "bob left"),
        ("Bye", "bob left"),
        ("/quit gone home", "bob left (quit: gone home)"),
    ],
)
def test_leaving_words_exit_cleanly(chat, words, notice):
    """.exit, bye (in any case) and /quit REASON end the terminal client with 0; the others
    see it leave."""
    w = watcher(chat)
    t = chat("terminal", "-u", "bob")
    t.expect("Welcome, bob!")
    joined(w, "bob")
    t.ready()
    t.type(words + "\r")
    assert t.exit_status() == 0
    leave = w.wait_event(lambda e: e["kind"] == "leave" and e["nick"] == "bob", "bob leaving")
    assert leave["text"] == notice


def test_a_line_over_the_limit_stays_at_the_prompt_to_be_shortened(chat):
    """4,001 characters and Enter: not sent and not lost; the prompt keeps the line and
    says the limit; one Backspace and Enter send it."""
    w = watcher(chat)
    t = chat("terminal", "-u", "bob")
    t.expect("Welcome, bob!")
    joined(w, "bob")
    t.ready()
    t.type("y" * 4001 + "\r")
    t.expect("4001 characters, the limit is 4000: shorten it to send it")
    t.type("\x7f\r")  # Backspace, Enter
    said = w.wait_event(lambda e: e["kind"] == "msg" and e["nick"] == "bob", "bob's line")
    assert said["text"] == "y" * 4000
    assert [e for e in w.events() if e["kind"] == "msg"] == [said]
    t.type("/msg watcher " + "z" * 4001 + "\r")  # the text of a /msg counts the same
    t.expect("4001 characters, the limit is 4000: shorten it to send it")
    t.type("\x7f\r")
    note = w.wait_event(lambda e: e["kind"] == "private", "bob's private message")
    assert note["text"] == "z" * 4000


def test_ctrl_c_clears_a_typed_line_and_leaves_from_an_empty_one(chat):
    """Ctrl+C with half a line typed clears it (nothing sent, the client stays); the next
    line goes out alone; Ctrl+C on an empty line leaves, with status 0."""
    w = watcher(chat)
    t = chat("terminal", "-u", "bob")
    t.expect("Welcome, bob!")
    joined(w, "bob")
    t.ready()
    t.type("half a thought")
    t.expect("half a thought")
    t.type("\x03")  # Ctrl+C
    t.type("hello\r")
    said = w.wait_event(lambda e: e["kind"] == "msg" and e["nick"] == "bob", "bob's line")
    assert said["text"] == "hello" and t.proc.poll() is None
    t.ready()
    t.type("\x03")
    assert t.exit_status() == 0
    assert [e["text"] for e in w.events() if e["kind"] == "msg"] == ["hello"]


# ---------------------------------------------------------------------------- scripts


def test_json_lines_arrive_in_order_and_end_of_input_waits_for_acks(chat):
    """--json: stdin lines reach the others in order; at end of input it exits 0, all sent."""
    w = watcher(chat, "bob", "-r", "work")
    lines = [f"deploy step {i}" for i in range(30)]
    s = chat("script", "--json", "-u", "deploybot", "-r", "work")
    s.send(*lines)
    assert s.end_input() == 0, s.errors
    got = w.wait_event(lambda e: e["text"] == lines[-1], "the last line")  # stored before exit
    msgs = [e for e in w.events() if e["kind"] == "msg" and e["nick"] == "deploybot"]
    assert [e["text"] for e in msgs] == lines
    assert [e["seq"] for e in msgs] == list(range(msgs[0]["seq"], got["seq"] + 1))
    assert all(e["room"] == "work" and not e["mine"] for e in msgs)
    welcome = s.events()[0]
    assert welcome["kind"] == "welcome" and welcome["nick"] == "deploybot"


def test_quit_with_a_line_the_broker_never_got_says_so_and_exits_1(chat):
    """The broker is gone (kill -9); a line typed, then /quit: the client gives up after
    its wait, names the line that was not delivered and exits 1, not 0."""
    s = chat("script", "-u", "carl")
    s.wait_line("Welcome, carl!")
    chat.broker.proc.kill()
    chat.broker.proc.wait()
    s.send("are you there?", "/quit")
    assert s.proc.wait(15) == 1
    assert "1 message(s) were not delivered: are you there?" in "\n".join(s.errors), s.errors


def test_control_characters_from_the_network_are_escaped(chat):
    """ESC and BEL in a message reach neither a terminal nor a plain reader raw: shown as \\x1b."""
    t = chat("terminal", "-u", "tina")
    t.expect("Welcome, tina!")
    plain = chat("script", "-u", "pete")
    plain.wait_line("pete joined")
    s = chat("script", "--json", "-u", "mallory")
    s.send("clear \x1b[2J\x1b]0;pwned\x07 done")
    assert s.end_input() == 0
    shown = r"clear \x1b[2J\x1b]0;pwned\x07 done"
    t.expect(shown)
    assert b"\x1b[2J" not in t.raw and b"\x1b]0;pwned" not in t.raw
    assert shown in plain.wait_line("clear")
    assert "\x1b" not in "".join(plain.lines)
    t.ready()
    t.type("/quit\r")
    assert t.exit_status() == 0


def test_unknown_command_gets_a_hint_and_sends_nothing(chat):
    """An unknown /command is answered locally with a hint; the room never sees it."""
    w = watcher(chat)
    s = chat("script", "-u", "alice")
    s.send("/frobnicate the widgets", "after")
    w.wait_event(lambda e: e.get("text") == "after", "alice's message")
    assert s.end_input() == 0
    hint = s.wait_line("/frobnicate")
    assert "unknown command" in hint and "/help" in hint
    assert not any("frobnicate" in json.dumps(e) for e in w.events())


def test_private_messages_read_clearly_on_both_sides(chat):
    """/msg shows `[private -> bob] text` to the sender and `[private] alice: text` to bob."""
    bob = chat("script", "-u", "bob")
    bob.wait_line("bob joined")
    alice = chat("script", "-u", "alice")
    alice.send("/msg bob psst, over here")
    assert "[private] alice: psst, over here" in bob.wait_line("[private]")
    assert "[private -> bob] psst, over here" in alice.wait_line("[private")
    assert alice.end_input() == 0


def test_history_with_a_nick_shows_the_private_conversation(chat):
    """/history NICK lists the private messages between you and NICK, both ways, in order;
    a third person's /history NICK shows none of them."""
    bob = chat("script", "-u", "bob")
    bob.wait_line("bob joined")
    alice = chat("script", "-u", "alice")
    alice.send("/msg bob one")
    bob.wait_line("[private] alice: one")
    bob.send("/msg alice two")
    alice.wait_line("[private] bob: two")
    alice.send("/history bob")
    title = alice.wait_line("your last 2 private messages with bob:")

    def listed() -> list[str]:
        lines = list(alice.lines)
        return lines[lines.index(title) + 1 :][:2]

    wait_for(lambda: len(listed()) == 2, 5, "the two messages")
    first, second = listed()
    assert "[private -> bob] one" in first and "[private] bob: two" in second
    carol = chat("script", "-u", "carol")
    carol.send("/history bob 10")
    carol.wait_line("no private messages with bob")
    carol.send("/history bob x")
    carol.wait_line("usage: /history [NICK] [N]")
    carol.send("/history -5")  # a bad N, not a nick: the usage, not the nickname rules
    usage = lambda: [ln for ln in carol.lines if "usage: /history [NICK] [N]" in ln]  # noqa: E731
    wait_for(lambda: len(usage()) == 2, 5, "the usage again")
    assert not [ln for ln in carol.lines if "nickname" in ln]
    for c in (alice, bob, carol):
        assert c.end_input() == 0


def test_help_lists_every_command_and_counts_read_right(chat):
    """/help lists every command of the README's table (`/help WORD` those about WORD);
    `//TEXT` says a line that starts with /; `/history 1` and `/history bob 1` read "the
    last event", "your last private message" (not "the last 1 events")."""
    from zmqchat._cli.chat import COMMANDS

    w = watcher(chat)
    s = chat("script", "-u", "alice")
    joined(w, "alice")
    s.send("/help", "//etc/hosts", "/msg watcher hi")
    w.wait_event(lambda e: e.get("text") == "/etc/hosts" and e["nick"] == "alice", "/etc/hosts")
    w.wait_event(lambda e: e["kind"] == "private", "the private message")
    s.send("/history 1", "/history watcher 1")
    s.wait_line("the last event of lobby:")
    s.wait_line("your last private message with watcher:")
    for usage, _ in COMMANDS:
        s.wait_line(f"  {usage}  ")  # the command, then its meaning in a column beside it
    assert s.end_input() == 0
    j = chat("script", "--json", "-u", "bob")
    j.send("/help edit")
    about = j.wait_event(lambda e: e.get("command") == "help", "/help edit")["text"]
    assert "/edit TEXT" in about and "s/OLD/NEW/" in about and "/join" not in about, about
    j.send("/help /join")  # the command itself, not every one whose text says "join"
    about = j.wait_event(lambda e: e.get("command") == "help" and "/join" in e["text"], "/join")
    assert "/unban" in str(COMMANDS) and "/unban" not in about["text"], about
    j.send("/help nothing-like-it")
    none = j.wait_event(lambda e: "nothing-like-it" in e.get("text", ""), "/help of nothing")
    assert none["text"] == "no command about 'nothing-like-it': /help lists them all"
    assert j.end_input() == 0


def test_join_switches_rooms_and_unknown_rooms_are_listed(chat):
    """/join ROOM moves you (the old room sees you leave); an unknown room's error lists rooms."""
    w = watcher(chat)
    s = chat("script", "-u", "alice")
    joined(w, "alice")
    s.send("/join nowhere", "/join #Work", "/rooms")  # (IRC's # and any case: it is work)
    error = s.wait_line("nowhere")
    assert "lobby" in error and "work" in error
    w.wait_event(lambda e: e["kind"] == "leave" and e["nick"] == "alice", "alice leaving lobby")
    assert s.wait_line("* work").startswith("-- * work")
    assert s.end_input() == 0


def test_tab_after_msg_completes_anyone_online_in_any_room(chat):
    """`/msg rob<Tab>` completes robert, who is online in another room: the line sent is
    `/msg robert hello` (the screen shows the completion drawn in place)."""
    r = watcher(chat, "robert", "-r", "work")
    t = chat("terminal", "-u", "ann")
    t.expect("Welcome, ann!")
    t.ready()
    t.type("/msg rob\t")
    t.expect("ert")  # what Tab added
    t.type("hello\r")
    got = r.wait_event(lambda e: e["kind"] == "private", "ann's private message")
    assert (got["nick"], got["text"]) == ("ann", "hello")
    t.type("\x04")
    assert t.exit_status() == 0


def test_typed_line_survives_incoming_messages(chat):
    """In a terminal, a half-typed line is kept while messages arrive, and is then sent whole."""
    w = watcher(chat)
    t = chat("terminal", "-u", "tom")
    t.expect("Welcome, tom!")
    joined(w, "tom")
    t.ready()
    t.type("half of a")
    t.expect("half of a")
    w.send("interrupting you")
    t.expect("<watcher> interrupting you")
    t.type(" sentence\r")
    w.wait_event(lambda e: e["kind"] == "msg" and e["nick"] == "tom", "tom's line")
    said = [e["text"] for e in w.events() if e["kind"] == "msg" and e["nick"] == "tom"]
    assert said == ["half of a sentence"]
    t.expect("<tom> half of a sentence")
    t.type("bye\r")
    assert t.exit_status() == 0


def test_server_key_chats_over_curve(make_broker_process, started, tmp_path):
    """--server-key FILE connects to a CURVE-only broker; its key pair goes to the config dir."""
    keys = tmp_path / "keys"
    subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), "--gen-keys", str(keys)],
        check=True,
        capture_output=True,
        timeout=10,
    )
    broker = make_broker_process("--curve-key", str(keys / "broker.key_secret"))
    where = ["-p", str(broker.port), "--server-key", str(keys / "broker.key")]
    bob = Script("--json", "-u", "bob", *where, XDG_CONFIG_HOME=str(tmp_path / "bob"))
    started.append(bob.proc)
    bob.wait_event(lambda e: e["kind"] == "welcome", "bob's welcome")
    alice = Script("-u", "alice", *where, XDG_CONFIG_HOME=str(tmp_path / "alice"))
    started.append(alice.proc)
    alice.send("over an encrypted line")
    assert alice.end_input() == 0, alice.errors
    bob.wait_event(lambda e: e.get("text") == "over an encrypted line", "alice's message")
    assert (tmp_path / "alice" / "zmqchat" / "client.key_secret").exists()
    assert bob.end_input() == 0
    clash = tmp_path / "report.txt"  # --gen-keys of a file: one line, no traceback
    clash.write_text("a report")
    run = subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), "--gen-keys", str(clash)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert (run.returncode, run.stderr) == (
        2,
        f"broker.py: --gen-keys {clash}: a file, not a folder\n",
    )


def test_a_downloads_folder_that_is_not_there_is_said_at_start(tmp_path):
    """--downloads naming no folder is a usage error before anything connects (it was said
    only at the first /get)."""
    run = subprocess.run(
        [sys.executable, CLIENT, "-u", "bob", "--downloads", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=10,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 2
    assert run.stderr.rstrip().endswith(f"--downloads {tmp_path / 'nope'}: no such folder")


def test_kicked_user_falls_back_to_lobby(make_broker_process, started):
    """Kicked from the room you are in, you land in lobby and your lines go there."""
    broker = make_broker_process("--ops", "boss")
    where = ["-i", "127.0.0.1", "-p", str(broker.port)]
    boss = Script(*where, "--json", "-u", "boss", "-r", "work")
    carol = Script(*where, "-u", "carol", "-r", "work")
    started.extend([boss.proc, carol.proc])
    boss.wait_event(lambda e: e["kind"] == "join" and e["nick"] == "carol", "carol joining")
    boss.send("/kick carol bye now")
    carol.wait_line("you were kicked from work by boss (bye now)")
    carol.wait_line("you are now in lobby")
    carol.send("/rooms", "still talking")
    assert carol.wait_line("* lobby").startswith("-- * lobby")
    carol.wait_line("<carol> still talking")
    assert carol.end_input() == 0


def test_kicked_out_of_lobby_the_room_commands_say_you_are_in_no_room(make_broker_process, started):
    """Kicked from lobby you are in no room: /who or /topic say to /join a room (not that a
    room name is 1 to 32 of a-z, ...)."""
    broker = make_broker_process("--ops", "boss")
    boss = Script("-i", "127.0.0.1", "-p", str(broker.port), "--json", "-u", "boss")
    started.append(boss.proc)
    boss.wait_event(lambda e: e["kind"] == "welcome", "boss's welcome")
    t = Terminal("-i", "127.0.0.1", "-p", str(broker.port), "-u", "carol")
    started.append(t.proc)
    t.ready()
    boss.send("/kick carol bye now")
    t.expect("you are in no room now: /join ROOM to go on")
    for command in ("/who", "/topic"):
        t.type(command + "\r")
        t.expect(f"{command}: you are in no room: /join ROOM first")
    assert "a room name is" not in t.text
    t.type("/quit\r")
    assert t.exit_status() == 0
    assert boss.end_input() == 0


def test_the_bottom_line_of_a_client_in_no_room_says_so(broker):
    """The terminal's bottom line, out of every room: `carol, in no room`, not `carol in `."""
    from zmqchat._cli.chat import Chat
    from zmqchat._cli.render import Screen
    from zmqchat._cli.terminal import toolbar
    from zmqchat._client.library import Client

    async def scenario() -> list[str]:
        async with Client("127.0.0.1", broker.port, "carol") as client:
            screen = Screen(json_mode=False, colour=False)
            lines = [
                toolbar(Chat(client, screen, room, leave_words=False)) for room in ("lobby", "")
            ]
            return lines

    in_lobby, nowhere = asyncio.run(scenario())
    assert in_lobby == " carol in lobby  ·  /help"
    assert nowhere == " carol, in no room  ·  /help"


def test_a_host_that_does_not_exist_is_said_at_once():
    """-i with a host name that names no machine (a typo): said at once as such, status 1,
    not after the 5 s wait for an answer as a broker that does not run."""
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, CLIENT, "-i", "nosuchhost.invalid", "-u", "zed"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=15,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        "client.py: cannot reach the broker at nosuchhost.invalid:9001: "
        "no such host: nosuchhost.invalid\n"
    )
    assert time.monotonic() - began < 4.0
