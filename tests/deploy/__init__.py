"""Tests of deploy/: the Prometheus config, alert rules and the Grafana dashboard.

Helpers shared with tests/integration/test_prometheus.py live here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD_JSON = DEPLOY / "grafana" / "dashboards" / "meter.json"
GENERATOR = DEPLOY / "grafana" / "build_dashboard.py"
#: Every alert deploy/prometheus/rules.yml defines.
ALERTS = {"MeterWorkerDown", "MeterRejectionsHigh", "MeterNoRatecard", "MeterStalled",
          "MeterLatencyHigh", "MeterHalted", "MeterFenced", "MeterInternalErrors",
          "MeterLicenseOverWarning", "MeterLicenseOverAllowance", "MeterLicenseExpiring",
          "MeterLicenseGracePeriod", "MeterLicenseExpired", "MeterClockAhead",
          "MeterClockBehind", "MeterClockUnchecked"}  # fmt: skip


def require_binary(name: str) -> str:
    """Path of ``name`` (e.g. promtool); skip without it, but fail on CI (CI=true)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed (apt-get install prometheus)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; it is required on CI")
        pytest.skip(reason)
    return path


def generator() -> ModuleType:
    """deploy/grafana/build_dashboard.py, imported from its path (deploy/ is no package)."""
    spec = importlib.util.spec_from_file_location("build_dashboard", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def current_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    return doc


def dashboard_queries(month: str, rate_interval: str = "1m") -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, with Grafana's variables filled in."""
    out = []
    for title, expr in generator().exprs(dashboard()):
        q = expr.replace("$__rate_interval", rate_interval).replace("$month", month)
        assert "$" not in q, f"{title}: unsubstituted variable in {q!r}"
        out.append((title, q))
    return out
