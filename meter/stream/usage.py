"""Reading ``meter.usage``: the highest revision per tenant-month is the truth."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from meter.domain import UsageRow
from meter.kafka import KafkaSettings, iter_to_end

log = logging.getLogger(__name__)


def keep_latest(
    latest: dict[str, dict[str, Any]], key: str, record: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Keep ``record`` for ``key`` unless a higher revision is already held."""
    held = latest.get(key)
    if held is None or record.get("revision", -1) >= held.get("revision", -1):
        latest[key] = record
    return latest


async def read_usage(settings: KafkaSettings, topic: str) -> dict[str, dict[str, Any]]:
    """Every tenant-month's highest-revision record on ``topic``, read to its end."""
    latest: dict[str, dict[str, Any]] = {}
    async for rec in iter_to_end(settings, topic):
        if rec.value is None or rec.key is None:
            continue
        try:
            record = orjson.loads(rec.value)
        except orjson.JSONDecodeError:
            log.warning("%s[%d]@%d is not JSON; skipped", rec.topic, rec.partition, rec.offset)
            continue
        if isinstance(record, dict):
            keep_latest(latest, rec.key.decode("utf-8", "replace"), record)
    return latest


def usage_rows(
    records: dict[str, dict[str, Any]], month: str | None = None, tenant_id: str | None = None
) -> list[UsageRow]:
    rows = [
        UsageRow(r["month"], r["tenant_id"], wtype, u["workloads"], u["points"])
        for r in records.values()
        if (month is None or r.get("month") == month)
        and (tenant_id is None or r.get("tenant_id") == tenant_id)
        for wtype, u in r.get("usage", {}).items()
        if u.get("workloads", 0) > 0
    ]
    rows.sort(key=lambda r: (r.month, r.tenant_id, r.workload_type))
    return rows
