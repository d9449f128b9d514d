"""The status page in a real headless browser, against ``meter run`` as a user starts it:
with the embedded broker it starts, and with ``--broker`` on an Apache Kafka node of the
test's own (``meter run`` uses the default topics and group).

Debian's chromium (``/usr/bin/chromium``) driven by Playwright (its own browser download
is not used).  The page must show exactly what ``meter rate`` computes over the same
events, for the month chosen in its selector, and follow new events without a reload.
Missing browser or Playwright: skipped, except on CI (``CI=true``) where that fails.

The page also works on a phone (no sideways scrolling at 420 and 360 px), says whether a
month is running or final, in UTC, and shows the license gauge when the API has one: those
are checked against an in-process server with a usage view filled by hand.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meter.kafka import KafkaSettings
from meter.observe.http import build_app, serve
from meter.observe.usage_view import UsageView
from meter.sim.fleet import generate
from tests.integration.conftest import BrokerHandle
from tests.integration.harness import TEST_NOW, own_broker, pinned_clock
from tests.integration.kafka import KafkaBroker

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]

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
UTC_TIME = re.compile(r"\b\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC\b")
PHONES = (420, 360)


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
    rate = ["rate", str(path), "--month", month, "--format", "json", *pinned_clock([]), *ANY_TIME]
    doc = json.loads(_meter(*rate).stdout)
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
    """``meter run`` (embedded broker, worker, status page) as a child process; with
    ``broker``, ``meter run --broker BROKER`` (no embedded broker)."""

    def __init__(self, broker: str | None = None) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        # Its own log: the two brokers' runs may go at once (pytest-xdist).
        self.log_path = ARTIFACTS / f"status-page-meter-run-{os.urandom(4).hex()}.log"
        self._log = self.log_path.open("wb")
        given = ["--broker", broker] if broker else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meter", "run", "--http-port", "0", *given,
             "--session-timeout-ms", "6000", *pinned_clock([]), *ANY_TIME],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1"}.items()
                 if k != "METER_BROKER"},
            cwd=ROOT,
        )  # fmt: skip
        self.broker = broker or self._wait_for(BROKER_LINE)
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


def layout(page: Any) -> dict[str, Any]:
    """Widths, and the text a person sees (``innerText`` skips what is hidden)."""
    return page.evaluate(
        """() => ({
          scrollWidth: document.documentElement.scrollWidth,
          innerWidth: window.innerWidth,
          text: document.body.innerText,
          status: document.querySelector('[data-testid="month-status"]').dataset.status,
          label: document.querySelector('[data-testid="status-label"]').innerText,
        })"""
    )


def assert_fits(page: Any, width: int) -> dict[str, Any]:
    page.set_viewport_size({"width": width, "height": 800})
    page.wait_for_timeout(100)
    seen = layout(page)
    assert seen["innerWidth"] == width
    assert seen["scrollWidth"] <= seen["innerWidth"], f"the page scrolls sideways at {width} px"
    return seen


def select_month(page: Any, month: str) -> None:
    page.wait_for_selector(f'[data-testid="month-select"] option[value="{month}"]',
                           state="attached", timeout=60_000)  # fmt: skip
    page.select_option('[data-testid="month-select"]', month)


#: The page shows the pinned month and the one after it, and that one's events may be ahead
#: of the records' timestamps and of the pinned clock: this test is not about that rule.
ANY_TIME = ("--clock-skew", "off")


def this_and_next_month() -> tuple[str, str]:
    """Months that are open at the meter's pinned time (a past month may be closed)."""
    now = datetime.fromisoformat(TEST_NOW)
    y, m = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return f"{now.year:04d}-{now.month:02d}", f"{y:04d}-{m:02d}"


def fleet(path: Path, n: int, seed: int, month: str, tenants: int) -> Path:
    lines = generate(n, seed=seed, month=month, tenants=tenants, workloads=8)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.fixture
def kafka_of_its_own(broker: BrokerHandle, unique: str) -> Iterator[KafkaBroker | None]:
    """An Apache Kafka node for ``meter run --broker`` when ``broker`` is Kafka; else None
    (``meter run`` starts the embedded broker).  Request it before ``browser``: Playwright
    runs an event loop in this thread, and the broker's ready probe is ``asyncio.run``."""
    if not isinstance(broker, KafkaBroker):
        yield None
        return
    with own_broker(broker, unique) as kafka:
        assert isinstance(kafka, KafkaBroker)
        yield kafka


def test_status_page_shows_what_meter_rate_computes_and_updates_live(
    kafka_of_its_own: KafkaBroker | None, browser: Any, tmp_path: Path
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

    kafka = kafka_of_its_own
    meter = MeterRun(kafka.bootstrap if kafka else None)
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

        # An open month says so, and every time on the page says UTC.
        seen_layout = layout(page)
        assert seen_layout["status"] == "running"
        assert seen_layout["label"] == "Running (not final)"
        assert UTC_TIME.search(seen_layout["text"]), seen_layout["text"]
        assert "Live" not in seen_layout["text"]
        assert "billable this month" not in seen_layout["text"]

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("METER_UPDATE_DOCS") == "1":  # refresh the README's screenshot
            shutil.copyfile(shot, ROOT / "docs" / "status-page.png")

        # On a phone: no sideways scrolling, the label and a UTC time still in view.
        for width in PHONES:
            narrow = assert_fits(page, width)
            assert "Running (not final)" in narrow["text"]
            assert UTC_TIME.search(narrow["text"])
            page.screenshot(path=str(ARTIFACTS / f"status-page-{width}.png"), full_page=True)
        page.set_viewport_size({"width": 1360, "height": 900})

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


# ------------------------------------------------------------ a view filled by hand

CLOSED_AT = "2026-12-03T00:00:00Z"
LICENSE = {
    "declared": True, "licensed_points": 500, "expires": "2027-06-30", "days_to_expiry": 214,
    "month": "2026-11", "used_points": 430, "new_points": 12, "previous_new_points": 8,
    "warning_points": 550, "allowed_points": 608, "state": "ok",
    "trend": [["2026-11-01", 200], ["2026-11-15", 380], ["2026-11-30", 430]],
}  # fmt: skip
UNDECLARED = {
    "declared": False, "licensed_points": None, "expires": None, "days_to_expiry": None,
    "month": "2026-12", "used_points": 40, "new_points": 3, "previous_new_points": 12,
    "warning_points": None, "allowed_points": None, "state": "undeclared",
}  # fmt: skip


def usage_record(tenant: str, month: str, usage: dict[str, tuple[int, int]]) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "month": month,
        "revision": 1,
        "usage": {t: {"workloads": w, "points": p} for t, (w, p) in usage.items()},
    }


def filled_view() -> UsageView:
    """November 2026 closed, with two late events after; December 2026 open."""
    view = UsageView(KafkaSettings(bootstrap="127.0.0.1:1"), "meter.usage")
    for r in [
        usage_record("acme", "2026-11", {"vm": (3, 15), "replica": (1, 10)}),
        usage_record("globex", "2026-11", {"server": (2, 7)}),
    ]:
        view.records[f"{r['tenant_id']}/2026-11"] = {**r, "final": True, "closed_at": CLOSED_AT}
    view.records["initech/2026-12"] = usage_record("initech", "2026-12", {"vm": (4, 20)})
    for wid, wtype, points in [("vm-9", "vm", 5), ("r-2", "replica", 10)]:
        view.corrections[f"acme/2026-11/{wtype}/{wid}"] = {
            "tenant_id": "acme", "month": "2026-11", "workload_type": wtype,
            "workload_id": wid, "workloads_added": 1, "points_added": points,
            "ratecard": "vcsp-2026", "event_id": f"late-{wid}", "reason": "late",
            "corrected_at": "2026-12-05T10:00:00Z",
        }  # fmt: skip
    view.version = 1
    return view


@pytest.fixture
def served() -> Iterator[Callable[[UsageView], str]]:
    """Serve a view in-process (its own event loop in a thread); returns the page's URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners = []

    def start(view: UsageView) -> str:
        app = build_app(CollectorRegistry(), view)
        fut = asyncio.run_coroutine_threadsafe(serve(app, "127.0.0.1", 0), loop)
        runner, port = fut.result(timeout=10)
        runners.append(runner)
        return f"http://127.0.0.1:{port}/"

    try:
        yield start
    finally:
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def read_license(page: Any) -> dict[str, Any]:
    return page.evaluate(
        """() => {
          const q = (id) => document.querySelector(`[data-testid="${id}"]`);
          const sec = q("license");
          const left = (id) => q(id) && !q(id).hidden ? parseFloat(q(id).style.left) : null;
          const val = (id) => q(id) ? q(id).querySelector("dd").dataset.value : null;
          return {
            shown: !!sec && !sec.hidden && sec.offsetParent !== null,
            title: sec ? sec.querySelector("h2").innerText.replace(/\\s+/g, " ") : null,
            state: sec ? sec.dataset.state : null,
            stateText: q("license-state") ? q("license-state").innerText : null,
            gaugeShown: !!q("license-gauge") && q("license-gauge").offsetParent !== null,
            fill: parseFloat(document.getElementById("l-fill").style.width),
            marks: {licensed: left("license-mark-licensed"), warning: left("license-mark-warning"),
                    allowed: left("license-mark-allowed")},
            values: {used: val("license-used"), licensed: val("license-licensed"),
                     warning: val("license-warning"), allowed: val("license-allowed"),
                     days: val("license-expiry")},
            text: sec ? sec.innerText : "",
          };
        }"""
    )


def corrected_points(page: Any) -> dict[str, tuple[str, str]]:
    """Tenant (``""``: the total row) -> (final points, corrected points) in the table."""
    rows = page.evaluate(
        """() => [...document.querySelectorAll('[data-testid="tenant-row"]')].map((r) => [
              r.dataset.tenant, r.querySelector('[data-testid="tenant-points"]').innerText,
              r.querySelector('[data-testid="tenant-corrected-points"]').dataset.value])
            .concat([["", document.querySelector('[data-testid="footer-points"]').dataset.value,
              document.querySelector('[data-testid="footer-corrected-points"]').dataset.value]])"""
    )
    return {t: (final, fixed) for t, final, fixed in rows}


def read_trend(page: Any) -> dict[str, Any]:
    return page.evaluate(
        """() => { const f = document.querySelector('[data-testid="license-trend"]');
                   return {shown: !f.hidden && f.offsetParent !== null, ...f.dataset,
                           caption: f.querySelector("figcaption").innerText,
                           limits: [...f.querySelectorAll("line")].map(
                             (l) => l.dataset.testid.replace("trend-", ""))}; }"""
    )


def first_screen(page: Any) -> dict[str, bool]:
    """Whether each part of the license panel is wholly in the first screen (no scroll)."""
    page.evaluate("() => window.scrollTo(0, 0)")
    return page.evaluate(
        """() => Object.fromEntries([["state", "license-state"], ["gauge", "license-gauge"],
              ["trend", "license-trend"]].map(([k, id]) => {
                const r = document.querySelector(`[data-testid="${id}"]`).getBoundingClientRect();
                return [k, r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight];
              }))"""
    )


def open_month(page: Any, url: str, month: str) -> None:
    page.goto(f"{url}?month={month}")
    page.wait_for_function(
        f"() => document.body.dataset.month === {json.dumps(month)}", timeout=15_000
    )


def test_status_page_shows_final_months_corrections_license_and_fits_a_phone(
    browser: Any, served: Callable[[UsageView], str]
) -> None:
    view = filled_view()
    view.license_doc = {"2026-11": LICENSE, "2026-12": UNDECLARED}.get
    url = served(view)
    page = browser.new_page(viewport={"width": 1360, "height": 900})

    # A closed month with late events after: final, its close time in UTC, its corrections.
    open_month(page, url, "2026-11")
    seen = layout(page)
    assert seen["status"] == "final+corrections"
    assert seen["label"] == "Final \u2014 closed 2026-12-03 00:00:00 UTC"
    assert "Running" not in seen["text"]
    assert "billable this month" not in seen["text"]
    assert "Tenant usage (calendar month)" in seen["text"]
    fixes = page.evaluate(
        """() => { const c = document.querySelector('[data-testid="corrections"]');
                   return {shown: !c.hidden, text: c.innerText, ...c.dataset}; }"""
    )
    assert fixes["shown"]
    assert fixes["count"] == "2"
    assert (fixes["workloads"], fixes["points"]) == ("8", "47")
    assert "2 corrections after the close" in fixes["text"]
    assert "8 workloads, 47 points" in fixes["text"]
    # The figures above are the month as closed; each tenant's corrected value beside it.
    assert read_page(page)["points"] == 32
    assert corrected_points(page) == {"acme": ("25", "40"), "globex": ("7", "7"), "": ("32", "47")}

    lic = read_license(page)
    assert lic["shown"]
    assert lic["title"] == "License usage (vendor rules: 31-day window, new workloads free)"
    assert lic["state"] == "ok"
    assert lic["stateText"].startswith("OK")
    assert lic["gaugeShown"]
    assert lic["values"] == {
        "used": "430", "licensed": "500", "warning": "550", "allowed": "608", "days": "214"
    }  # fmt: skip
    for number in ("430 points", "500 points", "550 points", "608 points", "214 days to expiry"):
        assert number in lic["text"], number
    # Used, then the license, then the warning line, then the allowance, on one scale.
    marks = lic["marks"]
    assert 0 < lic["fill"] < marks["licensed"] < marks["warning"] < marks["allowed"] < 100
    assert lic["fill"] / marks["licensed"] == pytest.approx(430 / 500, rel=0.01)
    assert marks["allowed"] / marks["licensed"] == pytest.approx(608 / 500, rel=0.01)
    # The trend: used points per day against the allowance.
    trend = read_trend(page)
    assert trend["shown"]
    assert (trend["days"], trend["last"]) == ("3", "430")
    assert "430 on 2026-11-30 (+50 points since 2026-11-15)" in trend["caption"]
    assert "+8 points/day on average" in trend["caption"]  # (430 - 200) / 29 days
    assert "the allowance (608) in about 23 days" in trend["caption"]
    assert trend["limits"] == ["licensed", "warning", "allowed"]
    ARTIFACTS.mkdir(exist_ok=True)
    # The license state is in the first screen, on a desktop and on a phone.
    page.set_viewport_size({"width": 1280, "height": 900})
    assert first_screen(page) == {"state": True, "gauge": True, "trend": True}
    page.screenshot(path=str(ARTIFACTS / "status-page-final.png"), full_page=True)

    for width in PHONES:
        narrow = assert_fits(page, width)
        assert "Final \u2014 closed 2026-12-03 00:00:00 UTC" in narrow["text"]
        assert read_license(page)["gaugeShown"]
        seen = first_screen(page)
        assert (seen["state"], seen["gauge"]) == (True, True), width
        # The usage table may scroll, inside its own panel only.
        assert page.evaluate(
            """() => { const t = document.querySelector('.table-scroll');
                       return t.getBoundingClientRect().right <= window.innerWidth; }"""
        )
        page.screenshot(path=str(ARTIFACTS / f"status-page-final-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1360, "height": 900})

    # An open month: running; no license declared: said so, no gauge.
    open_month(page, url, "2026-12")
    seen = layout(page)
    assert (seen["status"], seen["label"]) == ("running", "Running (not final)")
    assert page.locator('[data-testid="corrections"]').is_hidden()
    lic = read_license(page)
    assert lic["shown"]
    assert lic["state"] == "undeclared"
    assert lic["stateText"] == "No license declared (set --license FILE)"
    assert not lic["gaugeShown"]
    assert not read_trend(page)["shown"]
    assert page.locator('[data-testid="tenant-corrected-points"]').count() == 0
    assert "40 points" in lic["text"]

    # No license key in the API document: no license section, the rest as before.
    view.license_doc = None
    view.version += 1
    page.wait_for_function(
        """() => document.querySelector('[data-testid="license"]').hidden""", timeout=15_000
    )
    assert read_page(page)["points"] == 20
    assert layout(page)["label"] == "Running (not final)"


def test_status_page_says_what_is_wrong_with_a_bad_month(
    browser: Any, served: Callable[[UsageView], str]
) -> None:
    page = browser.new_page(viewport={"width": 420, "height": 800})
    page.goto(served(filled_view()) + "?month=2026-13")
    page.wait_for_selector('[data-testid="live-status"][data-state="error"]', timeout=15_000)
    error = read_page(page)["error"]
    assert "HTTP 400" in error
    assert "'2026-13'" in error
    assert "YYYY-MM" in error
    assert layout(page)["scrollWidth"] <= 420


def test_many_tenants_the_page_shows_the_top_ones_and_totals_every_tenant(
    browser: Any, served: Callable[[UsageView], str], tmp_path: Path
) -> None:
    """450 tenants: the table holds the 200 with the most points, the totals and the CSV
    download every tenant (the page never pulls every row each second)."""
    view = UsageView(KafkaSettings(bootstrap="127.0.0.1:1"), "meter.usage")
    for i in range(450):
        r = usage_record(f"t{i:04d}", "2026-12", {"vm": (1 + i % 4, 5 * (1 + i % 4))})
        view.records[f"t{i:04d}/2026-12"] = r
    view.version = 1
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    open_month(page, served(view), "2026-12")
    seen = read_page(page)
    total = sum(5 * (1 + i % 4) for i in range(450))
    assert seen["points"] == total
    rows = page.evaluate(
        """() => [...document.querySelectorAll('[data-testid="tenant-row"]')].map(
              (r) => Number(r.dataset.points))"""
    )
    assert len(rows) == 200
    assert rows == sorted((5 * (1 + i % 4) for i in range(450)), reverse=True)[:200]
    text = layout(page)["text"]
    assert "the 200 tenants with the most points, of 450" in text
    assert "All 450 tenants" in text
    assert (
        page.evaluate(
            """() => document.querySelector('[data-testid="total-tenants"]').dataset.value"""
        )
        == "450"
    )
    with page.expect_download() as got:
        page.click('[data-testid="download-csv"]')
    path = tmp_path / "usage.csv"
    got.value.save_as(path)
    lines = path.read_text().splitlines()
    assert lines[0] == "month,tenant_id,workload_type,workloads,points"
    assert len(lines) == 451
    assert sum(int(x.rsplit(",", 1)[1]) for x in lines[1:]) == total
