"""End to end (issue 23): `client.py` and `broker.py` as processes, as a user tries the
README's section on editing, replying and searching: s/old/new/, /edit, /delete, /purge,
/reply, /search, on one broker (restarted too) and on two brokers of a cluster."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import Script, Terminal, joined, watcher

from conftest import wait_for


def test_a_fixed_line_reaches_the_room_and_survives_a_broker_restart(chat):
    """s/old/new/ and /edit in the terminal: the room sees the edit and the terminal shows
    the line `(edited)` (s/old/new without its closing slash too, when old is in the last
    line; else it is text); after the broker restarts, a newcomer's backlog has the new
    text."""
    w = watcher(chat)
    t = chat("terminal", "-u", "alice")
    t.expect("Welcome, alice!")
    joined(w, "alice")
    t.ready()
    t.type("/edit too early\r")  # typed right, nothing to edit: not a usage error
    t.expect("!! you have no message in lobby to edit (only those sent from this client count)")
    t.type("teh deploy is done\r")
    said = w.wait_event(lambda e: e["kind"] == "msg" and e["nick"] == "alice", "alice's line")
    t.type("s/teh/the/\r")
    edit = w.wait_event(lambda e: e["kind"] == "edit", "the s/// edit")
    assert (edit["text"], edit["nick"], edit["ref"]) == ("the deploy is done", "alice", said["seq"])
    t.expect("<alice> the deploy is done (edited) [was: teh deploy is done]")
    t.type("/edit the deploy is DONE\r")
    w.wait_event(lambda e: e.get("text") == "the deploy is DONE", "the /edit")
    t.type("s/nothing/here/\r")
    t.expect("!! 'nothing' is not in your last message: nothing was changed")
    chat.broker.stop()
    chat.broker.start()
    late = chat("script", "--json", "-u", "late")
    backlog = late.wait_event(lambda e: e.get("seq") == said["seq"], "the edited line")
    assert backlog["text"] == "the deploy is DONE" and backlog["backlog"] and backlog["edited"]
    t.expect("reconnected")
    t.type("/history 5\r")
    t.expect("<alice> the deploy is DONE (edited)")
    t.type("s/DONE/done\r")  # the closing slash forgotten: still an edit (DONE is there)
    w.wait_event(lambda e: e.get("text") == "the deploy is done", "the s/// edit, unclosed")
    t.type("s/he/it\r")  # no closing slash, 'he' in the last line: an edit, not text
    w.wait_event(lambda e: e.get("text") == "tit deploy is done", "a word of it, unclosed")
    t.type("s/xyz/abc\r")  # xyz is not in it: text, said to the room as typed
    w.wait_event(lambda e: e["kind"] == "msg" and e.get("text") == "s/xyz/abc", "as text")
    t.type("bye\r")
    assert t.exit_status() == 0


def test_a_short_history_shows_a_message_edited_twice_once(chat):
    """/history N too short to hold a message edited twice (only its two edits): the
    message is shown once, as it reads now, not as two lines."""
    w = watcher(chat)
    alice = chat("script", "-u", "alice")
    joined(w, "alice")
    alice.send("the deploy is dnoe")
    w.wait_event(lambda e: e.get("text") == "the deploy is dnoe", "the line")
    alice.send("/edit the deploy is done", "/edit the deploy is DONE")
    w.wait_event(lambda e: e.get("text") == "the deploy is DONE", "the second edit")
    alice.send("/history 2", "/rooms")
    alice.wait_line("rooms (* = you are here):")
    lines = list(alice.lines)
    header = alice.wait_line("events of lobby (")
    listing = lines[lines.index(header) + 1 : lines.index("-- rooms (* = you are here):")]
    assert [line.split(" ", 1)[1] for line in listing] == [
        "[earlier] <alice> the deploy is DONE (edited)"
    ], listing
    assert alice.end_input() == 0


def test_a_deleted_line_is_gone_from_history_search_and_the_files(chat, tmp_path: Path):
    """/delete: the room sees `alice deleted a message`; /history and /search show
    nothing of it; once the broker has stopped, no file of its history holds the text."""
    w = watcher(chat)
    alice = chat("script", "-u", "alice")
    joined(w, "alice")
    alice.send("my password is hunter2", "and something else")
    w.wait_event(lambda e: e.get("text") == "and something else", "the second line")
    alice.send("/edit and something else entirely", "/delete")
    # /delete takes the last one: the line just edited, and its edit with it
    w.wait_event(lambda e: e["kind"] == "delete", "the removal")
    alice.send("/delete")
    notices = wait_for(
        lambda: [e for e in w.events() if e["kind"] == "delete"][1:],
        5,
        "the second removal",
    )
    assert notices[0]["text"] == "alice deleted a message"
    alice.send("/history", "/search hunter2", "/search something")
    alice.wait_line("nothing found for hunter2 in lobby")
    alice.wait_line("nothing found for something in lobby")
    lines = list(alice.lines)
    header = alice.wait_line("events of lobby (")  # the deleted ones are not listed:
    assert header.endswith("not shown on their own: edits, deleted messages):"), header
    start = lines.index(header)
    listing = lines[start : lines.index("-- nothing found for hunter2 in lobby")]
    assert any("alice deleted a message" in line for line in listing)
    assert not any("hunter2" in line or "something" in line for line in listing)
    assert alice.end_input() == 0
    assert w.end_input() == 0
    chat.broker.stop()
    for path in tmp_path.iterdir():
        if path.is_file():
            data = path.read_bytes()
            assert b"password is hunter2" not in data and b"something else" not in data, path


def test_operators_purge_and_others_are_refused(make_broker_process, started):
    """/purge NICK N removes NICK's last N messages for an operator; anyone else gets a
    clear refusal and nothing is removed."""
    broker = make_broker_process("--ops", "boss")
    where = ["-i", "127.0.0.1", "-p", str(broker.port)]
    w = Script(*where, "--json", "-u", "w")
    spam = Script(*where, "-u", "spammer")
    boss = Script(*where, "-u", "boss")
    carol = Script(*where, "-u", "carol")
    started += [s.proc for s in (w, spam, boss, carol)]
    spam.send("buy 1", "buy 2", "buy 3")
    w.wait_event(lambda e: e.get("text") == "buy 3", "the spam")
    carol.wait_line("<spammer> buy 3")
    carol.send("/purge spammer 2")
    carol.wait_line("operators may remove any")
    boss.wait_line("<spammer> buy 3")
    boss.send("/purge spammer 2")
    removed = wait_for(lambda: [e for e in w.events() if e["kind"] == "delete"][1:], 5, "2")
    assert {e["text"] for e in removed} == {"a message by spammer was removed by boss"}
    carol.wait_line("-- a message by spammer was removed by boss")
    carol.send("/search buy")
    carol.wait_line("1 match for buy in lobby")
    assert "**buy** 1" in carol.wait_line("<spammer> **buy** 1")
    for s in (w, spam, boss, carol):
        assert s.end_input() == 0


def test_a_reply_is_shown_with_what_it_answers_live_and_in_history(chat):
    """/reply NICK TEXT answers NICK's last line: everyone sees a short quote of it."""
    w = watcher(chat)
    t = chat("terminal", "-u", "bob")
    t.expect("Welcome, bob!")
    joined(w, "bob")
    w.send("is the deploy done now or do we wait for the tests to finish first?")
    t.expect("<watcher> is the deploy")
    t.ready()
    t.type("/reply watcher yes, go ahead\r")
    reply = w.wait_event(lambda e: e.get("text") == "yes, go ahead", "the reply")
    assert reply["re_nick"] == "watcher" and reply["quote"].startswith("watcher: is the deploy")
    t.expect("<bob> [re watcher: is the deploy done now or…] yes, go ahead")
    t.type("/history\r")
    t.expect("[earlier] <bob> [re watcher: is the deploy done now or…] yes, go ahead")
    t.type("/reply nobody hello\r")
    t.expect("nobody has said nothing in lobby lately")
    t.type("bye\r")
    assert t.exit_status() == 0


def test_search_words_prefixes_phrases_and_only_what_you_may_read(chat):
    """/search finds words, prefixes and phrases, newest first with the match marked;
    /search -a adds your other rooms and your private messages, never another's."""
    ann = chat("script", "-u", "ann")
    ann.wait_line("ann joined")
    ben = chat("script", "-u", "ben")
    ben.wait_line("ben joined")
    ann.send("The build failed", "rebuild it", "deployment at five", "/msg ben deploy key: 42")
    ben.wait_line("[private] ann: deploy key: 42")
    ann.send("/join work", "deploy notes for work", "/join lobby")
    ann.wait_line("you are now in lobby")
    ben.send('/search "build failed"', "/search deploy*", "/search -a deploy*")
    assert "<ann> The **build failed**" in ben.wait_line("**build failed**")
    ben.wait_line("1 match for deploy* in lobby")
    assert "[lobby] <ann> **deployment** at five" in ben.wait_line("**deployment** at five")
    ben.wait_line("2 matches for deploy* in your rooms and private messages")
    assert "[private -> ben] <ann> **deploy** key: 42" in ben.wait_line("**deploy** key")
    assert not any("notes for work" in line for line in ben.lines)
    for c in (ann, ben):
        assert c.end_input() == 0


def test_edit_on_b1_is_seen_on_b2_and_search_on_b2_finds_it(make_cluster_broker, started):
    """Two brokers: a line fixed in a terminal on b1 reaches a script on b2, and /search
    through b2 finds what was said through b1."""
    b1, b2 = make_cluster_broker("b1"), make_cluster_broker("b2")
    w = Script("-i", f"127.0.0.1:{b2.port}", "--json", "-u", "w")
    started.append(w.proc)
    w.wait_event(lambda e: e["kind"] == "join" and e["nick"] == "w", "w's join")
    t = Terminal("-i", f"127.0.0.1:{b1.port}", "-u", "alice")
    started.append(t.proc)
    t.expect("Welcome, alice!")
    t.ready()
    t.type("the relese is out\r")
    w.wait_event(lambda e: e.get("text") == "the relese is out", "alice's line via b1")
    t.type("s/relese/release/\r")
    edit = w.wait_event(lambda e: e["kind"] == "edit", "the edit via b1")
    assert edit["text"] == "the release is out"
    found = wait_for(
        lambda: (
            w.send("/search release")
            or next((e for e in w.events() if e.get("command") == "search" and e["results"]), None)
        ),
        10,
        "the line found through b2",
    )
    assert [r["text"] for r in found["results"]] == ["the release is out"]
    assert found["results"][0]["edited"]
    t.type("bye\r")
    assert t.exit_status() == 0
    assert w.end_input() == 0
