"""The client's ordering and gap repair (ordering.RoomOrder), without sockets.

A room's events, however they arrive (live batches late, twice or never, history pages in
between), come out 1, 2, 3, ... once each; what is missing is asked for from history.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from zmqchat._client.ordering import Fetch, RoomOrder


@dataclass(frozen=True)
class Ev:
    seq: object
    text: str = ""


def evs(*seqs: object) -> list[Ev]:
    return [Ev(s, f"e{s}") for s in seqs]


def seqs(events: list[Ev]) -> list[object]:
    return [e.seq for e in events]


def answer(order: RoomOrder[Ev], fetch: Fetch, history: list[Ev], room_seq: int):
    """History's reply to fetch, as the broker gives it: the stored events after fetch.after."""
    page = [e for e in history if e.seq > fetch.after][: fetch.limit]
    return order.fetched(fetch, page, room_seq)


def test_batches_in_order_are_delivered_as_they_come():
    """Consecutive batches come straight out, and nothing is asked of history."""
    order = RoomOrder[Ev]()
    assert seqs(order.receive(evs(1, 2, 3))) == [1, 2, 3]
    assert seqs(order.receive(evs(4))) == [4]
    assert order.last == 4 and not order.missing and not order.held and order.fetch() is None


def test_joined_room_starts_after_its_seq():
    """A room joined at seq 10 delivers 11 on; 10 and older are not delivered again."""
    order = RoomOrder[Ev](10)
    assert seqs(order.receive(evs(9, 10, 11))) == [11]
    assert seqs(order.receive(evs(12, 13))) == [12, 13]


def test_repeated_and_overlapping_batches_are_delivered_once():
    """A batch heard twice, and one overlapping what came before, give each event once."""
    order = RoomOrder[Ev]()
    order.receive(evs(1, 2))
    assert order.receive(evs(1, 2)) == []
    assert seqs(order.receive(evs(2, 3, 4))) == [3, 4]
    assert seqs(order.receive(evs(1, 1, 3, 5))) == [5]


def test_batch_with_a_repeat_inside_is_delivered_once_in_order():
    """A batch 1, 1, 3 (not what a broker sends) gives 1; 2 then releases 3."""
    order = RoomOrder[Ev]()
    assert seqs(order.receive(evs(1, 1, 3))) == [1]
    assert seqs(order.receive(evs(2))) == [2, 3]


def test_events_that_are_not_numbered_are_ignored():
    """An event without an integer seq is never delivered and does not block the others."""
    order = RoomOrder[Ev]()
    assert seqs(order.receive([Ev(None), Ev("2"), Ev(1), Ev(2.0)])) == [1]
    assert seqs(order.receive(evs(2))) == [2]


def test_gap_waits_and_asks_history_for_the_range():
    """After 1..2, a batch 5..6 waits; history is asked for after=2; its reply fills 3..4 and
    everything comes out in order; no second fetch while one is under way."""
    order = RoomOrder[Ev](limit=50)
    order.receive(evs(1, 2))
    assert order.receive(evs(5, 6)) == []
    assert order.missing and order.held and order.target == 6
    fetch = order.fetch()
    assert fetch is not None and (fetch.after, fetch.limit) == (2, 50)
    assert order.fetching and order.fetch() is None
    assert order.receive(evs(7)) == []
    result = order.fetched(fetch, evs(3, 4, 5, 6, 7), 7)
    assert seqs(result.ready) == [3, 4, 5, 6, 7] and not result.skipped
    assert result.next is None and not order.fetching and not order.missing


def test_room_ahead_of_us_is_fetched_in_pages():
    """A ping saying the room is at 25 while we have 0, with pages of 10: three fetches."""
    order = RoomOrder[Ev](limit=10)
    history = evs(*range(1, 26))
    order.reached(25)
    fetch, got, afters = order.fetch(), [], []
    while fetch is not None:
        afters.append(fetch.after)
        result = answer(order, fetch, history, 25)
        got += seqs(result.ready)
        fetch = result.next
    assert afters == [0, 10, 20] and got == list(range(1, 26))


def test_live_batch_arriving_during_a_fetch_is_not_delivered_twice():
    """The room is reported at 5, a fetch after=2 goes out, the live batch 3..5 comes first:
    the reply (3..5 again) delivers nothing and skips nothing."""
    order = RoomOrder[Ev]()
    order.receive(evs(1, 2))
    order.reached(5)
    assert order.missing and not order.held  # ahead, but nothing proves a loss yet
    fetch = order.fetch()
    assert fetch is not None and fetch.after == 2
    assert seqs(order.receive(evs(3, 4, 5))) == [3, 4, 5]
    result = order.fetched(fetch, evs(3, 4, 5), 5)
    assert result.ready == [] and not result.skipped and result.next is None
    assert seqs(order.receive(evs(5, 6))) == [6]


def test_numbers_history_lacks_are_skipped():
    """History has nothing between 2 and 6: 3..5 are given up on (and said so), 6 on come."""
    order = RoomOrder[Ev]()
    order.receive(evs(1, 2))
    order.receive(evs(7))
    fetch = order.fetch()
    assert fetch is not None
    result = order.fetched(fetch, evs(6, 7), 7)
    assert list(result.skipped) == [3, 4, 5]
    assert seqs(result.ready) == [6, 7] and result.next is None and order.last == 7


def test_empty_history_reply_while_holding_events_skips_to_them():
    """History has nothing after 2, yet 5 was heard: 3..4 are given up on and 5 comes out."""
    order = RoomOrder[Ev]()
    order.receive(evs(1, 2))
    order.receive(evs(5))
    fetch = order.fetch()
    assert fetch is not None
    result = order.fetched(fetch, [], 5)
    assert list(result.skipped) == [3, 4] and seqs(result.ready) == [5]


def test_empty_history_reply_from_a_broker_behind_skips_nothing():
    """Heard 1..2 and 6..7 live on one broker, then resumed on another that has not got the
    room's latest events yet: its history has nothing after 2 and says the room is at 4, 2
    or 0 (not followed there yet). 3..5 are not given up on; the next fetch, once that broker
    has them, delivers them and what was held."""
    order = RoomOrder[Ev]()
    order.receive(evs(1, 2))
    order.receive(evs(6, 7))
    for behind in (0, 2, 4):
        fetch = order.fetch()
        assert fetch is not None and fetch.after == 2
        result = order.fetched(fetch, [], behind)
        assert result.ready == [] and not result.skipped and result.next is None
        assert order.last == 2 and order.held
    order.reached(7)  # the next ping
    fetch = order.fetch()
    assert fetch is not None
    result = order.fetched(fetch, evs(3, 4, 5, 6, 7), 7)
    assert seqs(result.ready) == [3, 4, 5, 6, 7] and not result.skipped


def test_empty_history_reply_ends_the_repair_until_told_again():
    """A ping said 9 but history has nothing after 4 and the room is at 4: no more fetching
    (no loop of empty fetches) until the room is reported ahead again."""
    order = RoomOrder[Ev]()
    order.receive(evs(1, 2, 3, 4))
    order.reached(9)
    fetch = order.fetch()
    assert fetch is not None
    result = order.fetched(fetch, [], 4)
    assert result.ready == [] and not result.skipped and result.next is None
    assert not order.missing and order.fetch() is None
    order.reached(6)
    again = order.fetch()
    assert again is not None and again.after == 4


def test_failed_fetch_is_asked_again_and_its_late_reply_ignored():
    """A fetch with no reply (timeout) lets the next fetch() ask again; were the first reply
    to come after all, it changes nothing."""
    order = RoomOrder[Ev]()
    order.reached(3)
    first = order.fetch()
    assert first is not None and order.fetch() is None
    order.failed(first)
    second = order.fetch()
    assert second is not None and second is not first
    assert order.fetched(first, evs(1, 2, 3), 3).ready == []
    assert seqs(order.fetched(second, evs(1, 2, 3), 3).ready) == [1, 2, 3]


def test_broker_that_started_over_is_followed_from_its_new_numbers():
    """We had 1..40; the JOIN reply after a reconnect says 3 (a new history): events 4, 5, ...
    of the new numbering are delivered, and a fetch of the old numbering is ignored."""
    order = RoomOrder[Ev]()
    order.receive(evs(*range(1, 41)))
    order.reached(60)
    stale = order.fetch()
    assert stale is not None
    assert order.joined(3) is True
    assert order.last == 3 and not order.fetching and not order.missing
    assert order.fetched(stale, evs(*range(41, 61)), 60).ready == []
    assert seqs(order.receive(evs(4, 5))) == [4, 5]


def test_rejoin_at_a_later_seq_asks_for_what_was_missed():
    """The JOIN reply of a resume says 8 while we have 5: 6..8 are fetched."""
    order = RoomOrder[Ev]()
    order.receive(evs(1, 2, 3, 4, 5))
    assert order.joined(8) is False
    fetch = order.fetch()
    assert fetch is not None and fetch.after == 5


# ---------------------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_arrival_delivers_every_event_once_in_order(data):
    """Live batches late, reordered, repeated or lost, pings, history pages answered late or
    never: at every moment what came out is 1..k in order, and at the end it is 1..N."""
    n = data.draw(st.integers(1, 60), "N")
    cuts = sorted(data.draw(st.sets(st.integers(2, n), max_size=n - 1), "cuts")) if n > 1 else []
    bounds = [1, *cuts, n + 1]
    batches = [evs(*range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
    order = RoomOrder[Ev](limit=data.draw(st.integers(1, 8), "limit"))
    history: list[Ev] = []  # what the broker has stored (and published) so far
    live: list[list[Ev]] = []  # published batches on their way to us, any order
    asked: list[Fetch] = []  # fetches sent, not yet answered
    out: list[object] = []

    def take(events: list[Ev]) -> None:
        out.extend(seqs(events))
        assert out == list(range(1, len(out) + 1)), out

    def maybe_fetch() -> None:  # what the client does after each receive() and reached()
        fetch = order.fetch()
        if fetch is not None:
            asked.append(fetch)

    def reply(fetch: Fetch) -> None:
        asked.remove(fetch)
        result = answer(order, fetch, history, len(history))
        assert not result.skipped
        take(result.ready)
        if result.next is not None:
            asked.append(result.next)

    for _ in range(300):
        if not (batches or live or asked):
            break
        moves = (
            ["publish"] * bool(batches)
            + ["hear"] * bool(live)
            + ["ping"]
            + ["reply", "fail"] * bool(asked)
        )
        move = data.draw(st.sampled_from(moves))
        if move == "publish":
            batch = batches.pop(0)
            history += batch
            live += [batch] * data.draw(st.integers(0, 2), "copies")
        elif move == "hear":
            take(order.receive(live.pop(data.draw(st.integers(0, len(live) - 1)))))
            maybe_fetch()
        elif move == "ping":
            order.reached(len(history))
            maybe_fetch()
        elif move == "reply":
            reply(asked[data.draw(st.integers(0, len(asked) - 1))])
        else:
            fetch = asked.pop(data.draw(st.integers(0, len(asked) - 1)))
            order.failed(fetch)
    for batch in batches:  # the rest is published but never heard live
        history += batch
    order.reached(n)  # the next ping after the last event: repair to the end
    maybe_fetch()
    while asked:
        reply(asked[0])
    assert out == list(range(1, n + 1))
    assert not order.missing and not order.fetching


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 30), max_size=80), st.integers(0, 5))
def test_live_events_alone_come_out_in_order_once(heard, start):
    """Whatever single events are heard, what comes out is start+1, start+2, ... once each,
    up to the first number never heard."""
    order = RoomOrder[Ev](start)
    out = []
    for s in heard:
        out += seqs(order.receive(evs(s)))
    expected, k = [], start + 1
    while k in heard:
        expected.append(k)
        k += 1
    assert out == expected
