"""``meter worker``, ``meter send`` and ``meter report``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO

from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from meter.cli.common import (
    add_http_arguments,
    add_license_check_argument,
    add_max_event_bytes_argument,
    add_stream_arguments,
    clock_from,
    month_arg,
    provider_license,
    run_until_signalled,
    start_http,
    start_license_watch,
    status_views,
    stream_config,
)
from meter.cli.rate import open_input, rest_of_line
from meter.domain import load_ratecards
from meter.errors import ConfigError
from meter.kafka import add_kafka_arguments, settings_from_args, translate_auth_errors
from meter.kafka.authz import denial
from meter.report import FORMATS, UsageReport, render
from meter.report.license import license_section, license_table, render_license_csv
from meter.store.sqlite import SqliteStore
from meter.stream.send import MODES, send_lines
from meter.stream.usage import (
    fold,
    fold_license,
    license_rows,
    read_corrections,
    read_license,
    read_license_corrections,
    read_usage,
    record_month_infos,
    usage_rows,
)
from meter.stream.worker import Worker

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser(
        "worker",
        help="run one stream-processing worker (more can join the same group)",
        description="Read job events from Kafka, keep exact totals per tenant and month, "
        "publish them on the usage topic. Stop with SIGTERM or Ctrl-C.",
    )
    add_kafka_arguments(w)
    add_stream_arguments(w)
    add_http_arguments(w, default_port=9464, status_page_flag=True)
    add_license_check_argument(w)
    w.set_defaults(func=worker)

    s = sub.add_parser(
        "send",
        help="produce JSON lines to the jobs topic, bytes untouched",
        description="Produce each non-blank line of FILE (or - for standard input) as one "
        "message, bytes untouched (bad lines included), keyed by tenant_id where readable.",
    )
    s.add_argument("file", metavar="FILE", help="JSON lines file, or - for standard input")
    s.add_argument("--topic", default="meter.jobs", help="topic to produce to [meter.jobs]")
    s.add_argument(
        "--mode",
        choices=MODES,
        default="structured",
        help="CloudEvents content mode: structured sends each line as it is; binary sends "
        "each valid event's attributes as ce_* headers and its data as the value (other "
        "lines go as they are) [structured]",
    )
    add_max_event_bytes_argument(s)
    add_kafka_arguments(s)
    s.set_defaults(func=send)

    r = sub.add_parser(
        "report",
        help="print the usage report from the usage topic",
        description="Read the usage topic to its end, keep the highest revision per "
        "tenant-month and print the same report shape as `meter rate`.",
    )
    r.add_argument("--month", type=month_arg, help="only this month (YYYY-MM)")
    r.add_argument("--tenant", help="only this tenant")
    r.add_argument(
        "--format",
        choices=(*FORMATS, "vspc-csv"),
        default="table",
        help="output format; vspc-csv is the vendor's monthly usage report [%(default)s]",
    )
    r.add_argument("--topic", default="meter.usage", help="usage topic [meter.usage]")
    r.add_argument(
        "--with-corrections",
        action="store_true",
        help="with --month of a closed month: list the corrections after its final report",
    )
    r.add_argument("--ratecard", metavar="FILE", help="rate card file, for vspc-csv [built-in]")
    r.add_argument(
        "--license-topic",
        default="meter.license",
        help="license view topic; its corrections are on its .corrections [%(default)s]",
    )
    r.add_argument(
        "--license",
        metavar="FILE",
        help="the provider's license (JSON: licensed_points, expires): used points are shown "
        "against it and the vendor's allowance [none declared]",
    )
    add_kafka_arguments(r)
    r.set_defaults(func=report)


def worker(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    cards = load_ratecards(args.ratecard)
    license_ = provider_license(args)
    config = stream_config(args, license_)
    log.info("Kafka: %s; rate cards %s", settings, ", ".join(cards.versions))
    stop = asyncio.Event()

    if args.status_page and args.http_port < 0:
        raise ConfigError("--status-page needs HTTP: --http-port is -1")

    async def main() -> int:
        w = Worker(
            settings,
            config,
            cards,
            now=clock_from(args.clock),
            provider_license=license_,
            state=SqliteStore(args.state_dir) if args.state_dir else None,
        )
        view, view_task = (
            status_views(settings, config, w, stop) if args.status_page else (None, None)
        )
        watcher = start_license_watch(args, w, license_, stop)
        try:
            runner = await start_http(args, w, CollectorRegistry(), view)
            try:
                await w.run(stop)
            finally:
                if runner is not None:
                    await runner.cleanup()
        finally:
            if view_task is not None or watcher is not None:
                stop.set()
            for task in (view_task, watcher):
                if task is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(task, 10)
        return 0

    return run_until_signalled(main(), stop)


def send(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)

    async def produce(lines: Iterable[bytes]) -> int:
        # Checks the SASL handshake before the producer starts: a refusal is one line.
        async with translate_auth_errors(settings):
            try:
                return await send_lines(
                    settings,
                    args.topic,
                    lines,
                    max_event_bytes=args.max_event_bytes,
                    mode=args.mode,
                )
            except KafkaError as exc:
                refused = denial(exc, settings, topic_operation="Write", topic=args.topic)
                if refused is None:
                    raise
                raise refused from exc

    skipped: list[tuple[int, int]] = []

    def fitting(stream: BinaryIO) -> Iterator[bytes]:
        for number, line, size in bounded_lines(stream, args.max_event_bytes):
            if line is None:
                if len(skipped) < SKIPPED_SHOWN:
                    print(
                        f"meter: line {number} not sent: {size} bytes, over --max-event-bytes "
                        f"{args.max_event_bytes} (the meter would reject it as too_large)",
                        file=sys.stderr,
                    )
                skipped.append((number, size))
            else:
                yield line

    with open_input(args.file) as stream:
        n = asyncio.run(produce(fitting(stream)))
    print(f"sent {n} messages to {args.topic} on {settings.bootstrap}", file=sys.stderr)
    if skipped:
        print(f"meter: {len(skipped)} lines too large were not sent", file=sys.stderr)
        return 1
    return 0


#: Oversized lines named one by one by ``meter send``; the rest are counted.
SKIPPED_SHOWN = 5


def bounded_lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """``(number, line, size)`` for each line, never holding more than ``max_bytes`` + 2.

    A line longer than that is read to its end in pieces that are dropped and comes
    out as ``(number, None, size)``, its size without the line terminator.
    """
    limit = max_bytes + 2  # the longest event and its "\r\n"
    number = 0
    while line := stream.readline(limit):
        number += 1
        if len(line) < limit or line.endswith(b"\n"):
            yield number, line, len(line)
            continue
        yield number, None, rest_of_line(line, stream, limit)[0]


def report(args: argparse.Namespace) -> int:
    """The month's report, in both views.

    **Tenant usage** (calendar month, ``meter.usage``) and **license usage** (vendor
    rules, ``meter.license``).  Without ``--month``: what the events say now (every
    correction folded in).  With ``--month M`` of a closed month: its final report as
    submitted, and with ``--with-corrections`` the corrections after it and the
    corrected totals.  Every license report says what it is: running, final or
    final+corrections.
    """
    settings = settings_from_args(args)
    cards = load_ratecards(args.ratecard)
    license_ = provider_license(args)
    lic_topic = args.license_topic

    async def read() -> tuple[dict[str, dict[str, Any]], ...]:
        # The readers check the SASL handshake first; this translates what escapes them.
        async with translate_auth_errors(settings, check_first=False):
            return (
                await read_usage(settings, args.topic),
                await read_corrections(settings, f"{args.topic}.corrections"),
                await read_license(settings, lic_topic),
                await read_license_corrections(settings, f"{lic_topic}.corrections"),
            )

    records, corrections, lic_records, lic_corrections = asyncio.run(read())
    month, tenant = args.month, args.tenant
    finals = [r for r in records.values() if r.get("final") and r.get("month") == month]
    extra: dict[str, Any] = {}
    as_closed = month is not None and bool(finals)
    if as_closed:
        rows = usage_rows(records, month=month, tenant_id=tenant)
        extra = {"month": month, "final": True, "closed_at": finals[0].get("closed_at")}
        mine = sorted(
            (c for c in corrections.values()
             if c.get("month") == month and tenant in (None, c.get("tenant_id"))),
            key=lambda c: (c["tenant_id"], c["workload_type"], c["workload_id"]),
        )  # fmt: skip
        if args.with_corrections or mine:
            corrected = usage_rows(fold(records, corrections), month=month, tenant_id=tenant)
            if args.with_corrections:
                extra["corrections"] = mine
                extra["corrected_usage"] = UsageReport(usage=corrected).as_dict()["usage"]
            else:
                # As closed, and it says that corrections exist and how to see them.
                extra["corrections_since_close"] = len(mine)
                extra["corrected_points"] = sum(r.points for r in corrected)
    else:
        rows = usage_rows(fold(records, corrections), month=month, tenant_id=tenant)
        if month is not None:
            extra = {"month": month, "final": False}
    # The license view: as closed for --month of a closed month (unless --with-corrections),
    # else with every correction folded in.
    lic_now = fold_license(lic_records, lic_corrections)
    lic_shown = lic_records if as_closed and not args.with_corrections else lic_now
    lic_rows = license_rows(lic_shown, month=month, tenant_id=tenant)
    now = datetime.now(UTC)
    months = [month] if month is not None else sorted({r.month for r in lic_rows})
    infos = record_month_infos(
        records, lic_shown, lic_now, months, generated_at=now, license=license_, tenant_id=tenant
    )
    if args.format == "vspc-csv":
        sys.stdout.write(render_license_csv(lic_rows, infos, cards))
        return 0
    report = UsageReport(usage=rows, extra=extra)
    if args.format == "json":
        report.extra.update(license_section(lic_rows, infos))
    out = render(report, args.format)
    if args.format == "table":
        out = f"TENANT USAGE (calendar month)\n{out}\n{license_table(lic_rows, infos)}"
    sys.stdout.write(out)
    return 0
