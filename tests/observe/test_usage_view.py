"""What /api/usage says a month is: running, final, or final plus corrections.

Pure: the view's records and corrections are filled by hand, as the topics would.
"""

from __future__ import annotations

from typing import Any

from meter.kafka import KafkaSettings
from meter.observe.usage_view import UsageView, month_document
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
