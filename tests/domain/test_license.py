"""The license view (vendor rules), case by case: the vendor's own examples first.

Every case goes from event bytes to license rows with ``Rater(...).license_view()``
where it can, as ``meter rate`` and the workers do.  Rows read
``(month, tenant, type, workloads, new, rental, points, new_points)``.
"""

from __future__ import annotations

import calendar
import itertools
import re
from dataclasses import astuple
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from meter.domain import Ledger, Rater, load_ratecards, parse_ratecards
from meter.domain.license import (
    GRACE_DAYS,
    LicenseLedger,
    LicenseStatus,
    ProviderLicense,
    load_license,
    over_allowed,
    over_warning,
    parse_license,
    tail_month,
    window,
)
from meter.errors import ConfigError
from tests.domain.events import line

CARDS = load_ratecards()
R5 = (5, "vcsp-2026", "subscription")
_ids = itertools.count()

Row = tuple[str, str, str, int, int, int, int, int]


def ev(workload: str = "vm-1", time: str = "2026-11-10T10:00:00Z", **kw: Any) -> bytes:
    return line(workload=workload, time=time, id=f"e-{next(_ids)}", **kw)


def rated(*raws: bytes, cards: Any = CARDS) -> Rater:
    r = Rater(cards)
    for raw in raws:
        r.feed(raw)
    return r


def table(view: LicenseLedger, month: str | None = None) -> list[Row]:
    return [astuple(r) for r in view.rows(month)]


def status(
    licensed: int, used: int, previous_new: int = 0, expires: date | None = None, **kw: Any
) -> LicenseStatus:
    return LicenseStatus(
        month=kw.get("month", "2026-12"),
        used_points=used,
        new_points=kw.get("new_points", 0),
        previous_new_points=previous_new,
        license=ProviderLicense(licensed, expires),
        today=kw.get("today", date(2026, 12, 15)),
    )


# ------------------------------------------------------------ the vendor's examples


def test_vendor_example_7_machines_in_november_then_2_new_in_december() -> None:
    """Cloud Connect Guide, "Rental Veeam Backup & Replication License": 7 machines in
    November; in December the same 7 plus 2 that are new in December and free then."""
    nov = [ev(f"vm-{i}", "2026-11-10T10:00:00Z") for i in range(7)]
    dec = [ev(f"vm-{i}", "2026-12-10T10:00:00Z") for i in range(9)]
    jan = [ev(f"vm-{i}", "2027-01-10T10:00:00Z") for i in range(9)]
    view = rated(*nov, *dec, *jan).license_view("2026-11")  # metering began in November
    assert table(view) == [
        ("2026-11", "acme", "vm", 7, 0, 0, 35, 0),  # the history start: nothing is new
        ("2026-12", "acme", "vm", 9, 2, 0, 35, 10),  # 2 new: listed, not billed
        ("2027-01", "acme", "vm", 9, 0, 0, 45, 0),  # from the next month, ordinary workloads
    ]
    [dec_row] = view.rows("2026-12")
    assert dec_row.billable == 7
    assert (view.points("2026-12"), view.new_points("2026-12")) == (35, 10)
    # January's allowance carries December's new points.
    jan_status = status(50, view.points("2027-01"), view.new_points("2026-12"), month="2027-01")
    assert (jan_status.allowed_points, jan_status.state) == (80, "ok")


def test_vendor_example_a_machine_first_backed_up_on_15_february_is_new_in_february() -> None:
    """VCSP reference guide, "Reducing License Usage": a VM added and backed up on
    15 February 2022 is a new instance for February (reported in March)."""
    view = rated(
        ev("old", "2022-01-20T10:00:00Z"),
        ev("old", "2022-02-03T10:00:00Z"),
        ev("vm-new", "2022-02-15T10:00:00Z"),
    ).license_view("2022-01")
    assert table(view, "2022-02") == [("2022-02", "acme", "vm", 2, 1, 0, 5, 5)]


def test_vendor_example_backed_up_daily_to_15_march_drops_out_from_the_april_report() -> None:
    """VCSP reference guide, "Reducing License Usage": a VM backed up every day from
    1 January to 15 March 2024 leaves the reports from the one of 1 May (April usage)."""
    day, raws = date(2024, 1, 1), []
    while day <= date(2024, 3, 15):
        raws.append(ev("vm-1", f"{day.isoformat()}T22:00:00Z"))
        day += timedelta(days=1)
    view = rated(*raws).license_view()
    assert view.report_months() == ["2024-01", "2024-02", "2024-03"]
    assert [r.points for r in view.rows()] == [5, 5, 5]


def test_vendor_license_limits_for_50_and_200_points() -> None:
    """max(20, 20%) over the licensed points plus last month's new points may be used;
    the console warns past max(10, 10%) over."""
    fifty = status(50, 0)
    assert (fifty.warning_points, fifty.allowed_points) == (60, 70)  # +10 warns, +20 allowed
    assert status(50, 0, previous_new=15).allowed_points == 85
    two_hundred = status(200, 0)
    assert (two_hundred.warning_points, two_hundred.allowed_points) == (220, 240)  # 20, 40
    assert status(200, 0, previous_new=35).allowed_points == 275
    assert [status(50, used).state for used in (50, 60, 61, 70, 71)] == [
        "ok",
        "ok",
        "warning",
        "warning",
        "over_allowance",
    ]
    assert [status(200, used, previous_new=35).state for used in (220, 221, 275, 276)] == [
        "ok",
        "warning",
        "warning",
        "over_allowance",
    ]


def test_allowance_switches_from_the_fixed_number_to_the_percentage() -> None:
    assert [over_allowed(n) for n in (0, 1, 99, 100, 104, 105, 110, 1000)] == [
        20, 20, 20, 20, 20, 21, 22, 200,
    ]  # fmt: skip
    assert [over_warning(n) for n in (0, 99, 100, 109, 110, 119, 120, 1000)] == [
        10, 10, 10, 10, 11, 11, 12, 100,
    ]  # fmt: skip
    # Used points are whole: the floor compares exactly as the fraction would (105: 10.5).
    assert status(105, 115).state == "ok"
    assert status(105, 116).state == "warning"


# ------------------------------------------------------------ the 31-day window


def test_the_report_is_for_the_month_before_the_first_of_the_next_month() -> None:
    assert window("2026-11") == (date(2026, 10, 31), date(2026, 12, 1))
    assert window("2026-12") == (date(2026, 12, 1), date(2027, 1, 1))
    assert window("2026-04") == (date(2026, 3, 31), date(2026, 5, 1))
    assert window("9999-12") == (date(9999, 12, 1), None)


def test_month_boundary_last_second_and_first_second() -> None:
    view = rated(
        ev("last-second", "2026-11-30T23:59:59Z"),
        ev("first-second", "2026-12-01T00:00:00Z"),
    ).license_view("2026-11")
    assert table(view) == [
        ("2026-11", "acme", "vm", 1, 0, 0, 5, 0),  # last-second: November only (Dec has 31)
        ("2026-12", "acme", "vm", 1, 1, 0, 0, 5),  # first-second: December, new there
    ]


def test_a_session_in_the_last_day_of_october_counts_in_november_too() -> None:
    """November has 30 days: its window reaches back to 31 October (UTC)."""
    view = rated(
        ev("oct-31", "2026-10-31T00:00:00Z"),
        ev("oct-31-zone", "2026-11-01T01:30:00+02:00"),  # 31 October 23:30 UTC
        ev("oct-30", "2026-10-30T23:59:59Z"),
    ).license_view()
    assert table(view) == [
        ("2026-10", "acme", "vm", 3, 0, 0, 15, 0),
        ("2026-11", "acme", "vm", 2, 0, 0, 10, 0),  # seen in October: not new in November
    ]


@pytest.mark.parametrize(
    ("year", "tail_days"),
    [(2026, (29, 30, 31)), (2028, (30, 31)), (2100, (29, 30, 31)), (2000, (30, 31))],
)
def test_february_window_reaches_into_january(year: int, tail_days: tuple[int, ...]) -> None:
    for day in range(1, 32):
        expected = f"{year}-02" if day in tail_days else None
        assert tail_month(year * 10000 + 100 + day) == expected, day
    raws = [ev(f"jan-{d}", f"{year}-01-{d:02d}T12:00:00Z") for d in (28, 29, 30, 31)]
    view = rated(*raws).license_view()
    [feb] = view.rows(f"{year}-02")
    assert (feb.workloads, feb.new, feb.points) == (len(tail_days), 0, 5 * len(tail_days))
    assert view.report_months() == [f"{year}-01", f"{year}-02"]


def test_a_workload_seen_only_on_31_march_counts_in_march_and_april() -> None:
    view = rated(ev("vm-1", "2026-03-31T23:59:59Z")).license_view()
    assert table(view) == [
        ("2026-03", "acme", "vm", 1, 0, 0, 5, 0),
        ("2026-04", "acme", "vm", 1, 0, 0, 5, 0),
    ]
    assert tail_month(20260331) == "2026-04"
    assert tail_month(20260330) is None


@pytest.mark.parametrize("day", ["2026-07-31", "2026-12-31", "2028-07-31", "2028-12-31"])
def test_last_day_of_a_31_day_month_before_a_31_day_month_counts_once(day: str) -> None:
    view = rated(ev("vm-1", f"{day}T23:59:59Z")).license_view()
    assert [r.month for r in view.rows()] == [day[:7]]
    assert tail_month(int(day.replace("-", ""))) is None


@pytest.mark.parametrize("year", [2026, 2028])
def test_tail_month_for_every_day_of_a_year(year: int) -> None:
    """For every month: exactly the days the next month's 31-day window reaches back to,
    worked out with datetime.date."""
    for month in range(1, 13):
        nxt = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
        after = date(nxt.year + 1, 1, 1) if nxt.month == 12 else date(nxt.year, nxt.month + 1, 1)
        reaches = after - timedelta(days=31)
        for day in range(1, calendar.monthrange(year, month)[1] + 1):
            d = date(year, month, day)
            expected = f"{nxt.year:04d}-{nxt.month:02d}" if d >= reaches else None
            assert tail_month(year * 10000 + month * 100 + day) == expected, d
        start, end = window(f"{year:04d}-{month:02d}")
        assert end is not None
        assert (end - start).days == 31
        assert start <= date(year, month, 1)


def test_tail_month_at_the_ends_of_time() -> None:
    assert tail_month(99991231) is None
    assert tail_month(99991130) is None  # December has 31 days
    assert tail_month(99990131) == "9999-02"
    assert tail_month(10131) == "0001-02"


# ------------------------------------------------------------ new workloads, late events


def test_a_late_event_turns_a_new_workload_into_an_existing_one() -> None:
    view = LicenseLedger(history_start="2026-10")
    view.add("acme", "2026-12", "vm", "vm-1", R5)
    assert table(view) == [("2026-12", "acme", "vm", 1, 1, 0, 0, 5)]
    dec = view.tenant_month("acme", "2026-12")
    assert dec is not None
    revision = dec.revision
    view.add("acme", "2026-11", "vm", "vm-1", R5)  # late: the workload ran in November
    assert table(view) == [
        ("2026-11", "acme", "vm", 1, 1, 0, 0, 5),  # now new in November
        ("2026-12", "acme", "vm", 1, 0, 0, 5, 0),  # its new points moved to points
    ]
    assert dec.revision > revision
    assert (view.points("2026-12"), view.new_points("2026-12")) == (5, 0)


def test_one_stray_event_dated_2001_moves_no_bill() -> None:
    """Issue 18: 60 VMs of a subscription tenant in October and November, then one event
    of a tenant server whose clock was reset to 2001.  The history start is declared, so
    the stray event counts in tenant usage and nowhere in the license view."""
    raws = [ev(f"vm-{i}", f"2026-10-{1 + i % 28:02d}T10:00:00Z") for i in range(30)]
    raws += [ev(f"vm-{i}", f"2026-11-{1 + i % 28:02d}T10:00:00Z") for i in range(60)]
    before = rated(*raws)
    after = rated(*raws, ev("vm-0", "2001-01-01T00:00:00Z"))
    view = after.license_view("2026-10")
    assert table(view) == table(before.license_view("2026-10"))
    assert view.report_months() == ["2026-10", "2026-11"]  # none for 2001: before the start
    assert view.history_start == "2026-10"
    # None declared: every workload billed, the stray one in a month of its own (2001).
    for month in ("2026-10", "2026-11"):
        assert table(after.license_view(), month) == table(before.license_view(), month)
    assert table(after.license_view(), "2026-11") == [("2026-11", "acme", "vm", 60, 0, 0, 300, 0)]
    # October is the first month: nothing new, all 30 billed; November: 30 new (free).
    assert table(before.license_view("2026-10")) == [
        ("2026-10", "acme", "vm", 30, 0, 0, 150, 0),
        ("2026-11", "acme", "vm", 60, 30, 0, 150, 150),
    ]
    # Tenant usage has the stray month: it is usage, only not the provider's license.
    assert [u.month for u in after.ledger.usage()] == ["2001-01", "2026-10", "2026-11"]


def test_with_no_history_start_declared_no_workload_is_new() -> None:
    """Nothing to go on: every counted workload is billed (the safe side), in any order."""
    raws = [ev("vm-1", "2026-11-05T10:00:00Z"), ev("vm-2", "2026-12-05T10:00:00Z"),
            ev("vm-3", "2001-01-01T10:00:00Z")]  # fmt: skip
    for order in itertools.permutations(raws):
        view = rated(*order).license_view()
        assert view.history_start is None
        assert table(view) == [
            ("2001-01", "acme", "vm", 1, 0, 0, 5, 0),
            ("2026-11", "acme", "vm", 1, 0, 0, 5, 0),
            ("2026-12", "acme", "vm", 1, 0, 0, 5, 0),
        ]


def test_a_session_before_the_history_start_counts_only_where_the_window_puts_it() -> None:
    """History from November: an October 31 session reaches into November's window (the
    rules' 31 days reach back), October itself has no license report, and the workload
    is not new in December (it ran before)."""
    view = LicenseLedger(history_start="2026-11")
    view.add("acme", "2026-10", "vm", "vm-old", R5)
    view.add_tail("acme", "2026-11", "vm", "vm-old", R5)  # its session on 31 October
    view.add("acme", "2026-10", "vm", "vm-gone", R5)  # mid-October: no window reaches it
    view.add("acme", "2026-12", "vm", "vm-old", R5)
    view.add("acme", "2026-12", "vm", "vm-new", R5)
    assert view.report_months() == ["2026-11", "2026-12"]
    assert table(view) == [
        ("2026-11", "acme", "vm", 1, 0, 0, 5, 0),
        ("2026-12", "acme", "vm", 2, 1, 0, 5, 5),  # vm-old not new, vm-new new
    ]
    assert view.history_start == "2026-11"  # never earlier, whatever the data
    # What a close and its late corrections read: nothing for October either.
    assert view.contribution("acme", "2026-10", "vm", "vm-gone") is None
    assert view.contribution("acme", "2026-10", "vm", "vm-old") is None
    assert list(view.workloads("2026-10")) == []
    assert view.contribution("acme", "2026-11", "vm", "vm-old") == (R5, False)


@pytest.mark.parametrize(
    ("start", "nov", "dec"),
    [
        (None, (2, 0, 10, 0), (3, 0, 15, 0)),  # none declared: nothing is new
        ("2026-10", (2, 2, 0, 10), (3, 1, 10, 5)),  # history began before: all new in Nov
        ("2026-11", (2, 0, 10, 0), (3, 1, 10, 5)),  # November is the first month
        ("2026-12", None, (3, 0, 15, 0)),  # December is: November has no license report
        ("2027-01", None, None),
    ],
)
def test_history_start_declared_or_not(
    start: str | None, nov: tuple[int, ...] | None, dec: tuple[int, ...] | None
) -> None:
    r = rated(
        ev("vm-1", "2026-11-05T10:00:00Z"),
        ev("vm-2", "2026-11-06T10:00:00Z"),
        ev("vm-1", "2026-12-05T10:00:00Z"),
        ev("vm-2", "2026-12-06T10:00:00Z"),
        ev("vm-3", "2026-12-07T10:00:00Z"),
    )
    view = r.license_view(start)
    assert view.history_start == start
    for month, want in (("2026-11", nov), ("2026-12", dec)):
        got = [(x.workloads, x.new, x.points, x.new_points) for x in view.rows(month)]
        assert got == ([] if want is None else [want]), month


# ------------------------------------------------------------ licenses and rates


def test_rental_backups_cost_nothing_and_replicas_always_cost() -> None:
    """``rental`` counts rental machines, the ones the vendor's report leaves out: free
    because their tenant is on rental.  A rental tenant's replica or cloud VM pays the
    same points as anyone's, so it is not one (in tenant usage too)."""
    rater = rated(
        ev("vm-1", license="rental"),
        ev("vm-1", wtype="replica", license="rental"),
        ev("ws-1", wtype="workstation", license="rental"),
        ev("srv-1", wtype="server", license="rental"),
        ev("srv-2", wtype="server", license="perpetual"),
        ev("cvm-1", wtype="cloud_vm", license=None),
        ev("cvm-2", wtype="cloud_vm", license="rental"),
    )
    usage = {r.workload_type: (r.workloads, r.points, r.rental) for r in rater.ledger.usage()}
    assert usage == {
        "cloud_vm": (2, 22, 0),
        "replica": (1, 10, 0),
        "server": (2, 7, 1),
        "vm": (1, 0, 1),
        "workstation": (1, 0, 1),
    }
    view = rater.license_view()
    assert table(view) == [
        ("2026-11", "acme", "cloud_vm", 2, 0, 0, 22, 0),  # rated without the license
        ("2026-11", "acme", "replica", 1, 0, 0, 10, 0),  # a rental tenant's replica pays
        ("2026-11", "acme", "server", 2, 0, 1, 7, 0),
        ("2026-11", "acme", "vm", 1, 0, 1, 0, 0),
        ("2026-11", "acme", "workstation", 1, 0, 1, 0, 0),
    ]


def test_subscription_to_rental_within_the_month_is_charged_at_the_highest_rate() -> None:
    view = rated(
        ev("vm-1", "2026-11-05T10:00:00Z", license="subscription"),
        ev("vm-1", "2026-11-20T10:00:00Z", license="rental"),
    ).license_view()
    assert table(view) == [("2026-11", "acme", "vm", 1, 0, 0, 5, 0)]


def test_a_switch_to_rental_after_the_tail_days_still_pays_in_the_next_month() -> None:
    """The tenant switched to rental on 1 February; its 30 January session (subscription)
    is in February's window, so the license view charges February at 5 points, while the
    calendar-month tenant usage of February says rental, 0 points."""
    r = rated(
        ev("vm-1", "2026-01-30T10:00:00Z", license="subscription"),
        ev("vm-1", "2026-02-10T10:00:00Z", license="rental"),
    )
    view = r.license_view()
    assert table(view) == [
        ("2026-01", "acme", "vm", 1, 0, 0, 5, 0),
        ("2026-02", "acme", "vm", 1, 0, 0, 5, 0),
    ]
    [usage] = r.ledger.usage("2026-02")
    assert (usage.workloads, usage.points, usage.rental) == (1, 0, 1)
    # And the other way round: from rental to subscription, both views say 5 in February.
    r2 = rated(
        ev("vm-1", "2026-01-31T10:00:00Z", license="rental"),
        ev("vm-1", "2026-02-10T10:00:00Z", license="subscription"),
    )
    assert table(r2.license_view(), "2026-02") == [("2026-02", "acme", "vm", 1, 0, 0, 5, 0)]


def _two_cards(feb_vm: int) -> Any:
    rates = {
        "vm": {"rental": 0, "subscription": 5, "perpetual": 5},
        "replica": 10,
        "workstation": {"rental": 0, "subscription": 3, "perpetual": 3},
        "server": {"rental": 0, "subscription": 7, "perpetual": 7},
        "cloud_vm": 11,
        "cloud_database": 11,
        "cloud_file_share": 11,
        "cloud_vpc": 0,
    }
    later = {**rates, "vm": {"rental": 0, "subscription": feb_vm, "perpetual": feb_vm}}
    return parse_ratecards(
        {
            "ratecards": [
                {"version": "c1", "effective": "2026-01-01", "rates": rates},
                {"version": "c2", "effective": "2026-02-01", "rates": later},
            ]
        }
    )


@pytest.mark.parametrize(("feb_vm", "charged"), [(6, (6, "c2")), (4, (5, "c1"))])
def test_a_card_change_within_the_window_rates_each_session_by_its_own_card(
    feb_vm: int, charged: tuple[int, str]
) -> None:
    r = rated(
        ev("vm-1", "2026-01-30T10:00:00Z"),
        ev("vm-1", "2026-02-10T10:00:00Z"),
        cards=_two_cards(feb_vm),
    )
    view = r.license_view()
    assert view.contribution("acme", "2026-02", "vm", "vm-1") == (
        (charged[0], charged[1], "subscription"),
        False,
    )
    [feb] = view.rows("2026-02")
    assert feb.points == charged[0]


def test_failed_sessions_count_in_no_window() -> None:
    view = rated(
        ev("vm-1", "2026-01-31T10:00:00Z", result="failed"),
        ev("vm-1", "2026-02-10T10:00:00Z", result="warning"),
    ).license_view("2026-01")
    assert table(view) == [("2026-02", "acme", "vm", 1, 1, 0, 0, 5)]


def test_the_view_shares_the_raters_ledger_and_merges_as_a_join() -> None:
    a = rated(ev("vm-1", "2026-01-30T10:00:00Z")).license_view()
    b = rated(ev("vm-2", "2026-02-03T10:00:00Z")).license_view()
    both = rated(ev("vm-1", "2026-01-30T10:00:00Z"), ev("vm-2", "2026-02-03T10:00:00Z"))
    merged = LicenseLedger().merge(a).merge(b)
    assert merged == both.license_view()
    assert table(merged) == table(both.license_view())
    assert isinstance(a.calendar, Ledger)


# ------------------------------------------------------------ the provider's license file


def test_parse_license_reads_the_documented_form() -> None:
    lic = parse_license({"licensed_points": 500, "expires": "2027-06-30"}, "lic.json")
    assert lic == ProviderLicense(500, date(2027, 6, 30), "lic.json")
    assert parse_license({"licensed_points": 0}).expires is None
    assert parse_license({"licensed_points": 7, "expires": None, "comment": "x"}).expires is None


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ([], "expected an object with licensed_points"),
        ("500", "expected an object with licensed_points"),
        ({}, "licensed_points must be a whole number >= 0, got None"),
        ({"licensed_points": -1}, "licensed_points -1 is out of range: allowed 0 to"),
        ({"licensed_points": 1.5}, "licensed_points must be a whole number >= 0, got 1.5"),
        ({"licensed_points": True}, "licensed_points must be a whole number >= 0, got True"),
        ({"licensed_points": "500"}, "licensed_points must be a whole number >= 0, got '500'"),
        ({"licensed_points": 5, "points": 5}, "unknown keys 'points'; expected licensed_points"),
        ({"licensed_points": 5, "expires": "2027-6-30"}, "expires must be a date YYYY-MM-DD"),
        ({"licensed_points": 5, "expires": "2027-02-30"}, "expires must be a date YYYY-MM-DD"),
        ({"licensed_points": 5, "expires": 20270630}, "expires must be a date YYYY-MM-DD"),
        (
            {"licensed_points": 5, "expires": "2027-06-30T00:00:00Z"},
            "expires must be a date YYYY-MM-DD (the last valid day), got '2027-06-30T00:00",
        ),
    ],
)
def test_parse_license_errors_name_the_problem(doc: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as err:
        parse_license(doc, "licenses/acme.json")
    assert str(err.value).startswith("licenses/acme.json: ")
    assert isinstance(err.value, ValueError)


def test_load_license_reads_a_file_and_names_what_is_wrong(tmp_path: Path) -> None:
    good = tmp_path / "license.json"
    good.write_bytes(orjson.dumps({"licensed_points": 500, "expires": "2027-06-30"}))
    assert load_license(str(good)) == ProviderLicense(500, date(2027, 6, 30), str(good))
    with pytest.raises(ConfigError, match="cannot read license file"):
        load_license(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{licensed_points: 500}")
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}: not valid JSON"):
        load_license(str(bad))


def test_the_readme_license_example_is_a_valid_license() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [example] = [
        b for b in re.findall(r"```json\n(.*?)```", readme, re.S) if "licensed_points" in b
    ]
    lic = parse_license(orjson.loads(example), "README")
    assert lic.licensed_points > 0
    assert lic.expires is not None


# ------------------------------------------------------------ states at their exact days

EXPIRES = date(2027, 6, 30)


@pytest.mark.parametrize(
    ("today", "days", "state"),
    [
        (date(2027, 5, 31), 30, "ok"),
        (date(2027, 6, 1), 29, "expiring"),  # fewer than 30 days left
        (date(2027, 6, 30), 0, "expiring"),  # the last valid day
        (date(2027, 7, 1), -1, "grace"),  # the first day after expiry
        (EXPIRES + timedelta(days=GRACE_DAYS), -60, "grace"),  # 29 August: the 60th day
        (EXPIRES + timedelta(days=GRACE_DAYS + 1), -61, "expired"),
    ],
)
def test_expiry_states_at_their_exact_days(today: date, days: int, state: str) -> None:
    s = status(500, 100, expires=EXPIRES, today=today)
    assert (s.days_to_expiry, s.state) == (days, state)


def test_the_worst_state_wins() -> None:
    grace, expiring = date(2027, 7, 10), date(2027, 6, 20)
    assert status(500, 601, expires=EXPIRES, today=grace).state == "over_allowance"
    assert status(500, 551, expires=EXPIRES, today=grace).state == "grace"
    assert status(500, 551, expires=EXPIRES, today=expiring).state == "warning"
    assert status(500, 601, expires=EXPIRES, today=date(2027, 9, 1)).state == "expired"
    assert status(500, 100).state == "ok"  # no expiry declared
    assert status(500, 100).days_to_expiry is None


def test_without_a_declared_license_the_status_says_so() -> None:
    s = LicenseStatus("2026-12", 35, 10, 0, None, date(2026, 12, 15))
    assert (s.declared, s.state, s.allowed_points, s.warning_points) == (
        False,
        "undeclared",
        None,
        None,
    )
    assert s.as_dict() == {
        "declared": False,
        "licensed_points": None,
        "expires": None,
        "days_to_expiry": None,
        "month": "2026-12",
        "used_points": 35,
        "new_points": 10,
        "previous_new_points": 0,
        "warning_points": None,
        "allowed_points": None,
        "state": "undeclared",
    }
    declared = status(500, 100, previous_new=10, expires=EXPIRES).as_dict()
    assert declared["expires"] == "2027-06-30"
    assert (declared["warning_points"], declared["allowed_points"]) == (550, 610)
