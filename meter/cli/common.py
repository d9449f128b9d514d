"""Pieces the commands share: flags, signals, running a coroutine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from meter.domain.clock import DEFAULT_CLOCK_TOLERANCE
from meter.domain.close import DEFAULT_GRACE
from meter.domain.event import DEFAULT_CLOCK_SKEW, DEFAULT_MAX_EVENT_BYTES, skew_ms
from meter.domain.license import LicenseWatch, ProviderLicense, load_license
from meter.domain.month import parse_month
from meter.errors import ConfigError
from meter.kafka import KafkaSettings
from meter.observe.http import CpuShare, HttpThread, build_app
from meter.observe.metrics import instrument, recent_months
from meter.observe.snapshot import DEFAULT_TOP_TENANTS
from meter.observe.usage_view import LicenseView, UsageView
from meter.stream.config import StreamConfig, Topics
from meter.stream.worker import Worker

log = logging.getLogger(__name__)
DEFAULTS = Topics()


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("streaming")
    g.add_argument("--ratecard", metavar="FILE", help="rate card file (default: built-in)")
    g.add_argument("--group", default="meter", help="consumer group id [meter]")
    g.add_argument(
        "--partitions", type=int, default=4, help="partitions of topics meter creates [4]"
    )
    g.add_argument(
        "--replication-factor",
        type=positive_int,
        metavar="N",
        help="replication factor of the topics meter creates [min(3, brokers in the "
        "cluster)]; an existing changelog or snapshots topic with 1 on a cluster of several "
        "brokers is refused unless given, so pass 1 to accept one copy",
    )
    g.add_argument(
        "--min-insync-replicas",
        type=positive_int,
        metavar="N",
        help="min.insync.replicas of the topics meter creates: replicas that must hold a "
        "write before it counts [max(1, replication factor - 1)]",
    )
    g.add_argument(
        "--flush-interval",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="publish a tenant-month's usage at most this often [0.25]",
    )
    g.add_argument(
        "--jobs-topic",
        default=DEFAULTS.jobs,
        help="topic the job events are read from; its .by-tenant and .ledger.changelog "
        "topics are named after it [%(default)s]",
    )
    g.add_argument(
        "--usage-topic",
        default=DEFAULTS.usage,
        help="topic the usage records go to; corrections go to its .corrections [%(default)s]",
    )
    g.add_argument(
        "--rejected-topic",
        default=DEFAULTS.rejected,
        help="dead-letter topic: every message meter cannot count, with its reason [%(default)s]",
    )
    g.add_argument(
        "--session-timeout-ms",
        type=int,
        default=10_000,
        help="consumer group session timeout; on the embedded broker a join waits half of it, "
        "and after a worker died without leaving, about 1.8 times it [10000]",
    )
    g.add_argument(
        "--close-grace",
        type=parse_grace,
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help="close a month this long after it ends, e.g. 2d, 36h, 0, or off [2d: the 3rd "
        "day of the next month, 00:00 UTC]",
    )
    g.add_argument(
        "--clock-tolerance",
        type=parse_tolerance,
        default=DEFAULT_CLOCK_TOLERANCE,
        metavar="DURATION",
        help="close a month only while this host's clock is within this of the broker's "
        "time (LogAppendTime on the jobs topic's .clock topic; on a broker that assigns "
        "none, the other workers' clocks), e.g. 5m, 30s; off: closes follow this host's "
        "clock alone [5m]",
    )
    g.add_argument(
        "--reports-topic",
        default=DEFAULTS.reports,
        help="topic the month-close reports go to [%(default)s]",
    )
    g.add_argument(
        "--license-topic",
        default=DEFAULTS.license,
        help="topic the license view (vendor rules) goes to, one record per tenant-month; "
        "its corrections go to its .corrections [%(default)s]",
    )
    add_license_arguments(g)
    add_clock_skew_argument(g, "its Kafka record's timestamp")
    add_max_event_bytes_argument(
        g,
        "; dead letters keep at most this many bytes of the original (keep it below the "
        "broker's message limit)",
    )
    g.add_argument(
        "--clock",
        metavar="FILE",
        help="for drills and tests: read the current time (RFC 3339) from FILE instead of "
        "the system clock",
    )
    g.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep each home partition's state in DIR (SQLite, one file per partition): a "
        "restart reads it plus only the changelog written since, and closed months leave "
        "memory (--prune-after) [none: state in memory only, rebuilt from the changelog]",
    )
    g.add_argument(
        "--checkpoint-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --state-dir: save changed state at most this often (and at shutdown) [60]",
    )
    g.add_argument(
        "--snapshot-interval",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="with --state-dir: copy the saved state to the .ledger.snapshots topic at most "
        "this often (and at shutdown), so a worker on another host reads it instead of the "
        "whole changelog; -1: never [600]",
    )
    g.add_argument(
        "--purge-changelog",
        action="store_true",
        help="with --state-dir and snapshots (Apache Kafka): once a partition's snapshot is "
        "whole on the .ledger.snapshots topic, delete its changelog records below the whole "
        "snapshot before it (DeleteRecords), so the changelog stops growing with history "
        "[off: kept for ever]",
    )
    g.add_argument(
        "--prune-after",
        type=parse_grace,
        default=timedelta(days=7),
        metavar="DURATION",
        help="with --state-dir: a month leaves memory this long after it closed; a late "
        "event for it reads it back [7d; off: never]",
    )
    g.add_argument(
        "--idempotence",
        choices=("auto", "on", "off"),
        default="auto",
        help="idempotent producer: auto uses it where the broker supports it [auto]",
    )


def add_http_arguments(
    p: argparse.ArgumentParser, default_port: int, *, status_page_flag: bool = False
) -> None:
    g = p.add_argument_group("HTTP (metrics, health, status page)")
    g.add_argument("--http-host", default="127.0.0.1", help="address to serve on [127.0.0.1]")
    g.add_argument(
        "--http-port",
        type=int,
        default=default_port,
        help=f"port to serve /metrics, /healthz (and the status page) on; one in use is an "
        f"error; 0 = any free port, -1 = off [{default_port}]",
    )
    if status_page_flag:
        g.add_argument(
            "--status-page",
            action="store_true",
            help="also serve the live status page at / and /api/usage (it reads the usage "
            "topic, so it shows every worker's totals)",
        )
    g.add_argument(
        "--metrics-months",
        type=int,
        default=2,
        metavar="N",
        help="export usage gauges for the current and N-1 previous UTC months [2]",
    )
    g.add_argument(
        "--metrics-tenants",
        type=_non_negative,
        default=DEFAULT_TOP_TENANTS,
        metavar="N",
        help="per-tenant series (meter_points, meter_workloads) for the N tenants with the most "
        "points each month; every tenant is always in meter_provider_* (exact sums), "
        f"/api/usage and meter report [{DEFAULT_TOP_TENANTS}; 0: none]",
    )


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def status_views(
    settings: KafkaSettings, config: StreamConfig, worker: Worker, stop: asyncio.Event
) -> tuple[UsageView, asyncio.Task[Any]]:
    """The status page's view of the usage topic, with the license view beside it (the
    license gauge of a month: the whole provider's used points against ``--license``),
    and the task that tails both until ``stop``."""
    view = UsageView(settings, config.topics.usage)
    lic = LicenseView(settings, config.topics.license, config.topics.license_corrections)
    view.license_doc = lambda month: lic.status(
        month, worker.provider_license, worker.now().astimezone(UTC).date()
    )

    async def tail() -> None:
        await asyncio.gather(view.run(stop), lic.run(stop))

    return view, asyncio.create_task(tail(), name="meter-status-views")


async def start_http(
    args: argparse.Namespace,
    worker: Worker,
    registry: CollectorRegistry,
    view: UsageView | None = None,
) -> HttpThread | None:
    """Serve /metrics (and the status page when ``view`` is given) if enabled, from a
    thread of its own (:class:`~meter.observe.http.HttpThread`)."""
    collector = instrument(
        worker, registry, recent_months(args.metrics_months, worker.now), args.metrics_tenants
    )
    if args.http_port < 0:
        return None
    app = build_app(
        registry,
        view,
        health=worker.health,
        now=worker.now,
        exposition=lambda: collector.exposition(registry),
        loop_lag=None if collector.loop_lag is None else collector.loop_lag.observe,
        close_held=worker.close_held,
        worker_loop=asyncio.get_running_loop(),
        cpu_share=CpuShare(),
        metrics_stale_ok=collector.big,
    )
    server = HttpThread(app, args.http_host, args.http_port)
    try:
        port = await server.start()
    except OSError as exc:
        # Never another port instead: Prometheus scrapes the one it was told.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(
            f"cannot serve HTTP on {args.http_host}:{args.http_port}: {reason} "
            "(choose another --http-port; 0 picks any free port, -1 serves nothing)"
        ) from exc
    base = f"http://{args.http_host}:{port}"
    if view is not None:
        print(
            f"meter: status page on {base}/ (JSON: {base}/api/usage?month=YYYY-MM)",
            file=sys.stderr,
            flush=True,
        )
    print(f"meter: Prometheus metrics on {base}/metrics", file=sys.stderr, flush=True)
    worker.http_url = base
    return server


def stream_config(
    args: argparse.Namespace, license_: ProviderLicense | None = None
) -> StreamConfig:
    topics = Topics.derived(
        args.jobs_topic,
        args.usage_topic,
        args.rejected_topic,
        args.reports_topic,
        args.license_topic,
    )
    return StreamConfig(
        topics=topics,
        group_id=args.group,
        partitions=args.partitions,
        replication_factor=args.replication_factor,
        min_insync_replicas=args.min_insync_replicas,
        flush_interval_s=args.flush_interval,
        session_timeout_ms=args.session_timeout_ms,
        idempotence=args.idempotence,
        close_grace=args.close_grace,
        clock_tolerance=args.clock_tolerance,
        max_event_bytes=args.max_event_bytes,
        history_start=history_start(args, license_),
        clock_skew_ms=skew_ms(args.clock_skew),
        checkpoint_interval_s=args.checkpoint_interval,
        metrics_months=max(1, getattr(args, "metrics_months", 2)),
        snapshot_interval_s=args.snapshot_interval if args.snapshot_interval >= 0 else None,
        prune_after=args.prune_after,
        purge_changelog=getattr(args, "purge_changelog", False),
    )


def month_arg(value: str) -> str:
    """A ``YYYY-MM`` flag value; anything else is a usage error (exit 2) naming it."""
    try:
        return parse_month(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_license_arguments(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--license",
        metavar="FILE",
        help="the provider's license (JSON: licensed_points, expires): used points are "
        "shown against it and the vendor's allowance [none declared]",
    )
    g.add_argument(
        "--history-start",
        type=month_arg,
        metavar="YYYY-MM",
        help=HISTORY_START_HELP,
    )


#: ``--history-start``, for every command that has it.
HISTORY_START_HELP = (
    "license view: the month metering began (or history_start in the --license file); it "
    "has no new workloads, and earlier months have no license report [none: no workload is "
    "new, all are billed]"
)


def provider_license(args: argparse.Namespace) -> ProviderLicense | None:
    return None if args.license is None else load_license(args.license)


#: Seconds between two checks of a running worker's ``--license`` file.
LICENSE_CHECK_S = 30.0


def add_license_check_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--license-check-interval",
        type=float,
        default=LICENSE_CHECK_S,
        metavar="SECONDS",
        help="check the --license file this often (and on SIGHUP): a valid new one is "
        "applied, a broken or deleted one keeps the running license; both are logged once "
        "[%(default)s]",
    )


def start_license_watch(
    args: argparse.Namespace, worker: Worker, license_: ProviderLicense | None, stop: asyncio.Event
) -> asyncio.Task[None] | None:
    """Watch ``--license`` while the worker runs (``None``: no license file, or off)."""
    if license_ is None or args.license_check_interval <= 0:
        return None

    def apply(lic: ProviderLicense) -> None:
        worker.provider_license = lic

    return asyncio.ensure_future(
        watch_license(
            LicenseWatch(args.license, license_), apply, stop, args.license_check_interval
        )
    )


async def watch_license(
    watch: LicenseWatch,
    apply: Callable[[ProviderLicense], None],
    stop: asyncio.Event,
    every: float = LICENSE_CHECK_S,
) -> None:
    """Check the license file every ``every`` seconds and on SIGHUP until ``stop``: a valid
    new license is applied (``apply``), a broken or deleted file keeps the running one;
    each change or distinct problem is logged once (:class:`LicenseWatch`)."""
    loop = asyncio.get_running_loop()
    hup = asyncio.Event()
    # Not on every platform, nor outside the main thread: the timer still runs there.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, hup.set)
    try:
        while not stop.is_set():
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(hup.wait())}
            _, pending = await asyncio.wait(waits, timeout=every, return_when="FIRST_COMPLETED")
            for task in pending:
                task.cancel()
            if stop.is_set():
                break
            hup.clear()
            said = await asyncio.to_thread(watch.check)
            apply(watch.current)
            if said is not None:
                log.log(*said)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)


def history_start(args: argparse.Namespace, license_: ProviderLicense | None) -> str | None:
    """The declared history start: ``--history-start`` or the license file's (the same
    month when both are given); ``None``: none declared."""
    flag, declared = args.history_start, None if license_ is None else license_.history_start
    if flag is not None and declared is not None and flag != declared:
        raise ConfigError(
            f"--history-start {flag} but {args.license} declares "
            f"history_start {declared}: declare the month metering began once"
        )
    start: str | None = flag or declared
    return start


def add_clock_skew_argument(p: argparse._ActionsContainer, against: str) -> None:
    p.add_argument(
        "--clock-skew",
        type=parse_grace,
        default=DEFAULT_CLOCK_SKEW,
        metavar="DURATION",
        help=f"reject events dated after the end of the UTC hour of {against} plus this, as "
        "future_time (a clock running ahead; e.g. 2099) [1h; off: accept any time]",
    )


def add_max_event_bytes_argument(p: argparse._ActionsContainer, more: str = "") -> None:
    p.add_argument(
        "--max-event-bytes",
        type=positive_int,
        default=DEFAULT_MAX_EVENT_BYTES,
        metavar="N",
        help=f"reject larger events as too_large{more} [%(default)s]",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {text!r}")
    return value


def parse_grace(text: str) -> timedelta | None:
    """``2d``, ``36h``, ``90m``, ``0`` or ``off``."""
    t = text.strip().lower()
    if t in {"off", "never", "none"}:
        return None
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    try:
        if t and t[-1] in units:
            return timedelta(**{units[t[-1]]: float(t[:-1])})
        return timedelta(days=float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 2d, 36h, off)"
        ) from None


def parse_tolerance(text: str) -> timedelta | None:
    """``--clock-tolerance``: a duration (``5m``, ``30s``) not below zero, or ``off``."""
    value = parse_grace(text)
    if value is not None and value < timedelta(0):
        raise argparse.ArgumentTypeError(f"a tolerance cannot be negative: {text!r}")
    return value


def clock_from(path: str | None) -> Callable[[], datetime]:
    """The system clock, or one read from a file (for drills and tests)."""
    if path is None:
        return lambda: datetime.now(UTC)
    file = Path(path)

    def now() -> datetime:
        try:
            value = datetime.fromisoformat(file.read_text().strip())
        except (OSError, ValueError) as exc:
            log.warning("clock file %s unusable (%s); using the system clock", file, exc)
            return datetime.now(UTC)
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    return now


def run_until_signalled(main: Coroutine[Any, Any, int], stop: asyncio.Event) -> int:
    """Run ``main``; SIGTERM/SIGINT set ``stop``, a second one exits at once."""

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        hits = 0

        def on_signal(signum: int) -> None:
            nonlocal hits
            hits += 1
            if hits > 1:
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(128 + signum)
            log.info("%s received: stopping cleanly", signal.Signals(signum).name)
            stop.set()
            # Never hang on a broker that went away: exit anyway after a while.
            loop.call_later(30.0, _force_exit, signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        return await main

    return asyncio.run(runner())


def _force_exit(signum: int) -> None:
    log.error("did not stop within 30s of the signal; exiting")
    os._exit(128 + signum)
