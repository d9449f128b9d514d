"""Rating any inputs: one outcome each, and only the valid ones change the totals."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.domain import Event, Ledger, Rater, Rejected, load_ratecards, parse, parse_ratecards
from meter.domain.event import too_large
from tests.domain.events import line, mutated_events, valid_events
from tests.domain.test_ratecard import card, doc

CARDS = load_ratecards()

inputs = st.lists(
    st.one_of(valid_events(), valid_events(), mutated_events, st.binary(max_size=300)),
    max_size=40,
)


def totals(ledger: Ledger) -> list[tuple[str, str, str, int, int, int]]:
    return [
        (u.month, u.tenant_id, u.workload_type, u.workloads, u.points, u.rental)
        for u in ledger.usage()
    ]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(inputs, st.sampled_from([100, 250, 300, 65536]))
def test_every_input_has_one_outcome_and_totals_are_the_valid_subsets(
    raws: list[bytes], max_bytes: int
) -> None:
    rater = Rater(CARDS, max_bytes=max_bytes)
    for raw in raws:
        result = rater.feed(raw)
        assert isinstance(result, Event | Rejected)
    t = rater.tally
    assert t.read == t.counted + t.duplicate + t.not_counted + t.rejected == len(raws)

    valid = [raw for raw in raws if isinstance(parse(raw, max_bytes), Event)]
    only = Rater(CARDS, max_bytes=max_bytes)
    for raw in valid:
        only.feed(raw)
    assert totals(rater.ledger) == totals(only.ledger)
    u = only.tally
    assert (t.counted, t.duplicate, t.not_counted) == (u.counted, u.duplicate, u.not_counted)
    assert t.rejected == len(raws) - len(valid) + u.rejected  # u.rejected: no rate card


def test_reject_counts_an_input_that_was_never_fed() -> None:
    rater = Rater(CARDS)
    rater.feed(line())
    rejection = too_large(10**9, rater.max_bytes)
    assert rater.reject(rejection) is rejection
    assert rater.tally.as_dict() == {
        "read": 2,
        "counted": 1,
        "duplicate": 0,
        "not_counted": 0,
        "rejected": 1,
    }


def test_an_instant_outside_the_utc_calendar_has_no_rate_card() -> None:
    rater = Rater(CARDS)
    for time in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-01:00"):
        result = rater.feed(line(time=time))
        assert isinstance(result, Rejected)
        assert result.code == "no_ratecard"
        assert result.reason == (
            f"time: '{time}' is outside the years 0001 to 9999 in UTC; no rate card covers it"
        )
    assert rater.tally.rejected == 2
    assert rater.ledger.usage() == []


def test_the_no_ratecard_reason_quotes_a_bounded_time() -> None:
    time = "2025-01-01T00:00:00." + "0" * 10_000 + "Z"  # valid: a fraction may be long
    result = Rater(parse_ratecards(doc(card()))).feed(line(time=time))
    assert isinstance(result, Rejected)
    assert result.code == "no_ratecard"
    assert len(result.reason) < 200
    assert "... (10021 characters) is before the first rate card" in result.reason
