"""A real Prometheus scraping a real worker: the dashboard's queries and the alert rules
run against what the worker exports, and Prometheus agrees with ``meter report``.

Needs the ``prometheus`` binary (Debian: ``apt-get install prometheus``); skipped
without it, a failure on CI (CI=true).
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from meter.domain import Rater, load_ratecards
from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from tests.deploy import ALERTS, PROMETHEUS_DIR, dashboard_queries, require_binary
from tests.integration.conftest import BrokerHandle
from tests.integration.harness import (
    ARTIFACTS,
    TEST_NOW,
    Names,
    WorkerProcess,
    send,
    wait_for_usage,
)

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

#: Quiet while a healthy worker has just metered a fleet (MeterLatencyHigh depends on the
#: machine's speed, so its result is only required to evaluate).
QUIET = ALERTS - {"MeterLatencyHigh"}
#: Grafana's $__rate_interval, long enough to cover the whole test.
RATE_INTERVAL = "5m"


class Prometheus:
    """``prometheus`` as a child process with its own config and storage in ``tmp``."""

    def __init__(self, tmp: Path, target: str, tag: str) -> None:
        exe = require_binary("prometheus")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML too
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(PROMETHEUS_DIR / "rules.yml")],
                    "scrape_configs": [
                        {"job_name": "meter", "static_configs": [{"targets": [target]}]}
                    ],
                }
            ),
            encoding="utf-8",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"prometheus-{tag}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                doc: dict[str, Any] = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400 bad_data: a query that does not parse
            doc = json.load(exc)
        return doc

    def query(self, expr: str) -> list[dict[str, Any]]:
        doc = self.get("/api/v1/query", query=expr)
        assert doc["status"] == "success", f"{expr!r}: {doc.get('errorType')}: {doc.get('error')}"
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a query with one series, or None without any."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} returned {len(result)} series"
        return float(result[0]["value"][1])

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        self.wait_until(ready, timeout, "prometheus ready")

    def wait_until(
        self, check: Callable[[], bool], timeout: float, what: str | Callable[[], str]
    ) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                text = what if isinstance(what, str) else what()
                raise AssertionError(f"not within {timeout}s: {text}\n{self.log()[-3000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def names(unique: str) -> Names:
    return Names(unique)


#: A license the test fleet stays well within, expiring long after the test: the license
#: panels and recording rules have data, and the license alerts stay quiet.
LICENSE = {"licensed_points": 1_000_000, "expires": "9999-12-31"}


@pytest.fixture
def worker(broker: BrokerHandle, names: Names, tmp_path: Path) -> Iterator[WorkerProcess]:
    license_file = tmp_path / "license.json"
    license_file.write_text(json.dumps(LICENSE), encoding="utf-8")
    w = WorkerProcess(broker.bootstrap, names, "prometheus", extra=["--license", str(license_file)])
    try:
        yield w
    finally:
        w.terminate()
        w.close()


@pytest.fixture
def prometheus(tmp_path: Path, worker: WorkerProcess, names: Names) -> Iterator[Prometheus]:
    require_binary("prometheus")
    worker.wait_for_log("metrics on http://127.0.0.1:")
    m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", worker.log())
    assert m, worker.log()
    prom = Prometheus(tmp_path, f"127.0.0.1:{m.group(1)}", names.suffix)
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def utc_month(line: bytes) -> str | None:
    """The UTC month of an event's time; None where there is none to read."""
    try:
        t = datetime.fromisoformat(orjson.loads(line)["time"].upper())
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
        return None
    return None if t.tzinfo is None else t.astimezone(UTC).strftime("%Y-%m")


def finite(result: list[dict[str, Any]]) -> bool:
    return all(math.isfinite(float(r["value"][1])) for r in result)


@pytest.mark.timeout(300)
def test_dashboard_and_rules_against_a_real_prometheus(
    broker: BrokerHandle, names: Names, worker: WorkerProcess, prometheus: Prometheus
) -> None:
    month = TEST_NOW[:7]  # the worker's clock: its gauges cover this month and the one before
    settings = KafkaSettings(bootstrap=broker.bootstrap)
    prom = prometheus

    # Prometheus scrapes the worker before any event arrives, so the rate windows hold
    # the whole run and the latency quantiles have observations.
    prom.wait_until(lambda: prom.value('up{job="meter"}') == 1, 30, "worker scraped")
    worker.wait_for_log("took home partitions")

    # Only events of this UTC month (and broken ones): the fleet's zones put a few into the
    # previous month, which the worker may already have closed (late events are kept apart).
    lines = [
        line
        for line in generate(3000, seed=11, month=month, tenants=25, workloads=12)
        if utc_month(line) in {month, None}
    ]
    rater = Rater(load_ratecards())
    for line in lines:
        rater.feed(line)
    expected = rater.ledger.usage()
    want_points = sum(r.points for r in expected if r.month == month)
    assert want_points > 0
    assert 0 < rater.tally.rejected < 0.01 * len(lines)  # some, but too few to alert on

    send(settings, names.jobs, lines)
    wait_for_usage(settings, names.usage, expected, workers=[worker])

    # Prometheus catches up: every message has an outcome, the usage gauges are final, and
    # the latency of the usage records published has been observed (the worker observes it
    # once the broker has acknowledged them, which may be just after a reader sees them and
    # just after a scrape: without it, the latency panel's rate is 0/0, NaN).
    seen: list[float | None] = []

    def caught_up() -> bool:
        seen[:] = [
            prom.value("sum(meter_events_total)"),
            prom.value(f'sum(meter_provider_points{{month="{month}"}})'),
        ]
        observed = prom.value("sum(meter_event_to_total_latency_seconds_count)") or 0
        return seen == [len(lines), want_points] and observed > 0

    prom.wait_until(
        caught_up,
        60,
        lambda: (
            f"Prometheus sees {len(lines)} events, {want_points} points and latencies, not {seen}"
        ),
    )
    assert prom.value('sum(meter_events_total{outcome="rejected"})') == rater.tally.rejected
    assert prom.value('sum(meter_events_total{outcome="not_counted"})') == (rater.tally.not_counted)
    assert prom.value("sum(meter_events_rejected_total)") == rater.tally.rejected

    # (a) every dashboard query: valid PromQL, and data to show, all finite numbers
    for title, q in dashboard_queries(month, RATE_INTERVAL):
        result = prom.query(q)
        assert result, f"panel {title!r}: no data for {q!r}"
        assert finite(result), f"panel {title!r}: {q!r} gave {result}"
    # `meter send` keys by tenant_id with aiokafka's murmur2 (Java's default): every event
    # lands on its home partition, and the forwarded-share panel says so
    (share,) = [q for t, q in dashboard_queries(month, RATE_INTERVAL) if t == "Forwarded share"]
    assert prom.value(share) == 0
    # the month variable's query, label_values(meter_provider_points, month): newest first is ours
    months = prom.get("/api/v1/label/month/values", **{"match[]": "meter_provider_points"})["data"]
    assert sorted(months, reverse=True)[0] == month, months
    # the per-tenant table has every tenant the meter billed this month
    per_tenant = prom.query(f'sum by (tenant_id) (meter_points{{month="{month}"}})')
    want_tenants: dict[str, int] = {}
    for r in expected:
        if r.month == month:
            want_tenants[r.tenant_id] = want_tenants.get(r.tenant_id, 0) + r.points
    got_tenants = {s["metric"]["tenant_id"]: int(float(s["value"][1])) for s in per_tenant}
    assert got_tenants == want_tenants

    # (a) the alert rules, as Prometheus loaded and evaluated them
    def evaluated() -> bool:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return bool(rules) and all(r["lastEvaluation"] > "2000" for r in rules)

    prom.wait_until(evaluated, 30, "every rule evaluated")
    rules = [r for g in prom.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    for r in rules:
        assert r["health"] == "ok", f"{r['name']}: {r.get('lastError')}"
    alerts = {r["name"]: r for r in rules if r["type"] == "alerting"}
    recording = {r["name"]: r for r in rules if r["type"] == "recording"}
    assert set(alerts) == ALERTS
    for name, r in alerts.items():
        assert r["labels"]["severity"] in {"warning", "critical"}, name
        assert r["annotations"]["summary"], name
        assert r["annotations"]["description"], name
    # the recorded signals the alerts compare: present and finite on a working meter
    for name, r in recording.items():
        result = prom.query(r["query"])
        assert result, f"recording rule {name}: no data for {r['query']!r}"
        assert finite(result), f"recording rule {name}: {result}"
        prom.wait_until(lambda n=name: bool(prom.query(n)), 15, f"{name} recorded")
    assert prom.value("meter:consumer_lag_messages:sum") == 0
    # A recorded series holds what its last evaluation saw, which may be from before the
    # events (a rate of 0, a ratio of 0/0) when evaluation lags on a busy machine: wait for
    # one that saw them.
    prom.wait_until(
        lambda: (prom.value("meter:messages_processed:rate5m") or 0) > 0,
        30,
        lambda: f"messages processed: {prom.value('meter:messages_processed:rate5m')}",
    )
    ratio: list[float | None] = [None]

    def ratio_seen() -> bool:
        ratio[0] = prom.value("meter:events_rejected:ratio_rate5m")
        return ratio[0] is not None and math.isfinite(ratio[0]) and ratio[0] > 0

    prom.wait_until(ratio_seen, 30, lambda: f"rejected ratio: {ratio[0]}")
    assert ratio[0] is not None
    assert 0 < ratio[0] < 0.01
    # the alert conditions evaluate; on a healthy meter they select nothing
    for name, r in alerts.items():
        result = prom.query(r["query"])
        if name in QUIET:
            assert result == [], f"{name} would fire on a healthy meter: {result}"
    active = [a for a in prom.get("/api/v1/alerts")["data"]["alerts"]
              if a["labels"]["alertname"] in QUIET]  # fmt: skip
    assert active == []

    # (b) Prometheus and `meter report` agree on the month's points
    report = subprocess.run(
        [sys.executable, "-m", "meter", "report", "--broker", broker.bootstrap,
         "--topic", names.usage, "--month", month, "--format", "json"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    rows = json.loads(report.stdout)["usage"]
    assert rows
    assert {r["month"] for r in rows} == {month}
    report_points = sum(r["points"] for r in rows)
    report_workloads = sum(r["workloads"] for r in rows)
    assert report_points == want_points
    assert prom.value(f'sum(meter_provider_points{{month="{month}"}})') == report_points
    assert prom.value(f'sum(meter_workloads{{month="{month}"}})') == report_workloads
