"""A month pruned from memory keeps its totals for /metrics: in memory, across a restart
from local state, and gone again once the month's own state is read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from meter.store import StoreError
from meter.store.sqlite import SqliteStore
from meter.stream.partition import HomePartition, MonthTotals
from tests.stream.test_local_state import RATES, Changelog, close, event, recover, write


def metrics_view(hp: HomePartition, months: set[str]) -> tuple[list[object], list[object]]:
    usage = sorted(r for r in hp.usage_totals(months) if r[1][2])
    lic = sorted(r for r in hp.license_totals(months) if r[1][2])
    return usage, lic


def built(tmp_path: Path) -> tuple[HomePartition, Changelog]:
    log = Changelog()
    hp = recover(log, SqliteStore(tmp_path).partition("changelog", 0))
    for n in range(30):
        tenant = f"t{n % 3}"
        event(hp, tenant, "2026-01", f"w{n}", RATES[n % 3], 10)
        event(hp, tenant, "2026-02", f"w{n}", RATES[(n + 1) % 3], 30 if n % 2 else 5)
        event(hp, tenant, "2026-02", f"x{n}", RATES[1], 3)  # new in February
    write(hp, log)
    close(hp, log, "2026-01")
    close(hp, log, "2026-02")
    return hp, log


def test_a_pruned_month_keeps_its_totals_for_metrics_and_across_a_restart(tmp_path: Path) -> None:
    hp, log = built(tmp_path)
    months = {"2026-01", "2026-02"}
    before = metrics_view(hp, months)
    assert len(before[0]) == 6 and len(before[1]) == 6  # 3 tenants x 2 months, one type
    assert hp.save(log.fingerprint(hp.changelog_end), months) == 2
    assert len(hp.ledger) == 0 and hp.pruned == months
    assert metrics_view(hp, months) == before

    again = recover(log, SqliteStore(tmp_path).partition("changelog", 0))
    assert again.pruned == months and len(again.ledger) == 0
    assert metrics_view(again, months) == before

    # A late event reads February back: its totals are its state's again, and move with it.
    event(again, "t0", "2026-02", "late", RATES[2], 7)
    assert "2026-02" not in again.summaries and "2026-01" in again.summaries
    usage, _ = metrics_view(again, {"2026-02"})
    was = {r[1][0]: r[1] for r in before[0] if r[0] == "2026-02"}
    now = {r[1][0]: r[1] for r in usage}
    assert now["t0"][2] == was["t0"][2] + 1 and now["t0"][3] == was["t0"][3] + RATES[2][0]
    assert {t: now[t] for t in ("t1", "t2")} == {t: was[t] for t in ("t1", "t2")}


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"kind": "state", "month": "2026-01", "usage": [], "license": []}',
        b'{"kind": "totals", "month": "2026-01", "usage": [["t", "vm", 1, 2]], "license": []}',
        b'{"kind": "totals", "month": "2026-01", "usage": [["t", "vm", 1, 2, "3"]], "license": []}',
        b'{"kind": "totals", "month": 7, "usage": [], "license": []}',
    ],
)
def test_a_totals_row_that_is_not_one_is_an_error(raw: bytes) -> None:
    with pytest.raises(StoreError):
        MonthTotals.decode(raw)


def test_a_damaged_totals_row_makes_the_restore_fail_whole(tmp_path: Path) -> None:
    hp, log = built(tmp_path)
    assert hp.save(log.fingerprint(hp.changelog_end), {"2026-01"}) == 1
    store = SqliteStore(tmp_path).partition("changelog", 0)
    store.save(store.checkpoint(), {"totals:2026-01": [b'{"kind": "totals"}']})  # type: ignore[arg-type]
    fresh = HomePartition(0, hp.height, history_start="2026-01")
    fresh.begin_recovery()
    cp = store.checkpoint()
    assert cp is not None
    with pytest.raises(StoreError):
        fresh.restore(store, cp)
    assert len(fresh.ledger) == 0 and not fresh.summaries  # nothing half-loaded is kept


def test_only_the_months_metrics_shows_keep_their_totals(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from meter.domain import load_ratecards
    from meter.kafka import KafkaSettings
    from meter.stream.config import StreamConfig
    from meter.stream.worker import Worker

    now = datetime(2026, 3, 2, tzinfo=UTC)
    w = Worker(
        KafkaSettings(bootstrap="127.0.0.1:1"), StreamConfig(), load_ratecards(), now=lambda: now
    )
    assert w.shown_months() == {"2026-03", "2026-02"}
    hp, log = built(tmp_path)
    hp.save(log.fingerprint(hp.changelog_end), {"2026-01", "2026-02"})
    hp.keep_totals(w.shown_months())
    assert set(hp.summaries) == {"2026-02"}
    store = SqliteStore(tmp_path).partition("changelog", 0)
    again = HomePartition(0, hp.height, history_start="2026-01")
    again.begin_recovery()
    cp = store.checkpoint()
    assert cp is not None
    again.restore(store, cp, w.shown_months())
    assert set(again.summaries) == {"2026-02"} and again.pruned == {"2026-01", "2026-02"}
