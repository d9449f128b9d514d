"""The status page in a real headless browser, against ``meter run`` as a user starts it.

Debian's chromium (``/usr/bin/chromium``) driven by Playwright (its own browser download
is not used).  The page must show exactly what ``meter rate`` computes over the same
events, for the month chosen in its selector, and follow new events without a reload.
Missing browser or Playwright: skipped, except on CI (``CI=true``) where that fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meter.sim.fleet import generate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BROKER_LINE = re.compile(r"embedded Kafka-protocol broker \(Tansu\) on (\S+)")
PAGE_LINE = re.compile(r"status page on (http://\S+/)")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"status page browser test cannot run on CI: {reason}")
    pytest.skip(reason)


def _meter(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "meter", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"meter {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    return done


def rated(path: Path, month: str) -> dict[str, Any]:
    """What ``meter rate`` says about ``month``: totals and points/workloads per tenant."""
    doc = json.loads(_meter("rate", str(path), "--month", month, "--format", "json").stdout)
    tenants: dict[str, dict[str, int]] = defaultdict(lambda: {"workloads": 0, "points": 0})
    for row in doc["usage"]:
        assert row["month"] == month
        tenants[row["tenant_id"]]["workloads"] += row["workloads"]
        tenants[row["tenant_id"]]["points"] += row["points"]
    return {
        "points": sum(t["points"] for t in tenants.values()),
        "workloads": sum(t["workloads"] for t in tenants.values()),
        "tenants": dict(tenants),
    }


class MeterRun:
    """``meter run`` (embedded broker, worker, status page) as a child process."""

    def __init__(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / "status-page-meter-run.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meter", "run", "--http-port", "0",
             "--session-timeout-ms", "6000"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1"}.items()
                 if k != "METER_BROKER"},
            cwd=ROOT,
        )  # fmt: skip
        self.broker = self._wait_for(BROKER_LINE)
        self.url = self._wait_for(PAGE_LINE)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for(self, pattern: re.Pattern[str], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                pytest.fail(f"meter run exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        pytest.fail(f"meter run never printed {pattern.pattern!r}:\n{self.log()}")

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /healthz says the worker holds its partitions."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        pytest.fail(f"worker not ready within {timeout}s:\n{self.log()}")

    def send(self, path: Path) -> None:
        _meter("send", str(path), "--broker", self.broker)

    def stop(self, timeout: float = 40) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (Debian package: chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"playwright is not installed ({exc}); pip install -e '.[dev]'")
        raise  # unreachable
    with sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        except Exception as exc:  # a broken browser install surfaces as various errors
            _unavailable(f"cannot launch {CHROMIUM}: {exc}")
            raise
        try:
            yield b
        finally:
            b.close()


def read_page(page: Any) -> dict[str, Any]:
    """The figures the page shows: machine-readable attributes and the visible text."""
    return page.evaluate(
        """() => {
          const num = (s) => Number(String(s).replace(/[^0-9-]/g, ""));
          const v = (id) => document.querySelector(`[data-testid="${id}"]`);
          const rows = [...document.querySelectorAll('[data-testid="tenant-row"]')];
          const foot = (id) => v(id) ? num(v(id).dataset.value) : null;
          return {
            month: document.body.dataset.month || null,
            selected: v("month-select").value,
            months: [...v("month-select").options].map((o) => o.value),
            points: num(v("total-points").dataset.value),
            workloads: num(v("total-workloads").dataset.value),
            tenantCount: num(v("total-tenants").dataset.value),
            pointsText: num(v("total-points").textContent),
            workloadsText: num(v("total-workloads").textContent),
            footerPoints: foot("footer-points"),
            footerWorkloads: foot("footer-workloads"),
            order: rows.map((r) => r.dataset.tenant),
            tenants: Object.fromEntries(rows.map((r) => [r.dataset.tenant, {
              points: num(r.dataset.points),
              workloads: num(r.dataset.workloads),
              pointsText: num(r.querySelector('[data-testid="tenant-points"]').textContent),
            }])),
            typeBarPoints: [...document.querySelectorAll('[data-testid="type-bar"]')]
              .reduce((s, li) => s + num(li.dataset.points), 0),
            live: v("live-status").dataset.state,
            error: v("error").textContent,
            errorShown: v("error").offsetParent !== null,
          };
        }"""
    )


def shows(expected: dict[str, Any], month: str) -> Callable[[dict[str, Any]], bool]:
    def check(seen: dict[str, Any]) -> bool:
        return (
            seen["month"] == month
            and seen["points"] == expected["points"]
            and seen["workloads"] == expected["workloads"]
            and {t: v["points"] for t, v in seen["tenants"].items()}
            == {t: v["points"] for t, v in expected["tenants"].items()}
        )

    return check


def wait_until(page: Any, ok: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    seen = read_page(page)
    while not ok(seen):
        if time.monotonic() > deadline:
            pytest.fail(f"page never showed {what}; it shows:\n{json.dumps(seen, indent=1)}")
        page.wait_for_timeout(250)
        seen = read_page(page)
    return seen


def assert_shows_exactly(seen: dict[str, Any], expected: dict[str, Any]) -> None:
    assert seen["points"] == seen["pointsText"] == expected["points"]
    assert seen["workloads"] == seen["workloadsText"] == expected["workloads"]
    assert seen["footerPoints"] == expected["points"]
    assert seen["footerWorkloads"] == expected["workloads"]
    assert seen["typeBarPoints"] == expected["points"]
    assert seen["tenantCount"] == len(expected["tenants"])
    assert {t: (v["workloads"], v["points"]) for t, v in seen["tenants"].items()} == {
        t: (v["workloads"], v["points"]) for t, v in expected["tenants"].items()
    }
    assert all(v["pointsText"] == v["points"] for v in seen["tenants"].values())
    points = [seen["tenants"][t]["points"] for t in seen["order"]]
    assert points == sorted(points, reverse=True), "tenants are not sorted by points"
    assert seen["live"] == "live"
    assert not seen["errorShown"]


def select_month(page: Any, month: str) -> None:
    page.wait_for_selector(f'[data-testid="month-select"] option[value="{month}"]',
                           state="attached", timeout=60_000)  # fmt: skip
    page.select_option('[data-testid="month-select"]', month)


def this_and_next_month() -> tuple[str, str]:
    """Months that are open whenever the test runs (a past month may be closed)."""
    now = datetime.now(UTC)
    y, m = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return f"{now.year:04d}-{now.month:02d}", f"{y:04d}-{m:02d}"


def fleet(path: Path, n: int, seed: int, month: str, tenants: int) -> Path:
    lines = generate(n, seed=seed, month=month, tenants=tenants, workloads=8)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_status_page_shows_what_meter_rate_computes_and_updates_live(
    browser: Any, tmp_path: Path
) -> None:
    this, following = this_and_next_month()
    # The simulated fleet includes duplicates, failed sessions, license changes, bad lines.
    first = tmp_path / "first.jsonl"
    first.write_bytes(
        fleet(tmp_path / "a.jsonl", 300, seed=11, month=this, tenants=6).read_bytes()
        + fleet(tmp_path / "b.jsonl", 120, seed=12, month=following, tenants=3).read_bytes()
    )
    more = fleet(tmp_path / "more.jsonl", 600, seed=13, month=this, tenants=10)
    both = tmp_path / "both.jsonl"
    both.write_bytes(first.read_bytes() + more.read_bytes())
    want_this = rated(first, this)
    want_next = rated(first, following)
    want_after = rated(both, this)
    assert want_after["points"] > want_this["points"]  # the second batch must show
    assert len(want_after["tenants"]) > len(want_this["tenants"])  # with new tenants

    meter = MeterRun()
    try:
        meter.wait_ready()
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.goto(meter.url)
        page.wait_for_selector('[data-testid="live-status"][data-state="live"]', timeout=30_000)

        meter.send(first)
        # Nothing chosen: the page shows the current month, which has usage.
        seen = wait_until(page, shows(want_this, this), f"the {this} totals")
        assert_shows_exactly(seen, want_this)
        # Newest first; generated times with zones may also land in the month before.
        assert seen["months"][:2] == [following, this]

        select_month(page, following)
        seen = wait_until(page, shows(want_next, following), f"the {following} totals")
        assert_shows_exactly(seen, want_next)

        select_month(page, this)
        seen = wait_until(page, shows(want_this, this), f"the {this} totals again")
        assert_shows_exactly(seen, want_this)

        # More events: the open page follows them, no reload.
        page.evaluate("() => { window.__notReloaded = true; }")
        meter.send(more)
        seen = wait_until(page, shows(want_after, this), "the totals after more events")
        assert_shows_exactly(seen, want_after)
        assert seen["selected"] == this
        assert page.evaluate("() => window.__notReloaded === true"), "the page was reloaded"

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("METER_UPDATE_DOCS") == "1":  # refresh the README's screenshot
            shutil.copyfile(shot, ROOT / "docs" / "status-page.png")

        assert meter.stop() == 0, meter.log()

        # The meter is gone: the page says so, and keeps the last figures.
        page.wait_for_selector('[data-testid="live-status"][data-state="error"]', timeout=15_000)
        seen = read_page(page)
        assert seen["errorShown"]
        assert "Cannot read usage" in seen["error"]
        assert seen["points"] == want_after["points"]
        page.screenshot(path=str(ARTIFACTS / "status-page-error.png"), full_page=True)
    finally:
        meter.kill()
