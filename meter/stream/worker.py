"""The stream-processing worker: job events in, exact running totals out.

One worker is one member of the consumer group ``meter``.  It subscribes to
``meter.jobs`` and ``meter.jobs.by-tenant`` with the range assignor, so
partition *p* of both topics (same partition count) lands on the same worker.
A tenant's *home* partition is ``murmur2(tenant_id) % N`` — what any Kafka
producer keying by tenant_id picks — so an event keyed by tenant is usually
already home and is applied at once; any other event is forwarded, re-keyed,
to its home partition of ``meter.jobs.by-tenant`` (any key, or none, works).

The loop reads as: fetch, apply, write, commit, publish.  Per batch: parse,
rate and join into the home partition's ledger; write the ledger entries that
changed to the changelog, forwarded events and rejected messages; wait until
all of it is acknowledged (acks=all); commit the input offsets; publish usage
records (at most every ``flush_interval_s``) of what the changelog holds.  A
crash anywhere replays from the last commit, and replaying into a join changes
nothing.

Who may use a home partition's state, and when, is decided in one place:
:mod:`meter.stream.partition` (its lifecycle) and :mod:`meter.stream.lease`
(proof that this worker is still the member the partition was given to).  A
worker that was paused past its session timeout fences its partitions and
catches up from the changelog before using them again; a broker that lost its
data halts the worker (:class:`~meter.stream.partition.DataLostError`).

Month close (rules in :mod:`meter.domain.close`, state and records in
:mod:`meter.stream.closing`): once a month is due and the worker has read
what arrived, each home partition writes its final snapshot and a close marker
to the changelog, then publishes final usage records and reports.  Later
changes to a closed month become corrections keyed per workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import time
import zlib
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    GroupAuthorizationFailedError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownError,
    UnsupportedForMessageFormatError,
    UnsupportedVersionError,
)
from aiokafka.partitioner import murmur2

from meter.domain import (
    Event,
    RateCards,
    Rejected,
    Tally,
    parse,
    parse_message,
)
from meter.domain.clock import ClockVerdict
from meter.domain.close import closes_at, correction_for, months_to_close
from meter.domain.event import future_time, not_after
from meter.domain.license import ProviderLicense, tail_month
from meter.domain.month import recent
from meter.domain.rating import no_ratecard
from meter.errors import AuthenticationError, AuthorizationError, BrokerError, TlsError
from meter.kafka import (
    KafkaSettings,
    close_consumer,
    describe_partitions,
    ensure_topics,
    init_producer_id_handled,
    start_client,
)
from meter.kafka.authz import denial, not_authorized
from meter.kafka.group import (
    LeaderWatch,
    Suspect,
    describe_group,
    expire_departed_leader,
    watch_joins,
)
from meter.kafka.topics import delete_records_below
from meter.store import (
    Checkpoint,
    LocalStateError,
    RowsElsewhere,
    StateNotWritable,
    StateStore,
    StoreError,
)
from meter.stream import snapshots
from meter.stream.clockcheck import ClockReference, member_id, stop_watch, watch_clock
from meter.stream.closing import (
    close_records,
    correction_record,
    iso,
    license_correction_record,
    license_key,
    license_record,
    license_totals,
    partition_summary,
    provider_summary,
    tenant_report,
)
from meter.stream.config import StreamConfig
from meter.stream.lease import Lease, watch_heartbeats
from meter.stream.partition import (
    ELSEWHERE,
    ChangeBatch,
    DataLostError,
    HomePartition,
    Phase,
    WorkloadKey,
)
from meter.stream.records import (
    H_EXCEPTION,
    changelog_chunks,
    dead_letter,
    encode_usage,
    tail_chunks,
    usage_key,
)
from meter.stream.usage import keep_last, read_keyed

_T = TypeVar("_T")
log = logging.getLogger(__name__)

#: A dead letter keeps at most this much of the original key.
MAX_KEY_BYTES = 1024
#: Rejections logged one by one per batch; the rest are summed up in one line.
REJECTIONS_LOGGED_PER_BATCH = 5
#: On stop, how long work in flight may take before it is abandoned (and replayed later).
STOP_GRACE_S = 3.0
#: A close whose records did not all go out is published again this often.
REPUBLISH_S = 5.0
#: A topic this worker had read from, missing from every metadata answer for this long,
#: was deleted (or the broker lost its disk): the data meter read from it is gone.
TOPIC_GONE_S = 5.0
#: How old the consumer's view of partition leaders may get.  aiokafka retries a
#: ListOffsets answered NotLeaderForPartition against the leader it has cached without
#: asking for metadata: after a paused Apache Kafka broker came back, a worker resetting
#: a partition's position asked the old leader ~10 times a second for over a minute
#: (its default refresh is every 5 minutes).  One small Metadata request every 10 s.
METADATA_MAX_AGE_MS = 10_000
#: A batch's writes failing (and retried) for this long: /healthz says so.
WRITES_FAILING_S = 15.0
#: Input waiting but no batch processed for this long: /healthz says "not making progress".
STALL_S = 60.0
_LOST: Final = "the broker lost data meter had read or written"
_BLOCKED: Final = "a write can never succeed"
#: Writes that can never succeed, however often they are retried.
PERMANENT_WRITE_ERRORS: Final = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    CorruptRecordException,
    InvalidTopicError,
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    PolicyViolationError,
    UnsupportedForMessageFormatError,
)

#: While input is waiting (a replay, a catch-up), usage and license records are published
#: at most this often: each would be superseded within the second, and publishing them
#: every --flush-interval cost a sixth of a replay's CPU at provider scale.
CATCH_UP_FLUSH_S = 1.0
#: How often the worker asks whether it has waited for partitions long enough to check the group.
GROUP_WATCH_S = 1.0
#: How often the objects frozen after each batch are collected once (see _Collector).
FULL_COLLECT_S = 900.0

#: One write of a batch: what it is, for an error message that names its source.
Write = tuple[str, "asyncio.Future[Any]"]


def utc_now() -> str:
    return iso(datetime.now(UTC))


def _skew(verdict: ClockVerdict) -> str:
    return "unknown" if verdict.skew is None else f"{verdict.skew.total_seconds():+.1f}s"


#: What a broker answers a request no ACL allows (see meter.kafka.authz).
_REFUSED: Final = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
)


async def _acked(futures: list[asyncio.Future[Any]], what: str) -> bool:
    """Wait for every send's acknowledgement; False (logged) if one failed, to retry later.
    A refused authorization is raised instead, for the caller to report once."""
    try:
        await asyncio.gather(*futures)
    except _REFUSED:
        raise
    except (KafkaError, OSError) as exc:
        log.warning("publishing %d %s failed (%s); will retry", len(futures), what, exc)
        return False
    return True


class WriteBlockedError(BrokerError):
    """A write the broker will never accept (too large, invalid, not authorized)."""


@dataclass(eq=False)
class _InFlight:
    """One input batch on its way: what it changed per home partition, the forwards and
    dead letters it caused, the writes carrying them, and the input offsets that may be
    committed once every one of those writes is acknowledged."""

    changes: dict[int, ChangeBatch]
    forwards: list[tuple[int, bytes, bytes, Any]]
    dead: list[tuple[Any, bytes, list[tuple[str, bytes]], Any]]
    offsets: dict[TopicPartition, int]
    writes: list[Write] = field(default_factory=list)
    changelog: dict[int, list[asyncio.Future[Any]]] = field(default_factory=dict)
    #: Handing a write to the producer failed (it is all sent again when settling).
    send_error: BaseException | None = None
    #: The write being handed to the producer when ``send_error`` was raised.
    sending: str = ""

    def has_writes(self) -> bool:
        return bool(self.forwards or self.dead or any(self.changes.values()))


class _Outbox:
    """Keyed records for an output topic, gathered into one record batch per partition:
    one acknowledgement per batch, not per record.  Each key goes to the partition
    Kafka's default partitioner gives it (murmur2), so a compacted topic keeps one
    record per key, as with ``producer.send(topic, value, key=key)``."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: int) -> None:
        self.producer = producer
        self.topic = topic
        self.partitions = partitions
        self.records = 0
        self._open: dict[int, Any] = {}
        self._sent: list[asyncio.Future[Any]] = []

    async def put(self, key: bytes, value: bytes) -> None:
        h = _KEY_HASH.get(key)
        if h is None:
            if len(_KEY_HASH) >= 1_000_000:
                _KEY_HASH.clear()
            h = _KEY_HASH[key] = murmur2(key) & 0x7FFFFFFF
        p = h % self.partitions
        batch = self._open.get(p)
        if batch is None:
            batch = self._open[p] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            await self._ship(p)
            batch = self._open[p] = self.producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise MessageSizeTooLargeError(
                    f"a {len(value)}-byte record for {self.topic} does not fit a record batch"
                )
        self.records += 1

    async def _ship(self, p: int) -> None:
        batch = self._open.pop(p)
        self._sent.append(await self.producer.send_batch(batch, self.topic, partition=p))

    async def close(self) -> list[asyncio.Future[Any]]:
        """Send what is gathered; the futures of every batch sent."""
        for p in sorted(self._open):
            await self._ship(p)
        return self._sent


class _Collector:
    """Keeps the ledgers out of the cyclic garbage collector's way.

    A full collection walks every container alive, so with millions of ledger entries
    each one costs a fraction of a second, and they come every few hundred thousand
    allocations: the cost per event grew with the state (measured in-process at 1 M
    workloads: half the CPU of a replay).  After each batch everything alive is frozen
    (``gc.freeze``: collections never walk it again), so a collection costs what the
    last batch allocated.  The ledgers hold no reference cycles; a cycle that was alive
    at a freeze and died later is freed by one full collection every
    :data:`FULL_COLLECT_S`."""

    def __init__(self, every_s: float = FULL_COLLECT_S) -> None:
        self.every_s = every_s
        self._last_full = time.monotonic()

    def after_batch(self) -> None:
        gc.freeze()
        if time.monotonic() - self._last_full >= self.every_s:
            started = time.monotonic()
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
            self._last_full = time.monotonic()
            log.debug(
                "full garbage collection: %d unreachable objects in %.2fs",
                found,
                self._last_full - started,
            )


def release_free_memory() -> float:
    """Give the C allocator's free pages back to the system (glibc ``malloc_trim``): after a
    recovery or a pruned month, memory that held what is gone would otherwise stay in the
    process's RSS.  Returns the seconds it took; a no-op where there is no glibc."""
    started = time.monotonic()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return time.monotonic() - started


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


#: murmur2 of the keys of published records (tenant-months: bounded by the fleet).
_KEY_HASH: dict[bytes, int] = {}


@dataclass
class WorkerStats:
    """What the worker has done; read by progress lines and metrics."""

    tally: Tally = field(default_factory=Tally)
    forwarded: int = 0
    published: int = 0
    changelog_records: int = 0
    checkpoints: int = 0
    batches: int = 0
    recovered_entries: int = 0
    rebalances: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    corrections: int = 0
    #: Unix time of the newest job event processed (0 before the first).
    newest_event_ts: float = 0.0
    #: Messages whose handling raised (each went to the dead-letter topic).
    internal_errors: int = 0
    #: Writes that failed and were retried.
    write_retries: int = 0
    #: Times a home partition was fenced (ownership in doubt).
    fenced: int = 0
    #: Due closes of (home partition, month) the clock check refused (each counted once).
    closes_refused: int = 0


class Worker:
    def __init__(
        self,
        settings: KafkaSettings,
        config: StreamConfig,
        cards: RateCards,
        *,
        clock: Callable[[], str] = utc_now,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        stats: WorkerStats | None = None,
        provider_license: ProviderLicense | None = None,
        state: StateStore | None = None,
    ) -> None:
        self.settings = settings
        #: Local state of home partitions (``--state-dir``); None: memory only.
        self.state = state
        self._last_checkpoint = time.monotonic()
        #: (home, month) whose close meter.reports holds (a month is pruned only then).
        self._closes_published: set[tuple[int, str]] = set()
        self._last_republish = 0.0
        #: home -> when (monotonic) its state last went to the snapshots topic
        self._snapshot_times: dict[int, float] = {}
        #: (home partition, snapshot offset) whose state failed: never read again.
        self._refused_snapshots: set[tuple[int, int]] = set()
        #: home -> where this worker last purged its changelog (--purge-changelog)
        self._purged: dict[int, int] = {}
        self._purge_unsupported = False
        self.config = config
        self.cards = cards
        #: What the provider licensed (``--license``); None: not declared.
        self.provider_license = provider_license
        self.clock = clock
        #: The close clock (injectable so tests can move time).
        self.now = now
        #: Home partition -> its state and lifecycle (see meter.stream.partition).
        self.homes: dict[int, HomePartition] = {}
        self.lease = Lease(config.session_timeout_ms / 1000)
        #: months some partition has closed (from meter.reports and our own closes)
        self._known_months: set[str] = set()
        self._last_close_check = 0.0
        self._known_refreshed = 0.0
        self.stats = stats or WorkerStats()
        #: (topic, partition) -> next offset to process
        self._positions: dict[tuple[str, int], int] = {}
        #: Input topic -> the highest offset this worker has read from it, over its life
        #: (kept across rebalances, unlike ``_positions``).
        self._topics_read: dict[str, int] = {}
        #: Topics of ``_topics_read`` the broker's metadata no longer lists, since when.
        self._topics_missing: dict[str, float] = {}
        #: (topic, partition) -> the offset this worker last committed there
        self._committed: dict[tuple[str, int], int] = {}
        #: Called with each published record's event-to-total latency (seconds).
        self.on_latency: Callable[[float], None] | None = None
        #: tenant id -> (its one shared copy, its home partition)
        self._homes: dict[str, tuple[str, int]] = {}
        #: The batch whose writes are on their way (see :meth:`_process`).
        self._inflight: _InFlight | None = None
        #: The commit of the last settled batch's offsets, overlapping the next batch.
        self._committing: asyncio.Future[None] | None = None
        #: Partition counts of the output topics (records are batched per partition).
        self._out_partitions: dict[str, int] = {}
        self._n_home = config.partitions
        self._co_partitioned = True
        self._lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._restore: AIOKafkaConsumer | None = None
        self._last_flush = 0.0
        self._rejected_logged = 0
        self._internal_logged: set[str] = set()
        #: (home, month) whose close raised an unexpected error (not retried until restart).
        self._cannot_close: set[tuple[int, str]] = set()
        self._last_progress = time.monotonic()
        self._last_batch = time.monotonic()
        #: Since when (monotonic) a batch's writes have kept failing, and the last error.
        self._writes_failing_since: float | None = None
        self._write_error = ""
        #: Why the worker stopped processing for good (broker lost data, a write that
        #: can never succeed); empty while it works.
        self.halted = ""
        #: Why the broker cannot be used right now (connecting, authentication); empty when it can.
        self.connecting = "connecting to the broker"
        #: What the broker refuses for want of an ACL, per kind of work (fetch, recover,
        #: usage, ...), until that work succeeds again; each logged once.
        self.denials: dict[str, str] = {}
        self._denials_logged: set[str] = set()
        self.ready = asyncio.Event()
        #: This host's clock against the broker's time (or the other workers' clocks).
        self.clock_ref = ClockReference(member_id())
        self._clock_task: asyncio.Task[None] | None = None
        self._clock_reader: AIOKafkaConsumer | None = None
        #: The clock check's last verdict on closing months (None before the first).
        self.close_verdict: ClockVerdict | None = None
        #: (home, month) due but refused by the clock check (each counted and logged once).
        self._refused: set[tuple[int, str]] = set()
        #: Where this worker serves /metrics, once it does (for logs and tests).
        self.http_url: str | None = None
        #: How long this member has waited for partitions, and who the joins name as leader.
        self.group_watch = LeaderWatch(config.session_timeout_ms / 1000)
        #: Why the consumer group gives no partitions (a departed leader); empty otherwise.
        self.group_stuck = ""
        self._stuck_logged = False
        self._group_check: asyncio.Task[None] | None = None

    @property
    def ledgers(self) -> dict[int, Any]:
        """The ledgers of the home partitions this worker may publish from."""
        return {n: h.ledger for n, h in self.homes.items() if h.active}

    def health(self) -> tuple[bool, str]:
        """``(ok, reason)``: ok only when the worker owns its partitions and makes progress."""
        if self.halted:
            return False, self.halted
        if self.connecting:
            return False, self.connecting
        if self.group_stuck:
            return False, self.group_stuck
        if self.denials:
            return False, next(iter(self.denials.values()))
        if not self.ready.is_set():
            return False, "waiting for partitions from the consumer group"
        # One copy of the partitions (made without a thread switch): /healthz reads this
        # from the HTTP thread while the worker's loop may be changing them.
        homes = tuple(self.homes.items())
        recovering = sorted(n for n, h in homes if h.phase is Phase.RECOVERING)
        if recovering:
            return False, f"recovering home partitions {recovering} from the changelog"
        fenced = sorted((n, h.reason) for n, h in homes if h.phase is Phase.FENCED)
        if fenced:
            return False, f"fenced home partitions {[n for n, _ in fenced]}: {fenced[0][1]}"
        if not self.lease.valid():
            return False, (
                f"group membership not confirmed for {self.lease.age():.0f}s "
                "(paused, or the coordinator is unreachable)"
            )
        failing = self._writes_failing_since
        if failing is not None and time.monotonic() - failing > WRITES_FAILING_S:
            return False, (
                f"writes to the broker have failed for {time.monotonic() - failing:.0f}s "
                f"(last: {self._write_error:.200}); retrying, nothing committed meanwhile"
            )
        if sum(self.lag().values()) > 0 and time.monotonic() - self._last_batch > STALL_S:
            return False, f"input waiting but nothing processed for {STALL_S:.0f}s"
        return True, "ok"

    def problems(self) -> dict[str, bool]:
        """Bounded set of problems, for the ``meter_problem`` gauge."""
        phases = {h.phase for h in self.homes.values()}
        return {
            "halted": bool(self.halted),
            "data_lost": self.halted.startswith(_LOST),
            "write_blocked": self.halted.startswith(_BLOCKED),
            "fenced": Phase.FENCED in phases,
            "recovering": Phase.RECOVERING in phases,
            "connecting": bool(self.connecting),
            "not_authorized": bool(self.denials)
            or "not authorized:" in self.connecting
            or "not authorized:" in self.halted,
            "writes_failing": self._writes_failing_since is not None
            and time.monotonic() - self._writes_failing_since > WRITES_FAILING_S,
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then publish, commit and leave the group."""
        if self.config.history_start is None:
            log.warning(
                "license view: no history start declared, so no workload is new: all are "
                "billed (the safe side); declare the month metering began with "
                "--history-start YYYY-MM or history_start in the --license file"
            )
        else:
            log.info(
                "license view: history from %s (declared): no new workloads in it, no "
                "license report before it",
                self.config.history_start,
            )
        if not await self._connect(stop):
            return
        try:
            await self._loop(stop)
        finally:
            await self._shutdown()

    async def _connect(self, stop: asyncio.Event) -> bool:
        """Create topics and clients, retrying while the broker is unreachable or refuses us."""
        delay = 0.5
        logged: set[str] = set()
        while not stop.is_set():
            try:
                await self._start_clients()
            except (AuthenticationError, AuthorizationError, TlsError) as exc:
                # Retrying cannot help until someone fixes the secret, the CA or the ACL;
                # each refusal is said once, and fixing it is enough.
                await self._close_clients()
                self.connecting = str(exc)
                if str(exc) not in logged:
                    log.error("%s; retrying every %.0fs at most", exc, 10.0)  # noqa: TRY400
                    logged.add(str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)
            except (KafkaError, OSError, TimeoutError, BrokerError) as exc:
                await self._close_clients()
                self.connecting = f"broker {self.settings.bootstrap} not usable: {exc}"
                log.warning(
                    "broker %s not usable yet (%s: %s); retrying in %.1fs",
                    self.settings.bootstrap,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)
            else:
                self.connecting = ""
                return True
        return False

    async def _start_clients(self) -> None:
        t = self.config.topics
        await ensure_topics(
            self.settings,
            self.config.topic_specs(),
            replication_factor=self.config.replication_factor,
            min_insync_replicas=self.config.min_insync_replicas,
        )
        counts = await describe_partitions(self.settings, [t.jobs, t.by_tenant, t.changelog])
        self._n_home = counts[t.by_tenant]
        if counts[t.changelog] != self._n_home:
            raise KafkaError(
                f"{t.changelog} has {counts[t.changelog]} partitions but {t.by_tenant} has "
                f"{self._n_home}; they must match"
            )
        self._co_partitioned = counts[t.jobs] == self._n_home
        if not self._co_partitioned:
            log.warning(
                "%s has %d partitions and %s %d: every event will be forwarded to its "
                "tenant's home partition (slower; create them with the same count)",
                t.jobs,
                counts[t.jobs],
                t.by_tenant,
                self._n_home,
            )
        self._producer = await self._start_producer()
        self._out_partitions.clear()
        kw = self.settings.client_kwargs()
        self._restore = await self._reader()
        self._consumer = AIOKafkaConsumer(
            **kw,
            group_id=self.config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
            max_poll_interval_ms=300_000,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_wait_ms=100,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
        )
        await start_client(self._consumer, self.settings)
        watch_heartbeats(self._consumer, self.lease)
        watch_joins(self._consumer, self.group_watch.joined)
        self.group_watch.waiting()
        self._consumer.subscribe([t.jobs, t.by_tenant], listener=_Rebalance(self))
        # Beside the loop: getmany() waits inside aiokafka while a rebalance is under way.
        self._group_check = asyncio.create_task(self._watch_group(), name="meter-group-watch")
        # Its own reader, lazier than _reader(): one small record per worker every 2 s.
        self._clock_reader = AIOKafkaConsumer(
            **kw, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=500
        )
        await start_client(self._clock_reader, self.settings)
        self._clock_task = asyncio.create_task(
            watch_clock(
                self.clock_ref,
                self._producer,
                self._clock_reader,
                t.clock,
                self.now,
                report=self._clock_result,
            ),
            name="meter-clock-watch",
        )
        log.info(
            "worker started: broker %s, group %s, %d home partitions; reading %s",
            self.settings.bootstrap,
            self.config.group_id,
            self._n_home,
            t.jobs,
        )

    async def _start_producer(self) -> AIOKafkaProducer:
        kw = self.settings.client_kwargs()
        common = {
            "acks": "all",
            # No linger: what a batch wrote goes out at once, and a usage record that
            # passed the ownership check leaves the process without waiting.
            "linger_ms": 0,
            "max_batch_size": 1024 * 1024,
            "max_request_size": 8 * 1024 * 1024,
            "request_timeout_ms": 30_000,
        }
        if self.config.idempotence in ("auto", "on"):
            producer = AIOKafkaProducer(**kw, **common, enable_idempotence=True)
            try:
                # InitProducerId is part of start(); the embedded broker fails it.  Its
                # failure is reported here, once, so aiokafka's own ERROR is left out.
                with init_producer_id_handled():
                    await start_client(producer, self.settings)
            except KafkaError as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                if isinstance(exc, ClusterAuthorizationFailedError):
                    raise not_authorized(
                        self.settings,
                        "IdempotentWrite",
                        "cluster",
                        "kafka-cluster",
                        "Write on any topic also grants it; or run with --idempotence off",
                    ) from exc
                if self.config.idempotence == "on":
                    raise
                # What a broker without idempotent producers answers (Tansu: UnknownError)
                # is expected and documented: INFO.  Anything else deserves a look.
                expected = isinstance(exc, UnknownError | UnsupportedVersionError)
                log.log(
                    logging.INFO if expected else logging.WARNING,
                    "broker does not support idempotent producers (%s); using acks=all "
                    "without idempotence: totals stay exact because state is join-shaped, "
                    "a retried write is at worst written twice",
                    exc,
                )
            else:
                return producer
        producer = AIOKafkaProducer(**kw, **common)
        await start_client(producer, self.settings)
        return producer

    async def _close_clients(self) -> None:
        await stop_watch(self._clock_task)
        self._clock_task = None
        check, self._group_check = self._group_check, None
        if check is not None:
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await check
        for consumer in (self._consumer, self._restore, self._clock_reader):
            if consumer is not None:
                await close_consumer(consumer, max_seconds=5.0)
        if self._producer is not None:
            try:
                await asyncio.wait_for(self._producer.stop(), 5.0)
            except TimeoutError:
                log.warning(
                    "producer did not stop within 5 s (broker unreachable?): nothing was "
                    "committed past what the broker acknowledged, so the next owner redoes it"
                )
            except (KafkaError, OSError) as exc:
                log.warning("producer did not stop cleanly: %s", exc)
        self._consumer = self._restore = self._producer = self._clock_reader = None

    async def _shutdown(self) -> None:
        if not self.halted:
            try:
                async with self._lock:
                    await asyncio.wait_for(self._drain(), STOP_GRACE_S)
                    await asyncio.wait_for(self._flush(), 5.0)
                    if self.state is not None:
                        await asyncio.wait_for(self._checkpoint(final=True), 30.0)
            except (TimeoutError, KafkaError, OSError, BrokerError) as exc:
                log.warning("could not publish the last usage records on shutdown: %s", exc)
        self._abandon()
        for hp in self.homes.values():
            if hp.store is not None:
                hp.store.close()
        await self._close_clients()
        log.info("worker stopped: %s", self._summary())

    def _denied(self, exc: BaseException, work: str, operation: str, topic: str = "") -> bool:
        """If ``exc`` is a refused authorization, note it for ``work`` (``fetch``,
        ``usage``, ...): logged once as one ERROR naming the operation and the resource,
        and /healthz not ready until ``work`` succeeds again (:meth:`_allowed`).  False
        (nothing done) for any other error."""
        refused = denial(
            exc,
            self.settings,
            topic_operation=operation,
            topic=topic,
            group=self.config.group_id,
        )
        if refused is None:
            return False
        message = str(refused)
        self.denials[work] = message
        if message not in self._denials_logged:
            self._denials_logged.add(message)
            log.error("%s; retrying, not ready meanwhile", message)
        return True

    def _clock_result(self, exc: BaseException | None, operation: str) -> bool:
        """The clock watch's turn: a refused heartbeat or read is a denial (see _denied)."""
        if exc is None:
            if "clock" in self.denials:
                self._allowed("clock")
            return False
        return self._denied(exc, "clock", operation, self.config.topics.clock)

    def _allowed(self, work: str) -> None:
        """``work`` succeeded: a denial noted for it is over (and would be said again)."""
        message = self.denials.pop(work, None)
        if message is not None and message not in self.denials.values():
            self._denials_logged.discard(message)
            log.info("%s: allowed now", work)

    # ------------------------------------------------------------------ main loop

    async def _loop(self, stop: asyncio.Event) -> None:
        consumer = self._consumer
        assert consumer is not None
        stopper = asyncio.ensure_future(stop.wait())
        collector = _Collector()
        refused_delay = 0.5
        try:
            while not stop.is_set():
                if self.halted:
                    # Nothing more is read, written or committed; /healthz says why.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
                    continue
                fetch = asyncio.ensure_future(
                    consumer.getmany(timeout_ms=200, max_records=self.config.max_batch)
                )
                done, _ = await asyncio.wait({fetch, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if fetch not in done:
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, KafkaError):
                        await fetch
                    break
                try:
                    batch = fetch.result()
                except KafkaError as exc:
                    if self._denied(exc, "fetch", "Read"):
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), refused_delay)
                        refused_delay = min(refused_delay * 2, 10.0)
                        continue
                    log.warning("fetch failed (%s); retrying", exc)
                    await asyncio.sleep(0.5)
                    continue
                self._allowed("fetch")
                refused_delay = 0.5
                await self._step(self._cycle(batch, stop), stopper)
                collector.after_batch()
                self._progress()
        finally:
            stopper.cancel()

    async def _cycle(self, batch: dict[TopicPartition, list[Any]], stop: asyncio.Event) -> None:
        """One turn: check ownership and the broker, apply, write, commit, publish."""
        try:
            self._check_input_log()
            await self._check_ownership()
            if batch:
                await self._process(batch, stop)
            else:
                await self._drain(stop)
            every = self.config.flush_interval_s
            if self._behind():
                every = max(every, CATCH_UP_FLUSH_S)
            if time.monotonic() - self._last_flush >= every:
                await self._flush()
            if time.monotonic() - self._last_close_check >= 1.0:
                await self._close_checked()
            if (
                self.state is not None
                and time.monotonic() - self._last_checkpoint >= self.config.checkpoint_interval_s
            ):
                await self._checkpoint()
        except DataLostError as exc:
            self._data_lost(exc)
        except WriteBlockedError as exc:
            self._halt(str(exc))
        except StateNotWritable as exc:
            self._state_not_writable(exc)
        except StoreError as exc:
            self._halt(
                f"local state failed ({exc}); the changelog holds everything: move the "
                "partition's file out of --state-dir and restart to rebuild it"
            )

    def _state_not_writable(self, exc: StateNotWritable) -> None:
        self._halt(
            f"local state cannot be written: {exc}. meter stopped processing and committing "
            "until then"
        )

    def _data_lost(self, exc: DataLostError) -> None:
        self._halt(
            f"{_LOST} ({exc}); meter stopped processing and committing so that no total is "
            "built on missing data. Restore the broker's data (or, if the loss is accepted, "
            "recreate meter's topics and replay meter.jobs from the job systems), then restart "
            "the workers"
        )

    def _halt(self, reason: str) -> None:
        if not self.halted:
            self.halted = reason
            log.error("%s", reason)
            self._abandon()
            for home in self.homes.values():
                home.fence("the worker halted")
            self._quiet_readers()

    def _quiet_readers(self) -> None:
        """A halted worker reads nothing more: its clock watch stops, and the consumers
        outside the group give up their partitions.  aiokafka keeps asking for the metadata
        of an assigned partition whose topic the broker does not have, ~2,200 times a
        second (measured on Apache Kafka 4.4.0), polled or not: after a broker lost its
        data, a halted worker would hammer it until someone stopped the worker."""
        if self._clock_task is not None:
            self._clock_task.cancel()
        for consumer in (self._clock_reader, self._restore):
            if consumer is not None:
                consumer.unsubscribe()

    async def _step(self, work: Coroutine[Any, Any, None], stopper: asyncio.Future[Any]) -> None:
        """Run one unit of work under the lock; on stop, give it a moment, then cancel it.

        Cancelling is always safe: offsets are committed only after everything a
        batch caused is acknowledged, so cancelled work is replayed, into a join.
        """
        async with self._lock:
            task = asyncio.ensure_future(work)
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                done, _ = await asyncio.wait({task}, timeout=STOP_GRACE_S)
                if not done:
                    log.warning("stopping: abandoning work in flight (it will be replayed)")
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ ownership

    def _check_input_log(self) -> None:
        """An input partition whose log end fell below what we read, or an input topic we
        read from that the broker no longer has: the broker lost it.

        The embedded broker comes back from a restart with empty topics (it creates them
        on demand); Apache Kafka on a fresh disk, or after the topics were deleted, with
        none: every metadata answer then says the topic is unknown."""
        consumer = self._consumer
        if consumer is None:
            return
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            pos = self._positions.get((tp.topic, tp.partition))
            if hw is not None and pos is not None and hw < pos:
                raise DataLostError(
                    f"{tp.topic}[{tp.partition}] ends at offset {hw}, below offset {pos} "
                    "this worker had read"
                )
        read = self._topics_read
        for (topic, _), pos in self._positions.items():
            if pos > read.get(topic, 0):
                read[topic] = pos
        now = time.monotonic()
        for topic, pos in sorted(read.items()):
            if consumer.partitions_for_topic(topic) is not None:
                self._topics_missing.pop(topic, None)
                continue
            since = self._topics_missing.setdefault(topic, now)
            if now - since >= TOPIC_GONE_S:
                raise DataLostError(
                    f"topic {topic} no longer exists on the broker (unknown to it for "
                    f"{now - since:.0f} s); this worker had read it up to offset {pos}"
                )

    async def _check_ownership(self) -> None:
        """Fence every partition when the lease lapsed; catch up fenced ones once it holds."""
        if not self._lease_holds():
            return
        fenced = [n for n, h in self.homes.items() if h.phase in (Phase.FENCED, Phase.RECOVERING)]
        if fenced:
            # The lease holds again in the same generation: no rebalance happened, so
            # nobody else was given these partitions; the changelog says what changed.
            await self._drain()  # nothing of ours in flight while the changelog is read
            try:
                await self._recover(fenced)
            except (KafkaError, OSError, TimeoutError) as exc:
                # They stay RECOVERING (nothing applied or published); the next turn retries.
                if not self._denied(exc, "recover", "Read", self.config.topics.changelog):
                    log.warning("could not recover home partitions %s yet (%s)", fenced, exc)
                return
            self._allowed("recover")

    def _fence_all(self, reason: str) -> None:
        moved = [n for n, h in sorted(self.homes.items()) if h.fence(reason)]
        if moved:
            self.stats.fenced += len(moved)
            self._pause_homes(moved)
            log.warning(
                "fenced home partitions %s: %s; nothing is published from them until they "
                "are caught up from the changelog",
                moved,
                reason,
            )

    def _pause_homes(self, homes: Iterable[int]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        mine = consumer.assignment()
        tps = [
            tp
            for n in homes
            for tp in (
                TopicPartition(self.config.topics.by_tenant, n),
                TopicPartition(self.config.topics.jobs, n),
            )
            if tp in mine and (tp.topic != self.config.topics.jobs or self._co_partitioned)
        ]
        if tps:
            consumer.pause(*tps)

    def _resume_homes(self, homes: Iterable[int]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        wanted = set(homes)
        tps = [tp for tp in consumer.paused() if tp.partition in wanted]
        if tps:
            consumer.resume(*tps)

    # ------------------------------------------------------------------ one batch

    async def _process(self, batch: dict[TopicPartition, list[Any]], stop: asyncio.Event) -> None:
        """Apply one batch and send what it caused; then settle the batch before it.

        The batch's writes are sent but not waited for: their acknowledgement, and the
        commit of the batch's input offsets after it, overlap the next batch's work
        (:meth:`_settle`).  A partition's changes become publishable only with the
        acknowledgement of the write that carries them (:class:`ChangeBatch`)."""
        t = self.config.topics
        cards = self.cards
        homes = self.homes
        tally = self.stats.tally
        max_bytes = self.config.max_event_bytes
        skew = self.config.clock_skew_ms
        known = self._homes
        n_home = self._n_home
        forwards: list[tuple[int, bytes, bytes, Any]] = []
        rejects: list[tuple[Any, bytes, Rejected, str]] = []
        offsets: dict[TopicPartition, int] = {}
        touched: list[int] = []
        lost: set[int] = set()
        now = self.clock()
        last_time = ""
        counted = duplicate = not_counted = 0
        self._rejected_logged = 0
        consumer = self._consumer
        assert consumer is not None
        for tp, records in batch.items():
            from_jobs = tp.topic == t.jobs
            partition = tp.partition
            here = homes.get(partition)
            if (not from_jobs or self._co_partitioned) and (here is None or not here.active):
                # Not ours to apply now (revoked, fenced or recovering): read it again later.
                if tp in consumer.assignment():
                    consumer.seek(tp, records[0].offset)
                continue
            # Events homed here are applied; any other is forwarded (also everything
            # read from jobs when jobs and by-tenant are not co-partitioned).
            mine = partition if not from_jobs or self._co_partitioned else -1
            apply = here.apply if here is not None and mine >= 0 else None
            # Where this partition's records start in the batch's outcomes: a partition whose
            # local state fails is read again whole, and its records must count only then.
            before = (counted, duplicate, not_counted, len(rejects), len(forwards))
            for rec in records:
                try:
                    value: bytes | None = rec.value
                    if value is None:
                        rejects.append(
                            (rec, b"", Rejected("invalid_json", "message has no value"), "")
                        )
                        continue
                    if rec.headers:  # either CloudEvents content mode; none: plain JSON
                        result = parse_message(value, rec.headers, max_bytes)
                    else:
                        result = parse(value, max_bytes)
                    if result.__class__ is Rejected:
                        assert isinstance(result, Rejected)
                        rejects.append((rec, value, result, ""))
                        continue
                    assert isinstance(result, Event)
                    rate = cards.rate(result)
                    if rate is None:
                        rejects.append((rec, value, no_ratecard(result, cards), ""))
                        continue
                    limit = not_after(rec.timestamp, skew)
                    if limit is not None:
                        # Dated after its record's hour plus the skew: a clock ahead.  The
                        # record's timestamp travels with it (forwards keep it): a replay
                        # and the home partition decide the same way.
                        ahead = future_time(result, limit)
                        if ahead is not None:
                            rejects.append((rec, value, ahead, ""))
                            continue
                    last_time = result.time
                    if result.result == "failed":
                        not_counted += 1
                        continue
                    hit = known.get(result.tenant_id)
                    if hit is None:
                        # One copy of each tenant id, shared by every key that holds it.
                        tenant = result.tenant_id
                        home = (murmur2(tenant.encode()) & 0x7FFFFFFF) % n_home
                        hit = known[tenant] = (tenant, home)
                    tenant, home = hit
                    if home != mine:
                        # Not on its home partition (or misrouted on by-tenant): send it home.
                        forwards.append((home, tenant.encode(), value, rec))
                        self.stats.forwarded += 1
                        continue
                    date = result.date
                    # A month's last days also count in the next month's window (license view).
                    args = (
                        tenant,
                        result.month,
                        result.workload_type,
                        result.workload_id,
                        rate,
                        rec.timestamp,
                        result.id,
                        tail_month(date) if date % 100 >= 29 else None,
                    )
                    try:  # inline, not _with_history: this is the hot path
                        changed = apply(*args)  # type: ignore[misc]
                    except RowsElsewhere as exc:
                        # History this event needs is on the snapshots topic: fetch it (or
                        # fail as LocalStateError, below), then apply it again.
                        assert here is not None
                        await self._fetch_elsewhere(here, exc.rows)
                        changed = apply(*args)  # type: ignore[misc]
                    if changed:
                        counted += 1
                    else:
                        duplicate += 1
                except LocalStateError as exc:
                    # A pruned month could not be read back: never a rejected event.  The
                    # partition is rebuilt from the changelog and this batch read again.
                    assert here is not None
                    log.error("%s; rebuilding it from the changelog", exc)  # noqa: TRY400
                    self._state_lost(here, str(exc))
                    counted, duplicate, not_counted, n_rejects, n_forwards = before
                    self.stats.forwarded -= len(forwards) - n_forwards
                    del rejects[n_rejects:], forwards[n_forwards:]
                    self.stats.fenced += 1
                    self._pause_homes([partition])
                    lost.add(partition)
                    break
                except Exception as exc:  # noqa: BLE001 - one message never stops a partition
                    rejects.append(
                        (rec, rec.value or b"", self._internal(rec, exc), type(exc).__name__)
                    )
            if apply is not None:
                touched.append(partition)
            offsets[tp] = records[-1].offset + 1
        for tp, records in batch.items():
            if tp.partition in lost and (tp.topic != t.jobs or self._co_partitioned):
                # Everything this batch applied to a partition that lost its local state is
                # read again once it is rebuilt (what it forwarded goes again: a join).
                offsets.pop(tp, None)
                if tp in consumer.assignment():
                    consumer.seek(tp, records[0].offset)
        touched = [n for n in touched if n not in lost]
        tally.counted += counted
        tally.duplicate += duplicate
        tally.not_counted += not_counted
        self.stats.batches += 1
        self._last_batch = time.monotonic()
        if self._rejected_logged > REJECTIONS_LOGGED_PER_BATCH:
            log.warning(
                "... and %d more rejected in this batch (every one is on %s with its reason)",
                self._rejected_logged - REJECTIONS_LOGGED_PER_BATCH,
                t.rejected,
            )
        if last_time:
            self._note_event_time(last_time)
        dead = [self._dead_letter(rec, raw, why, exc, now) for rec, raw, why, exc in rejects]
        changes = {}
        for n in sorted(set(touched)):
            change = self.homes[n].take_batch()
            if change:
                changes[n] = change
        for tp, offset in offsets.items():
            self._positions[(tp.topic, tp.partition)] = offset
        flight = _InFlight(changes, forwards, dead, offsets)
        previous, self._inflight = self._inflight, flight
        try:
            if flight.has_writes():
                try:
                    await self._send(flight)
                except (KafkaError, OSError) as exc:
                    flight.send_error = exc  # sent again when it is settled
            if previous is not None:
                await self._settle(previous, stop)
        except BaseException:
            self._abandon(previous)  # and this batch: neither is committed
            raise
        if not self._behind():
            # Caught up: nothing to overlap with, settle now (no added latency).
            await self._drain(stop)

    def _internal(self, rec: Any, exc: Exception) -> Rejected:
        """A message whose handling raised: logged (traceback once per kind), dead-lettered."""
        self.stats.internal_errors += 1
        kind = type(exc).__name__
        where = f"{rec.topic}[{rec.partition}]@{rec.offset}"
        if kind not in self._internal_logged:
            self._internal_logged.add(kind)
            log.exception(
                "%s: handling this message raised %s; it goes to the dead-letter "
                "topic with code internal_error and the worker carries on",
                where,
                kind,
            )
        else:
            log.error("%s: handling this message raised %s: %s", where, kind, exc)
        return Rejected("internal_error", f"meter could not handle this message: {kind}")

    def _dead_letter(
        self, rec: Any, raw: bytes, why: Rejected, exc: str, now: str
    ) -> tuple[Any, bytes, list[tuple[str, bytes]], Any]:
        topic, partition, offset = rec.topic, rec.partition, rec.offset
        self.stats.tally.rejected += 1
        codes = self.stats.rejected_by_code
        codes[why.code] = codes.get(why.code, 0) + 1
        self._rejected_logged += 1
        if self._rejected_logged <= REJECTIONS_LOGGED_PER_BATCH:
            log.warning("%s[%d]@%d rejected: %s", topic, partition, offset, why.reason)
        value, headers = dead_letter(
            raw,
            why.reason,
            why.code,
            topic,
            partition,
            offset,
            now,
            max_bytes=self.config.max_event_bytes,
            extra=[(H_EXCEPTION, exc.encode())] if exc else (),
            original_headers=rec.headers or (),
        )
        key = rec.key
        if key is not None and len(key) > MAX_KEY_BYTES:
            key = key[:MAX_KEY_BYTES]  # the whole original stays on its source topic
        return key, value, headers, rec

    def _note_event_time(self, value: str) -> None:
        """For the freshness metric only; never stops a batch."""
        text = value.upper()
        try:
            ts = datetime.fromisoformat(text).timestamp()
        except ValueError:  # a leap second: close enough without it
            try:
                ts = datetime.fromisoformat(text.replace(":60", ":59", 1)).timestamp()
            except (ValueError, OverflowError):
                return
        except OverflowError:
            return
        self.stats.newest_event_ts = max(self.stats.newest_event_ts, ts)

    def lag(self) -> dict[tuple[str, int], int]:
        """Per input partition: Fetch high watermark minus the next offset to process."""
        consumer = self._consumer
        if consumer is None:
            return {}
        out = {}
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            pos = self._positions.get((tp.topic, tp.partition))
            if hw == 0:
                pos = 0
            if hw is not None and pos is not None:
                out[(tp.topic, tp.partition)] = max(0, hw - pos)
        return out

    def _behind(self) -> bool:
        """True when some assigned input partition has records this worker has not read."""
        consumer = self._consumer
        if consumer is None:
            return False
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            pos = self._positions.get((tp.topic, tp.partition))
            if hw is not None and pos is not None and hw > pos:
                return True
        return False

    async def _send(self, flight: _InFlight) -> None:
        """Hand everything a batch caused to the producer (acknowledgements come later)."""
        t = self.config.topics
        producer = self._producer
        assert producer is not None
        writes: list[Write] = []
        changelog: dict[int, list[asyncio.Future[Any]]] = {}
        flight.writes, flight.changelog = writes, changelog
        flight.send_error = None
        flight.sending = ""
        for home, change in flight.changes.items():
            if not change:
                continue
            for value in (
                *changelog_chunks(change.entries, change.event_ids),
                *tail_chunks(change.tails),
            ):
                what = f"changelog {t.changelog}[{home}] ({_sources(flight.offsets)})"
                flight.sending = what
                fut = await producer.send(t.changelog, value, partition=home)
                changelog.setdefault(home, []).append(fut)
                writes.append((what, fut))
                self.stats.changelog_records += 1
        for home, key, raw, rec in flight.forwards:
            flight.sending = f"forward of {_source(rec)}"
            # With its headers: a binary-mode event is half in them.
            fut = await producer.send(
                t.by_tenant,
                raw,
                key=key,
                partition=home,
                timestamp_ms=rec.timestamp if rec.timestamp >= 0 else None,
                headers=list(rec.headers) if rec.headers else None,
            )
            writes.append((flight.sending, fut))
        for rkey, raw, headers, rec in flight.dead:
            flight.sending = f"dead letter of {_source(rec)}"
            fut = await producer.send(t.rejected, raw, key=rkey, headers=headers)
            writes.append((flight.sending, fut))
        flight.sending = ""

    async def _settle(self, flight: _InFlight, stop: asyncio.Event | None) -> None:
        """Wait until everything ``flight`` wrote is acknowledged (acks=all), retrying on
        failure; then its changes become publishable and its input offsets are committed.

        Retrying re-sends the lot; every write is a fact (a ledger entry, a forwarded
        event, a rejection), so a second copy changes no total.  A write that can never
        succeed halts the worker (:class:`WriteBlockedError`); a write that did not
        complete leaves the partitions it touched to be rebuilt, and so does every batch
        sent after it (nothing of theirs is committed either).
        """
        delay = 0.5
        completed = False
        try:
            while flight.has_writes():
                try:
                    if flight.send_error is not None:
                        raise flight.send_error
                    await asyncio.gather(*(f for _, f in flight.writes))
                except (KafkaError, OSError) as exc:
                    blocked = _blocked(flight.writes, exc, flight.sending, self.settings)
                    if blocked is not None:
                        raise WriteBlockedError(
                            f"{_BLOCKED}: {blocked}; meter stopped processing and "
                            "committing (nothing was skipped: the input stays where it is). Fix "
                            "the broker or topic limits or permissions, then restart the worker"
                        ) from exc
                    self.stats.write_retries += 1
                    if self._writes_failing_since is None:
                        self._writes_failing_since = time.monotonic()
                    self._write_error = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "writing %d changelog entries, %d forwards and %d rejections failed "
                        "(%s: %s); retrying in %.1fs — offsets stay uncommitted until it succeeds",
                        sum(len(c.entries) + len(c.tails) for c in flight.changes.values()),
                        len(flight.forwards),
                        len(flight.dead),
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    if stop is not None and stop.is_set() and delay >= 10.0:
                        raise
                    try:
                        await self._send(flight)
                    except (KafkaError, OSError) as again:
                        flight.send_error = again
                else:
                    break
            completed = True
            self._writes_failing_since = None
            for home, change in flight.changes.items():
                hp = self.homes.get(home)
                if hp is not None:
                    hp.written(change, [f.result().offset for f in flight.changelog.get(home, ())])
        finally:
            if not completed:
                self._abandon(flight)
        await self._commit_after(flight.offsets)

    def _abandon(self, flight: _InFlight | None = None) -> None:
        """``flight`` (and every batch sent after it) will not be acknowledged: the
        partitions they changed are rebuilt from the changelog before use."""
        flights = [flight] if flight is not None else []
        if self._inflight is not None and self._inflight is not flight:
            flights.append(self._inflight)
        self._inflight = None
        for f in flights:
            for home in f.changes:
                hp = self.homes.get(home)
                if hp is not None:
                    hp.write_failed("the batch was abandoned or could not be written")

    async def _drain(self, stop: asyncio.Event | None = None) -> None:
        """Settle the batch in flight, if any, and wait for its commit."""
        flight, self._inflight = self._inflight, None
        if flight is not None:
            await self._settle(flight, stop)
        await self._committed_all()

    async def _commit_after(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit ``offsets`` (all acknowledged) once the commit before it is done; the
        commit itself overlaps the next batch."""
        await self._committed_all()
        if offsets:
            self._committing = asyncio.ensure_future(self._commit(offsets))

    async def _committed_all(self) -> None:
        task, self._committing = self._committing, None
        if task is not None and not task.cancelled():
            await task

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        consumer = self._consumer
        assert consumer is not None
        sent = self.lease.now()
        generation = self.lease.generation
        try:
            # aiokafka's commit waits forever for a coordinator that is gone.
            await asyncio.wait_for(consumer.commit(offsets), self.config.commit_timeout_s)
        except (KafkaError, OSError, AssertionError, TimeoutError) as exc:
            # A rebalance took these partitions: their new owner replays from the
            # last commit, which the join makes harmless.
            log.warning(
                "commit of %d partitions failed (%s); they will be replayed", len(offsets), exc
            )
        else:
            if generation is not None:
                self.lease.renew(generation, sent)
            for tp, offset in offsets.items():
                self._committed[(tp.topic, tp.partition)] = offset

    def _publishable(self) -> list[HomePartition]:
        """The partitions that may publish now: ACTIVE, and the lease holds."""
        if not self._lease_holds():
            return []
        return [h for h in self.homes.values() if h.active]

    def _lease_holds(self) -> bool:
        """True while the lease holds; once it lapsed, every partition is fenced."""
        if self.lease.valid():
            return True
        self._fence_all(
            f"group membership not confirmed for {self.lease.age():.1f}s "
            "(paused or cut off past the session timeout?)"
        )
        return False

    async def _outbox(self, topic: str) -> _Outbox:
        producer = self._producer
        assert producer is not None
        n = self._out_partitions.get(topic)
        if n is None:
            n = self._out_partitions[topic] = len(await producer.partitions_for(topic))
        return _Outbox(producer, topic, n)

    async def _flush(self) -> None:
        """Publish the usage record of every tenant-month whose acknowledged state changed."""
        self._last_flush = time.monotonic()
        await self._publish_corrections()
        await self._publish_license()
        if not any(h.dirty for h in self.homes.values()):
            return
        if self._producer is None:
            return
        now = self.clock()
        published: list[int] = []
        taken: list[tuple[HomePartition, dict[tuple[str, str], int]]] = []
        records = 0
        try:
            out = await self._outbox(self.config.topics.usage)
            for hp in self._publishable():
                keys = hp.take_dirty()
                if not keys:
                    continue
                taken.append((hp, keys))
                tenant_month = hp.ledger.tenant_month
                for (tenant, month), ts in keys.items():
                    tm = tenant_month(tenant, month)
                    if tm is None:
                        continue
                    await out.put(usage_key(tenant, month), encode_usage(tm, now))
                    published.append(ts)
            records = out.records
            acked = await _acked(await out.close(), "usage records")
        except (KafkaError, OSError) as exc:
            if not self._denied(exc, "usage", "Write", self.config.topics.usage):
                log.warning("publishing usage records failed (%s); will retry", exc)
            acked = False
        if not acked:
            for hp, keys in taken:
                if hp.active:
                    for key, ts in keys.items():
                        hp.dirty.setdefault(key, ts)
            return
        self._allowed("usage")
        self.stats.published += records
        if self.on_latency is not None:
            acked_ms = time.time() * 1000
            for ts in published:
                if ts >= 0:  # recovered state has no arrival time
                    self.on_latency(max(0.0, (acked_ms - ts) / 1000))

    async def _publish_license(self) -> None:
        """The license view: running records of open months, corrections of closed ones."""
        homes = self._publishable()
        if not any(h.lic_dirty or h.lcorr_dirty for h in homes):
            return
        producer = self._producer
        if producer is None:
            return
        t = self.config.topics
        now = self.clock()
        futures = []
        records = 0
        taken: list[tuple[HomePartition, set[tuple[str, str]], set[WorkloadKey]]] = []
        try:
            out = await self._outbox(t.license)
            for hp in homes:
                keys, hp.lic_dirty = hp.lic_dirty, set()
                corr, hp.lcorr_dirty = hp.lcorr_dirty, set()
                taken.append((hp, keys, corr))
                lic = hp.license
                start = lic.history_start
                for tenant, month in keys:
                    lm = lic.tenant_month(tenant, month)
                    if lm is None:
                        continue
                    doc = license_record(lm, start, now, status="running")
                    await out.put(license_key(tenant, month), orjson.dumps(doc))
                finals = hp.close.license_finals
                for key in corr:
                    tenant, month, wtype, wid = key
                    before = finals.get(month, {}).get(tenant, {}).get((wtype, wid))
                    cdoc = license_correction_record(
                        key,
                        lic.contribution(tenant, month, wtype, wid),
                        before,
                        hp.close.late_ids.get(key),
                        now,
                    )
                    if cdoc is not None:
                        futures.append(
                            await producer.send(
                                t.license_corrections,
                                orjson.dumps(cdoc),
                                key="/".join(key).encode(),
                            )
                        )
            records = out.records + len(futures)
            futures += await out.close()
            acked = await _acked(futures, "license records")
        except (KafkaError, OSError) as exc:
            if not self._denied(exc, "license", "Write", self.config.topics.license):
                log.warning("publishing license records failed (%s); will retry", exc)
            acked = False
        if not acked:
            for hp, keys, corr in taken:
                if hp.active:
                    hp.lic_dirty |= keys
                    hp.lcorr_dirty |= corr
            return
        self._allowed("license")
        self.stats.published += records

    # ------------------------------------------------------------------ month close

    async def _close_checked(self) -> None:
        try:
            await self._close_due()
        except (KafkaError, OSError, TimeoutError) as exc:
            # Nothing is marked closed until its marker is acknowledged, so the next
            # check simply closes again.
            if not self._denied(exc, "close", "Write", self.config.topics.reports):
                log.warning("closing a month failed (%s); will retry", exc)
        else:
            active = [h for h in self.homes.values() if h.active]
            if not self._unpublished_closes(active):
                self._allowed("close")

    async def _caught_up(self) -> bool:
        """True when every assigned input partition has been read to its high watermark."""
        consumer = self._consumer
        if consumer is None or not self.ready.is_set():
            return False
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is None:
                return False  # no Fetch answer for it yet
            key = (tp.topic, tp.partition)
            pos = self._positions.get(key)
            if pos is None:
                # Nothing read from it since we took it: where the group left off.
                pos = await asyncio.wait_for(consumer.position(tp), 5.0)
                if pos is None:
                    return False
                self._positions[key] = pos
            if pos < hw:
                return False
        return True

    async def _close_due(self) -> None:
        """Close every due month of our home partitions, once we have read what arrived."""
        self._last_close_check = time.monotonic()
        grace = self.config.close_grace
        active = [h for h in self.homes.values() if h.active]
        if grace is None or not active or not await self._caught_up():
            return
        await self._publish_unpublished_closes(active)
        host_now = self.now()
        verdict = self._clock_verdict(host_now)
        if time.monotonic() - self._known_refreshed >= 30.0:
            self._known_refreshed = time.monotonic()  # also when it fails: not every second
            await self._refresh_known_months()
        # A month closes on every home partition once any of ours has usage in it or any
        # partition anywhere closed it, so that every partition publishes its summary.
        months = set(self._known_months)
        for hp in active:
            months.update(hp.months())
        if verdict.now is None:
            self._refuse_closes(active, months, host_now, verdict)
            return
        now = verdict.now
        reports: dict[str, dict[str, Any]] | None = None
        read = False
        for hp in sorted(active, key=lambda h: h.number):
            for month in months_to_close(months, hp.close.closed, now, grace):
                if not self._publishable() or not hp.active:
                    return
                if (hp.number, month) in self._cannot_close:
                    continue
                if not read:
                    # meter.reports read once for every close of this round (and kept up
                    # to date with what they publish), not once per partition and month.
                    reports, read = await self._refresh_known_months(), True
                try:
                    await self._close(hp, month, reports)
                except (KafkaError, OSError, TimeoutError, DataLostError):
                    raise
                except Exception:  # a bug must not stop the partition: this month waits
                    self._cannot_close.add((hp.number, month))
                    self.stats.internal_errors += 1
                    log.exception(
                        "closing %s on home partition %d raised; that month stays open on it "
                        "(a meter bug: report it; the worker goes on)",
                        month,
                        hp.number,
                    )

    async def _publish_unpublished_closes(self, active: list[HomePartition]) -> None:
        """Publish again, every few seconds, the closes whose marker is on the changelog but
        whose records did not all reach their topics (a write refused, the broker away):
        until then meter.reports lacks the month's receipt.  A failure raises (see
        :meth:`_close_checked`)."""
        due = self._unpublished_closes(active)
        if not due or time.monotonic() - self._last_republish < REPUBLISH_S:
            return
        self._last_republish = time.monotonic()
        if not self._publishable():
            return
        reports = await self._refresh_known_months()
        for hp, month in due:
            if hp.active:
                await self._publish_close(hp, month, reports)

    def _unpublished_closes(self, active: list[HomePartition]) -> list[tuple[HomePartition, str]]:
        return [
            (hp, month)
            for hp in active
            for month in sorted(hp.close.closed - hp.pruned)
            if (hp.number, month) not in self._closes_published
            and (hp.number, month) not in self._cannot_close
        ]

    def _clock_verdict(self, host_now: datetime) -> ClockVerdict:
        """The clock check on closing months now; a change of state is logged once."""
        verdict = self.clock_ref.verdict(host_now, self.config.clock_tolerance)
        before = self.close_verdict
        self.close_verdict = verdict
        if before is None or before.state != verdict.state:
            if verdict.state == "ahead":
                log.error("%s", verdict.reason)
            elif verdict.state == "behind":
                log.warning("%s", verdict.reason)
            elif verdict.state == "unknown":
                log.info("%s", verdict.reason)
            elif before is not None:
                log.info("month close: %s (skew %s)", verdict.reason, _skew(verdict))
        return verdict

    def _refuse_closes(
        self,
        active: list[HomePartition],
        months: set[str],
        host_now: datetime,
        verdict: ClockVerdict,
    ) -> None:
        """Count and log, once each, the closes this host's clock says are due and the
        clock check holds."""
        grace = self.config.close_grace
        assert grace is not None
        for hp in sorted(active, key=lambda h: h.number):
            for month in months_to_close(months, hp.close.closed, host_now, grace):
                if (hp.number, month) not in self._refused:
                    self._refused.add((hp.number, month))
                    self.stats.closes_refused += 1
                    log.warning(
                        "not closing %s on home partition %d, due by this host's clock (%s): %s",
                        month,
                        hp.number,
                        iso(host_now),
                        verdict.reason,
                    )

    def close_held(self) -> str:
        """Why month closes are held now; empty when they are not (or not checked yet)."""
        v = self.close_verdict
        return v.reason if v is not None and v.now is None else ""

    async def _close(
        self, hp: HomePartition, month: str, reports: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """Write ``month``'s final snapshot and close marker for ``hp``, then publish the
        close (``reports``: ``meter.reports`` as read for this close, else read here)."""
        await self._drain()  # a close covers acknowledged state only
        if not hp.active:
            return
        t = self.config.topics
        grace = self.config.close_grace
        assert grace is not None
        snap = hp.close.snapshot(hp.ledger, month)
        lsnap = hp.close.license_snapshot(hp.license, month)
        producer = self._producer
        assert producer is not None
        raws = close_records(month, snap, lsnap, hp.license.history_start, closes_at(month, grace))
        futures = [await producer.send(t.changelog, raw, partition=hp.number) for raw in raws]
        metas = await asyncio.gather(*futures)
        hp.acknowledged([m.offset for m in metas])
        hp.closed(month, snap, lsnap, hp.license.history_start)
        self._known_months.add(month)
        log.info(
            "closed %s on home partition %d: %d tenants, final records published",
            month,
            hp.number,
            len(snap),
        )
        if hp.active:
            await self._publish_close(hp, month, reports)

    async def _publish_close(
        self, hp: HomePartition, month: str, reports: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """Final usage records, tenant reports and, last, this partition's summary.

        The summary goes out only once everything before it is acknowledged, so it is the
        close's receipt.  With ``reports`` (what ``meter.reports`` holds, read on
        recovery), a close whose summary and tenant reports are there already, the same,
        is not published again: a restart or rebalance republishes only what changed.
        ``reports`` is updated with what is published.
        """
        hc = hp.close
        t = self.config.topics
        grace = self.config.close_grace or timedelta(0)
        producer = self._producer
        assert producer is not None
        closed_at = iso(closes_at(month, grace))
        tms = [hc.final_tenant_month(tenant, month) for tenant in sorted(hc.finals[month])]
        tenant_docs = {
            usage_key(tm.tenant_id, month).decode(): (tm, tenant_report(tm, grace))
            for tm in tms
            if tm.types
        }
        lms = [hc.final_license_month(tenant, month) for tenant in sorted(hc.license_finals[month])]
        summary_key = f"partition/{month}/{hp.number}"
        summary = partition_summary(month, hp.number, self._n_home, tms, grace)
        start = hc.license_starts.get(month)
        summary["license_usage"] = {"history_start": start, **license_totals(lms)}
        if (
            reports is not None
            and reports.get(summary_key) == summary
            and all(reports.get(key) == doc for key, (_, doc) in tenant_docs.items())
        ):
            log.debug("close of %s on home partition %d already published", month, hp.number)
        else:
            futures = []
            for key, (tm, doc) in tenant_docs.items():
                futures.append(
                    await producer.send(
                        t.usage,
                        encode_usage(tm, self.clock(), final=True, closed_at=closed_at),
                        key=key.encode(),
                    )
                )
                futures.append(await producer.send(t.reports, orjson.dumps(doc), key=key.encode()))
            for lm in lms:
                if lm.totals:
                    ldoc = license_record(
                        lm,
                        start,
                        self.clock(),
                        status="final",
                        closed_at=closed_at,
                    )
                    futures.append(
                        await producer.send(
                            t.license, orjson.dumps(ldoc), key=license_key(lm.tenant_id, month)
                        )
                    )
            await asyncio.gather(*futures)
            await producer.send_and_wait(t.reports, orjson.dumps(summary), key=summary_key.encode())
            self.stats.published += len(futures) + 1
            if reports is not None:
                reports.update({key: doc for key, (_, doc) in tenant_docs.items()})
                reports[summary_key] = summary
        self._closes_published.add((hp.number, month))
        await self._maybe_provider_summary(month, reports)

    async def _refresh_known_months(self) -> dict[str, dict[str, Any]] | None:
        """Read ``meter.reports``; learn every month some partition closed.  None on failure."""
        try:
            reports = await read_keyed(
                self.settings, self.config.topics.reports, keep_last, max_seconds=15
            )
        except (KafkaError, OSError, TimeoutError, BrokerError) as exc:
            if not self._denied(exc, "reports", "Read", self.config.topics.reports):
                log.warning("could not read %s: %s", self.config.topics.reports, exc)
            return None
        self._allowed("reports")
        self._known_refreshed = time.monotonic()
        self._known_months |= {
            str(r["month"]) for r in reports.values() if r.get("type") == "partition_summary"
        }
        return reports

    async def _maybe_provider_summary(
        self, month: str, reports: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """Publish the provider summary once every home partition has closed ``month``,
        unless ``meter.reports`` holds it already, the same (read now unless ``reports``
        is given; it is updated with what is published)."""
        if reports is None:
            reports = await self._refresh_known_months()
            if reports is None:
                return
        parts = [reports.get(f"partition/{month}/{p}") for p in range(self._n_home)]
        if any(p is None for p in parts):
            # ``reports`` may be the round's copy, read before another worker published its
            # summaries (workers close the same month at the same moment): read it again,
            # after our own summaries are acknowledged, so the last to close always sees all.
            fresh = await self._refresh_known_months()
            if fresh is None:
                return
            reports.update(fresh)
            parts = [reports.get(f"partition/{month}/{p}") for p in range(self._n_home)]
            if any(p is None for p in parts):
                return
        grace = self.config.close_grace or timedelta(0)
        doc = provider_summary(month, parts, grace)  # type: ignore[arg-type]
        key = f"provider/{month}"
        if reports.get(key) == doc:
            return
        producer = self._producer
        assert producer is not None
        await producer.send_and_wait(
            self.config.topics.reports, orjson.dumps(doc), key=key.encode()
        )
        reports[key] = doc
        log.info("month %s closed on every partition: provider summary published", month)

    async def _publish_corrections(self) -> None:
        if not any(h.corr_dirty for h in self.homes.values()):
            return
        producer = self._producer
        if producer is None:
            return
        now = self.clock()
        futures = []
        taken: list[tuple[HomePartition, set[tuple[str, str, str, str]]]] = []
        for hp in self._publishable():
            keys, hp.corr_dirty = hp.corr_dirty, set()
            taken.append((hp, keys))
        try:
            for hp, keys in taken:
                hc = hp.close
                for tenant, month, wtype, wid in keys:
                    tm = hp.ledger.tenant_month(tenant, month)
                    rate = None if tm is None else tm.rate(wtype, wid)
                    if rate is None:
                        continue
                    before = hc.finals.get(month, {}).get(tenant, {}).get((wtype, wid))
                    for c in correction_for(tenant, month, wtype, wid, rate, before):
                        late = hc.late_ids.get((tenant, month, wtype, wid))
                        doc = correction_record(c, late, now)
                        futures.append(
                            await producer.send(
                                self.config.topics.corrections,
                                orjson.dumps(doc),
                                key=c.key.encode(),
                            )
                        )
            acked = await _acked(futures, "corrections")
        except (KafkaError, OSError) as exc:
            if not self._denied(exc, "corrections", "Write", self.config.topics.corrections):
                log.warning("publishing corrections failed (%s); will retry", exc)
            acked = False
        if not acked:
            for hp, keys in taken:
                hp.corr_dirty |= keys
            return
        self._allowed("corrections")
        self.stats.corrections += len(futures)

    # ------------------------------------------------------------------ rebalance

    async def _watch_group(self) -> None:
        """Check the group once a wait for partitions has lasted past any healthy rebalance,
        and again only if joins still name the same leader after the repair had its time
        (:class:`~meter.kafka.group.LeaderWatch`)."""
        while True:
            await asyncio.sleep(GROUP_WATCH_S)
            suspect = self.group_watch.due()
            if suspect is not None:
                await self._check_group(suspect)

    async def _check_group(self, suspect: Suspect) -> None:
        """The leader every join names is no member of the group: the embedded broker's
        wedge (:mod:`meter.kafka.group`).  Say so once, and make the broker expire it."""
        group = self.config.group_id
        t = self.config.topics
        try:
            view = await describe_group(self.settings, group)
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning(
                "no partitions from consumer group %s for %.0fs, and it could not be described: %s",
                group,
                suspect.waited_s,
                exc,
            )
            return
        if not view.departed(suspect.leader) or self.group_watch.waiting_since is None:
            log.info(
                "no partitions from consumer group %s for %.0fs; the broker says it is %s "
                "with %d members and names %s as its leader",
                group,
                suspect.waited_s,
                view.state,
                len(view.members),
                "no one" if view.leader is None else repr(view.leader),
            )
            return
        session = self.config.session_timeout_ms / 1000
        self.group_stuck = (
            f"consumer group {group} is stuck: its leader {suspect.leader} left during a "
            f"rebalance and the broker still names it, so no member gets partitions "
            f"(waiting {suspect.waited_s:.0f}s); meter is making the broker expire it"
        )
        if not self._stuck_logged:
            self._stuck_logged = True
            log.error(
                "consumer group %s is stuck: its leader %s left while the group was "
                "rebalancing and the broker still names it as leader (%s; members %d), so "
                "no member is given partitions (this one waited %.0fs). That is a bug of "
                "the embedded broker (Tansu 0.6); Apache Kafka elects a new leader. meter "
                "joins once as that departed member, which the broker then evicts after the "
                "session timeout (%.0fs), electing a live leader. If partitions still do not "
                "come, restart the embedded broker or start the workers with a new --group "
                "(they replay %s from the start: the totals stay exact)",
                group,
                suspect.leader,
                view.state,
                len(view.members),
                suspect.waited_s,
                session,
                t.jobs,
            )
        try:
            answer = await expire_departed_leader(
                self.settings,
                group,
                suspect.leader,
                [t.jobs, t.by_tenant],
                session_timeout_ms=self.config.session_timeout_ms,
            )
        except (KafkaError, OSError, TimeoutError) as exc:
            answer = f"{type(exc).__name__}: {exc}"
        log.info(
            "joined consumer group %s once as its departed leader %s (the broker answered "
            "%s); it should be evicted within %.0fs",
            group,
            suspect.leader,
            answer,
            session,
        )

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Publish what changed while ownership is still certain; then fence everything.

        aiokafka's eager protocol revokes everything and then assigns, in one
        rebalance.  Whatever is assigned again is caught up from the changelog
        before use (another member may have owned it in between, if this one's
        membership lapsed), so nothing is trusted across a rebalance unverified.
        """
        self.group_watch.waiting()
        async with self._lock:
            self.stats.rebalances += 1
            if not self.halted:
                try:
                    # What is in flight is settled and committed while the partitions
                    # are still ours; what cannot be is rebuilt before use.
                    await asyncio.wait_for(self._drain(), 10.0)
                    if any(tp.topic == self.config.topics.by_tenant for tp in revoked):
                        self._check_input_log()
                        await asyncio.wait_for(self._flush(), 10.0)
                except DataLostError as exc:
                    self._data_lost(exc)
                except WriteBlockedError as exc:
                    self._halt(str(exc))
                except (TimeoutError, KafkaError, OSError) as exc:
                    log.warning("could not publish usage before a rebalance: %s", exc)
            self._abandon()
            for hp in self.homes.values():
                hp.fence("a rebalance is in progress")

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        homes = {tp.partition for tp in assigned if tp.topic == self.config.topics.by_tenant}
        waited = self.group_watch.assigned()
        if self.group_stuck:
            self.group_stuck = ""
            self._stuck_logged = False
            log.info(
                "consumer group %s formed again: home partitions %s assigned after %.0fs "
                "without partitions",
                self.config.group_id,
                sorted(homes),
                waited or 0.0,
            )
        consumer = self._consumer
        generation = getattr(getattr(consumer, "_coordinator", None), "generation", None)
        self.lease.granted(generation if isinstance(generation, int) else -1)
        async with self._lock:
            gone = sorted(set(self.homes) - homes)
            for home in gone:
                hp = self.homes.pop(home)
                hp.move(Phase.CLOSED)
                if hp.store is not None:
                    hp.store.close()
            if gone:
                log.info("gave up home partitions %s", gone)
            mine = {(tp.topic, tp.partition) for tp in assigned}
            for key in set(self._positions) - mine:
                del self._positions[key]
            height = self.cards.height
            for home in homes - set(self.homes):
                hp = self.homes[home] = HomePartition(home, height, self.config.history_start)
                if self.state is not None:
                    hp.store = self.state.partition(self.config.topics.changelog, home)
            if self.halted:
                return
            try:
                await self._check_committed(assigned)
                reports = None
                if homes and self.config.close_grace is not None:
                    reports = await self._refresh_known_months()
                if homes:
                    await self._recover(sorted(homes), reports)
            except DataLostError as exc:
                self._data_lost(exc)
                return
            except StateNotWritable as exc:
                self._state_not_writable(exc)
                return
            except (KafkaError, OSError, TimeoutError, BrokerError) as exc:
                # The partitions stay RECOVERING; the loop tries again (nothing is applied
                # to or published from them meanwhile).
                if not self._denied(exc, "recover", "Read", self.config.topics.changelog):
                    log.warning(
                        "could not recover home partitions %s yet (%s); will retry",
                        sorted(homes),
                        exc,
                    )
            else:
                self._allowed("recover")
        self.ready.set()

    async def _check_committed(self, assigned: Iterable[TopicPartition]) -> None:
        """Committed offsets this worker made must still be there (else: broker lost them)."""
        consumer = self._consumer
        if consumer is None:
            return
        for tp in assigned:
            ours = self._committed.get((tp.topic, tp.partition))
            if ours is None:
                continue
            try:
                now = await asyncio.wait_for(consumer.committed(tp), 5.0)
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("could not check the committed offset of %s: %s", tp, exc)
                continue
            if now is None or now < ours:
                raise DataLostError(
                    f"the group's committed offset of {tp.topic}[{tp.partition}] is {now}, "
                    f"below {ours} this worker committed"
                )

    async def _recover(
        self, homes: list[int], reports: dict[str, dict[str, Any]] | None = None
    ) -> int:
        """Bring ``homes`` up to the changelog's end: new or rebuilt ones from offset 0,
        fenced ones from where their state was (a join: replaying again changes nothing).

        ``reports``: ``meter.reports`` as just read (else it is read here when needed)."""
        restore = self._restore
        assert restore is not None
        started = time.monotonic()
        parts = {n: self.homes[n] for n in homes}
        starts = {n: hp.begin_recovery() for n, hp in parts.items()}
        tps = {TopicPartition(self.config.topics.changelog, n): n for n in homes}
        # Where each changelog partition starts: above 0 once purged (--purge-changelog).
        begins = {tps[tp]: o for tp, o in (await restore.beginning_offsets(list(tps))).items()}
        for n, hp in parts.items():
            if 0 < starts[n] < begins[n]:
                # Caught up from where its state was, but the changelog after that is purged
                # (another worker owned the partition meanwhile): rebuild it from a snapshot.
                log.warning(
                    "home partition %d: its state is at changelog offset %d, the changelog now "
                    "starts at %d (purged); reading it again",
                    n,
                    starts[n],
                    begins[n],
                )
                hp.needs_rebuild = True
                starts[n] = hp.begin_recovery()
            if starts[n] == 0 and hp.store is not None and not len(hp.ledger):
                starts[n] = await self._restore_local(hp, begins[n])
            if starts[n] < begins[n]:
                raise DataLostError(
                    f"home partition {n}: the changelog starts at offset {begins[n]} (purged "
                    f"below it) and no state at or past it reads back (local state or a whole "
                    f"snapshot on {self.config.topics.snapshots}); replaying from offset "
                    f"{starts[n]} would leave out what was purged"
                )
        restore.assign(list(tps))
        for tp, n in tps.items():
            restore.seek(tp, starts[n])
        targets: dict[TopicPartition, int] = {}
        remaining = set(tps)
        total = 0
        while remaining:
            for tp in list(remaining):
                if tp not in targets:
                    hw = restore.highwater(tp)
                    if hw is None:
                        continue
                    targets[tp] = hw
                    if hw < starts[tps[tp]]:
                        raise DataLostError(
                            f"changelog {tp.topic}[{tp.partition}] ends at offset {hw}, below "
                            f"offset {starts[tps[tp]]} this worker had read and written"
                        )
                if await restore.position(tp) >= targets[tp]:
                    remaining.discard(tp)
            if not remaining:
                break
            batch = await restore.getmany(*remaining, timeout_ms=50, max_records=10_000)
            for tp, records in batch.items():
                if tp not in targets:
                    hw = restore.highwater(tp)
                    targets[tp] = hw if hw is not None else records[-1].offset + 1
                hp = parts[tps[tp]]
                for rec in records:
                    if rec.offset >= targets[tp] or not rec.value:
                        continue
                    try:
                        total += await self._with_history(hp, partial(hp.replay, rec.value))
                    except LocalStateError as exc:
                        # A pruned month the record reaches could not be read back: this
                        # partition starts again from offset 0 without local state.
                        log.error("%s; rebuilding it from the changelog", exc)  # noqa: TRY400
                        self._state_lost(hp, str(exc))
                        raise
                    except Exception as exc:  # noqa: BLE001 - never stop recovery (ChangelogError and bugs)
                        log.error(  # noqa: TRY400 - the traceback adds nothing
                            "%s[%d]@%d unreadable changelog record skipped: %s",
                            tp.topic,
                            tp.partition,
                            rec.offset,
                            exc,
                        )
        restore.assign([])
        for tp, n in tps.items():
            parts[n].recovered(targets[tp])
            self._known_months |= parts[n].close.closed
        # Publish a close again only where meter.reports lacks it or says otherwise (one
        # read for all); every correction since goes out with the next flush.  Unreadable
        # reports: publish again (the same content).
        closed = any(hp.close.closed for hp in parts.values())
        if closed and reports is None:
            reports = await self._refresh_known_months()
        for hp in parts.values():
            for month in sorted(hp.close.closed):
                try:
                    if month in hp.pruned:
                        if reports is not None and f"partition/{month}/{hp.number}" in reports:
                            self._closes_published.add((hp.number, month))
                            continue
                        try:  # meter.reports lacks it: publish it again
                            await self._with_history(hp, partial(hp.load_months, {month}))
                        except LocalStateError as exc:
                            log.error("%s; rebuilding it from the changelog", exc)  # noqa: TRY400
                            self._state_lost(hp, str(exc))
                            continue
                    if self._publishable():
                        await self._publish_close(hp, month, reports)
                except (KafkaError, OSError, TimeoutError) as exc:
                    log.warning("could not republish the close of %s: %s", month, exc)
        self._resume_homes(homes)
        release_free_memory()  # what a replay or a load allocated and let go
        self.stats.recovered_entries += total
        caught = [n for n in homes if starts[n] > 0]
        log.info(
            "took home partitions %s: recovered %d ledger entries in %.2fs%s",
            homes,
            total,
            time.monotonic() - started,
            f" (caught up {caught} from where their state was)" if caught else "",
        )
        return total

    # ------------------------------------------------------------------ local state

    async def _restore_local(self, hp: HomePartition, begin: int = 0) -> int:
        """Load ``hp``'s saved state when it matches the changelog; the offset to replay
        the changelog from (0: rebuild, the store is cleared).  ``begin``: where the
        changelog starts; above 0 (purged), state must be past it, and where local state is
        not, the snapshots are read (the whole one before the last, where the last fails).
        Raises :class:`DataLostError` when the saved state is past the changelog's end."""
        offset = await self._restore_local_once(hp, begin)
        for _ in range(2):  # the last whole snapshot, then the one before it
            if offset > 0 or begin == 0 or hp.store is None:
                break
            offset = await self._restore_local_once(hp, begin)
        return offset

    async def _restore_local_once(self, hp: HomePartition, begin: int) -> int:
        store = hp.store
        assert store is not None
        started = time.monotonic()
        # The fingerprint is the record at offset - 1: it must not be purged.
        need = begin + 1 if begin > 0 else 0
        try:
            checkpoint = store.checkpoint()
        except StateNotWritable:
            raise  # a setting to fix: the file is left as it is
        except StoreError as exc:
            log.warning("%s; rebuilding home partition %d from the changelog", exc, hp.number)
            store.clear()  # moved aside, not deleted
            checkpoint = None
            if not begin:
                return 0
        if checkpoint is not None and checkpoint.offset < need:
            log.warning(
                "local state of home partition %d is at changelog offset %d, behind the "
                "changelog's start %d (purged): reading a snapshot instead",
                hp.number,
                checkpoint.offset,
                begin,
            )
            store.clear()
            checkpoint = None
        from_topic = checkpoint is None
        if checkpoint is None:
            checkpoint = await self._download_snapshot(hp, need)
            if checkpoint is None:
                return 0
        if checkpoint.offset > 0:
            crc = await self._record_crc(hp.number, checkpoint.offset - 1)
            if crc is None:
                raise DataLostError(
                    f"local state of home partition {hp.number} ({store!r}) is at changelog "
                    f"offset {checkpoint.offset}, past the changelog's end: the broker lost "
                    "data (or the state belongs to another cluster: remove the file to rebuild)"
                )
            if crc != checkpoint.fingerprint:
                log.warning(
                    "local state of home partition %d does not match the changelog (another "
                    "cluster or a recreated topic); rebuilding from the changelog",
                    hp.number,
                )
                if from_topic and hp.published.at >= 0:
                    self._refused_snapshots.add((hp.number, hp.published.at))
                store.clear()
                return 0
        source = hp.published.at  # the snapshot the state came from (-1: none)
        try:
            shown = self.shown_months()
            records = await asyncio.to_thread(hp.restore, store, checkpoint, shown)  # in a thread
        except StoreError as exc:
            log.warning("%s; rebuilding home partition %d from the changelog", exc, hp.number)
            if source >= 0:  # not from that snapshot again
                self._refused_snapshots.add((hp.number, source))
            store.clear()
            return 0
        log.info(
            "home partition %d: local state read to changelog offset %d (%d records, %d "
            "months pruned) in %.2fs",
            hp.number,
            checkpoint.offset,
            records,
            len(hp.pruned),
            time.monotonic() - started,
        )
        if not from_topic and self._purging():
            await self._note_last_snapshot(hp)
        return checkpoint.offset

    async def _note_last_snapshot(self, hp: HomePartition) -> None:
        """After a restart from local state: where the last whole snapshot on the topic is,
        so the next one is written beside it (each row to its other slot) and the changelog
        can be purged below it once that next one is whole."""
        try:
            last = await snapshots.last_whole(
                self._restore, self.config.topics.snapshots, hp.number
            )
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("could not read %s[%d]: %s", self.config.topics.snapshots, hp.number, exc)
            return
        if last is not None:
            last.before = None
            hp.published = snapshots.Published({}, slots=dict(last.slots), before=last)

    async def _reader(self) -> AIOKafkaConsumer:
        """A started consumer outside any group, for reading chosen offsets."""
        consumer = AIOKafkaConsumer(
            **self.settings.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await start_client(consumer, self.settings)
        return consumer

    async def _with_history(self, hp: HomePartition, step: Callable[[], _T]) -> _T:
        """``step()``, once more after fetching the history it needs from the snapshots topic
        (:class:`RowsElsewhere`); a fetch that fails raises :class:`LocalStateError`."""
        try:
            return step()
        except RowsElsewhere as exc:
            await self._fetch_elsewhere(hp, exc.rows)
            return step()

    async def _fetch_elsewhere(self, hp: HomePartition, rows: dict[str, list[int]]) -> None:
        """Fetch pruned months' rows a snapshot holds into the local store (a late event needs
        them).  Raises :class:`LocalStateError` when they are gone (the caller rebuilds)."""
        store = hp.store
        assert store is not None
        started = time.monotonic()
        topic = self.config.topics.snapshots
        consumer: AIOKafkaConsumer | None = None
        try:
            # Its own reader: the restore consumer may be reading the changelog meanwhile.
            consumer = await self._reader()
            got = await snapshots.fetch(consumer, topic, hp.number, rows)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise LocalStateError(hp.number, f"cannot fetch {sorted(rows)}: {exc}") from exc
        finally:
            if consumer is not None:
                await close_consumer(consumer, max_seconds=5.0)
        if got is None:
            raise LocalStateError(hp.number, f"{sorted(rows)} are no longer on {topic}")
        left = {k: v for k, v in hp.elsewhere.items() if k not in got}
        try:
            checkpoint = store.checkpoint()
            assert checkpoint is not None
            await asyncio.to_thread(
                store.save, checkpoint, {**got, ELSEWHERE: [orjson.dumps(left)]}
            )
        except StoreError as exc:
            raise LocalStateError(hp.number, str(exc)) from exc
        hp.elsewhere = left
        log.info(
            "home partition %d: %s fetched from %s into local state in %.2fs",
            hp.number,
            ", ".join(sorted(got)),
            topic,
            time.monotonic() - started,
        )

    def _state_lost(self, hp: HomePartition, why: str) -> None:
        """``hp``'s local state failed: rebuild it from the changelog, and never from the
        snapshot it was read from or last copied to (it would fail the same way)."""
        if hp.published.at >= 0:
            self._refused_snapshots.add((hp.number, hp.published.at))
        hp.state_lost(why)

    async def _download_snapshot(self, hp: HomePartition, need: int = 0) -> Checkpoint | None:
        """No local state: read the partition's last snapshot from Kafka into the local store
        (checked against the changelog next, like any local state); None when there is none.
        One that failed before, or whose state is behind changelog offset ``need``, is not
        read: the whole one before it is, where that one fits."""
        if self.config.snapshot_interval_s is None or hp.store is None:
            return None
        started = time.monotonic()
        topic = self.config.topics.snapshots
        refused = {at for n, at in self._refused_snapshots if n == hp.number}
        try:
            got = await snapshots.read(self._restore, topic, hp.number, refused, need)
        except (KafkaError, OSError, TimeoutError) as exc:
            # Replaying the changelog instead gives the same state, only slower; a denial
            # still says which ACL is missing and keeps /healthz not ready.
            if not self._denied(exc, "snapshot-read", "Read", topic):
                log.warning(
                    "could not read %s[%d] (%s): replaying the changelog", topic, hp.number, exc
                )
            return None
        self._allowed("snapshot-read")
        if got is None:
            return None
        checkpoint, rows, published = got
        # History stays on the topic: where the pruned months' rows are is noted locally.
        away = {k: v for k, v in published.index.items() if k not in rows}
        if away:
            rows[ELSEWHERE] = [orjson.dumps(away)]
        hp.store.save(checkpoint, rows)
        hp.published = published
        log.info(
            "home partition %d: snapshot read from %s (%d rows, %d bytes, changelog offset %d; "
            "%d rows of pruned months left there) in %.2fs",
            hp.number,
            topic,
            len(rows),
            sum(len(r) for row in rows.values() for r in row),
            checkpoint.offset,
            len(away),
            time.monotonic() - started,
        )
        return hp.store.checkpoint()

    async def _publish_snapshot(self, hp: HomePartition, force: bool = False) -> None:
        every = self.config.snapshot_interval_s
        if every is None or hp.store is None or self._producer is None:
            return
        last = self._snapshot_times.get(hp.number)
        if not force and last is not None and time.monotonic() - last < every:
            return
        if not hp.unpublished and hp.published.at >= 0 and hp.published_end == hp.saved_end:
            return
        started = time.monotonic()
        try:
            hp.published = await snapshots.publish(
                self._producer,
                self.config.topics.snapshots,
                hp.number,
                hp.store,
                hp.unpublished,
                hp.published,
                elsewhere=hp.elsewhere,
                local=(ELSEWHERE,),
            )
        except (KafkaError, OSError) as exc:
            if not self._denied(exc, "snapshot", "Write", self.config.topics.snapshots):
                log.warning(
                    "could not publish the snapshot of home partition %d: %s", hp.number, exc
                )
            return
        self._allowed("snapshot")
        self._snapshot_times[hp.number] = time.monotonic()
        hp.unpublished.clear()
        hp.published_end = hp.saved_end
        log.info(
            "home partition %d: snapshot of its state at changelog offset %d on %s in %.2fs",
            hp.number,
            hp.saved_end,
            self.config.topics.snapshots,
            time.monotonic() - started,
        )
        await self._purge(hp)

    def _purging(self) -> bool:
        return (
            self.config.purge_changelog
            and self.config.snapshot_interval_s is not None
            and self.state is not None
            and not self._purge_unsupported
        )

    async def _purge(self, hp: HomePartition) -> None:
        """``--purge-changelog``: delete ``hp``'s changelog records that no restore needs,
        those below the whole snapshot before its last one (one generation of slack: where
        the last is damaged, a new host reads that one, and its fingerprint record, at its
        offset - 1, is kept).  A broker that cannot (the embedded one) keeps them all."""
        last, before = hp.published.checkpoint, hp.published.before
        if not self._purging() or last is None or before is None or before.checkpoint is None:
            return
        # Never past the last snapshot's own state (a "before" noted from the topic could
        # belong to another history: then it is only not a fallback).
        below = min(before.checkpoint.offset, last.offset) - 1
        if below <= self._purged.get(hp.number, 0):
            return
        topic = self.config.topics.changelog
        try:
            starts = await delete_records_below(self.settings, topic, {hp.number: below})
        except (KafkaError, OSError, TimeoutError, BrokerError) as exc:
            if isinstance(exc, UnsupportedVersionError | ConnectionError | KafkaConnectionError):
                self._purge_unsupported = True
                log.warning(
                    "the broker does not delete records (%s): the changelog is kept whole", exc
                )
            else:
                log.warning("could not purge %s[%d]: %s", topic, hp.number, exc)
            return
        self._purged[hp.number] = starts.get(hp.number, below)
        log.info(
            "home partition %d: changelog records below offset %d deleted (the snapshot at "
            "%s offset %d holds the state at %d)",
            hp.number,
            self._purged[hp.number],
            self.config.topics.snapshots,
            before.at,
            before.checkpoint.offset,
        )

    async def _record_crc(self, home: int, offset: int) -> int | None:
        """CRC-32 of the changelog record at ``offset`` of ``home``; None when the
        changelog has no record there."""
        restore = self._restore
        assert restore is not None
        tp = TopicPartition(self.config.topics.changelog, home)
        restore.assign([tp])
        try:
            restore.seek(tp, offset)
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                batch = await restore.getmany(tp, timeout_ms=200, max_records=1)
                for rec in batch.get(tp, ()):
                    return zlib.crc32(rec.value or b"") if rec.offset == offset else None
                hw = restore.highwater(tp)
                if hw is not None and hw <= offset:
                    return None
            raise KafkaError(f"could not read changelog record {home}@{offset} in 15 s")
        finally:
            restore.assign([])

    def shown_months(self) -> set[str]:
        """The months /metrics shows: the current UTC month and the ``metrics_months - 1``
        before it."""
        now = self.now()
        return recent(now.year, now.month, self.config.metrics_months)

    def _prunable(self, hp: HomePartition, now: datetime) -> set[str]:
        after = self.config.prune_after
        grace = self.config.close_grace
        if after is None or grace is None:
            return set()
        # A pruned month's totals stay for /metrics (HomePartition.summaries).
        return {
            m
            for m in hp.close.closed - hp.pruned
            if (hp.number, m) in self._closes_published and closes_at(m, grace) + after <= now
        }

    async def _checkpoint(self, final: bool = False) -> None:
        """Save every active home partition's changed state (nothing in flight, so all of
        it is acknowledged), then prune the closed months that are due."""
        self._last_checkpoint = time.monotonic()
        now = self.now()
        due = {}
        for hp in self.homes.values():
            if hp.active and hp.store is not None:
                prunable = self._prunable(hp, now)
                if hp.changed or hp.saved_end != hp.changelog_end or prunable:
                    due[hp] = prunable
        if due:
            await self._drain()
            await self._save(due, final)
        if final:  # what earlier checkpoints saved and the interval kept off the topic
            for hp in self.homes.values():
                if hp.active:
                    await self._publish_snapshot(hp, force=True)

    async def _save(self, due: dict[HomePartition, set[str]], final: bool) -> None:
        """Checkpoint each partition of ``due``, pruning the months given with it."""
        for hp, prunable in due.items():
            if not hp.active:
                continue
            started = time.monotonic()
            end = hp.changelog_end
            fingerprint = await self._record_crc(hp.number, end - 1) if end > 0 else 0
            if fingerprint is None:
                raise DataLostError(
                    f"changelog partition {hp.number} has no record at offset {end - 1}, "
                    "which this worker wrote or read"
                )
            months = len(hp.changed)
            # In a thread, so heartbeats and scrapes go on (a close's checkpoint of a month of
            # a million workloads takes seconds); nothing else changes the state meanwhile:
            # batches and rebalances wait for the lock this cycle holds.
            pruned = await asyncio.to_thread(hp.save, fingerprint, prunable)
            hp.keep_totals(self.shown_months())
            if pruned:
                release_free_memory()  # a pruned month's memory goes back to the system
            self.stats.checkpoints += 1
            log.info(
                "home partition %d: state saved at changelog offset %d (%d months written, "
                "%d pruned) in %.2fs",
                hp.number,
                end,
                months,
                pruned,
                time.monotonic() - started,
            )
            await self._publish_snapshot(hp, force=final)
        self._last_checkpoint = time.monotonic()

    # ------------------------------------------------------------------ reporting

    def _summary(self) -> str:
        s = self.stats
        return (
            f"{s.tally.read} events ({s.tally.counted} counted, {s.tally.duplicate} duplicate, "
            f"{s.tally.not_counted} not counted, {s.tally.rejected} rejected), "
            f"{s.forwarded} forwarded, {s.published} usage records published"
        )

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress >= 10.0:
            self._last_progress = now
            log.info("progress: %s", self._summary())


def _source(rec: Any) -> str:
    return f"{rec.topic}[{rec.partition}]@{rec.offset}"


def _sources(offsets: dict[TopicPartition, int]) -> str:
    return "batch ending " + ", ".join(
        f"{tp.topic}[{tp.partition}]@{o - 1}" for tp, o in sorted(offsets.items())
    )


def _blocked(
    writes: list[Write], exc: BaseException, sending: str, settings: KafkaSettings
) -> str | None:
    """Describe the first write that failed with an error no retry can fix, if any
    (``sending``: the write being handed to the producer when ``exc`` was raised).  A
    refused authorization names the operation and the topic (see meter.kafka.authz)."""

    def said(err: BaseException) -> str:
        refused = denial(err, settings, topic_operation="Write")
        return str(refused) if refused is not None else f"{type(err).__name__}: {err}"

    for what, fut in writes:
        if fut.done() and not fut.cancelled():
            err = fut.exception()
            if isinstance(err, PERMANENT_WRITE_ERRORS):
                return f"{what}: {said(err)}"
    if isinstance(exc, PERMANENT_WRITE_ERRORS):
        return f"{sending or 'a record'}: {said(exc)}"
    return None


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.worker.on_assigned(assigned)
