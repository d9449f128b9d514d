"""Prometheus metrics of a worker, read from its state at scrape time.

Nothing here runs per event: the worker keeps plain integers (its
:class:`~meter.stream.worker.WorkerStats`) and its ledgers, and the custom
collector turns them into metric families when Prometheus scrapes.  Usage
gauges cover only the months ``months()`` returns (by default the current and
the previous UTC month) so label cardinality stays bounded.

Two views, named as everywhere in meter: ``meter_points`` / ``meter_workloads`` are
tenant usage (calendar month, what a provider charges its tenants);
``meter_license_*`` are license usage (the vendor's rules, what the provider is billed
on), beside the provider's declared license (``--license FILE``).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meter import __version__
from meter.domain import OUTCOMES, REJECTION_CODES
from meter.domain.clock import STATES
from meter.domain.license import ProviderLicense
from meter.domain.month import recent
from meter.observe.snapshot import (
    DEFAULT_TOP_TENANTS,
    UsageSnapshot,
    build_snapshot,
    snapshot_now,
)
from meter.stream.worker import Worker

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
#: Tenant-months (both views) from which a scrape is answered with the last body while
#: the next is built (about 50 ms of walking): small workers always answer fresh.
STALE_WALK = 20_000
LOOP_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def recent_months(
    count: int = 2, now: Callable[[], datetime] | None = None
) -> Callable[[], set[str]]:
    """The current UTC month and the ``count - 1`` before it."""

    def months() -> set[str]:
        t = (now or (lambda: datetime.now(UTC)))()
        return recent(t.year, t.month, count)

    return months


class WorkerCollector(Collector):
    def __init__(
        self, worker: Worker, months: Callable[[], set[str]], top_tenants: int = DEFAULT_TOP_TENANTS
    ) -> None:
        self.worker = worker
        self.months = months
        self.top_tenants = top_tenants
        #: set by :meth:`exposition` for the one collect it runs (built in slices)
        self.snapshot: UsageSnapshot | None = None
        #: tenant-months the last exposition read
        self.walked = 0
        #: the event loop's lag (set by :func:`instrument`)
        self.loop_lag: Histogram | None = None

    def big(self) -> bool:
        """Whether the last walk was big enough (:data:`STALE_WALK`) that a scrape is
        answered with the last body while the next is built."""
        return self.walked >= STALE_WALK

    async def exposition(self, registry: CollectorRegistry) -> bytes:
        """The scrape body, with the ledgers walked in slices between which the event
        loop runs (never in one go: that stalled polling and heartbeats)."""
        self.snapshot = await build_snapshot(
            self.worker.homes.values(), self.months(), self.top_tenants
        )
        self.walked = self.snapshot.walked
        try:
            return generate_latest(registry)
        finally:
            self.snapshot = None

    def collect(self) -> Iterator[Metric]:
        s = self.worker.stats
        t = s.tally
        events = CounterMetricFamily(
            "meter_events", "Input messages by outcome.", labels=["outcome"]
        )
        for outcome in OUTCOMES:
            events.add_metric([outcome], getattr(t, outcome))
        yield events
        rejected = CounterMetricFamily(
            "meter_events_rejected", "Rejected input messages by reason.", labels=["reason"]
        )
        for code in REJECTION_CODES:
            rejected.add_metric([code], s.rejected_by_code.get(code, 0))
        yield rejected
        yield _counter(
            "meter_events_forwarded",
            "Events re-keyed to their tenant's home partition.",
            s.forwarded,
        )
        yield _counter("meter_usage_records_published", "Usage records published.", s.published)
        yield _counter("meter_changelog_records", "Changelog records written.", s.changelog_records)
        yield _counter("meter_rebalances", "Consumer group rebalances seen.", s.rebalances)
        yield _counter(
            "meter_corrections_published",
            "Corrections to closed months published (late events).",
            s.corrections,
        )
        ok, _ = self.worker.health()
        ready = GaugeMetricFamily(
            "meter_ready",
            "1 when the worker owns its partitions and makes progress (what /healthz says).",
        )
        ready.add_metric([], 1 if ok else 0)
        yield ready
        problems = GaugeMetricFamily(
            "meter_problem",
            "1 while the worker has this problem: halted (broker lost data, a write that can "
            "never succeed), fenced, recovering, connecting.",
            labels=["problem"],
        )
        for problem, on in self.worker.problems().items():
            problems.add_metric([problem], 1 if on else 0)
        yield problems
        yield _counter(
            "meter_internal_errors",
            "Messages whose handling raised an unexpected error (each one dead-lettered).",
            s.internal_errors,
        )
        yield _counter(
            "meter_write_retries", "Batch writes that failed and were retried.", s.write_retries
        )
        yield _counter(
            "meter_partitions_fenced",
            "Times a home partition was fenced because ownership was in doubt.",
            s.fenced,
        )
        closed = GaugeMetricFamily(
            "meter_last_closed_month_timestamp_seconds",
            "Start (Unix seconds) of the newest month closed on this worker's partitions.",
        )
        months = {m for h in self.worker.homes.values() for m in h.close.closed}
        if months:
            last = max(months)
            closed.add_metric(
                [], datetime(int(last[:4]), int(last[5:7]), 1, tzinfo=UTC).timestamp()
            )
        yield closed
        yield from clock_families(self.worker)
        cards = GaugeMetricFamily(
            "meter_ratecard_info",
            "Rate cards loaded (value is always 1).",
            labels=["version", "effective"],
        )
        for card in self.worker.cards.cards:
            cards.add_metric([card.version, card.effective], 1)
        yield cards
        yield _counter(
            "meter_ledger_entries_recovered",
            "Ledger entries replayed from the changelog.",
            s.recovered_entries,
        )
        newest = GaugeMetricFamily(
            "meter_newest_event_timestamp_seconds",
            "Time (Unix seconds) of the newest job event processed.",
        )
        if s.newest_event_ts:
            newest.add_metric([], s.newest_event_ts)
        yield newest
        homes = GaugeMetricFamily("meter_home_partitions", "Home partitions this worker owns.")
        homes.add_metric([], len(self.worker.ledgers))
        yield homes
        yield _counter(
            "meter_state_checkpoints",
            "Checkpoints of a home partition's state written to --state-dir.",
            getattr(s, "checkpoints", 0),
        )
        pruned = GaugeMetricFamily(
            "meter_state_pruned_months",
            "Closed months kept in --state-dir and not in memory, per home partition.",
            labels=["partition"],
        )
        behind = GaugeMetricFamily(
            "meter_state_unsaved_records",
            "Changelog records joined into a home partition since its last checkpoint (what a "
            "restart on this host replays).",
            labels=["partition"],
        )
        for n, hp in sorted(getattr(self.worker, "homes", {}).items()):
            if getattr(hp, "store", None) is not None and hp.active:
                pruned.add_metric([str(n)], len(hp.pruned))
                behind.add_metric([str(n)], max(0, hp.changelog_end - max(hp.saved_end, 0)))
        yield pruned
        yield behind
        lag = GaugeMetricFamily(
            "meter_consumer_lag_messages",
            "Messages not yet processed, per input partition (Fetch high watermark - position).",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(self.worker.lag().items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        snap = self.snapshot
        if snap is None:
            snap = snapshot_now(self.worker.homes.values(), self.months(), self.top_tenants)
        yield from usage_families(snap.top)
        yield from provider_families(snap)
        yield from license_families(
            getattr(self.worker, "provider_license", None),
            self.worker.now().date(),
            snap.license,
        )
        before = GaugeMetricFamily(
            "meter_license_before_history_start_workload_months",
            "Workload-months of tenant usage dated before the declared history start: counted "
            "in tenant usage, in the license view only where a 31-day window reaches back to "
            "them; 0 with no history start declared" + _SHARE,
        )
        before.add_metric([], snap.before_history_start)
        yield before


def provider_families(snap: UsageSnapshot) -> Iterator[Metric]:
    """Exact sums over every tenant (this worker's share): what dashboards total."""
    workloads = GaugeMetricFamily(
        "meter_provider_workloads",
        "Distinct counted workloads of all tenants, per month and workload type" + _SHARE,
        labels=["month", "workload_type"],
    )
    points = GaugeMetricFamily(
        "meter_provider_points",
        "Points of all tenants' counted workloads, per month and workload type (tenant "
        "usage, calendar month)" + _SHARE,
        labels=["month", "workload_type"],
    )
    for (month, wtype), (n, p) in sorted(snap.provider.items()):
        workloads.add_metric([month, wtype], n)
        points.add_metric([month, wtype], p)
    yield workloads
    yield points
    tenants = GaugeMetricFamily(
        "meter_tenants", "Tenants with usage in the month" + _SHARE, labels=["month"]
    )
    omitted = GaugeMetricFamily(
        "meter_tenants_without_series",
        "Tenants with usage in the month that have no meter_points/meter_workloads series "
        "(beyond --metrics-tenants, by points): they are in meter_provider_* and in "
        "/api/usage and meter report" + _SHARE,
        labels=["month"],
    )
    for month, n in sorted(snap.tenants.items()):
        tenants.add_metric([month], n)
        omitted.add_metric([month], snap.omitted.get(month, 0))
    yield tenants
    yield omitted


def clock_families(worker: Worker) -> Iterator[Metric]:
    """The month-close clock check: this host's clock against the broker's time."""
    tolerance = worker.config.clock_tolerance
    verdict = worker.clock_ref.verdict(worker.now(), tolerance)
    skew = GaugeMetricFamily(
        "meter_clock_skew_seconds",
        "This host's close clock minus the broker's time (LogAppendTime of its heartbeat; on "
        "a broker that assigns none, the other workers' clocks: the largest disagreement). "
        "Positive: ahead. Absent while nothing has been measured.",
    )
    if verdict.skew is not None:
        skew.add_metric([], verdict.skew.total_seconds())
    yield skew
    tol = GaugeMetricFamily(
        "meter_clock_tolerance_seconds",
        "--clock-tolerance: months close only while |skew| is within it (absent when off).",
    )
    if tolerance is not None:
        tol.add_metric([], tolerance.total_seconds())
    yield tol
    state = GaugeMetricFamily(
        "meter_clock_check",
        "1 for the clock check's state: ok, ahead (closes held), behind (closes late), "
        "unknown (no reference time: closes held), off.",
        labels=["state"],
    )
    for name in STATES:
        state.add_metric([name], 1 if verdict.state == name else 0)
    yield state
    held = GaugeMetricFamily(
        "meter_month_close_held",
        "1 while the clock check holds month closes (usage still counts).",
    )
    held.add_metric([], 1 if verdict.held else 0)
    yield held
    yield _counter(
        "meter_month_closes_refused",
        "Due closes (home partition, month) the clock check refused, each counted once.",
        worker.stats.closes_refused,
    )


def usage_families(totals: Iterable[tuple[str, str, str, int, int]]) -> Iterator[Metric]:
    """The per-tenant usage gauges of ``(tenant, month, type, workloads, points)`` rows."""
    workloads = GaugeMetricFamily(
        "meter_workloads",
        "Distinct counted workloads this month so far, per tenant (the --metrics-tenants "
        "tenants with the most points; all tenants: meter_provider_workloads).",
        labels=["tenant_id", "month", "workload_type"],
    )
    points = GaugeMetricFamily(
        "meter_points",
        "Points the counted workloads consume this month so far, per tenant (the "
        "--metrics-tenants tenants with the most points; all tenants: meter_provider_points).",
        labels=["tenant_id", "month", "workload_type"],
    )
    for tenant, month, wtype, n, p in sorted(totals):
        labels = [tenant, month, wtype]
        workloads.add_metric(labels, n)
        points.add_metric(labels, p)
    yield workloads
    yield points


#: The per-month license gauges: (totals key, metric name, help).
_LICENSE_MONTH_GAUGES = (
    ("used_points", "meter_license_used_points",
     "License usage (vendor rules): points the vendor bills for the month, new workloads "
     "excluded"),
    ("new_points", "meter_license_new_points",
     "License usage (vendor rules): points of the month's new workloads (free this month)"),
    ("previous_new_points", "meter_license_previous_new_points",
     "License usage (vendor rules): new points of the month before, which the allowance adds"),
    ("workloads", "meter_license_workloads",
     "License usage (vendor rules): protected workloads (a success or warning session in the "
     "31-day window), new ones included"),
    ("new_workloads", "meter_license_new_workloads",
     "License usage (vendor rules): of those, workloads processed for the first time this "
     "month"),
)  # fmt: skip
_SHARE = ". This worker's home partitions only: the provider's figure is the sum over all workers."


def license_families(
    lic: ProviderLicense | None, today: date, totals: dict[str, dict[str, int]]
) -> Iterator[Metric]:
    """The provider's license, and each month's license usage on this worker."""
    declared = GaugeMetricFamily(
        "meter_license_declared",
        "1 when the provider declared its license (--license FILE), 0 when not: then there "
        "are no licensed points, expiry or license alerts, and everything else works.",
    )
    declared.add_metric([], 0 if lic is None else 1)
    yield declared
    licensed = GaugeMetricFamily(
        "meter_license_licensed_points",
        "Points the provider licensed from the vendor (only when a license is declared).",
    )
    expiry = GaugeMetricFamily(
        "meter_license_expiry_days",
        "Days from today (UTC) to the license's last valid day: 0 on that day, negative "
        "after it (60 days of grace, then workloads are no longer processed). Only when "
        "the license declares an expiry.",
    )
    if lic is not None:
        licensed.add_metric([], lic.licensed_points)
        if lic.expires is not None:
            expiry.add_metric([], (lic.expires - today).days)
    yield licensed
    yield expiry
    for key, name, doc in _LICENSE_MONTH_GAUGES:
        family = GaugeMetricFamily(name, doc + _SHARE, labels=["month"])
        for month, values in sorted(totals.items()):
            family.add_metric([month], values.get(key, 0))
        yield family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class BuildInfo(Collector):
    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "meter_build_info", "meter version (value is always 1).", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


def instrument(
    worker: Worker,
    registry: CollectorRegistry,
    months: Callable[[], set[str]] | None = None,
    top_tenants: int = DEFAULT_TOP_TENANTS,
) -> WorkerCollector:
    """Register a worker's metrics in ``registry`` (passed in, so tests use their own)."""
    collector = WorkerCollector(worker, months or recent_months(), top_tenants)
    registry.register(collector)
    registry.register(BuildInfo())
    latency = Histogram(
        "meter_event_to_total_latency_seconds",
        "From a job event's arrival in Kafka (record timestamp) to the usage record that "
        "includes it being acknowledged.",
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    worker.on_latency = latency.observe
    collector.loop_lag = Histogram(
        "meter_event_loop_lag_seconds",
        "How late the worker's event loop ran a 100 ms timer: what polling, heartbeats and "
        "commits waited (a long one risks the session timeout and a fence).",
        buckets=LOOP_LAG_BUCKETS,
        registry=registry,
    )
    return collector
