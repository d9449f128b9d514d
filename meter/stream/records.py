"""What the streaming meter writes on its topics, as bytes.  Pure: no Kafka here.

- changelog: ``{"v": 1, "entries": [[tenant, month, type, workload, points, card], ...]}``
- usage: the record documented in ``schemas/usage-record.v1.schema.json``
- rejected: the original bytes untouched; the reason travels in headers
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

import orjson

from meter.domain import Rate, TenantMonth

CHANGELOG_VERSION: Final = 1
Entry = tuple[str, str, str, str, Rate]

# Header names on meter.jobs.rejected.
H_REASON: Final = "meter.reason"
H_CODE: Final = "meter.code"
H_TOPIC: Final = "meter.source.topic"
H_PARTITION: Final = "meter.source.partition"
H_OFFSET: Final = "meter.source.offset"
H_REJECTED_AT: Final = "meter.rejected_at"


class ChangelogError(ValueError):
    """A changelog record that this version of meter cannot read."""


def encode_changelog(entries: Sequence[Entry]) -> bytes:
    return orjson.dumps(
        {"v": CHANGELOG_VERSION, "entries": [[t, m, w, i, r[0], r[1]] for t, m, w, i, r in entries]}
    )


def decode_changelog(raw: bytes) -> list[Entry]:
    try:
        doc = orjson.loads(raw)
        if doc.get("v") != CHANGELOG_VERSION:
            raise ChangelogError(f"unknown changelog version {doc.get('v')!r}")
        return [(t, m, w, i, (int(p), str(c))) for t, m, w, i, p, c in doc["entries"]]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ChangelogError):
            raise
        raise ChangelogError(f"malformed changelog record: {exc}") from exc


def usage_key(tenant_id: str, month: str) -> bytes:
    return f"{tenant_id}/{month}".encode()


def usage_record(tm: TenantMonth, updated_at: str, **extra: Any) -> dict[str, Any]:
    cards = tm.ratecards
    doc: dict[str, Any] = {
        "tenant_id": tm.tenant_id,
        "month": tm.month,
        "revision": tm.revision,
        "usage": {
            wtype: {"workloads": t[0], "points": t[1]} for wtype, t in sorted(tm.totals.items())
        },
        "workloads": tm.workload_count,
        "points": tm.points,
        "ratecard": ",".join(cards),
        "ratecards": cards,
        "updated_at": updated_at,
    }
    doc.update(extra)
    return doc


def encode_usage(tm: TenantMonth, updated_at: str, **extra: Any) -> bytes:
    return orjson.dumps(usage_record(tm, updated_at, **extra))


def rejected_headers(
    reason: str, code: str, topic: str, partition: int, offset: int, rejected_at: str
) -> list[tuple[str, bytes]]:
    return [
        (H_REASON, reason.encode()),
        (H_CODE, code.encode()),
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_REJECTED_AT, rejected_at.encode()),
    ]


def headers_dict(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in headers}
