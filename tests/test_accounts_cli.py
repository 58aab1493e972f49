"""Accounts end to end (issue 21): the real `broker.py` and `client.py` as processes, as
the README's "Accounts" section tells a new user to use them: in a pseudo-terminal, through
pipes and --json, the operator's `broker.py accounts`, kill -9 of a client and of the
broker, and two brokers of a cluster."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from cli_helpers import Script, Terminal

from conftest import ROOT, wait_for

PW = "s3cret-pass"
FAST = ("--scram-iterations", "4096", "--heartbeat", "0.5")  # quick logins, quick expiry


def clients(broker, started):
    """A factory of clients of `broker`: start(kind, *args, **env)."""

    def start(kind: str, *args: str, **env: str):
        where = ["-i", "127.0.0.1", "-p", str(broker.port)]
        runner = Terminal(*where, *args) if kind == "terminal" else Script(*where, *args, **env)
        started.append(runner.proc)
        return runner

    start.broker = broker
    return start


@pytest.fixture
def achat(make_broker_process, started):
    """A broker process for accounts, and clients of it: achat(kind, *args, **env)."""
    return clients(make_broker_process(*FAST), started)


@pytest.fixture
def held_chat(make_broker_process, started):
    """The same with the default heartbeat (2 s): a lost connection holds its nick 6 s."""
    return clients(make_broker_process("--scram-iterations", "4096"), started)


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "password"
    path.write_text(PW + "\n")
    return str(path)


def register(achat, nick: str, *lines: str) -> None:
    """A guest script registers its nick (then runs `lines`) and leaves."""
    s = achat("script", "-u", nick)
    s.send("/register", PW, PW, *lines)
    s.wait_line(f"{nick} is registered")
    assert s.end_input() == 0


def operator(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "broker.py"), "accounts", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_register_in_a_terminal_then_log_in_at_the_prompt(achat):
    """/register asks the password twice without showing it; -u with a registered nick asks
    'Password for NICK: ' (not echoed) and logs in; a wrong password is asked for again
    (a typo does not end the session), and after 3 wrong ones the client exits with
    status 4."""
    t = achat("terminal", "-u", "alice")

    def register(*answers: str) -> None:  # /register, its prompts answered with these keys
        t.ready()
        t.type("/register\r")
        for prompt, keys in zip(("Password:", "Again:"), answers, strict=False):
            t.expect(prompt)
            t.type(keys)

    register("short\r")  # too short: said at once, not after typing it twice
    t.expect("a password is at least 8 characters; nothing was changed")
    assert "Again:" not in t.text
    register("\x03")  # Ctrl+C at the password: the command is cancelled, not the chat
    t.expect("cancelled: nothing was changed")
    register(PW + "\r", "\x04")  # Ctrl+D, likewise
    t.expect("cancelled: nothing was changed")
    register(PW + "\r", PW + "\r")
    t.expect("alice is registered: it is yours from now on")
    t.type("/quit\r")
    assert t.exit_status() == 0
    assert PW not in t.text
    t = achat("terminal", "-u", "alice")
    t.expect("alice is a registered account (Enter alone: choose another nickname).")
    t.expect("Password for alice: ")
    t.type("\n")  # not alice after all
    t.expect("Nickname: ")
    t.type("alicia\n")
    t.expect("Welcome, alicia!")
    t.ready()
    t.type("\x04")
    assert t.exit_status() == 0
    t = achat("terminal", "-u", "alice")
    t.expect("Password for alice: ")
    t.type(PW + "\n")
    t.expect("Welcome back, alice! You are in lobby")
    assert t.text.count("Connecting to") == 1, t.text  # not said again after the password
    t.ready()
    t.type("\x04")
    assert t.exit_status() == 0
    assert PW not in t.text
    t = achat("terminal", "-u", "alice")
    t.expect("Password for alice: ")
    t.type("not-the-password\n")
    t.expect("Sorry, wrong password for alice. Try again.")
    t.expect("Password for alice: ")
    t.type(PW + "\n")
    t.expect("Welcome back, alice! You are in lobby")
    t.ready()
    t.type("\x04")
    assert t.exit_status() == 0
    t = achat("terminal", "-u", "alice")
    for _ in range(3):
        t.expect("Password for alice: ")
        t.type("not-the-password\n")
    t.expect("wrong password for alice (3 tries)")
    assert t.exit_status() == 4
    assert t.text.count("Password for alice: ") == 3, t.text


def test_an_account_fixes_and_deletes_what_it_said_before_it_logged_in_again(achat, password_file):
    """An account's messages are its own from any session: logged in again, `s/OLD/NEW/`
    fixes the last one it said in the room before, and /delete removes it. A guest has
    nothing to fix after it comes back (its old messages were another client's)."""
    register(achat, "alice", "I will fix thsi later")
    w = achat("script", "--json", "-u", "watcher")
    w.wait_event(lambda e: e["kind"] == "join" and e["nick"] == "watcher", "watcher joining")
    s = achat("script", "-u", "alice", "--password-file", password_file)
    s.wait_line("Welcome back, alice!")
    s.send("s/thsi/this/")
    edit = w.wait_event(lambda e: e["kind"] == "edit" and e["nick"] == "alice", "the edit")
    assert edit["text"] == "I will fix this later"
    s.send("/delete")
    w.wait_event(lambda e: e["kind"] == "delete" and e["nick"] == "alice", "the removal")
    assert s.end_input() == 0
    guest = achat("script", "-u", "gus")
    guest.send("a guest's line")
    w.wait_event(lambda e: e.get("text") == "a guest's line", "the guest's line")
    assert guest.end_input() == 0
    guest = achat("script", "-u", "gus")
    guest.send("s/line/word/")
    assert "only those sent from this client count" in guest.wait_line("no message in lobby")
    assert guest.end_input() == 0


def test_a_script_logs_in_from_a_file_or_the_environment_and_is_never_asked(
    achat, password_file, tmp_path
):
    """From a pipe /register reads the next two lines; a registered nick then needs
    --password-file or ZMQCHAT_PASSWORD (status 4 without, or with a wrong one, and the nick
    stays free); --json never asks, even on a terminal."""
    register(achat, "bob")
    s = achat("script", "-u", "bob")
    assert s.end_input() == 4
    assert "bob is a registered account" in s.errors[-1] and "--password-file" in s.errors[-1]
    for way in (("--password-file", password_file), ()):
        s = achat("script", "-u", "bob", *way, ZMQCHAT_PASSWORD=PW if not way else "")
        s.wait_line("Welcome back, bob!")
        assert s.end_input() == 0
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    s = achat("script", "-u", "bob", "--password-file", str(wrong))
    assert s.end_input() == 4 and "wrong password for bob" in s.errors[-1]
    t = achat("terminal", "-u", "bob", "--json")
    assert t.exit_status() == 4
    assert "Password for" not in t.text and "--json never asks" in t.text
    s = achat("script", "-u", "bob", "--password-file", password_file, "--json")
    welcome = s.wait_event(lambda e: e["kind"] == "welcome", "the welcome")
    assert welcome["account"] == "bob" and welcome["joined"] == ["lobby"]
    assert s.end_input() == 0


def test_a_password_is_changed_with_password(achat, password_file):
    """/password asks the old password once and the new one twice; a wrong old one
    changes nothing, and says so; then only the new one logs in."""
    register(achat, "cy")
    s = achat("script", "-u", "cy", "--password-file", password_file)
    s.send("/password", "not-the-old-one", "n3w-secret", "n3w-secret")
    assert "nothing was changed" in s.wait_line("wrong password for cy")
    s.send("/password", PW, "n3w-secret", "n3w-secret")
    s.wait_line("your password is changed")
    assert s.end_input() == 0
    s = achat("script", "-u", "cy", "--password-file", password_file)
    assert s.end_input() == 4
    s = achat("script", "-u", "cy", ZMQCHAT_PASSWORD="n3w-secret")
    s.wait_line("Welcome back, cy!")
    assert s.end_input() == 0


def test_an_account_takes_over_its_killed_client_at_once(held_chat, password_file):
    """kill -9 of an account's client: logging in again takes its held session over at
    once (not after the 6 s a lost connection holds its nick), and the room sees neither a
    leave nor a join."""
    achat = held_chat
    register(achat, "dee")
    w = achat("script", "-u", "watcher", "--json")
    w.wait_event(lambda e: e["kind"] == "join" and e["nick"] == "watcher", "the watcher in")
    first = achat("script", "-u", "dee", "--password-file", password_file)
    first.send("before")
    w.wait_event(lambda e: e.get("text") == "before", "dee's first line")
    first.proc.kill()
    first.proc.wait()
    started = time.monotonic()
    again = achat("script", "-u", "dee", "--password-file", password_file)
    again.send("after")
    w.wait_event(lambda e: e.get("text") == "after", "dee's line after the kill")
    assert time.monotonic() - started < 4  # not the 3 heartbeats (6 s) of a held nick
    assert again.end_input() == 0
    live = [e for e in w.events() if e.get("nick") == "dee" and not e.get("backlog")]
    assert [e["text"] for e in live] == ["before", "after"]  # no leave, no join


def test_a_guest_waits_for_its_nick_after_its_client_was_killed(achat):
    """A guest restarted right after kill -9 is told its nick is still held and for how
    long, waits, and gets it."""
    first = achat("script", "-u", "eve")
    first.wait_line("Welcome, eve!")
    first.proc.kill()
    first.proc.wait()
    again = achat("script", "-u", "eve")
    again.wait_line("Welcome, eve!", timeout=20)  # the nick is held 3 heartbeats (6 s)
    waited = "if that was you and your connection was just lost, it is free within"
    assert any(waited in e for e in again.errors)
    assert again.end_input() == 0


def test_after_a_login_the_unread_is_said_shown_and_counted(achat, password_file):
    """Back after others talked: the summary lines, the unread private message, the
    current room's unread messages with the mention highlighted, the other room's count in
    the toolbar; /join shows that room's unread; a second login has nothing unread."""
    register(achat, "fay", "/join support", "/join work")
    bob = achat("script", "-u", "bob", "-r", "work")
    bob.send("hello FAY, are you there?", "second line", "/join support", "a ticket")
    bob.send("/msg fay lunch?")
    bob.wait_line("[private -> fay] lunch?")
    assert bob.end_input() == 0
    t = achat("terminal", "-u", "fay", "--password-file", password_file)
    t.expect("Welcome back, fay! You are in work; your other rooms: lobby, support")
    t.expect("*** 1 unread from bob")  # after the rooms'
    assert "*** 2 unread in work, 1 mentions you" in t.text
    assert "*** 1 unread in support" in t.text
    t.expect("[private] bob: lunch?")
    t.expect("<bob> hello FAY, are you there?")
    t.expect("<bob> second line")
    t.expect("work (+1)>")  # unread elsewhere (the toolbar says where: support 1)
    t.type("/join support\r")
    t.expect("<bob> a ticket")
    t.ready("support")
    t.type("/quit\r")
    assert t.exit_status() == 0
    s = achat("script", "-u", "fay", "--password-file", password_file, "--json")
    s.wait_event(lambda e: e["kind"] == "welcome", "the welcome")
    assert s.end_input() == 0
    assert not [e for e in s.events() if e["kind"] == "unread"]
    assert s.events()[0]["room"] == "support"  # where it was last


def test_join_says_where_you_are_before_what_is_unread_there(achat, password_file):
    """/join of one of the account's rooms: `you are now in lobby` heads the room's unread
    messages (it came after them, as if they were the room left behind)."""
    register(achat, "fay", "/join support")  # in lobby and support, last in support
    bob = achat("script", "-u", "bob")
    bob.send("news for the lobby")
    bob.wait_line("<bob> news for the lobby")
    assert bob.end_input() == 0
    s = achat("script", "-u", "fay", "--password-file", password_file)
    s.wait_line("Welcome back, fay! You are in support")
    s.send("/join lobby")
    s.wait_line("<bob> news for the lobby")
    assert s.end_input() == 0
    said = [line for line in s.lines if "you are now in lobby" in line or "<bob>" in line]
    assert [line.split(" ", 1)[1] for line in said] == [
        "you are now in lobby",
        "<bob> news for the lobby",
    ], s.lines


def test_a_message_edited_twice_while_away_is_caught_up_with_once(achat, password_file):
    """While fay is away bob says a line in lobby and edits it twice: when she comes back
    and joins lobby, its catch-up shows the line once, as it reads now, not the line and
    then each edit again."""
    register(achat, "fay", "/join support")  # in lobby and support, last in support
    bob = achat("script", "-u", "bob")
    bob.send("the fix is in banana", "/edit the fix is in cherry", "/edit the fix is in kiwi")
    bob.wait_line("<bob> the fix is in kiwi (edited)")
    bob.send("done for today")
    bob.wait_line("<bob> done for today")
    assert bob.end_input() == 0
    s = achat("script", "-u", "fay", "--password-file", password_file)
    s.wait_line("Welcome back, fay! You are in support")
    s.send("/join lobby")
    s.wait_line("<bob> done for today")
    assert s.end_input() == 0
    said = [line.split(" ", 1)[1] for line in s.lines if "<bob>" in line]
    assert said == ["<bob> the fix is in kiwi (edited)", "<bob> done for today"], s.lines


def test_a_private_file_offer_seen_is_read_and_own_lines_are_not_unread(
    achat, password_file, tmp_path
):
    """fay, on, is offered a file privately and says a line from a script of her own in
    a room she is not looking at; back later, nothing of either is waiting for her."""
    register(achat, "fay", "/join support")  # last in support
    doc = tmp_path / "notes.txt"
    doc.write_text("the notes")
    s = achat("script", "-u", "fay", "--password-file", password_file, "--json")
    s.wait_event(lambda e: e["kind"] == "welcome", "fay's welcome")
    bob = achat("script", "-u", "bob")
    bob.send(f"/send @fay {doc}")
    s.wait_event(lambda e: e["kind"] == "file" and e.get("to"), "the private offer")
    mine = achat("script", "-u", "fay", "--password-file", password_file, "-r", "lobby")
    mine.send("a line from my script in lobby")  # (a second session of the account)
    s.wait_event(lambda e: e["kind"] == "marked" or e.get("room") == "lobby", "news of it")
    assert mine.end_input() == 0 and bob.end_input() == 0
    assert s.end_input() == 0
    again = achat("script", "-u", "fay", "--password-file", password_file, "--json")
    again.wait_event(lambda e: e["kind"] == "welcome", "the welcome")
    assert again.end_input() == 0
    assert not [e for e in again.events() if e["kind"] == "unread"], again.events()


def test_the_operator_manages_accounts_while_the_broker_runs(achat, password_file):
    """`broker.py accounts add|list|passwd|del` on the broker's database, the broker
    running: each change counts at the next login, and passwd and del end the account's
    live sessions within seconds (the client says it cannot log in again)."""
    db = ["--db", achat.broker.args[achat.broker.args.index("--db") + 1]]
    done = operator("add", "gus", *db, "--password-file", password_file, "--iterations", "4096")
    assert (done.returncode, done.stdout) == (0, "added gus\n")
    assert operator("add", "GUS", *db, "--password-file", password_file).returncode == 1
    s = achat("script", "-u", "gus", "--password-file", password_file)
    s.wait_line("Welcome, gus!")  # (its first login: not "back")
    assert operator("list", *db).stdout.startswith("gus  (registered ")
    done = operator("passwd", "gus", *db, "--iterations", "4096", stdin="n3w-secret\nn3w-secret\n")
    assert done.returncode == 0 and "Password for gus: " in done.stderr
    s.wait_line("cannot log in again: the password for gus was changed", timeout=15)
    assert s.end_input() == 4  # a supervisor of the script can tell
    assert achat("script", "-u", "gus", "--password-file", password_file).end_input() == 4
    s = achat("script", "-u", "gus", ZMQCHAT_PASSWORD="n3w-secret")
    s.wait_line("Welcome back, gus!")
    assert operator("del", "gus", *db).stdout == "removed gus\n"
    s.wait_line("cannot log in again: the account gus was removed", timeout=15)
    assert s.end_input() == 4
    s = achat("script", "-u", "gus")  # a guest's nick again
    s.wait_line("Welcome, gus!")
    assert s.end_input() == 0
    assert operator("del", "gus", *db).returncode == 1


def test_a_missing_password_file_is_said_plainly_under_the_name_as_run(tmp_path):
    """The operator's command names itself as it was run (`broker.py accounts`, not an
    installed command's name) and, like the client, says what is wrong with a password
    file in words, not as Python's exception text; nothing is created."""
    missing = str(tmp_path / "no-such-file")
    db = str(tmp_path / "chat.db")
    done = operator("add", "gus", "--db", db, "--create", "--password-file", missing)
    assert done.returncode == 1
    assert (
        done.stderr == f"broker.py accounts: --password-file {missing}: no such file or directory\n"
    )
    done = operator("del", "gus", "--db", db)
    assert (done.returncode, done.stderr.split(": ")[0]) == (1, "broker.py accounts")
    client = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "-u", "gus", "--password-file", missing],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert client.returncode == 2
    assert client.stderr == f"client.py: --password-file {missing}: no such file or directory\n"
    assert list(tmp_path.iterdir()) == []


def test_the_operators_password_is_read_twice_and_what_is_wrong_is_said_first(tmp_path):
    """`accounts add` with one line on its input says the password is read twice (it exited
    1 saying nothing) and creates nothing; a --db that is not there is refused (add made a
    new, empty one: `--create` does), and `passwd` of an account that is not there says so,
    before a password is asked for."""
    db = str(tmp_path / "chat.db")
    done = operator("add", "gus", "--db", db, "--create", stdin="only-one-line\n")
    assert done.returncode == 1
    assert done.stderr.endswith(
        "broker.py accounts: no password: it is read twice (two lines from a pipe), or give it "
        "with --password-file FILE; nothing was changed\n"
    )
    assert list(tmp_path.iterdir()) == []
    for action, hint in (("passwd", ")"), ("add", "; --create makes a new one)")):
        done = operator(action, "gus", "--db", db, stdin="s3cret-pass\ns3cret-pass\n")
        assert (done.returncode, done.stderr) == (
            1,
            f"broker.py accounts: {db}: no such database (--db the broker's, or --cluster "
            f"URLS{hint}\n",
        )  # (a typo in --db, or the wrong folder: no new, empty database the broker never reads)
        assert list(tmp_path.iterdir()) == []
    done = operator("add", "gus", "--db", db, "--create", stdin="s3cret-pass\ns3cret-pass\n")
    assert (done.returncode, done.stdout) == (0, "added gus\n")
    for args, said in (
        (("passwd", "ivy"), "no account ivy"),
        (("add", "GUS"), "gus is registered already (a new password: accounts passwd gus)"),
    ):
        done = operator(*args, "--db", db, stdin="an0ther-pass\nan0ther-pass\n")
        assert (done.returncode, done.stderr) == (1, f"broker.py accounts: {said}\n")
        assert "Password" not in done.stderr  # nothing was asked


def test_accounts_rooms_and_marks_survive_kill_9_of_the_broker(achat, password_file):
    """An account, its rooms and what it has read are on disk like the history: after a
    kill -9 of the broker the account logs in, is back in its rooms and is told what it
    has not read."""
    register(achat, "hal", "/join team")
    bob = achat("script", "-u", "bob", "-r", "team")
    bob.send("one", "two")
    bob.wait_line("<bob> two")
    assert bob.end_input() == 0
    achat.broker.proc.kill()
    achat.broker.proc.wait()
    achat.broker.start()
    s = achat("script", "-u", "hal", "--password-file", password_file)
    s.wait_line("2 unread in team")
    s.wait_line("<bob> two")
    assert s.end_input() == 0


def test_register_on_one_broker_and_log_in_on_another(make_cluster_broker, started, tmp_path):
    """In a cluster an account registered on b1 logs in on b2, with its rooms; killed there
    (kill -9), it logs in again on b1 at once, the room seeing no leave or join; the
    operator adds an account against the cluster's NATS, and it logs in on either broker."""
    b1 = make_cluster_broker("b1", "--scram-iterations", "4096", "--heartbeat", "2")
    b2 = make_cluster_broker("b2", "--scram-iterations", "4096", "--heartbeat", "2")
    password = tmp_path / "password"
    password.write_text(PW + "\n")

    def script(b, *args: str) -> Script:
        s = Script("-i", "127.0.0.1", "-p", str(b.port), *args)
        started.append(s.proc)
        return s

    s = script(b1, "-u", "ivy", "-r", "work")
    s.send("/register", PW, PW)
    s.wait_line("ivy is registered")
    assert s.end_input() == 0
    w = script(b1, "-u", "watcher", "-r", "work", "--json")
    w.wait_event(lambda e: e["kind"] == "join" and e["nick"] == "watcher", "the watcher in")
    s = script(b2, "-u", "ivy", "--password-file", str(password))
    s.wait_line("Welcome back, ivy! You are in work")
    s.send("from b2")
    w.wait_event(lambda e: e.get("text") == "from b2", "ivy's line through b2")
    s.proc.kill()
    s.proc.wait()
    killed = time.monotonic()
    s = script(b1, "-u", "ivy", "--password-file", str(password))
    s.send("from b1")
    w.wait_event(lambda e: e.get("text") == "from b1", "ivy's line through b1, at once")
    assert time.monotonic() - killed < 4  # not the 6 s a lost connection holds its nick
    assert s.end_input() == 0
    live = [e for e in w.events() if e.get("nick") == "ivy" and not e.get("backlog")]
    assert [e["text"] for e in live] == ["from b2", "from b1"]  # no leave, no join
    urls = b1.args[b1.args.index("--cluster") + 1]
    ns = ["--cluster", urls, "--namespace", make_cluster_broker.namespace]
    done = operator("add", "jo", *ns, "--password-file", str(password), "--iterations", "4096")
    assert done.returncode == 0, done.stderr
    assert "jo  (registered" in operator("list", *ns).stdout
    for b, welcome in ((b1, "Welcome, jo!"), (b2, "Welcome back, jo!")):  # (first, then back)
        s = script(b, "-u", "jo", "--password-file", str(password))
        s.wait_line(welcome)
        assert s.end_input() == 0
    assert wait_for(lambda: "ivy" in operator("list", *ns).stdout, 5, "ivy listed")


def test_two_devices_of_an_account_share_their_marks_and_rooms(achat, password_file):
    """An account in a terminal and in a --json script at once: both get in and both stay;
    what the terminal reads comes off the script's unread (a `marked` line with unread 0);
    what the script reads comes off the terminal's prompt count; a /join in the script is
    followed by the terminal."""
    register(achat, "gil", "/join support", "/join lobby")
    t = achat("terminal", "-u", "gil", "--password-file", password_file)
    t.expect("Welcome back, gil!")
    t.ready("lobby")
    s = achat("script", "-u", "gil", "--password-file", password_file, "--json", "-r", "lobby")
    s.wait_event(lambda e: e["kind"] == "welcome", "the script's welcome")
    bob = achat("script", "-u", "bob", "-r", "support")
    bob.send("one", "two")
    bob.wait_line("two")
    t.expect("(+2)>")  # support's two, counted while the terminal reads lobby
    t.type("/join support\r")
    t.expect("<bob> two")
    marked = s.wait_event(lambda e: e["kind"] == "marked", "the terminal's mark, told")
    assert (marked["room"], marked["unread"]) == ("support", 0)
    s.send("/join team")  # the script joins a room: the terminal follows
    t.expect("your account joined team on another connection")
    s.send("/leave team")
    t.expect("your account left team on another connection")
    assert s.end_input() == 0
    t.type("/quit\r")
    assert t.exit_status() == 0
    assert bob.end_input() == 0


def test_the_accounts_own_lines_from_elsewhere_are_not_counted_unread():
    """The toolbar's count of another room: a line under the account's nick (sent from
    its other device or a script of its own) is not something to read; bob's is."""
    from zmqchat import Client
    from zmqchat._cli.catchup import Reading
    from zmqchat._client.library import Event

    reading = Reading(Client("127.0.0.1", 9, "Fay"))
    reading.take(Event("msg", "from my script", "fay", "lobby", 5, mine=False), "support")
    reading.take(Event("msg", "hi fay", "bob", "lobby", 6), "support")
    assert reading.waiting == {"lobby": [1, 1]}  # what the toolbar shows: lobby 1 (1 @you)
