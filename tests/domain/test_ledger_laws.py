"""The ledger is a join: order, duplication and splitting never change totals."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meter.domain import Ledger, Rater, load_ratecards
from tests.domain.events import bad_events, events, line

CARDS = load_ratecards()


def rate_all(raws: list[bytes]) -> Rater:
    r = Rater(CARDS)
    for raw in raws:
        r.feed(raw)
    return r


def totals(ledger: Ledger) -> list[tuple[str, str, str, int, int]]:
    return [(u.month, u.tenant_id, u.workload_type, u.workloads, u.points) for u in ledger.usage()]


@settings(max_examples=300)
@given(st.lists(events, max_size=60), st.randoms())
def test_any_permutation_gives_the_same_totals(raws: list[bytes], rnd: object) -> None:
    shuffled = list(raws)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a, b = rate_all(raws), rate_all(shuffled)
    assert a.ledger == b.ledger
    assert totals(a.ledger) == totals(b.ledger)
    assert a.tally.rejected == b.tally.rejected
    assert a.tally.not_counted == b.tally.not_counted
    assert a.tally.counted + a.tally.duplicate == b.tally.counted + b.tally.duplicate


@settings(max_examples=300)
@given(st.lists(events, max_size=60), st.lists(st.integers(0, 59), max_size=60))
def test_any_duplication_changes_nothing(raws: list[bytes], again: list[int]) -> None:
    dup = list(raws) + [raws[i] for i in again if i < len(raws)]
    a, b = rate_all(raws), rate_all(dup)
    assert totals(a.ledger) == totals(b.ledger)
    assert a.tally.counted == b.tally.counted  # repeats are never counted twice


@settings(max_examples=300)
@given(st.lists(events, max_size=60), st.integers(0, 60))
def test_split_rated_apart_and_merged(raws: list[bytes], cut: int) -> None:
    whole = rate_all(raws)
    left, right = rate_all(raws[:cut]), rate_all(raws[cut:])
    ab = Ledger().merge(left.ledger).merge(right.ledger)
    ba = Ledger().merge(right.ledger).merge(left.ledger)
    assert ab == ba == whole.ledger
    assert totals(ab) == totals(whole.ledger)


@settings(max_examples=200)
@given(st.lists(events, max_size=40))
def test_merge_is_idempotent(raws: list[bytes]) -> None:
    r = rate_all(raws)
    before = totals(r.ledger)
    r.ledger.merge(r.ledger)
    copy = Ledger().merge(r.ledger)
    assert totals(r.ledger) == before == totals(copy)


@settings(max_examples=200)
@given(st.lists(events, max_size=40), st.lists(bad_events, min_size=1, max_size=10))
def test_rejected_events_never_change_totals(raws: list[bytes], bad: list[bytes]) -> None:
    a, b = rate_all(raws), rate_all(raws + bad)
    assert totals(a.ledger) == totals(b.ledger)
    assert b.tally.rejected == a.tally.rejected + len(bad)


def test_license_change_is_charged_once_at_the_highest_rate() -> None:
    r = rate_all(
        [
            line(license="rental", id="1"),
            line(license="subscription", id="2"),
            line(license="rental", id="3"),
        ]
    )
    [row] = r.ledger.usage()
    assert (row.workloads, row.points) == (1, 5)
    assert r.tally.as_dict() == {
        "read": 3,
        "counted": 2,
        "duplicate": 1,
        "not_counted": 0,
        "rejected": 0,
    }


def test_revision_grows_with_every_change_and_only_then() -> None:
    r = Rater(CARDS)
    seen = []
    for raw in [
        line(license="rental"),
        line(license="rental"),
        line(license="subscription"),
        line(workload="vm-2", license="rental"),
        line(workload="vm-2", result="failed"),
    ]:
        r.feed(raw)
        tm = r.ledger.tenant_month("acme", "2026-11")
        assert tm is not None
        seen.append(tm.revision)
    assert seen == [1, 1, 6, 7, 7]
