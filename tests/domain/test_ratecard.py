from __future__ import annotations

import copy
from typing import Any

import pytest

from meter.domain import Rater, load_ratecards, parse, parse_ratecards
from meter.domain.event import Event
from meter.errors import RateCardError
from tests.domain.events import line

DEFAULT = load_ratecards()


def doc(*cards: dict[str, Any]) -> dict[str, Any]:
    return {"ratecards": list(cards)}


def card(version: str = "c1", effective: str = "2026-01-01", **over: Any) -> dict[str, Any]:
    rates: dict[str, Any] = {
        t: {"rental": 0, "subscription": 5, "perpetual": 5}
        for t in ["vm", "replica", "workstation", "server"]
    }
    rates |= {t: 11 for t in ["cloud_vm", "cloud_database", "cloud_file_share", "cloud_vpc"]}
    rates.update(over)
    return {"version": version, "effective": effective, "rates": rates}


@pytest.mark.parametrize(
    ("wtype", "lic", "points"),
    [
        ("vm", "rental", 0),
        ("vm", "subscription", 5),
        ("vm", "perpetual", 5),
        ("replica", "rental", 10),
        ("replica", "subscription", 10),
        ("workstation", "rental", 0),
        ("workstation", "perpetual", 3),
        ("server", "rental", 0),
        ("server", "subscription", 7),
        ("cloud_vm", None, 11),
        ("cloud_database", "rental", 11),
        ("cloud_file_share", "perpetual", 11),
        ("cloud_vpc", None, 0),
    ],
)
def test_default_card_is_the_vendor_table(wtype: str, lic: str | None, points: int) -> None:
    ev = parse(line(wtype=wtype, license=lic))
    assert isinstance(ev, Event)
    assert DEFAULT.rate(ev) == (points, "vcsp-2026", lic or "")


def test_event_is_rated_by_the_card_in_effect_at_its_time() -> None:
    cards = parse_ratecards(
        doc(
            card("old", "2026-01-01"),
            card("new", "2026-11-15", vm={"rental": 1, "subscription": 6, "perpetual": 6}),
        )
    )
    before = parse(line(time="2026-11-14T23:59:59Z"))
    local_after = parse(line(time="2026-11-14T23:30:00-01:00"))  # 00:30 UTC on the 15th
    after = parse(line(time="2026-11-15T00:00:00Z"))
    too_early = parse(line(time="2025-12-31T23:59:59Z"))
    assert isinstance(before, Event)
    assert isinstance(after, Event)
    assert isinstance(local_after, Event)
    assert isinstance(too_early, Event)
    assert cards.rate(before) == (5, "old", "subscription")
    assert cards.rate(local_after) == (6, "new", "subscription")
    assert cards.rate(after) == (6, "new", "subscription")
    assert cards.rate(too_early) is None
    r = Rater(cards)
    rej = r.feed(line(time="2025-12-31T23:59:59Z"))
    assert getattr(rej, "code", None) == "no_ratecard"
    assert r.tally.rejected == 1
    assert len(r.ledger) == 0


def test_mid_month_card_change_charges_the_highest_rate_once() -> None:
    cards = parse_ratecards(
        doc(
            card("old", "2026-01-01"),
            card("new", "2026-11-15", vm={"rental": 1, "subscription": 6, "perpetual": 6}),
        )
    )
    r = Rater(cards)
    r.feed(line(time="2026-11-20T00:00:00Z", id="1"))
    r.feed(line(time="2026-11-02T00:00:00Z", id="2"))
    [row] = r.ledger.usage()
    assert (row.workloads, row.points) == (1, 6)
    tm = r.ledger.tenant_month("acme", "2026-11")
    assert tm is not None
    assert tm.ratecards == ["new"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([], "no cards"),
        ("nope", "'ratecards' list"),
        ([card(), card("c2")], "overlaps card 'c1'"),
        ([card(), card("c1", "2027-01-01")], "'c1' appears twice"),
        ([card(effective="2026-02-30")], "effective: expected a date"),
        ([card(version="")], "version: missing"),
        ([card(vm=-1)], "rates.vm: expected points"),
        ([card(vm=True)], "rates.vm: expected points"),
        ([card(vm=1.5)], "rates.vm: expected points"),
        ([card(vm={"rental": 0, "subscription": 5})], "missing license type(s) perpetual"),
        ([card(vm={"rental": 0, "subscription": 5, "perpetual": 5, "trial": 1})], "trial"),
        ([card(tape=3)], "unknown workload type(s) tape"),
    ],
)
def test_bad_cards_are_clear_errors(bad: Any, message: str) -> None:
    d = {"ratecards": bad} if isinstance(bad, list) else bad
    with pytest.raises(RateCardError, match=None) as err:
        parse_ratecards(copy.deepcopy(d), "cards.json")
    assert message in str(err.value)


def test_missing_type_is_an_error_not_a_silent_zero() -> None:
    c = card()
    del c["rates"]["cloud_vpc"]
    with pytest.raises(RateCardError, match="missing workload type"):
        parse_ratecards(doc(c))


def test_unreadable_card_file(tmp_path: Any) -> None:
    with pytest.raises(RateCardError, match="cannot read"):
        load_ratecards(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RateCardError, match="not valid JSON"):
        load_ratecards(tmp_path / "bad.json")


def test_a_byte_order_mark_before_the_json_is_ignored() -> None:
    # `meter send` keeps bytes untouched, so the worker must read what `meter rate` reads.
    assert isinstance(parse(b"\xef\xbb\xbf" + line()), Event)
