"""The stream-processing worker: job events in, exact running totals out.

One worker is one member of the consumer group ``meter``.  It subscribes to
``meter.jobs`` and ``meter.jobs.by-tenant`` with the range assignor, so
partition *p* of both topics (same partition count) lands on the same worker.
A tenant's *home* partition is ``murmur2(tenant_id) % N`` — what any Kafka
producer keying by tenant_id picks — so an event keyed by tenant is usually
already home and is applied at once; any other event is forwarded, re-keyed,
to its home partition of ``meter.jobs.by-tenant`` (any key, or none, works).

Per batch: parse, rate and join into the home partition's ledger; then write
the ledger entries that changed to the changelog, forwarded events and
rejected messages, wait until all of it is acknowledged (acks=all), and only
then commit the input offsets.  A crash anywhere replays from the last commit,
and replaying into a join changes nothing.  Usage records are published from
the ledger at most every ``flush_interval_s`` per tenant-month.

On assignment a home partition's ledger is rebuilt by replaying its changelog
partition up to the high watermark reported by Fetch (never ListOffsets:
the embedded broker answers it short), and every tenant-month it holds is
republished (same revision for the same state).

Month close (rules in :mod:`meter.domain.close`, state and records in
:mod:`meter.stream.closing`): once a month is due and the worker has read
what arrived, each home partition writes its final snapshot and a close marker
to the changelog, then publishes final usage records and reports.  Later
changes to a closed month become corrections keyed per workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from meter.domain import Event, Ledger, Rate, RateCards, Rejected, Tally, parse
from meter.domain.close import closes_at, correction_for, months_to_close
from meter.domain.rating import no_ratecard
from meter.errors import BrokerError
from meter.kafka import (
    KafkaSettings,
    close_consumer,
    describe_partitions,
    ensure_topics,
)
from meter.stream.closing import (
    HomeClose,
    correction_record,
    encode_closed_marker,
    encode_final_chunk,
    iso,
    partition_summary,
    provider_summary,
    tenant_report,
)
from meter.stream.config import StreamConfig
from meter.stream.records import (
    ChangelogError,
    Entry,
    encode_changelog,
    encode_usage,
    read_changelog,
    rejected_headers,
    usage_key,
)
from meter.stream.usage import keep_last, read_keyed

log = logging.getLogger(__name__)

CHANGELOG_CHUNK = 2_000
#: Rejections logged one by one per batch; the rest are summed up in one line.
REJECTIONS_LOGGED_PER_BATCH = 5
#: On stop, how long work in flight may take before it is abandoned (and replayed later).
STOP_GRACE_S = 3.0


def utc_now() -> str:
    return iso(datetime.now(UTC))


async def _acked(futures: list[asyncio.Future[Any]], what: str) -> bool:
    """Wait for every send's acknowledgement; False (logged) if one failed, to retry later."""
    try:
        await asyncio.gather(*futures)
    except (KafkaError, OSError) as exc:
        log.warning("publishing %d %s failed (%s); will retry", len(futures), what, exc)
        return False
    return True


@dataclass
class WorkerStats:
    """What the worker has done; read by progress lines and metrics."""

    tally: Tally = field(default_factory=Tally)
    forwarded: int = 0
    published: int = 0
    changelog_records: int = 0
    batches: int = 0
    recovered_entries: int = 0
    rebalances: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    corrections: int = 0
    #: Unix time of the newest job event processed (0 before the first).
    newest_event_ts: float = 0.0


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
    ) -> None:
        self.settings = settings
        self.config = config
        self.cards = cards
        self.clock = clock
        #: The close clock (injectable so tests can move time).
        self.now = now
        self.closes: dict[int, HomeClose] = {}
        #: home -> workloads of closed months changed since the last flush
        self._corr_dirty: dict[int, set[tuple[str, str, str, str]]] = defaultdict(set)
        #: months some partition has closed (from meter.reports and our own closes)
        self._known_months: set[str] = set()
        self._last_close_check = 0.0
        self._known_refreshed = 0.0
        self.stats = stats or WorkerStats()
        self.ledgers: dict[int, Ledger] = {}
        #: home -> (tenant, month) -> earliest Kafka timestamp (ms) of a change not yet published
        self._dirty: dict[int, dict[tuple[str, str], int]] = defaultdict(dict)
        #: (topic, partition) -> next offset to process
        self._positions: dict[tuple[str, int], int] = {}
        #: Called with each published record's event-to-total latency (seconds).
        self.on_latency: Callable[[float], None] | None = None
        self._homes: dict[str, int] = {}
        self._revoked: set[int] = set()
        self._n_home = config.partitions
        self._co_partitioned = True
        self._lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._restore: AIOKafkaConsumer | None = None
        self._last_flush = 0.0
        self._rejected_logged = 0
        self._last_progress = time.monotonic()
        self.ready = asyncio.Event()
        #: Where this worker serves /metrics, once it does (for logs and tests).
        self.http_url: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then publish, commit and leave the group."""
        if not await self._connect(stop):
            return
        try:
            await self._loop(stop)
        finally:
            await self._shutdown()

    async def _connect(self, stop: asyncio.Event) -> bool:
        """Create topics and clients, retrying while the broker is unreachable."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self._start_clients()
            except (KafkaError, OSError, TimeoutError) as exc:
                await self._close_clients()
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
                return True
        return False

    async def _start_clients(self) -> None:
        t = self.config.topics
        await ensure_topics(self.settings, self.config.topic_specs())
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
        kw = self.settings.client_kwargs()
        self._restore = AIOKafkaConsumer(
            **kw,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await self._restore.start()
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
        )
        await self._consumer.start()
        self._consumer.subscribe([t.jobs, t.by_tenant], listener=_Rebalance(self))
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
            "linger_ms": 5,
            "max_batch_size": 1024 * 1024,
            "max_request_size": 8 * 1024 * 1024,
            "request_timeout_ms": 30_000,
        }
        if self.config.idempotence in ("auto", "on"):
            producer = AIOKafkaProducer(**kw, **common, enable_idempotence=True)
            try:
                # InitProducerId is part of start(); the embedded broker fails it.
                await producer.start()
            except KafkaError as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                if self.config.idempotence == "on":
                    raise
                log.warning(
                    "broker does not support idempotent producers (%s); using acks=all "
                    "without idempotence: totals stay exact because state is join-shaped, "
                    "a retried write is at worst written twice",
                    exc,
                )
            else:
                return producer
        producer = AIOKafkaProducer(**kw, **common)
        await producer.start()
        return producer

    async def _close_clients(self) -> None:
        for consumer in (self._consumer, self._restore):
            if consumer is not None:
                await close_consumer(consumer, max_seconds=5.0)
        if self._producer is not None:
            try:
                await asyncio.wait_for(self._producer.stop(), 5.0)
            except (TimeoutError, KafkaError, OSError) as exc:
                log.warning("producer did not stop cleanly: %s", exc)
        self._consumer = self._restore = self._producer = None

    async def _shutdown(self) -> None:
        try:
            async with self._lock:
                await asyncio.wait_for(self._flush(), 5.0)
        except (TimeoutError, KafkaError, OSError) as exc:
            log.warning("could not publish the last usage records on shutdown: %s", exc)
        await self._close_clients()
        log.info("worker stopped: %s", self._summary())

    # ------------------------------------------------------------------ main loop

    async def _loop(self, stop: asyncio.Event) -> None:
        consumer = self._consumer
        assert consumer is not None
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
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
                    log.warning("fetch failed (%s); retrying", exc)
                    await asyncio.sleep(0.5)
                    continue
                if batch:
                    await self._step(self._process(batch, stop), stopper)
                if time.monotonic() - self._last_flush >= self.config.flush_interval_s:
                    await self._step(self._flush(), stopper)
                if time.monotonic() - self._last_close_check >= 1.0:
                    await self._step(self._close_checked(), stopper)
                self._progress()
        finally:
            stopper.cancel()

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

    async def _close_checked(self) -> None:
        try:
            await self._close_due()
        except (KafkaError, OSError, TimeoutError) as exc:
            # Nothing is marked closed until its marker is acknowledged, so the next
            # check simply closes again.
            log.warning("closing a month failed (%s); will retry", exc)

    async def _process(
        self, batch: dict[TopicPartition, list[object]], stop: asyncio.Event
    ) -> None:
        t = self.config.topics
        cards = self.cards
        ledgers = self.ledgers
        tally = self.stats.tally
        changes: dict[int, list[Entry]] = defaultdict(list)
        forwards: list[tuple[int, bytes, bytes]] = []
        rejects: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
        offsets: dict[TopicPartition, int] = {}
        now = self.clock()
        last_time = ""
        late_ids: dict[int, dict[int, str]] = {}
        self._rejected_logged = 0
        for tp, records in batch.items():
            from_jobs = tp.topic == t.jobs
            if not from_jobs and tp.partition not in ledgers:
                continue  # revoked while this batch was in flight: the new owner reads it
            for rec in records:
                value: bytes | None = rec.value  # type: ignore[attr-defined]
                if value is None:
                    result: Event | Rejected = Rejected("invalid_json", "message has no value")
                    raw = b""
                else:
                    raw = value
                    result = parse(raw)
                if result.__class__ is Rejected:
                    assert isinstance(result, Rejected)
                    rejects.append(self._reject(rec, raw, result, now))
                    continue
                assert isinstance(result, Event)
                rate = cards.rate(result)
                if rate is None:
                    rejects.append(self._reject(rec, raw, no_ratecard(result, cards), now))
                    continue
                last_time = result.time
                if result.result == "failed":
                    tally.not_counted += 1
                    continue
                tenant = result.tenant_id
                home = self._homes.get(tenant)
                if home is None:
                    home = self._homes[tenant] = (murmur2(tenant.encode()) & 0x7FFFFFFF) % (
                        self._n_home
                    )
                if home != tp.partition or (from_jobs and not self._co_partitioned):
                    # Not on its home partition (or misrouted on by-tenant): send it home.
                    forwards.append((home, tenant.encode(), raw))
                    self.stats.forwarded += 1
                    continue
                ledger = ledgers.get(home)
                if ledger is None:
                    # Not ours (a stale batch during a rebalance): leave it uncommitted.
                    break
                month = result.month
                if ledger.add(tenant, month, result.workload_type, result.workload_id, rate):
                    tally.counted += 1
                    changes[home].append(
                        (tenant, month, result.workload_type, result.workload_id, rate)
                    )
                    hc = self.closes.get(home)
                    if hc is not None and month in hc.closed:
                        # Late: the final record stays; the difference is a correction.
                        wkey = (tenant, month, result.workload_type, result.workload_id)
                        hc.late_ids[wkey] = result.id
                        self._corr_dirty[home].add(wkey)
                        late_ids.setdefault(home, {})[len(changes[home]) - 1] = result.id
                        continue
                    dirty = self._dirty[home]
                    ts = rec.timestamp  # type: ignore[attr-defined]
                    if dirty.get((tenant, month), ts) >= ts:
                        dirty[(tenant, month)] = ts
                else:
                    tally.duplicate += 1
            else:
                offsets[tp] = records[-1].offset + 1  # type: ignore[attr-defined]
        self.stats.batches += 1
        if self._rejected_logged > REJECTIONS_LOGGED_PER_BATCH:
            log.warning(
                "... and %d more rejected in this batch (every one is on %s with its reason)",
                self._rejected_logged - REJECTIONS_LOGGED_PER_BATCH,
                t.rejected,
            )
        if last_time:
            self._note_event_time(last_time)
        await self._write(changes, forwards, rejects, stop, late_ids)
        await self._commit(offsets)
        for tp, offset in offsets.items():
            self._positions[(tp.topic, tp.partition)] = offset

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

    def _reject(
        self, rec: object, raw: bytes, why: Rejected, now: str
    ) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        topic, partition, offset = rec.topic, rec.partition, rec.offset  # type: ignore[attr-defined]
        self.stats.tally.rejected += 1
        codes = self.stats.rejected_by_code
        codes[why.code] = codes.get(why.code, 0) + 1
        self._rejected_logged += 1
        if self._rejected_logged <= REJECTIONS_LOGGED_PER_BATCH:
            log.warning("%s[%d]@%d rejected: %s", topic, partition, offset, why.reason)
        headers = rejected_headers(why.reason, why.code, topic, partition, offset, now)
        return rec.key, raw, headers  # type: ignore[attr-defined]

    async def _write(
        self,
        changes: dict[int, list[Entry]],
        forwards: list[tuple[int, bytes, bytes]],
        rejects: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
        stop: asyncio.Event,
        late_ids: dict[int, dict[int, str]] | None = None,
    ) -> None:
        """Write everything a batch caused and wait for acks=all, retrying on failure.

        Retrying re-sends the lot; every write is a fact (a ledger entry, a
        forwarded event, a rejection), so a second copy changes no total.
        """
        if not (changes or forwards or rejects):
            return
        t = self.config.topics
        delay = 0.5
        while True:
            producer = self._producer
            assert producer is not None
            try:
                futures = []
                for home, entries in changes.items():
                    eids = (late_ids or {}).get(home, {})
                    for i in range(0, len(entries), CHANGELOG_CHUNK):
                        chunk_ids = [
                            eids.get(n) for n in range(i, min(i + CHANGELOG_CHUNK, len(entries)))
                        ]
                        value = encode_changelog(entries[i : i + CHANGELOG_CHUNK], chunk_ids)
                        futures.append(await producer.send(t.changelog, value, partition=home))
                        self.stats.changelog_records += 1
                for home, key, raw in forwards:
                    futures.append(await producer.send(t.by_tenant, raw, key=key, partition=home))
                for rkey, raw, headers in rejects:
                    futures.append(await producer.send(t.rejected, raw, key=rkey, headers=headers))
                await asyncio.gather(*futures)
            except (KafkaError, OSError) as exc:
                log.warning(
                    "writing %d changelog entries, %d forwards and %d rejections failed "
                    "(%s: %s); retrying in %.1fs — offsets stay uncommitted until it succeeds",
                    sum(len(e) for e in changes.values()),
                    len(forwards),
                    len(rejects),
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                if stop.is_set() and delay >= 10.0:
                    raise
            else:
                return

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        consumer = self._consumer
        assert consumer is not None
        try:
            # aiokafka's commit waits forever for a coordinator that is gone.
            await asyncio.wait_for(consumer.commit(offsets), self.config.commit_timeout_s)
        except (KafkaError, OSError, AssertionError, TimeoutError) as exc:
            # A rebalance took these partitions: their new owner replays from the
            # last commit, which the join makes harmless.
            log.warning(
                "commit of %d partitions failed (%s); they will be replayed", len(offsets), exc
            )

    async def _flush(self) -> None:
        """Publish the usage record of every tenant-month that changed."""
        self._last_flush = time.monotonic()
        await self._publish_corrections()
        if not any(self._dirty.values()):
            return
        producer = self._producer
        if producer is None:
            return
        t = self.config.topics
        now = self.clock()
        futures = []
        published: list[int] = []
        for home, keys in self._dirty.items():
            ledger = self.ledgers.get(home)
            if ledger is None:
                continue
            for (tenant, month), ts in keys.items():
                tm = ledger.tenant_month(tenant, month)
                if tm is None:
                    continue
                futures.append(
                    await producer.send(
                        t.usage, encode_usage(tm, now), key=usage_key(tenant, month)
                    )
                )
                published.append(ts)
        if not await _acked(futures, "usage records"):
            return
        self._dirty.clear()
        self.stats.published += len(futures)
        if self.on_latency is not None:
            acked = time.time() * 1000
            for ts in published:
                if ts >= 0:  # recovered state has no arrival time
                    self.on_latency(max(0.0, (acked - ts) / 1000))

    # ------------------------------------------------------------------ month close

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
        if grace is None or not self.ledgers or not await self._caught_up():
            return
        now = self.now()
        if time.monotonic() - self._known_refreshed >= 30.0:
            self._known_refreshed = time.monotonic()
            await self._refresh_known_months()
        # A month closes on every home partition once any of ours has usage in it or any
        # partition anywhere closed it, so that every partition publishes its summary.
        months = set(self._known_months)
        for ledger in self.ledgers.values():
            months.update(tm.month for tm in ledger.tenant_months())
        for home in sorted(self.ledgers):
            hc = self.closes.setdefault(home, HomeClose())
            for month in months_to_close(months, hc.closed, now, grace):
                await self._close(home, month)

    async def _close(self, home: int, month: str) -> None:
        ledger = self.ledgers[home]
        hc = self.closes[home]
        t = self.config.topics
        grace = self.config.close_grace
        assert grace is not None
        snap = hc.snapshot(ledger, month)
        rows = [(tenant, w, i, r) for tenant, wl in snap.items() for (w, i), r in wl.items()]
        producer = self._producer
        assert producer is not None
        futures = []
        for i in range(0, len(rows), CHANGELOG_CHUNK):
            chunk = encode_final_chunk(month, rows[i : i + CHANGELOG_CHUNK])
            futures.append(await producer.send(t.changelog, chunk, partition=home))
        await asyncio.gather(*futures)
        # The marker goes last: a snapshot without it is not a close.
        marker = encode_closed_marker(month, closes_at(month, grace))
        await (await producer.send(t.changelog, marker, partition=home))
        hc.closed.add(month)
        hc.finals[month] = snap
        self._known_months.add(month)
        dirty = self._dirty.get(home, {})
        for tenant in list(snap):
            dirty.pop((tenant, month), None)
        log.info(
            "closed %s on home partition %d: %d tenants, final records published",
            month,
            home,
            len(snap),
        )
        await self._publish_close(home, month)

    async def _publish_close(self, home: int, month: str) -> None:
        """Final usage records, tenant reports and this partition's summary (idempotent)."""
        hc = self.closes[home]
        t = self.config.topics
        grace = self.config.close_grace or timedelta(0)
        producer = self._producer
        assert producer is not None
        closed_at = iso(closes_at(month, grace))
        tms = [hc.final_tenant_month(tenant, month) for tenant in sorted(hc.finals[month])]
        futures = []
        for tm in tms:
            if not tm.workloads:
                continue
            key = usage_key(tm.tenant_id, month)
            futures.append(
                await producer.send(
                    t.usage,
                    encode_usage(tm, self.clock(), final=True, closed_at=closed_at),
                    key=key,
                )
            )
            futures.append(
                await producer.send(t.reports, orjson.dumps(tenant_report(tm, grace)), key=key)
            )
        summary = partition_summary(month, home, self._n_home, tms, grace)
        futures.append(
            await producer.send(
                t.reports, orjson.dumps(summary), key=f"partition/{month}/{home}".encode()
            )
        )
        await asyncio.gather(*futures)
        self.stats.published += len(futures)
        await self._maybe_provider_summary(month)

    async def _refresh_known_months(self) -> dict[str, dict[str, Any]] | None:
        """Read ``meter.reports``; learn every month some partition closed.  None on failure."""
        try:
            reports = await read_keyed(
                self.settings, self.config.topics.reports, keep_last, max_seconds=15
            )
        except (KafkaError, OSError, TimeoutError, BrokerError) as exc:
            log.warning("could not read %s: %s", self.config.topics.reports, exc)
            return None
        self._known_months |= {
            str(r["month"]) for r in reports.values() if r.get("type") == "partition_summary"
        }
        return reports

    async def _maybe_provider_summary(self, month: str) -> None:
        """Publish the provider summary once every home partition has closed ``month``."""
        reports = await self._refresh_known_months()
        if reports is None:
            return
        parts = [reports.get(f"partition/{month}/{p}") for p in range(self._n_home)]
        if any(p is None for p in parts):
            return
        grace = self.config.close_grace or timedelta(0)
        doc = provider_summary(month, parts, grace)  # type: ignore[arg-type]
        producer = self._producer
        assert producer is not None
        await producer.send_and_wait(
            self.config.topics.reports, orjson.dumps(doc), key=f"provider/{month}".encode()
        )
        log.info("month %s closed on every partition: provider summary published", month)

    async def _publish_corrections(self) -> None:
        if not any(self._corr_dirty.values()):
            return
        producer = self._producer
        if producer is None:
            return
        now = self.clock()
        futures = []
        for home, keys in self._corr_dirty.items():
            ledger = self.ledgers.get(home)
            hc = self.closes.get(home)
            if ledger is None or hc is None:
                continue
            for tenant, month, wtype, wid in keys:
                tm = ledger.tenant_month(tenant, month)
                if tm is None or (wtype, wid) not in tm.workloads:
                    continue
                rate = tm.workloads[(wtype, wid)]
                before = hc.finals.get(month, {}).get(tenant, {}).get((wtype, wid))
                for c in correction_for(tenant, month, wtype, wid, rate, before):
                    doc = correction_record(c, hc.late_ids.get((tenant, month, wtype, wid)), now)
                    futures.append(
                        await producer.send(
                            self.config.topics.corrections, orjson.dumps(doc), key=c.key.encode()
                        )
                    )
        if not await _acked(futures, "corrections"):
            return
        self._corr_dirty.clear()
        self.stats.corrections += len(futures)

    # ------------------------------------------------------------------ rebalance

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Publish what changed; keep the ledgers until the new assignment is known.

        aiokafka's eager protocol revokes everything and then assigns, in one
        rebalance.  A home partition in both keeps its ledger (nobody else can have
        owned it in between); one not assigned again is dropped in ``on_assigned``.
        """
        async with self._lock:
            self.stats.rebalances += 1
            self._revoked = {
                tp.partition for tp in revoked if tp.topic == self.config.topics.by_tenant
            }
            if self._revoked:
                try:
                    await asyncio.wait_for(self._flush(), 10.0)
                except (TimeoutError, KafkaError, OSError) as exc:
                    log.warning("could not publish usage before a rebalance: %s", exc)

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        homes = {tp.partition for tp in assigned if tp.topic == self.config.topics.by_tenant}
        async with self._lock:
            gone = sorted(set(self.ledgers) - homes)
            for home in gone:
                self.ledgers.pop(home, None)
                self._dirty.pop(home, None)
                self.closes.pop(home, None)
                self._corr_dirty.pop(home, None)
            if gone:
                log.info("gave up home partitions %s", gone)
            mine = {(tp.topic, tp.partition) for tp in assigned}
            for key in set(self._positions) - mine:
                del self._positions[key]
            # Kept only if revoked and assigned in this same rebalance.
            for home in set(self.ledgers) - self._revoked:
                self.ledgers.pop(home, None)
            self._revoked = set()
            new = sorted(homes - set(self.ledgers))
            if new and self.config.close_grace is not None:
                await self._refresh_known_months()
            if new:
                started = time.monotonic()
                entries = await self._recover(new)
                log.info(
                    "took home partitions %s: recovered %d ledger entries in %.2fs",
                    new,
                    entries,
                    time.monotonic() - started,
                )
        self.ready.set()

    async def _recover(self, homes: list[int]) -> int:
        """Rebuild the ledgers of ``homes`` from the changelog, up to its end."""
        restore = self._restore
        assert restore is not None
        tps = [TopicPartition(self.config.topics.changelog, p) for p in homes]
        ledgers = {p: Ledger() for p in homes}
        closes = {p: HomeClose() for p in homes}
        pendings: dict[int, dict[str, dict[str, dict[tuple[str, str], Rate]]]] = {
            p: {} for p in homes
        }
        restore.assign(tps)
        await restore.seek_to_beginning(*tps)
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
                if await restore.position(tp) >= targets[tp]:
                    remaining.discard(tp)
            if not remaining:
                break
            batch = await restore.getmany(*remaining, timeout_ms=50, max_records=10_000)
            for tp, records in batch.items():
                if tp not in targets:
                    hw = restore.highwater(tp)
                    targets[tp] = hw if hw is not None else records[-1].offset + 1
                ledger = ledgers[tp.partition]
                hc = closes[tp.partition]
                pending = pendings[tp.partition]
                for rec in records:
                    if rec.offset >= targets[tp] or not rec.value:
                        continue
                    try:
                        cl = read_changelog(rec.value)
                        for n, entry in enumerate(cl.entries):
                            ledger.add(*entry)
                            total += 1
                            if n in cl.event_ids:
                                hc.late_ids[entry[:4]] = cl.event_ids[n]
                        if cl.final is not None:
                            snap = pending.setdefault(cl.final, {})
                            for tenant, wtype, wid, rate in cl.final_entries:
                                ledger.add(tenant, cl.final, wtype, wid, rate)
                                held = snap.setdefault(tenant, {}).get((wtype, wid))
                                if held is None or rate > held:
                                    snap[tenant][(wtype, wid)] = rate
                        if cl.closed is not None:
                            hc.closed.add(cl.closed)
                            hc.finals[cl.closed] = pending.pop(cl.closed, {})
                    except ChangelogError as exc:
                        log.error(  # noqa: TRY400 - the traceback adds nothing
                            "%s[%d]@%d unreadable changelog record skipped: %s",
                            tp.topic,
                            tp.partition,
                            rec.offset,
                            exc,
                        )
        restore.assign([])
        for p, ledger in ledgers.items():
            hc = closes[p]
            self.ledgers[p] = ledger
            self.closes[p] = hc
            self._known_months |= hc.closed
            self._dirty[p].update(
                ((tm.tenant_id, tm.month), -1)
                for tm in ledger.tenant_months()
                if tm.month not in hc.closed
            )
            for month in sorted(hc.closed):
                # Publish the close again (same content) and every correction since.
                try:
                    await self._publish_close(p, month)
                except (KafkaError, OSError, TimeoutError) as exc:
                    log.warning("could not republish the close of %s: %s", month, exc)
                self._corr_dirty[p].update(
                    (c.tenant_id, c.month, c.workload_type, c.workload_id)
                    for c in hc.corrections(ledger, month)
                )
        self.stats.recovered_entries += total
        return total

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


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.worker.on_assigned(assigned)
