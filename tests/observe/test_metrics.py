"""The worker's metrics, read through a registry passed in (no broker needed)."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from meter.domain import load_ratecards
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
