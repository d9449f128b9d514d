"""``Rater.feed_block`` (many lines decoded in one call) gives every line the outcome
``Rater.feed_line`` gives it alone, in order: the same tally, ledger, tails and rejections."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.domain import Rater, Rejected, load_ratecards, parse_ratecards
from meter.domain.event import MAX_DEPTH
from tests.domain.events import bad_events, line, mutated_events, valid_events
from tests.domain.test_ratecard import card, doc

CARDS = load_ratecards()
#: Two cards: the loop looks each event's card up by its date.
TWO_CARDS = parse_ratecards(
    doc(card(version="old", effective="2026-01-01"), card(version="new", effective="2026-11-15"))
)

EVENT = line()
#: Lines that only a whole-block decoder could get wrong.
TRICKS = [
    EVENT[:60] + b"\n" + EVENT[60:],  # one event over two lines
    EVENT[:70] + b"\n" + EVENT[70:],  # ... split inside a string: "],[" is a string there
    EVENT + b" " + EVENT,  # two on one line
    EVENT + b"," + EVENT,
    b"[" + EVENT + b"]",
    EVENT[:-1] + b',"tags":["a",["b"]]}',  # arrays among the ignored members
    EVENT[:-1] + b',"x":' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}",
    EVENT[:-1] + b',"x":' + b'{"":' * MAX_DEPTH + b"{}" + b"}" * MAX_DEPTH + b"}",
    EVENT[:-1] + b',"x":' + b"[" * 600 + b"]" * 600 + b"}",
    line(time="2026-11-30T23:59:60Z"),  # a leap second
    line(time="2026-11-03t10:00:00.123456789z"),
    line(workload="vm\u00e9"),  # not ASCII: the line goes alone
    line(workload="vm\u0085"),  # a C1 control character
    line(workload="vm\\u0007x").replace(b"\\\\u", b"\\u"),  # an escaped control character
    line(workload="\u2028"),
    line(tenant="x" * 129),
    line(workload="w" * 257),
    line(id=""),
    line(license=None, wtype="cloud_vm"),
    line(result="failed", license=None),
    line(result="failed", tenant="a/b"),
    line(time="0001-01-01T00:30:00+01:00"),  # before every card in UTC
    line(time="2025-12-31T23:00:00Z"),
    b"\xef\xbb\xbf" + EVENT,
    b"",
    b" ",
    b"\t\x0b\x0c",
    b"\r",
    b"x" * 400,
]

lines = st.lists(
    st.one_of(
        valid_events(),
        valid_events(),
        valid_events(),
        mutated_events,
        bad_events,
        st.sampled_from(TRICKS),
        st.binary(max_size=60),
    ),
    max_size=60,
)


def split(data: bytes) -> list[bytes]:
    """The lines, each with its terminator (the last may have none)."""
    parts = data.split(b"\n")
    return [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def one_by_one(rater: Rater, data: bytes) -> tuple[list[tuple[int, Rejected]], int]:
    rejected = []
    every = split(data)
    for number, ln in enumerate(every, 1):
        result = rater.feed_line(ln)
        if isinstance(result, Rejected):
            rejected.append((number, result))
    return rejected, len(every)


def state(rater: Rater) -> tuple[object, ...]:
    return (
        rater.tally.as_dict(),
        sorted(rater.ledger.entries()),
        sorted(rater.tails.items()),
        rater.ledger.usage(),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines,
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
    st.sampled_from([200, 400, 2000, 65536]),
    st.sampled_from([CARDS, TWO_CARDS]),
    st.integers(1, 5),
)
def test_a_block_gives_each_line_its_own_outcome(
    items: list[bytes],
    newline: bytes,
    last_newline: bool,
    max_bytes: int,
    cards: object,
    first: int,
) -> None:
    data = newline.join(items) + (newline if last_newline and items else b"")
    assert not isinstance(cards, str)
    whole = Rater(cards, max_bytes=max_bytes)  # type: ignore[arg-type]
    alone = Rater(cards, max_bytes=max_bytes)  # type: ignore[arg-type]
    got = whole.feed_block(data, first) if data else ([], 0)
    want, count = one_by_one(alone, data)
    assert got[1] == count
    assert got[0] == [(n + first - 1, r) for n, r in want]
    assert state(whole) == state(alone)


@given(st.lists(valid_events(), min_size=100, max_size=300))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_many_batches_and_one_bad_line_among_them(items: list[bytes]) -> None:
    for bad in (b"{not json", line(license=None), EVENT + b" " + EVENT, b" "):
        data = b"\n".join([*items[:77], bad, *items[77:]]) + b"\n"
        whole, alone = Rater(CARDS), Rater(CARDS)
        got = whole.feed_block(data)
        assert got == one_by_one(alone, data)
        assert state(whole) == state(alone)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(valid_events(), valid_events(), bad_events, st.sampled_from(TRICKS)),
        max_size=60,
    ),
    st.lists(st.integers(0, 60), max_size=4),
    st.sampled_from([CARDS, TWO_CARDS]),
)
def test_parts_rated_apart_and_joined_in_order_are_the_whole(
    items: list[bytes], cuts: list[int], cards: object
) -> None:
    """``meter rate --jobs``: the state, the tally (counted or duplicate depends on what came
    before) and the tails of parts rated apart and joined in order are the whole's."""
    assert not isinstance(cards, str)
    whole = Rater(cards)  # type: ignore[arg-type]
    one_by_one(whole, b"".join(raw + b"\n" for raw in items))
    bounds = [0, *sorted(min(c, len(items)) for c in cuts), len(items)]
    first = Rater(cards)  # type: ignore[arg-type]
    first.feed_block(b"".join(raw + b"\n" for raw in items[: bounds[1]]))
    for a, b in itertools.pairwise(bounds[1:]):
        part = Rater(cards, raised={})  # type: ignore[arg-type]
        part.feed_block(b"".join(raw + b"\n" for raw in items[a:b]))
        first.join_after(part.rated())
    assert state(first) == state(whole)


def test_a_part_that_raised_a_rate_the_part_before_had_counted() -> None:
    low = line(license="rental")  # 0 points
    high = line(license="subscription", id="e-2")  # 5 points
    whole = Rater(CARDS)
    for raw in (high, low, high, low, high):
        whole.feed_line(raw)
    first, part = Rater(CARDS), Rater(CARDS, raised={})
    first.feed_line(high)
    for raw in (low, high, low, high):
        part.feed_line(raw)
    assert part.tally.counted == 2  # low, then high raised it
    first.join_after(part.rated())
    assert state(first) == state(whole)
    assert first.tally.counted == 1


def test_a_raw_del_in_a_workload_id_is_rejected_in_a_block_as_alone() -> None:
    """JSON allows DEL (0x7F) raw in a string; parse rejects it as a control character, and
    the block's fast path must too (found by make soak's dated run: a block counted it)."""
    good = line(workload="ok", id="e-1")
    bad = line(workload="\x7f1", id="e-2")
    assert b"\x7f" in bad  # raw, not escaped
    for failed in (False, True):
        lines = [good, bad] if not failed else [good, line(workload="\x7f2", result="failed")]
        block, alone = Rater(CARDS), Rater(CARDS)
        rejected, _ = block.feed_block(b"\n".join(lines) + b"\n")
        for raw in lines:
            alone.feed(raw)
        assert block.tally == alone.tally
        assert block.tally.rejected == 1
        assert [n for n, _ in rejected] == [2]
        assert block.ledger.usage() == alone.ledger.usage()


def test_a_newline_inside_a_string_is_two_lines_in_a_block_too() -> None:
    """A raw newline inside a string: each half is a bad line alone, so in a block too
    (the batch decoder once read the halves as one event and counted one line fewer)."""
    cut = EVENT.index(b"vbr://")
    data = b"\n".join([EVENT, b"not json", EVENT[:cut] + b"\n" + EVENT[cut:], EVENT])
    whole, alone = Rater(CARDS), Rater(CARDS)
    got = whole.feed_block(data)
    assert got == one_by_one(alone, data)
    assert got[1] == 5
    assert [n for n, _ in got[0]] == [2, 3, 4]
    assert state(whole) == state(alone)
