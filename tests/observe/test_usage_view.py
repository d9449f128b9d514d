"""What /api/usage says a month is: running, final, or final plus corrections.

Pure: the view's records and corrections are filled by hand, as the topics would.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from meter.domain.license import ProviderLicense
from meter.kafka import KafkaSettings
from meter.observe.usage_view import LicenseView, UsageView, month_document
from meter.stream.usage import fold_license, license_month_state, license_rows
from tests.observe.test_http import record

CLOSED_AT = "2026-12-03T00:00:00Z"


def final(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "final": True, "closed_at": CLOSED_AT}


def correction(tenant: str, wtype: str, wid: str, workloads: int, points: int) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "month": "2026-11",
        "workload_type": wtype,
        "workload_id": wid,
        "workloads_added": workloads,
        "points_added": points,
        "ratecard": "vcsp-2026",
        "event_id": f"late-{wid}",
        "reason": "late",
        "corrected_at": "2026-12-05T10:00:00Z",
    }


def records(*rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{r['tenant_id']}/{r['month']}": r for r in rs}


ACME = record("acme", "2026-11", {"vm": (3, 15)})
GLOBEX = record("globex", "2026-11", {"server": (2, 7)})
DECEMBER = record("acme", "2026-12", {"vm": (1, 5)})
LATE = {
    "acme/2026-11/vm/vm-9": correction("acme", "vm", "vm-9", 1, 5),
    "acme/2026-11/replica/r-1": correction("acme", "replica", "r-1", 1, 10),
}


def totals(rows: list[dict[str, Any]]) -> tuple[int, int]:
    return sum(r["workloads"] for r in rows), sum(r["points"] for r in rows)


def test_an_open_month_is_running_with_no_closed_at() -> None:
    doc = month_document(records(ACME, GLOBEX, final(DECEMBER)), {}, "2026-11")
    assert doc["status"] == "running"
    assert doc["final"] is False
    assert "closed_at" not in doc
    assert totals(doc["usage"]) == (5, 22)


def test_a_month_closed_on_some_partitions_only_is_still_running() -> None:
    doc = month_document(records(final(ACME), GLOBEX), LATE, "2026-11")
    assert doc["status"] == "running"
    assert "closed_at" not in doc
    # What the events say now: the corrections folded in.
    assert totals(doc["usage"]) == (7, 37)


def test_a_closed_month_is_final_with_its_close_time() -> None:
    doc = month_document(records(final(ACME), final(GLOBEX), DECEMBER), {}, "2026-11")
    assert doc["status"] == "final"
    assert doc["final"] is True
    assert doc["closed_at"] == CLOSED_AT
    assert totals(doc["usage"]) == (5, 22)
    assert "corrections" not in doc
    assert "corrected_usage" not in doc
    # The month after is its own: running.
    assert month_document(records(final(ACME), DECEMBER), {}, "2026-12")["status"] == "running"


def test_a_closed_month_with_late_events_shows_as_closed_plus_its_corrections() -> None:
    doc = month_document(records(final(ACME), final(GLOBEX)), LATE, "2026-11")
    assert doc["status"] == "final+corrections"
    assert doc["closed_at"] == CLOSED_AT
    # The usage is the month as closed (what was submitted) ...
    assert totals(doc["usage"]) == (5, 22)
    # ... the corrections after it, per workload, and the corrected totals.
    assert [c["workload_id"] for c in doc["corrections"]] == ["r-1", "vm-9"]
    assert totals(doc["corrected_usage"]) == (7, 37)
    by_type = {(r["tenant_id"], r["workload_type"]): r for r in doc["corrected_usage"]}
    assert by_type["acme", "replica"]["points"] == 10
    assert by_type["acme", "vm"]["workloads"] == 4


def test_corrections_follow_the_tenant_filter() -> None:
    recs = records(final(ACME), final(GLOBEX))
    globex = month_document(recs, LATE, "2026-11", tenant_id="globex")
    assert globex["status"] == "final"
    assert totals(globex["usage"]) == (2, 7)
    acme = month_document(recs, LATE, "2026-11", tenant_id="acme")
    assert acme["status"] == "final+corrections"
    assert totals(acme["corrected_usage"]) == (5, 30)


def test_a_month_closed_empty_then_corrected_is_final() -> None:
    doc = month_document(records(DECEMBER), LATE, "2026-11")
    assert doc["status"] == "final+corrections"
    assert doc["usage"] == []
    assert "closed_at" not in doc  # no final record says when
    assert totals(doc["corrected_usage"]) == (2, 15)


def test_a_month_with_nothing_is_running() -> None:
    assert month_document({}, {}, "2026-11")["status"] == "running"


def test_malformed_corrections_are_not_counted() -> None:
    bad = {"x": {"month": "2026-11", "tenant_id": "acme", "points_added": "5"}}
    doc = month_document(records(final(ACME)), bad, "2026-11")
    assert doc["status"] == "final"


def test_the_license_source_adds_license_to_a_month_when_it_has_one() -> None:
    view = UsageView(KafkaSettings(bootstrap="127.0.0.1:1"), "meter.usage")
    view.records = records(ACME)
    assert "license" not in view.document(month="2026-11")
    lic = {"declared": False, "month": "2026-11", "used_points": 15, "state": "undeclared"}
    asked: list[str] = []

    def license_doc(month: str) -> dict[str, Any] | None:
        asked.append(month)
        return lic if month == "2026-11" else None

    view.license_doc = license_doc
    assert view.document(month="2026-11")["license"] == lic
    assert "license" not in view.document(month="2026-10")
    assert asked == ["2026-11", "2026-10"]
    # All months at once: no month, no status, no license.
    doc = view.document()
    assert set(doc) == {"usage"}


def license_record(tenant: str, month: str, revision: int, points: int) -> bytes:
    usage = {"vm": {"workloads": 1, "new_workloads": 0, "rental_workloads": 0,
                    "points": points, "new_points": 0}}  # fmt: skip
    return orjson.dumps(
        {
            "view": "license",
            "tenant_id": tenant,
            "month": month,
            "status": "running",
            "revision": revision,
            "usage": usage,
        }
    )


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def test_the_license_trend_is_used_points_at_the_end_of_each_day_of_records() -> None:
    """The trend follows the records' own timestamps: the provider's used points after the
    last record of each UTC day, replaced records and corrections counted once."""
    view = LicenseView(KafkaSettings(bootstrap="127.0.0.1:1"), "meter.license")
    take = view._take
    take(b"acme/2026-11", license_record("acme", "2026-11", 1, 5), view.records,
         ms("2026-11-02T10:00:00+00:00"))  # fmt: skip
    take(b"globex/2026-11", license_record("globex", "2026-11", 1, 7), view.records,
         ms("2026-11-02T23:59:59+00:00"))  # fmt: skip
    take(b"acme/2026-11", license_record("acme", "2026-11", 3, 15), view.records,
         ms("2026-11-05T00:00:00+00:00"))  # fmt: skip
    # An older revision arriving late changes nothing, on no day.
    take(b"acme/2026-11", license_record("acme", "2026-11", 2, 10), view.records,
         ms("2026-11-06T00:00:00+00:00"))  # fmt: skip
    take(b"acme/2026-12", license_record("acme", "2026-12", 1, 99), view.records,
         ms("2026-12-01T00:00:00+00:00"))  # fmt: skip
    fix = orjson.dumps({**correction("acme", "vm", "vm-9", 1, 5), "new_added": 0,
                        "rental_added": 0, "new_points_added": 0})  # fmt: skip
    take(b"acme/2026-11/vm/vm-9", fix, view.corrections, ms("2026-12-05T10:00:00+00:00"))
    take(b"acme/2026-11/vm/vm-9", fix, view.corrections, ms("2026-12-06T10:00:00+00:00"))
    doc = view.status("2026-11", None, date(2026, 12, 6))
    assert doc is not None
    assert doc["used_points"] == 27
    assert doc["trend"] == [["2026-11-02", 12], ["2026-11-05", 22], ["2026-12-05", 27]]
    assert view.status("2026-12", None, date(2026, 12, 6))["trend"] == [["2026-12-01", 99]]  # type: ignore[index]
    assert view.status("2026-10", None, date(2026, 12, 6))["trend"] == []  # type: ignore[index]


# ------------------------------------------------------------ the indexes agree with a scan

TENANTS = st.sampled_from(["acme", "globex", "initech"])
MONTHS = st.sampled_from(["2026-10", "2026-11"])


@st.composite
def license_stream(draw: st.DrawFn) -> list[tuple[bytes, bytes, bool]]:
    """License records and corrections, in any order, replays and bad ones among them."""
    out = []
    for _ in range(draw(st.integers(0, 25))):
        tenant, month = draw(TENANTS), draw(MONTHS)
        if draw(st.booleans()):
            n = draw(st.integers(1, 3))  # a type in a record has workloads
            usage = {"vm": {"workloads": n, "new_workloads": 0, "rental_workloads": 0,
                            "points": draw(st.integers(0, 10 * n)),
                            "new_points": draw(st.integers(0, 10))}}  # fmt: skip
            doc: dict[str, Any] = {
                "view": "license", "tenant_id": tenant, "month": month,
                "status": draw(st.sampled_from(["running", "final"])),
                "revision": draw(st.integers(0, 5)), "usage": usage,
            }  # fmt: skip
            if draw(st.integers(0, 9)) == 0:
                doc["usage"] = {"vm": {"points": "5"}}  # malformed: skipped by both
            out.append((f"{tenant}/{month}".encode(), orjson.dumps(doc), False))
        else:
            wid = draw(st.sampled_from(["a", "b"]))
            fix = {
                "tenant_id": tenant, "month": month, "workload_type": "vm",
                "workload_id": wid, "workloads_added": 1,  # a late workload
                "new_added": 0, "rental_added": 0,
                "points_added": draw(st.integers(0, 10)),
                "new_points_added": draw(st.integers(0, 5)),
            }  # fmt: skip
            key = f"{tenant}/{month}/vm/{wid}".encode()
            out.append((key, orjson.dumps(fix), True))
    return out


@settings(max_examples=200, deadline=None)
@given(license_stream(), MONTHS)
def test_the_license_status_from_the_index_is_the_fold_of_every_record(
    stream: list[tuple[bytes, bytes, bool]], month: str
) -> None:
    view = LicenseView(KafkaSettings(bootstrap="127.0.0.1:1"), "meter.license")
    for key, value, is_fix in stream:
        view._take(key, value, view.corrections if is_fix else view.records, 0)
    got = view.status(month, ProviderLicense(100), date(2026, 11, 20))
    folded = fold_license(view.records, view.corrections)
    rows = license_rows(folded)
    if not view.records:
        assert got is not None  # a license is declared
    assert got is not None
    assert got["used_points"] == sum(r.points for r in rows if r.month == month)
    assert got["new_points"] == sum(r.new_points for r in rows if r.month == month)
    assert got["previous_new_points"] == sum(r.new_points for r in rows if r.month == "2026-10") * (
        month == "2026-11"
    )
    assert got["status"] == license_month_state(folded, month)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(TENANTS, MONTHS, st.integers(0, 4), st.booleans(), st.sampled_from(["a", "b"])),
        max_size=20,
    ),
    MONTHS,
    st.sampled_from([None, "acme", "globex"]),
)
def test_a_month_document_from_the_index_is_the_one_from_every_record(
    items: list[tuple[str, str, int, bool, str]], month: str, tenant: str | None
) -> None:
    view = UsageView(KafkaSettings(bootstrap="127.0.0.1:1"), "meter.usage")
    for t, m, rev, fin, closed in items:
        r = {**record(t, m, {"vm": (rev, 5 * rev)}), "revision": rev}
        if fin:
            r = {**r, "final": True, "closed_at": f"2026-12-0{1 + (closed == 'b')}T00:00:00Z"}
        if rev == 4:  # a late correction instead
            c = {**correction(t, "vm", closed, 1, 5), "month": m}
            view._take(f"{t}/{m}/vm/{closed}".encode(), orjson.dumps(c), view.corrections)
            continue
        view._take(f"{t}/{m}".encode(), orjson.dumps(r), view.records)
    want = month_document(view.records, view.corrections, month, tenant)
    assert view.document(month, tenant) == want
    # the same after the dicts were replaced by hand (the index is rebuilt)
    view.records = dict(view.records)
    assert view.document(month, tenant) == want
