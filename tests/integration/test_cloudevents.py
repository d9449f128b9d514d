"""Both content modes of the CloudEvents Kafka binding, produced by the official SDK, through
the embedded broker: the same totals as ``meter rate``, dead letters with their headers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from cloudevents.core.bindings.kafka import KafkaMessage, to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from dateutil.parser import isoparse

from meter.domain import Event, parse
from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from meter.stream.records import headers_dict
from tests.integration.harness import (
    Names,
    WorkerProcess,
    audit_args,
    audit_clean,
    expected_usage,
    read_all,
    wait_for_usage,
)

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

TRICKY = Path(__file__).resolve().parents[1] / "cli" / "tricky.jsonl"


def meter(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "meter", *args], capture_output=True, timeout=120, check=False
    )


def sdk_message(raw: bytes, binary: bool) -> KafkaMessage | None:
    """The event in ``raw`` as the official SDK writes it, or ``None`` if the SDK can't hold it."""
    if not isinstance(parse(raw), Event):
        return None
    doc = orjson.loads(raw)
    attributes = {k: v for k, v in doc.items() if k != "data"}
    try:
        attributes["time"] = isoparse(attributes["time"])
        event = CloudEvent(attributes=attributes, data=doc["data"])
    except ValueError:  # e.g. a leap second: dateutil has no 60th second
        return None
    return (to_binary if binary else to_structured)(event, JSONFormat())


def wait_for_dead_letters(settings: KafkaSettings, topic: str, n: int) -> list[Any]:
    deadline = time.monotonic() + 30
    dead = read_all(settings, topic)
    while len(dead) < n and time.monotonic() < deadline:
        time.sleep(0.5)
        dead = read_all(settings, topic)
    return dead


def rows(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (r["month"], r["tenant_id"], r["workload_type"], r["workloads"], r["points"])
        for r in doc["usage"]
    ]


def test_sdk_binary_and_structured_mixed_give_meter_rate_totals(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    names = Names(unique)
    bootstrap = kafka_settings.bootstrap
    lines = list(generate(1500, seed=11, tenants=20, workloads=15))  # two months, some broken
    # Each event as one producer would send it: SDK binary, SDK structured, or a plain JSON
    # line without headers (today's producers); half keyed by tenant, half not (forwarded).
    messages: list[tuple[bytes, list[tuple[str, bytes]], bytes | None]] = []
    modes = {"binary": 0, "structured": 0, "plain": 0}
    for i, raw in enumerate(lines):
        ev = parse(raw)
        key = ev.tenant_id.encode() if isinstance(ev, Event) and i % 2 else None
        sdk = sdk_message(raw, binary=i % 3 == 0) if i % 3 != 2 else None
        if sdk is None:
            messages.append((raw, [], key))
            modes["plain"] += 1
        else:
            messages.append((sdk.value, list(sdk.headers.items()), key))
            modes["binary" if i % 3 == 0 else "structured"] += 1
    assert min(modes.values()) > 400, modes
    # A binary-mode event without its time: rejected, naming the header.
    bad = sdk_message(lines[0], binary=True)
    assert bad is not None
    bad_headers = [(k, v) for k, v in bad.headers.items() if k != "ce_time"]
    messages.append((bad.value, bad_headers, None))

    async def produce() -> None:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await p.start()
        try:
            for value, headers, key in messages:
                await p.send(names.jobs, value, key=key, headers=headers)
            await p.flush()
        finally:
            await p.stop()

    expected = expected_usage(lines)
    worker = WorkerProcess(bootstrap, names, "a")
    try:
        worker.wait_for_log("took home partitions")
        asyncio.run(produce())
        wait_for_usage(kafka_settings, names.usage, expected, workers=[worker])

        # `meter rate` over the same events (structured lines) says what `meter report` says.
        events = tmp_path / "events.jsonl"
        events.write_bytes(b"\n".join(lines) + b"\n")
        rated = meter("rate", str(events), "--format", "json")
        report = meter("report", "--broker", bootstrap, "--topic", names.usage, "--format", "json")
        assert rated.returncode == 0 and report.returncode == 0, rated.stderr + report.stderr
        assert rows(orjson.loads(report.stdout)) == rows(orjson.loads(rated.stdout))

        # The bad binary message is on the dead-letter topic: its value and headers as sent,
        # then meter's. (The broken lines of the fleet are there too.)
        broken = sum(not isinstance(parse(raw), Event) for raw in lines)
        dead = wait_for_dead_letters(kafka_settings, names.rejected, broken + 1)
        assert len(dead) == broken + 1
        binary_dead = [r for r in dead if any(k == "ce_id" for k, _ in r.headers)]
        assert len(binary_dead) == 1
        rec = binary_dead[0]
        assert rec.value == bad.value
        assert list(rec.headers[: len(bad_headers)]) == bad_headers
        h = headers_dict(rec.headers)
        assert h["meter.code"] == "missing_field"
        assert h["meter.reason"] == "header ce_time: missing (binary-mode CloudEvent)"
        assert h["meter.source.topic"] == names.jobs

        # `meter audit` reads both modes from the raw topic: no difference in either month.
        for month in sorted({r.month for r in expected}):
            audit = meter("audit", "--broker", bootstrap, "--month", month, *audit_args(names))
            out = audit.stdout.decode()
            assert audit.returncode == 0, out + audit.stderr.decode()
            assert f"{len(messages)} raw events" in out
            assert f"{broken + 1} rejected" in out
            assert audit_clean(audit.stdout, names), out
    finally:
        assert worker.terminate() == 0, worker.log()
    assert " forwarded" in worker.log()  # binary events went home with their headers


def test_meter_send_binary_round_trip(
    kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    names = Names(unique)
    bootstrap = kafka_settings.bootstrap
    lines = list(generate(600, seed=12, tenants=10, workloads=10))
    lines += [ln for ln in TRICKY.read_bytes().splitlines() if ln.strip()]
    bad = [ln for ln in lines if not isinstance(parse(ln), Event)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    worker = WorkerProcess(bootstrap, names, "a")
    try:
        worker.wait_for_log("took home partitions")
        sent = meter("send", str(path), "--mode", "binary", "--broker", bootstrap,
                     "--topic", names.jobs)  # fmt: skip
        assert sent.returncode == 0, sent.stderr.decode()
        wait_for_usage(kafka_settings, names.usage, expected_usage(lines), workers=[worker])
        on_topic = read_all(kafka_settings, names.jobs)
        assert len(on_topic) == len(lines)
        binary = [r for r in on_topic if r.headers]
        assert len(binary) == len(lines) - len(bad)
        for rec in binary[:50]:
            h = headers_dict(rec.headers)
            assert h["ce_specversion"] == "1.0"
            assert h["content-type"] == "application/json"
            assert rec.key == orjson.loads(rec.value)["tenant_id"].encode()
        # Lines that are not events went as they were, and reached the dead-letter topic.
        assert sorted(r.value for r in on_topic if not r.headers) == sorted(bad)
        dead = wait_for_dead_letters(kafka_settings, names.rejected, len(bad))
        assert sorted(r.value for r in dead) == sorted(bad)
    finally:
        assert worker.terminate() == 0, worker.log()
