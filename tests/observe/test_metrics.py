"""The worker's metrics, read through a registry passed in (no broker needed)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from prometheus_client import CollectorRegistry

from meter.domain import load_ratecards
from meter.domain.license import ProviderLicense
from meter.kafka import KafkaSettings
from meter.observe.metrics import instrument, recent_months
from meter.stream.config import StreamConfig
from meter.stream.partition import HomePartition
from meter.stream.worker import Worker


def make_worker() -> Worker:
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), StreamConfig(), load_ratecards())
    home = HomePartition(0)
    home.recovered(0)
    ledger = home.ledger
    ledger.add("acme", "2026-11", "vm", "a", (5, "vcsp-2026", "subscription"))
    ledger.add("acme", "2026-11", "vm", "b", (5, "vcsp-2026", "subscription"))
    ledger.add("acme", "2026-10", "replica", "a", (10, "vcsp-2026", "subscription"))
    ledger.add(
        "acme", "2026-08", "replica", "a", (10, "vcsp-2026", "subscription")
    )  # outside the window
    w.homes[0] = home
    w.stats.tally.counted = 4
    w.stats.tally.rejected = 2
    w.stats.rejected_by_code["invalid_time"] = 2
    w.stats.published = 7
    return w


def test_usage_gauges_are_read_from_state_for_recent_months_only() -> None:
    registry = CollectorRegistry()
    w = make_worker()
    instrument(w, registry, recent_months(2, now=lambda: datetime(2026, 11, 27, tzinfo=UTC)))
    labels = {"tenant_id": "acme", "month": "2026-11", "workload_type": "vm"}
    assert registry.get_sample_value("meter_workloads", labels) == 2
    assert registry.get_sample_value("meter_points", labels) == 10
    assert (
        registry.get_sample_value(
            "meter_points", {"tenant_id": "acme", "month": "2026-10", "workload_type": "replica"}
        )
        == 10
    )
    assert (
        registry.get_sample_value(
            "meter_points", {"tenant_id": "acme", "month": "2026-08", "workload_type": "replica"}
        )
        is None
    )
    # Read at scrape time: a change in state shows without touching any metric object.
    w.ledgers[0].add("acme", "2026-11", "vm", "c", (5, "vcsp-2026", "subscription"))
    assert registry.get_sample_value("meter_workloads", labels) == 3


def test_counters_and_build_info() -> None:
    registry = CollectorRegistry()
    instrument(make_worker(), registry)
    assert registry.get_sample_value("meter_events_total", {"outcome": "counted"}) == 4
    assert registry.get_sample_value("meter_events_total", {"outcome": "rejected"}) == 2
    assert registry.get_sample_value("meter_events_rejected_total", {"reason": "invalid_time"}) == 2
    assert registry.get_sample_value("meter_events_rejected_total", {"reason": "invalid_json"}) == 0
    assert registry.get_sample_value("meter_usage_records_published_total") == 7
    assert registry.get_sample_value("meter_home_partitions") == 1
    assert registry.get_sample_value("meter_ready") == 0
    assert (
        registry.get_sample_value(
            "meter_ratecard_info", {"version": "vcsp-2026", "effective": "0001-01-01"}
        )
        == 1
    )
    assert registry.get_sample_value("meter_corrections_published_total") == 0
    from meter import __version__

    samples = [s for m in registry.collect() if m.name == "meter_build_info" for s in m.samples]
    assert samples[0].labels["version"] == __version__


def test_latency_histogram_is_fed_by_the_worker() -> None:
    registry = CollectorRegistry()
    w = make_worker()
    instrument(w, registry)
    assert w.on_latency is not None
    w.on_latency(0.2)
    w.on_latency(3.0)
    assert registry.get_sample_value("meter_event_to_total_latency_seconds_count") == 2
    assert (
        registry.get_sample_value("meter_event_to_total_latency_seconds_bucket", {"le": "0.25"})
        == 1
    )


def test_recent_months_wraps_the_year() -> None:
    months = recent_months(3, now=lambda: datetime(2027, 1, 5, tzinfo=UTC))()
    assert months == {"2027-01", "2026-12", "2026-11"}


# ---------------------------------------------------------------- license gauges

NOV = {"month": "2026-11"}


def licensed_worker(lic: ProviderLicense | None, *, today: datetime) -> Worker:
    """A worker with a declared license (or none) and real license totals on partition 1
    (history from 2026-09; partition 0 of :func:`make_worker` holds calendar entries only):

    - 2026-10: 9 workloads (1 new), 40 used points, 5 new points;
    - 2026-11: 13 workloads (2 new), 55 used points, 10 new, 5 new the month before.
    """
    w = make_worker()
    w.now = lambda: today
    w.provider_license = lic  # what --license FILE sets
    home = HomePartition(1, history_start="2026-09")
    home.recovered(0)
    rate = (5, "vcsp-2026", "subscription")
    add = home.license.add
    for i in range(10):
        add("lic", "2026-09", "vm", f"w{i}", rate)
    for wid in [f"w{i}" for i in range(8)] + ["n1"]:
        add("lic", "2026-10", "vm", wid, rate)
    for wid in [f"w{i}" for i in range(10)] + ["n1", "m1", "m2"]:
        add("lic", "2026-11", "vm", wid, rate)
    w.homes[1] = home
    return w


def test_declared_license_exports_licensed_points_and_days_to_expiry() -> None:
    registry = CollectorRegistry()
    now = datetime(2026, 11, 27, 23, 59, tzinfo=UTC)
    w = licensed_worker(ProviderLicense(50, date(2026, 12, 26)), today=now)
    instrument(w, registry, recent_months(2, now=lambda: now))
    assert registry.get_sample_value("meter_license_declared") == 1
    assert registry.get_sample_value("meter_license_licensed_points") == 50
    assert registry.get_sample_value("meter_license_expiry_days") == 29
    # the last valid day is 0, the day after -1 (grace), read from the worker's clock
    w.now = lambda: datetime(2026, 12, 26, tzinfo=UTC)
    assert registry.get_sample_value("meter_license_expiry_days") == 0
    w.now = lambda: datetime(2027, 2, 25, tzinfo=UTC)
    assert registry.get_sample_value("meter_license_expiry_days") == -61


def test_license_without_expiry_has_no_expiry_gauge() -> None:
    registry = CollectorRegistry()
    now = datetime(2026, 11, 27, tzinfo=UTC)
    instrument(licensed_worker(ProviderLicense(200), today=now), registry)
    assert registry.get_sample_value("meter_license_declared") == 1
    assert registry.get_sample_value("meter_license_licensed_points") == 200
    assert registry.get_sample_value("meter_license_expiry_days") is None


def test_undeclared_license_says_so_and_still_exports_license_usage() -> None:
    registry = CollectorRegistry()
    now = datetime(2026, 11, 27, tzinfo=UTC)
    instrument(licensed_worker(None, today=now), registry, recent_months(2, now=lambda: now))
    assert registry.get_sample_value("meter_license_declared") == 0
    assert registry.get_sample_value("meter_license_licensed_points") is None
    assert registry.get_sample_value("meter_license_expiry_days") is None
    assert registry.get_sample_value("meter_license_used_points", NOV) == 55
    help_text = {m.name: m.documentation for m in registry.collect()}
    assert "--license" in help_text["meter_license_declared"]


def test_per_month_license_gauges_for_the_usage_months() -> None:
    registry = CollectorRegistry()
    now = datetime(2026, 11, 27, tzinfo=UTC)
    w = licensed_worker(ProviderLicense(50, date(2027, 6, 30)), today=now)
    instrument(w, registry, recent_months(2, now=lambda: now))
    assert registry.get_sample_value("meter_license_used_points", NOV) == 55
    assert registry.get_sample_value("meter_license_new_points", NOV) == 10
    assert registry.get_sample_value("meter_license_previous_new_points", NOV) == 5
    assert registry.get_sample_value("meter_license_workloads", NOV) == 13
    assert registry.get_sample_value("meter_license_new_workloads", NOV) == 2
    oct_ = {"month": "2026-10"}
    assert registry.get_sample_value("meter_license_used_points", oct_) == 40
    assert registry.get_sample_value("meter_license_new_workloads", oct_) == 1
    # the same months as the usage gauges: 2026-08 is not exported
    assert registry.get_sample_value("meter_license_used_points", {"month": "2026-08"}) is None
    # a share of the provider's figure: the HELP says to sum over workers
    help_text = {m.name: m.documentation for m in registry.collect()}
    for name in ("used_points", "new_points", "previous_new_points", "workloads"):
        assert "sum over all workers" in help_text[f"meter_license_{name}"]


def test_a_worker_without_license_state_exports_empty_license_families() -> None:
    registry = CollectorRegistry()
    w = make_worker()
    w.provider_license = None
    w.homes.clear()
    instrument(w, registry)
    names = {m.name for m in registry.collect()}
    assert {"meter_license_declared", "meter_license_used_points"} <= names
    assert registry.get_sample_value("meter_license_declared") == 0
    assert registry.get_sample_value("meter_license_used_points", NOV) is None


def test_workload_months_before_the_history_start_are_a_gauge() -> None:
    """Tenant usage dated before the declared history start (a tenant's reset clock, a
    replayed archive): counted, and visible on /metrics, summed over active partitions."""
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), StreamConfig(), load_ratecards())
    rate = (5, "vcsp-2026", "subscription")
    for n, active in ((0, True), (1, True), (2, False)):
        home = HomePartition(n, history_start="2026-11")
        home.recovered(0)
        if not active:
            home.fence("revoked")
        home.ledger.add("acme", "2001-01", "vm", f"old-{n}", rate)
        home.ledger.add("acme", "2026-10", "vm", f"oct-{n}", rate)
        home.ledger.add("acme", "2026-11", "vm", f"nov-{n}", rate)
        w.homes[n] = home
    registry = CollectorRegistry()
    instrument(w, registry)
    name = "meter_license_before_history_start_workload_months"
    assert registry.get_sample_value(name) == 4  # 2 partitions x (2001-01, 2026-10)
    w.homes[0].license = HomePartition(0).license  # no history start declared: none before
    assert registry.get_sample_value(name) == 2
