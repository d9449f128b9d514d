"""``meter audit``: recompute a month from the raw events and compare with what was published,
in both views (tenant usage and the license view)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from meter.cli.common import (
    add_clock_skew_argument,
    add_license_arguments,
    add_max_event_bytes_argument,
    history_start,
    month_arg,
    provider_license,
)
from meter.domain import Rater, load_ratecards
from meter.domain.event import not_after, skew_ms
from meter.kafka import KafkaSettings, add_kafka_arguments, iter_to_end, settings_from_args
from meter.report.audit import compare, compare_license
from meter.stream.config import Topics
from meter.stream.usage import (
    fold,
    fold_license,
    license_rows,
    read_corrections,
    read_license,
    read_license_corrections,
    read_usage,
    usage_rows,
)

DEFAULTS = Topics()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="recompute a month from the raw jobs topic and compare with the published totals",
        description="Read the raw jobs topic, rate it with the same core as `meter rate`, and "
        "compare the month with the usage topic plus its corrections (tenant usage) and with "
        "the license topic plus its corrections (license usage, the vendor's rules). Prints "
        "every difference; exits 1 if there is one.",
    )
    p.add_argument("--month", required=True, type=month_arg, help="the month to audit (YYYY-MM)")
    p.add_argument(
        "--jobs-topic", default=DEFAULTS.jobs, help="topic of the raw job events [%(default)s]"
    )
    p.add_argument(
        "--usage-topic",
        default=DEFAULTS.usage,
        help="usage topic to check, with its .corrections [%(default)s]",
    )
    p.add_argument(
        "--license-topic",
        default=DEFAULTS.license,
        help="license view topic to check, with its .corrections [%(default)s]",
    )
    p.add_argument("--ratecard", metavar="FILE", help="rate card file (default: built-in)")
    add_license_arguments(p)
    add_clock_skew_argument(p, "each record's timestamp (as the workers judge it)")
    add_max_event_bytes_argument(p)
    add_kafka_arguments(p)
    p.set_defaults(func=run)


async def audit(
    settings: KafkaSettings,
    args: argparse.Namespace,
    rater: Rater,
    start: str | None,
) -> tuple[list[Any], list[Any], int, int]:
    """The differences in tenant usage and in the license view, the raw events read, and
    the usage rows expected."""
    month = args.month
    skew = skew_ms(args.clock_skew)
    raw = 0
    async for rec in iter_to_end(settings, args.jobs_topic, max_seconds=None):
        raw += 1
        if rec.value is not None and rec.value.strip():
            # The workers' time rule: each event against its own record's timestamp.
            rater.not_after = not_after(rec.timestamp, skew)
            rater.feed(rec.value, rec.headers)  # either CloudEvents content mode
    usage = args.usage_topic
    published = fold(
        await read_usage(settings, usage), await read_corrections(settings, f"{usage}.corrections")
    )
    lic = args.license_topic
    published_license = fold_license(
        await read_license(settings, lic),
        await read_license_corrections(settings, f"{lic}.corrections"),
    )
    expected_rows = rater.ledger.usage(month=month)
    usage_diffs = compare(expected_rows, usage_rows(published, month=month))
    license_diffs = compare_license(
        rater.license_view(start).rows(month=month), license_rows(published_license, month=month)
    )
    return usage_diffs, license_diffs, raw, len(expected_rows)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    start = history_start(args, provider_license(args))
    rater = Rater(load_ratecards(args.ratecard), max_bytes=args.max_event_bytes)
    diffs, license_diffs, raw, rows = asyncio.run(audit(settings, args, rater, start))
    t = rater.tally
    print(
        f"audit of {args.month}: {raw} raw events on {args.jobs_topic} ({t.counted} counted, "
        f"{t.duplicate} duplicate, {t.not_counted} not counted, {t.rejected} rejected); "
        f"{rows} usage rows expected; license view with history start {start or 'none'}"
    )
    for d in diffs:
        print(f"DIFFERENCE {d}")
    for ld in license_diffs:
        print(f"DIFFERENCE {ld}")
    print(f"{len(diffs)} difference(s) between the raw events and {args.usage_topic} + corrections")
    print(
        f"{len(license_diffs)} difference(s) between the raw events and {args.license_topic} "
        "+ corrections"
    )
    sys.stdout.flush()
    return 1 if diffs or license_diffs else 0
