"""The ledger is a join: order, duplication and splitting never change totals."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meter.domain import (
    LICENSES,
    WORKLOAD_TYPES,
    Ledger,
    Rate,
    RateCards,
    Rater,
    TenantMonth,
    load_ratecards,
    parse_ratecards,
)
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
    r = Rater(CARDS, ledger=Ledger(height=CARDS.height))
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
    h = CARDS.height
    rental, subscription = h((0, "vcsp-2026", "rental")), h((5, "vcsp-2026", "subscription"))
    assert seen == [rental, rental, subscription, subscription + rental, subscription + rental]


def test_without_cards_the_revision_is_workloads_plus_points() -> None:
    r = rate_all([line(license="rental"), line(workload="vm-2"), line(wtype="replica")])
    [tm] = r.ledger.tenant_months()
    assert tm.revision == tm.workload_count + tm.points == 3 + 15


# ---------------------------------------------------------------- revision laws

_FLAT = {"cloud_vm": 11, "cloud_database": 11, "cloud_file_share": 11, "cloud_vpc": 0}
#: Two cards that rate a vm the same, so a vm's rate can climb by card version alone.
CARDS2 = parse_ratecards(
    {
        "ratecards": [
            {
                "version": "v1",
                "effective": "2026-01-01",
                "rates": {
                    "vm": {"rental": 5, "subscription": 5, "perpetual": 5},
                    "replica": {"rental": 10, "subscription": 10, "perpetual": 10},
                    "workstation": {"rental": 0, "subscription": 3, "perpetual": 3},
                    "server": {"rental": 0, "subscription": 7, "perpetual": 7},
                    **_FLAT,
                },
            },
            {
                "version": "v2",
                "effective": "2026-06-01",
                "rates": {
                    "vm": {"rental": 5, "subscription": 5, "perpetual": 5},
                    "replica": {"rental": 8, "subscription": 12, "perpetual": 12},
                    "workstation": {"rental": 0, "subscription": 3, "perpetual": 4},
                    "server": {"rental": 0, "subscription": 7, "perpetual": 7},
                    **_FLAT,
                },
            },
        ]
    }
)


def producible(cards: RateCards) -> list[Rate]:
    """Every rate the cards can give, from their public tables."""
    return sorted(
        {
            (points, c.version, lic or "")
            for c in cards.cards
            for by_license in c.rates.values()
            for lic, points in by_license.items()
        }
    )


any_rates = st.tuples(
    st.integers(0, 13),
    st.sampled_from(["old", "v0", "v1", "v1a", "v2", "v3", "vcsp-2026", "zz"]),
    st.sampled_from(["", *LICENSES, "other"]),
)


def entries(rates: st.SearchStrategy[Rate]) -> st.SearchStrategy[tuple[str, str, str, str, Rate]]:
    return st.tuples(
        st.sampled_from(["a", "b"]),
        st.sampled_from(["2026-11", "2026-12"]),
        st.sampled_from(["vm", "replica"]),
        st.sampled_from(["1", "2", "3"]),
        rates,
    )


known_entries = entries(st.sampled_from(producible(CARDS2)))


def content(tm: TenantMonth | None) -> object:
    """What a usage record says: usage per type (incl. rental) and the card versions."""
    if tm is None:
        return None
    return sorted((w, tuple(t)) for w, t in tm.totals.items()), tm.ratecards


def revisions(ledger: Ledger) -> dict[tuple[str, str], int]:
    return {(tm.tenant_id, tm.month): tm.revision for tm in ledger.tenant_months()}


@settings(max_examples=300)
@given(st.lists(known_entries, max_size=80))
def test_revision_climbs_with_every_change_and_only_then(log: list[Any]) -> None:
    ledger = Ledger(height=CARDS2.height)
    for t, m, w, i, rate in log:
        tm = ledger.tenant_month(t, m)
        rev, said, others = (tm.revision if tm else 0), content(tm), revisions(ledger)
        changed = ledger.add(t, m, w, i, rate)
        tm = ledger.tenant_month(t, m)
        assert tm is not None
        assert tm.revision > rev if changed else tm.revision == rev
        if content(tm) != said:
            assert tm.revision > rev
        assert {k: v for k, v in revisions(ledger).items() if k != (t, m)} == {
            k: v for k, v in others.items() if k != (t, m)
        }
        # Kept incrementally, equal to what it is from scratch.
        assert tm.revision == sum(CARDS2.height(r) for _, _, r in tm.entries())
        assert tm.ratecards == sorted({r[1] for _, _, r in tm.entries()})
        assert tm.revision > tm.workload_count + tm.points


@settings(max_examples=300)
@given(st.lists(known_entries | entries(any_rates), max_size=80), st.randoms())
def test_equal_state_equal_revision_in_any_order(log: list[Any], rnd: Any) -> None:
    once = Ledger(height=CARDS2.height)
    for e in log:
        before = revisions(once)
        once.add(*e)
        after = revisions(once)
        assert all(after[k] >= v for k, v in before.items())  # never down, known card or not
    shuffled = log + log[: len(log) // 2]
    rnd.shuffle(shuffled)
    again = Ledger(height=CARDS2.height)
    for e in shuffled:
        again.add(*e)
    cut = len(log) // 3
    left, right = Ledger(height=CARDS2.height), Ledger()  # merge re-heights by the target
    for e in log[:cut]:
        left.add(*e)
    for e in log[cut:]:
        right.add(*e)
    merged = Ledger(height=CARDS2.height).merge(right).merge(left)
    assert revisions(once) == revisions(again) == revisions(merged)
    assert {(tm.tenant_id, tm.month): tm.ratecards for tm in once.tenant_months()} == {
        (tm.tenant_id, tm.month): tm.ratecards for tm in merged.tenant_months()
    }


def test_a_rate_that_climbs_by_card_version_alone_raises_the_revision() -> None:
    ledger = Ledger(height=CARDS2.height)
    ledger.add("a", "2026-11", "vm", "1", (5, "v1", "rental"))
    tm = ledger.tenant_month("a", "2026-11")
    assert tm is not None
    before = tm.revision
    assert ledger.add("a", "2026-11", "vm", "1", (5, "v2", "rental"))
    assert tm.revision > before
    assert tm.ratecards == ["v2"]
    assert (tm.workload_count, tm.points) == (1, 5)  # same totals: the old revision tied here


# ---------------------------------------------------------------- the height of a rate

points = st.integers(0, 12)


@st.composite
def card_docs(draw: st.DrawFn, version: str, effective: str) -> dict[str, Any]:
    rates: dict[str, Any] = {}
    for w in WORKLOAD_TYPES:
        rates[w] = draw(points) if draw(st.booleans()) else {lic: draw(points) for lic in LICENSES}
    return {"version": version, "effective": effective, "rates": rates}


@st.composite
def card_files(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Some cards, and one more to add to them."""
    versions = draw(st.permutations(["old", "v0", "v1", "v2", "zz"]))
    days = draw(st.permutations(["2026-01-01", "2026-03-01", "2026-05-01", "2026-07-01"]))
    n = draw(st.integers(1, 3))
    docs = [draw(card_docs(versions[k], days[k])) for k in range(n + 1)]
    return docs[:n], docs[n]


@settings(max_examples=200)
@given(card_files(), st.lists(any_rates, min_size=2, max_size=30))
def test_height_is_strictly_increasing_and_adding_a_card_never_lowers_it(
    files: tuple[list[dict[str, Any]], dict[str, Any]], extra: list[Rate]
) -> None:
    docs, added = files
    cards = parse_ratecards({"ratecards": docs})
    more = parse_ratecards({"ratecards": [*docs, added]})
    known = producible(cards)
    rates = sorted(set(known) | set(extra))
    h = cards.height
    for r in rates:
        assert h(r) >= r[0] + 1
        assert more.height(r) >= h(r)
    for lo, hi in itertools.pairwise(rates):
        assert h(lo) <= h(hi)
        if lo in known or hi in known:
            assert h(lo) < h(hi)
