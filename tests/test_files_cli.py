"""Files as a person and a script use them (issue 24): client.py in a terminal and with
--json, against a broker process."""

from __future__ import annotations

import os
import signal

from cli_helpers import joined, watcher

from conftest import wait_for

CTRL_C = "\x03"


def test_send_list_and_get_from_the_terminal_and_a_script(chat, tmp_path):
    """In a terminal /send takes a path with spaces and says the id; a --json script sees the
    offer as an event, /get saves it into --downloads and says where; /files lists it."""
    folder = tmp_path / "my docs"
    folder.mkdir()
    src = folder / "notes v1.txt"
    src.write_bytes(os.urandom(300_000))
    downloads = tmp_path / "dl"
    downloads.mkdir()
    w = watcher(chat, "bob", "--downloads", str(downloads))
    t = chat("terminal", "-u", "alice")
    t.ready()
    joined(w, "alice")
    t.type(f"/send {src}\r")
    offer = w.wait_event(lambda e: e["kind"] == "file", "the offer")
    assert offer["nick"] == "alice" and offer["name"] == "notes v1.txt"
    assert offer["size"] == 300_000 and f"/get {offer['file']}" in offer["text"]
    t.expect(f"sent notes v1.txt (293.0 KB) to lobby: id {offer['file']}")
    w.send(f"/get {offer['file']}")
    saved = w.wait_event(lambda e: e["kind"] == "saved", "saved")
    assert saved["path"] == str(downloads / "notes v1.txt")
    assert (downloads / "notes v1.txt").read_bytes() == src.read_bytes()
    t.type("/files\r")
    t.expect(f"{offer['file']}  notes v1.txt  293.0 KB  from alice")
    w.send("/files")
    listed = w.wait_event(lambda e: e["kind"] == "files", "the list")
    assert [f["file"] for f in listed["files"]] == [offer["file"]]


def test_script_sends_a_file_and_finishes_it_before_leaving(chat, tmp_path):
    """A --json script's /send followed by the end of its input: the upload completes
    first, then the script exits 0; a private /send @NICK reaches only that person."""
    src = tmp_path / "report.csv"
    src.write_text("a,b\n1,2\n")
    bob = watcher(chat, "bob")
    carol = watcher(chat, "carol")
    s = chat("script", "--json", "-u", "deploybot")
    joined(bob, "deploybot")
    s.send(f"/send @bob {src}", f"/send {src}")
    assert s.end_input(10) == 0
    private = bob.wait_event(lambda e: e["kind"] == "file" and e.get("to"), "the private file")
    assert private["name"] == "report.csv" and private["nick"] == "deploybot"
    carol.wait_event(lambda e: e["kind"] == "file", "the room's file")
    assert not [e for e in carol.events() if e["kind"] == "file" and e.get("to")]


def test_ctrl_c_cancels_a_transfer_not_the_client(chat, tmp_path):
    """A transfer stuck (its broker paused) shows in the toolbar; Ctrl+C cancels it and the
    chat goes on; a second Ctrl+C, with nothing under way, leaves."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(100_000))
    t = chat("terminal", "-u", "alice")
    t.ready()
    broker = chat.broker.proc
    broker.send_signal(signal.SIGSTOP)
    try:
        t.type(f"/send {src}\r")
        t.expect("sending big.bin")
        t.type(CTRL_C)
        t.expect("cancelled sending big.bin")
    finally:
        broker.send_signal(signal.SIGCONT)
    t.type("still here\r")
    t.expect("<alice> still here", timeout=10)
    assert t.proc.poll() is None
    t.type(CTRL_C)
    wait_for(lambda: t.proc.poll() is not None, 10, "the client to leave")


def test_a_folder_or_a_wrong_id_is_said_at_once_for_what_it_is(chat, tmp_path):
    """/send of a folder says it is a folder (not `no such file`: it is there); /get of
    something that cannot be a file id says so at once, without starting a transfer; a
    /get of an id nobody has and a /send to a nick nobody has say that nothing moved, and
    why."""
    folder = tmp_path / "my docs"
    folder.mkdir()
    t = chat("terminal", "-u", "alice")
    t.ready()
    t.type(f"/send {folder}\r")
    t.expect(f"{folder} is a folder: /send takes one file (zip or tar the folder)")
    t.type("/get zzz\r")
    t.expect("'zzz' is not a file id (8 to 16 of 0-9a-f; /files lists them)")
    assert "no such file" not in t.text and "getting zzz" not in t.text
    src = tmp_path / "notes.txt"
    src.write_text("x" * 200_000)
    t.type("/get deadbeef\r")  # a file id, of no file: refused, and no transfer was begun
    t.expect("getting deadbeef... (Ctrl+C cancels)")
    t.expect("deadbeef not downloaded: no such file")
    t.type(f"/send @nobody {src}\r")
    t.expect("sending notes.txt (195.3 KB) to nobody... (Ctrl+C cancels)")
    t.expect("notes.txt not sent: nobody called nobody is connected")
    t.ready()
    t.type("/quit\r")
    assert t.exit_status() == 0


def test_files_are_listed_in_columns():
    """/files: names, sizes and senders line up whatever their lengths."""
    from zmqchat._cli.files import offer_lines

    offers = [
        {"file": "0d05b25b", "name": "my log.txt", "size": 22, "nick": "alice", "ts": 0},
        {"file": "4374bbcf", "name": "big.bin", "size": 3_000_000, "nick": "bo", "ts": 0},
    ]
    first, second = offer_lines(offers)
    assert first.startswith("  0d05b25b  my log.txt  22 bytes  from alice  ")
    assert second.startswith("  4374bbcf  big.bin       2.9 MB  from bo     ")
    assert first.index("from") == second.index("from")
