"""What an operator sees: Prometheus metrics over real HTTP, and structured log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.request

import zmq

from conftest import free_ports, wait_for
from zmqchat import BlockingClient, ChatError, Client
from zmqchat import protocol as m
from zmqchat.broker._loop import default_name


def scrape(port: int) -> dict[str, float]:
    """The metrics page as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_move_as_clients_chat(make_broker_process):
    """--metrics-port serves Prometheus text: connected clients, members per room, requests
    and events by kind, errors by code, rate-limit refusals and the acknowledgement latency
    histogram all follow what clients do."""
    (mport,) = free_ports(1)
    b = make_broker_process("--metrics-port", str(mport), "--rate", "5", "--burst", "5")
    assert b.proc.stdout.readline().strip() == f"Metrics on http://127.0.0.1:{mport}/metrics"
    before = scrape(mport)
    assert before["zmqchat_connected_clients"] == 0
    name = default_name(b.port)
    assert before[f'zmqchat_broker_info{{broker="{name}",mode="single"}}'] == 1

    async def chat() -> None:
        async with (
            Client("127.0.0.1", b.port, "ann") as ann,
            Client("127.0.0.1", b.port, "bob") as bob,
        ):
            for i in range(3):
                await ann.say("lobby", f"hello {i}")
            try:
                await bob.join("nowhere")
            except ChatError as err:
                assert err.code == "ROOM_UNKNOWN"
            during = scrape(mport)
            assert during["zmqchat_connected_clients"] == 2
            assert during['zmqchat_room_members{room="lobby"}'] == 2

    asyncio.run(chat())
    ctx = zmq.Context()
    flood = ctx.socket(zmq.DEALER)
    flood.linger = 0
    flood.connect(f"tcp://127.0.0.1:{b.port}")
    frames = [
        m.encode_request("HELLO", b"h", {"version": 1, "nick": "flood"}),
        m.encode_request("JOIN", b"j", {"room": "lobby"}),
    ]
    frames += [
        m.encode_request(
            "SAY", f"s{i}".encode(), {"room": "lobby", "msgs": [{"id": f"x{i}", "text": "flood"}]}
        )
        for i in range(8)
    ]
    for f in frames:
        flood.send_multipart(f)
    codes = []
    for _ in frames:
        assert flood.poll(5000)
        codes.append(m.decode_response(flood.recv_multipart()).body.get("code"))
    assert "RATE_LIMITED" in codes
    flood.send_multipart(m.encode_request("BYE", b"b", {}))
    assert flood.poll(5000) and m.decode_response(flood.recv_multipart()).kind == "OK"
    ctx.destroy(linger=0)
    after = scrape(mport)
    assert after['zmqchat_requests_total{kind="SAY"}'] >= 3 + 8
    assert after['zmqchat_requests_total{kind="HELLO"}'] == 3
    assert after['zmqchat_events_total{kind="msg"}'] >= 3
    assert after['zmqchat_events_total{kind="join"}'] == 3
    assert after['zmqchat_errors_total{code="ROOM_UNKNOWN"}'] == 1
    assert after["zmqchat_rate_limited_total"] >= 1
    assert after["zmqchat_ack_seconds_count"] >= 3
    assert after['zmqchat_ack_seconds_bucket{le="+Inf"}'] == after["zmqchat_ack_seconds_count"]
    assert 0 < after["zmqchat_ack_seconds_sum"] < after["zmqchat_ack_seconds_count"]
    wait_for(lambda: scrape(mport)["zmqchat_connected_clients"] == 0, 5, "both gone")
    wait_for(lambda: scrape(mport)["zmqchat_history_lag_events"] == 0, 5, "the writer")


def test_connection_events_are_logged_as_json_lines_with_client_text_escaped(make_broker_process):
    """--log-format json alone: one JSON object per connection event; a quit reason full of
    control characters is escaped and cut short, never written raw."""
    b = make_broker_process("--log-format", "json")
    reason = "\x1b[2J\r\nFAKE LINE " + "x" * 180

    async def visit() -> None:
        client = Client("127.0.0.1", b.port, "ann")
        await client.connect()
        await client.topic("lobby", "exams on friday")  # what changes a room is logged too
        await client.close(reason)

    asyncio.run(visit())
    b.stop()
    err = b.proc.stderr.read()
    assert "\x1b" not in err and "\r\nFAKE" not in err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = {line["event"]: line for line in lines if "event" in line}
    assert events["hello"]["nick"] == "ann" and events["hello"]["resume"] is False
    assert events["quit"]["nick"] == "ann"
    assert events["quit"]["reason"] == reason  # decoded from its escaped JSON
    assert all(re.match(r"\d{4}-\d\d-\d\dT", line["ts"]) for line in lines)
    assert (events["topic"]["by"], events["topic"]["topic"]) == ("ann", "exams on friday")
    assert events["started"]["port"] == b.port and events["started"]["broker"]  # and when
    assert lines[-1]["event"] == "stopped"  # it ended, in the same log


def test_json_logs_keep_a_level_given_with_them(make_broker_process):
    """--log-format json --log-level WARNING: no connection events (the level given wins)."""
    b = make_broker_process("--log-format", "json", "--log-level", "warning")
    BlockingClient("127.0.0.1", b.port, "ann").close()
    assert b.stop() == 0
    assert b.proc.stderr.read() == ""


def malformed(b, dealer: zmq.Socket, frames: list[bytes]) -> dict:
    """Send raw frames, return the broker's ERROR reply body."""
    dealer.send_multipart(frames)
    assert dealer.poll(5000), "no reply"
    kind, _label, body = dealer.recv_multipart()
    assert kind == b"ERROR"
    return json.loads(body)


def test_malformed_requests_are_logged_with_the_address_and_rate_limited(broker, caplog):
    """At INFO, each malformed request is one line with its code, reason and the sender's
    address; a flood of them is logged at most 10 lines a second, and the next line says
    how many were left out."""
    caplog.set_level(logging.INFO, logger="zmqchat.broker")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(f"tcp://127.0.0.1:{broker.port}")
    try:
        sent = [
            ([b"NOPE", b"1", b"{}"], "UNKNOWN_COMMAND"),
            ([b"HELLO", b"2", b"{not json"], "BAD_REQUEST"),
            ([b"HELLO", b"3", b'{"version": 99, "nick": "ann"}'], "BAD_VERSION"),
        ]
        for frames, code in sent:
            assert malformed(broker, dealer, frames)["code"] == code

        def lines() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage() == "malformed"]

        got = [(r.fields["code"], r.fields["peer"]) for r in lines()]
        assert got == [(code, "127.0.0.1") for _, code in sent]
        assert "99" in lines()[2].fields["reason"]
        began = time.monotonic()
        for n in range(200):
            dealer.send_multipart([b"NOPE", str(n).encode(), b"{}"])
        for _ in range(200):
            assert dealer.poll(5000)
            dealer.recv_multipart()
        took = time.monotonic() - began
        assert len(lines()) - 3 <= 10 * (int(took) + 2)  # 10 in any second
        wait_for(  # a line once a second goes by says how many it left out
            lambda: (
                malformed(broker, dealer, [b"NOPE", b"x", b"{}"])
                and lines()[-1].fields.get("unlogged")
            ),
            timeout=3,
            what="a line that counts the requests left out",
        )
        logged = len(lines()) - 3
        assert logged + sum(r.fields.get("unlogged", 0) for r in lines()) >= 200
    finally:
        dealer.close()


def test_log_lines_escape_and_cut_what_clients_send():
    """In text lines a value with spaces, quotes or control characters is quoted with
    escapes; any client-given value is cut to 200 characters."""
    import logging

    from zmqchat._ops import logs

    record = logging.LogRecord("broker", logging.INFO, "", 0, "quit", None, None)
    record.fields = {"nick": "ann", "reason": 'bye "all"\x1b[2J\n' + "y" * 400}
    line = logs.TextFormatter().format(record)
    assert "\x1b" not in line and "\n" not in line
    assert ' nick=ann reason="bye \\"all\\"\\u001b[2J\\n' in line
    assert line.count("y") <= 200 and line.endswith('\\u2026"')  # the cut is marked
    data = json.loads(logs.JsonFormatter().format(record))
    assert data["event"] == "quit" and len(data["reason"]) == 201
