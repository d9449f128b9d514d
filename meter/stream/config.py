"""Settings of the streaming meter: topic names, partitions, timings.

Built once at the edge (the CLI) and passed in; nothing below reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from meter.domain.clock import DEFAULT_CLOCK_TOLERANCE
from meter.domain.close import DEFAULT_GRACE
from meter.domain.event import DEFAULT_CLOCK_SKEW, DEFAULT_MAX_EVENT_BYTES, skew_ms
from meter.kafka.topic_check import TopicSpec

#: Kafka retention.ms meaning "keep forever".
FOREVER: Final = -1
DAY_MS: Final = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Topics:
    jobs: str = "meter.jobs"
    rejected: str = "meter.jobs.rejected"
    usage: str = "meter.usage"
    #: Events re-keyed by tenant when they arrive on a partition that is not
    #: their tenant's home partition (any key, or none, must work).
    by_tenant: str = "meter.jobs.by-tenant"
    #: The ledger's changelog: one record per processed batch and home
    #: partition, holding the ledger entries that batch changed.  Replayed as a
    #: join, so it needs neither compaction nor ordering.
    changelog: str = "meter.ledger.changelog"
    #: Month-close reports: one record per tenant-month, per partition, and the provider.
    reports: str = "meter.reports"
    #: Corrections to closed months, keyed per workload.
    corrections: str = "meter.usage.corrections"
    #: The license view (vendor rules): one record per tenant-month, running then final.
    license: str = "meter.license"
    #: Corrections to closed months' license reports, keyed per workload.
    license_corrections: str = "meter.license.corrections"
    #: Snapshots of home partitions' local state, for workers on a new host (compacted).
    snapshots: str = "meter.ledger.snapshots"
    #: Workers' clock heartbeats (one partition, LogAppendTime): the month-close clock check.
    clock: str = "meter.jobs.clock"

    @classmethod
    def derived(
        cls,
        jobs: str = "meter.jobs",
        usage: str = "meter.usage",
        rejected: str = "meter.jobs.rejected",
        reports: str = "meter.reports",
        license_: str = "meter.license",
    ) -> Topics:
        """The topics of the five a command names (``--jobs-topic`` ...): the rest are
        named after them, as the README's topic table shows."""
        return cls(
            jobs=jobs,
            usage=usage,
            rejected=rejected,
            reports=reports,
            corrections=f"{usage}.corrections",
            license=license_,
            license_corrections=f"{license_}.corrections",
            by_tenant=f"{jobs}.by-tenant",
            changelog=f"{jobs}.ledger.changelog",
            snapshots=f"{jobs}.ledger.snapshots",
            clock=f"{jobs}.clock",
        )


@dataclass(frozen=True, slots=True)
class StreamConfig:
    topics: Topics = Topics()
    group_id: str = "meter"
    #: Partitions of the tenant-keyed topics (jobs, by-tenant, changelog).
    partitions: int = 4
    #: Replication factor of the topics meter creates; None: min(3, brokers in the cluster).
    replication_factor: int | None = None
    #: min.insync.replicas of the topics meter creates; None: max(1, replication factor - 1).
    min_insync_replicas: int | None = None
    #: Raw events are kept a month plus the close grace (issue: audit needs them).
    jobs_retention_ms: int = 40 * DAY_MS
    #: Publish a tenant-month's usage record at most this often.
    flush_interval_s: float = 0.25
    max_batch: int = 10_000
    commit_timeout_s: float = 15.0
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    #: "auto": idempotent producer where the broker supports it (Apache Kafka),
    #: plain acks=all where it does not (the embedded Tansu broker).
    idempotence: str = "auto"
    #: A month closes this long after its end (None: never close).
    close_grace: timedelta | None = DEFAULT_GRACE
    #: Months close only while this host's clock is within this of the broker's time (or,
    #: on a broker that assigns none, the other workers' clocks); None: no check.
    clock_tolerance: timedelta | None = DEFAULT_CLOCK_TOLERANCE
    #: Events larger than this are rejected as ``too_large`` (never forwarded or copied whole).
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    #: License view: the declared first month of meter's history (it has no new
    #: workloads); None: none declared, no workload is new.
    history_start: str | None = None
    #: Events dated after the end of the UTC hour of their record's timestamp plus this
    #: many milliseconds are rejected as ``future_time``; None: any time is accepted.
    clock_skew_ms: int | None = skew_ms(DEFAULT_CLOCK_SKEW)
    #: With local state (``--state-dir``): save changed state at most this often.
    checkpoint_interval_s: float = 60.0
    #: With local state: a closed month leaves memory this long after it closed (None: never);
    #: its totals stay while /metrics shows it (``metrics_months``).
    prune_after: timedelta | None = timedelta(days=7)
    #: The months /metrics shows: the current UTC month and the ``metrics_months - 1`` before.
    metrics_months: int = 2
    #: With local state: copy it to the snapshots topic at most this often (None: never).
    snapshot_interval_s: float | None = 600.0
    #: With local state and snapshots: delete changelog records below the whole snapshot
    #: before the last (DeleteRecords; brokers that cannot keep them all).
    purge_changelog: bool = False

    def topic_specs(self) -> list[TopicSpec]:
        """The topics meter creates and checks.  Their replication is chosen for the
        cluster (``replication_factor``, ``min_insync_replicas``: see
        :func:`~meter.kafka.topics.ensure_topics`)."""
        t = self.topics
        n = self.partitions
        compact = {"cleanup.policy": "compact"}
        return [
            TopicSpec(t.jobs, n, configs={"retention.ms": str(self.jobs_retention_ms)}),
            TopicSpec(t.by_tenant, n, configs={"retention.ms": str(7 * DAY_MS)}),
            # The source of truth, kept for ever: a shorter retention or compaction
            # loses ledger entries, so an existing changelog that differs is refused.
            TopicSpec(
                t.changelog,
                n,
                configs={
                    "cleanup.policy": "delete",
                    "retention.ms": str(FOREVER),
                    "retention.bytes": str(FOREVER),
                },
                strict=frozenset({"cleanup.policy", "retention.ms", "retention.bytes"}),
                state=True,
                same_partitions_as=t.by_tenant,
            ),
            TopicSpec(t.usage, n, configs=compact),
            TopicSpec(t.rejected, n, configs={"retention.ms": str(90 * DAY_MS)}),
            TopicSpec(t.reports, n, configs=compact),
            TopicSpec(t.corrections, n, configs=compact),
            TopicSpec(t.license, n, configs=compact),
            TopicSpec(t.license_corrections, n, configs=compact),
            TopicSpec(t.snapshots, n, configs=compact, state=True),
            # The broker stamps its own time on each heartbeat (where it honours this).
            TopicSpec(
                t.clock,
                1,
                configs={"message.timestamp.type": "LogAppendTime", "retention.ms": str(DAY_MS)},
            ),
        ]
