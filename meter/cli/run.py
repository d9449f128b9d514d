"""``meter run`` (the whole meter on one machine) and ``meter demo`` (plus a simulated fleet)."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from meter.broker import EmbeddedBroker
from meter.cli.common import (
    add_http_arguments,
    add_license_check_argument,
    add_stream_arguments,
    clock_from,
    history_start,
    provider_license,
    run_until_signalled,
    start_http,
    start_license_watch,
    status_views,
    stream_config,
)
from meter.domain import Rater, UsageRow, load_ratecards
from meter.domain.license import LicenseRow, previous_month
from meter.kafka import KafkaSettings, add_kafka_arguments, settings_from_args, start_client
from meter.kafka.settings import ENV_BROKER
from meter.observe.http import utc_month
from meter.report import UsageReport, render
from meter.report.license import license_table, month_infos
from meter.sim.fleet import generate
from meter.store.sqlite import SqliteStore
from meter.stream.config import StreamConfig
from meter.stream.send import tenant_key
from meter.stream.usage import (
    by_month,
    fold,
    fold_license,
    license_rows,
    month_state,
    read_corrections,
    read_license,
    read_license_corrections,
    read_usage,
    usage_rows,
)
from meter.stream.worker import Worker, WorkerStats

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "run",
        help="the whole meter on one machine (starts the embedded broker if none is given)",
        description="Run a worker; with no --broker (or METER_BROKER) start the embedded "
        "broker first (memory only). Prints where everything listens. Ctrl-C stops it.",
    )
    add_stack_arguments(r, http_port=8080)
    r.set_defaults(func=run)

    d = sub.add_parser(
        "demo",
        help="meter run plus a simulated fleet of tenants, then the report",
        description="Start the meter, simulate tenants' job systems emitting events (license "
        "changes, duplicates, failures, bad events), show live progress, print the report, "
        "then keep the status page up until Ctrl-C (--exit: stop at once).",
    )
    add_stack_arguments(d, http_port=0)
    d.add_argument("--events", type=int, default=20_000, help="events to emit [20000]")
    d.add_argument("--rate", type=float, default=2_000.0, help="events per second [2000]")
    d.add_argument("--tenants", type=int, default=12, help="simulated tenants [12]")
    d.add_argument(
        "--exit",
        action="store_true",
        help="stop after the report instead of keeping the status page up until Ctrl-C",
    )
    d.set_defaults(func=demo, session_timeout_ms=6_000)


def add_stack_arguments(p: argparse.ArgumentParser, http_port: int) -> None:
    """What `meter run` and `meter demo` both take: Kafka, streaming, broker and HTTP flags."""
    add_kafka_arguments(p)
    add_stream_arguments(p)
    add_license_check_argument(p)
    p.add_argument("--broker-port", type=int, default=0, help="embedded broker port [any]")
    add_http_arguments(p, default_port=http_port)


@contextlib.asynccontextmanager
async def meter_stack(
    args: argparse.Namespace, stop: asyncio.Event, stats: WorkerStats
) -> AsyncIterator[tuple[KafkaSettings, StreamConfig, Worker]]:
    """The broker (embedded unless one is given) and a worker running in this process."""
    settings = settings_from_args(args)
    license_ = provider_license(args)  # a bad file is one line before anything starts
    config = stream_config(args, license_)
    cards = load_ratecards(args.ratecard)
    embedded: EmbeddedBroker | None = None
    if args.broker is None and not os.environ.get(ENV_BROKER):
        embedded = EmbeddedBroker(args.broker_port).start()
        settings = settings.with_bootstrap(embedded.bootstrap)
        say(
            f"embedded Kafka-protocol broker (Tansu) on {embedded.bootstrap} — MEMORY ONLY: "
            "everything is lost when meter stops"
        )
    else:
        say(f"Kafka broker: {settings}")
    state = None
    if args.state_dir and embedded is not None:
        say("--state-dir ignored: the embedded broker keeps nothing, so neither does meter")
    elif args.state_dir:
        state = SqliteStore(args.state_dir)
    worker = Worker(
        settings,
        config,
        cards,
        stats=stats,
        now=clock_from(args.clock),
        provider_license=license_,
        state=state,
    )
    view, view_task = status_views(settings, config, worker, stop)
    try:
        runner = await start_http(args, worker, CollectorRegistry(), view)
    except BaseException:  # e.g. a busy --http-port: leave no broker behind
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(view_task, 10)
        if embedded is not None:
            embedded.stop()
        raise
    task = asyncio.create_task(worker.run(stop), name="meter-worker")
    watcher = start_license_watch(args, worker, license_, stop)
    say(
        f"worker: group {config.group_id}, reading {config.topics.jobs}, totals on "
        f"{config.topics.usage}, rejected messages on {config.topics.rejected}"
    )
    try:
        yield settings, config, worker
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        except TimeoutError:
            log.warning("worker did not stop within 30s")
        for waited in (view_task, watcher):
            if waited is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waited, 10)
        if runner is not None:
            await runner.cleanup()
        if embedded is not None:
            embedded.stop()


def say(text: str) -> None:
    print(f"meter: {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()

    async def main() -> int:
        async with meter_stack(args, stop, WorkerStats()) as (_, _, _):
            say("running; Ctrl-C to stop")
            await stop.wait()
        return 0

    return run_until_signalled(main(), stop)


def demo(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    # Rejections are the demo's point, not news: they are on the rejected topic.
    logging.getLogger("meter.stream.worker").setLevel(logging.ERROR)
    logging.getLogger("meter.kafka").setLevel(logging.WARNING)
    logging.getLogger("meter.broker").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    stats = WorkerStats()

    async def main() -> int:
        lines, this, before = demo_events(args)
        rater = Rater(load_ratecards(args.ratecard))
        for line in lines:
            rater.feed(line)
        expected = rater.ledger.usage()
        if args.license is None:
            # The demo provider's license: metering began the month before, and this
            # month's used points are ~85% of it, so the gauge has something to show.
            args.history_start = args.history_start or before
            used = sum(r.points for r in rater.license_view(args.history_start).rows(this))
            args.license = write_demo_license(args, used)
        license_view = rater.license_view(history_start(args, provider_license(args)))
        expected_license = license_view.rows()
        async with meter_stack(args, stop, stats) as (settings, config, worker):
            say("waiting for the worker to join its consumer group ...")
            ready = asyncio.ensure_future(worker.ready.wait())
            await asyncio.wait(
                {ready, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
            say(
                f"emitting {len(lines)} job events from {args.tenants} simulated tenants at "
                f"{args.rate:.0f}/s (duplicates, failures, license changes, bad events)"
            )
            progress = Progress(stats, len(lines))
            await emit(settings, config.topics.jobs, lines, args.rate, stop, progress.sent)
            print(file=sys.stderr)
            say("all events sent; waiting for the totals on the usage topic")
            rows: list[UsageRow] = []
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                rows = usage_rows(
                    fold(
                        await read_usage(settings, config.topics.usage),
                        await read_corrections(settings, config.topics.corrections),
                    )
                )
                progress.show(final=False)
                if rows == expected and stats.tally.read >= len(lines):
                    break
                await asyncio.sleep(0.5)
            progress.show(final=True)
            if stop.is_set() and rows != expected:
                return 130
            t = stats.tally
            sys.stdout.write(render(UsageReport(usage=rows), "table"))
            print(
                f"\n{len(lines)} events emitted by {args.tenants} simulated tenants: "
                f"{t.counted} counted, {t.duplicate} duplicate, {t.not_counted} not counted "
                f"(failed), {t.rejected} rejected (on {config.topics.rejected} with their reasons)."
            )
            same = rows == expected
            print(
                "The totals read back from the usage topic "
                + ("equal" if same else "DO NOT equal")
                + " `meter rate` over the same events.",
                flush=True,
            )
            lic_rows, lic_records = await _license_rows_when(
                settings, config, expected_license, stop
            )
            now = worker.now()
            groups = by_month(lic_records)
            infos = month_infos(
                license_view,
                {m: month_state(groups.get(m, [])) for m in sorted({r.month for r in lic_rows})},
                now,
                worker.provider_license,
            )
            print()
            sys.stdout.write(license_table(lic_rows, infos))
            lic_same = lic_rows == expected_license
            same = same and lic_same
            print(
                "\nThe license report read back from the license topic "
                + ("equals" if lic_same else "DOES NOT equal")
                + " `meter rate --format vspc-csv` over the same events (vendor rules: "
                "31-day window, new workloads free in their first month).",
                flush=True,
            )
            if worker.http_url is not None and not args.exit and not stop.is_set():
                # The point of the page is to be looked at: it stays until asked to stop.
                say(
                    f"the status page stays up on {worker.http_url}/ (the worker too); "
                    "Ctrl-C to stop (--exit: stop after the report)"
                )
                await stop.wait()
        return 0 if same else 1

    return run_until_signalled(main(), stop)


def demo_events(args: argparse.Namespace) -> tuple[list[bytes], str, str]:
    """The demo's fleet: a third of the events in the month before the worker's clock,
    the rest in its month up to now (none in the future: that is ``future_time``).  The
    month before stays open for the demo (its close grace is stretched, and said so):
    its events are usage, not late corrections of a month that closed mid-stream."""
    now = clock_from(args.clock)()
    this = utc_month(now)
    before = previous_month(this)
    assert before is not None
    begin = datetime.fromisoformat(f"{this}-01T00:00:00+00:00")
    grace = now - begin + timedelta(days=1)
    if args.close_grace is not None and args.close_grace < grace:
        say(
            f"{before} stays open during the demo (close grace {grace.days} days instead of "
            f"{args.close_grace.days}): its events are sent now, not late"
        )
        args.close_grace = grace
    first = args.events // 3
    common = {"seed": 42, "tenants": args.tenants, "workloads": 15}
    lines = [
        # A fifth of the workloads are new this month: they begin in it.
        *generate(first, month=before, id_prefix=f"{before}-", active=0.8, until=begin, **common),
        *generate(
            args.events - first,
            month=this,
            id_prefix=f"{this}-",
            event_seed=43,
            until=now,
            **common,
        ),
    ]
    return lines, this, before


def write_demo_license(args: argparse.Namespace, used: int) -> str:
    """A license file for the demo's provider, in a directory removed at exit; its path."""
    folder = Path(tempfile.mkdtemp(prefix="meter-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    licensed = max(50, -(-used * 100 // 85) // 50 * 50 + 50)
    expires = (clock_from(args.clock)() + timedelta(days=365)).date().isoformat()
    doc = {"licensed_points": licensed, "expires": expires,
           "comment": "meter demo: a simulated provider's license"}  # fmt: skip
    if args.history_start:
        doc["history_start"] = args.history_start
    path = folder / "license.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    say(f"license: {licensed} points, expires {expires}, history start "
        f"{args.history_start or 'none'} ({path}; yours: --license FILE)")  # fmt: skip
    return str(path)


async def _license_rows_when(
    settings: KafkaSettings,
    config: StreamConfig,
    expected: list[LicenseRow],
    stop: asyncio.Event,
    wait_s: float = 60.0,
) -> tuple[list[LicenseRow], dict[str, dict[str, Any]]]:
    """The license view read back from its topic (rows and folded records), once it
    equals ``expected`` (or the last read after ``wait_s`` seconds)."""
    rows: list[LicenseRow] = []
    records: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + wait_s
    while not stop.is_set() and time.monotonic() < deadline:
        records = fold_license(
            await read_license(settings, config.topics.license),
            await read_license_corrections(settings, config.topics.license_corrections),
        )
        rows = license_rows(records)
        if rows == expected:
            break
        await asyncio.sleep(0.5)
    return rows, records


class Progress:
    def __init__(self, stats: WorkerStats, total: int) -> None:
        self.stats = stats
        self.total = total
        self.n_sent = 0
        self._last = 0.0

    def sent(self, n: int) -> None:
        self.n_sent = n
        self.show(final=False)

    def show(self, *, final: bool) -> None:
        now = time.monotonic()
        if not final and now - self._last < 0.2:
            return
        self._last = now
        t = self.stats.tally
        line = (
            f"\rsent {self.n_sent}/{self.total} | processed {t.read}: {t.counted} counted, "
            f"{t.duplicate} duplicate, {t.not_counted} not counted, {t.rejected} rejected | "
            f"{self.stats.published} usage records published"
        )
        end = "\n" if final else ""
        print(line, end=end, file=sys.stderr, flush=True)


async def emit(
    settings: KafkaSettings,
    topic: str,
    lines: list[bytes],
    rate: float,
    stop: asyncio.Event,
    on_progress: Callable[[int], None],
) -> None:
    """Produce ``lines`` at about ``rate`` per second, as job systems would."""
    producer = AIOKafkaProducer(**settings.client_kwargs(), acks="all", linger_ms=5)
    await start_client(producer, settings)
    try:
        started = time.monotonic()
        step = max(1, int(rate / 50))
        for i in range(0, len(lines), step):
            if stop.is_set():
                return
            for line in lines[i : i + step]:
                await producer.send(topic, line, key=tenant_key(line))
            due = started + (i + step) / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            on_progress(min(i + step, len(lines)))
        await producer.flush()
    finally:
        await producer.stop()
