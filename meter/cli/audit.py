"""``meter audit``: recompute a month from the raw events and compare with what was published."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from meter.cli.common import add_max_event_bytes_argument, month_arg
from meter.domain import Rater, load_ratecards
from meter.kafka import KafkaSettings, add_kafka_arguments, iter_to_end, settings_from_args
from meter.report.audit import compare
from meter.stream.config import Topics
from meter.stream.usage import fold, read_corrections, read_usage, usage_rows

DEFAULTS = Topics()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="recompute a month from the raw jobs topic and compare with the published totals",
        description="Read the raw jobs topic, rate it with the same core as `meter rate`, and "
        "compare the month with the usage topic plus its corrections. Prints every "
        "difference; exits 1 if there is one.",
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
    p.add_argument("--ratecard", metavar="FILE", help="rate card file (default: built-in)")
    add_max_event_bytes_argument(p)
    add_kafka_arguments(p)
    p.set_defaults(func=run)


async def audit(
    settings: KafkaSettings, jobs: str, usage: str, month: str, rater: Rater
) -> tuple[list[Any], int, int]:
    raw = 0
    async for rec in iter_to_end(settings, jobs, max_seconds=None):
        raw += 1
        if rec.value is not None and rec.value.strip():
            rater.feed(rec.value, rec.headers)  # either CloudEvents content mode
    published = fold(
        await read_usage(settings, usage), await read_corrections(settings, f"{usage}.corrections")
    )
    expected_rows = rater.ledger.usage(month=month)
    published_rows = usage_rows(published, month=month)
    return compare(expected_rows, published_rows), raw, len(expected_rows)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    rater = Rater(load_ratecards(args.ratecard), max_bytes=args.max_event_bytes)
    diffs, raw, rows = asyncio.run(
        audit(settings, args.jobs_topic, args.usage_topic, args.month, rater)
    )
    t = rater.tally
    print(
        f"audit of {args.month}: {raw} raw events on {args.jobs_topic} ({t.counted} counted, "
        f"{t.duplicate} duplicate, {t.not_counted} not counted, {t.rejected} rejected); "
        f"{rows} usage rows expected"
    )
    for d in diffs:
        print(f"DIFFERENCE {d}")
    print(f"{len(diffs)} difference(s) between the raw events and {args.usage_topic} + corrections")
    sys.stdout.flush()
    return 1 if diffs else 0
