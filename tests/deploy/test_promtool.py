"""deploy/prometheus and deploy/grafana, checked with the real promtool (no server)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from meter.domain.license import over_allowed, over_warning
from tests.deploy import (
    ALERTS,
    DASHBOARD_JSON,
    PROMETHEUS_DIR,
    ROOT,
    current_month,
    dashboard,
    dashboard_queries,
    generator,
    require_binary,
)

PANELS = {
    "Points and workloads per tenant ($month): the top tenants",
    "Points by workload type ($month)",
    "Month-to-date points",
    "Events by outcome",
    "Rejections by reason",
    "Consumer lag",
    "Event-to-total latency",
    "Newest event age",
    "Forwarded share",
    "License",
    "Licensed points",
    "License used points ($month)",
    "Days to license expiry",
    "License used points vs the warning line ($month)",
    "License used points vs the allowance ($month)",
    "New workloads ($month)",
}


def promtool(*args: str, cwd: Path = ROOT) -> str:
    exe = require_binary("promtool")
    proc = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def test_prometheus_config_is_valid_and_finds_its_rules() -> None:
    # run from the repository root: rule_files must resolve relative to the config file
    out = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert "1 rule files found" in out
    assert "SUCCESS" in out


def test_rules_are_valid() -> None:
    out = promtool("check", "rules", str(PROMETHEUS_DIR / "rules.yml"))
    assert re.search(r"SUCCESS: \d+ rules found", out), out


def test_rule_unit_tests_pass() -> None:
    out = promtool("test", "rules", "rules.test.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out


def test_every_alert_fires_and_stays_quiet_in_the_unit_tests() -> None:
    rules = (PROMETHEUS_DIR / "rules.yml").read_text(encoding="utf-8")
    tests = (PROMETHEUS_DIR / "rules.test.yml").read_text(encoding="utf-8")
    assert set(re.findall(r"^\s*- alert: (\w+)$", rules, re.M)) == ALERTS
    # each alert_rule_test case: alertname, then exp_alerts empty ([]) or a list
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", tests)
    fires = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}
    assert fires == ALERTS, f"no firing case for {ALERTS - fires}"
    assert quiet == ALERTS, f"no quiet case for {ALERTS - quiet}"


def test_license_lines_are_the_domain_rules(tmp_path: Path) -> None:
    """The recorded warning and allowance lines agree with meter.domain.license (what
    `meter report` and the status page show) for licenses small and large, at the
    floors and around the 10% and 20% steps."""
    licensed = [0, 1, 9, 50, 99, 100, 101, 105, 109, 199, 200, 205, 209, 1234, 100_000]
    series, warning, allowed = [], [], []
    for n, points in enumerate(licensed):
        job = f"meter-{n}"
        series += [
            {"series": f'meter_license_licensed_points{{job="{job}", instance="w{w}"}}',
             "values": f"{points}x5"}
            for w in (1, 2)
        ] + [
            {"series": f'meter_license_previous_new_points{{job="{job}", instance="w{w}", '
                       'month="2026-11"}', "values": f"{n + w}x5"}
            for w in (1, 2)
        ]  # fmt: skip
        warning.append(
            {"labels": f'meter:license_warning_points{{job="{job}"}}',
             "value": points + over_warning(points)}
        )  # fmt: skip
        allowed.append(
            {"labels": f'meter:license_allowed_points{{job="{job}", month="2026-11"}}',
             "value": points + over_allowed(points) + (n + 1) + (n + 2)}
        )  # fmt: skip
    doc = {
        "rule_files": [str(PROMETHEUS_DIR / "rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": "meter:license_warning_points", "eval_time": "2m",
                     "exp_samples": warning},
                    {"expr": "meter:license_allowed_points", "eval_time": "2m",
                     "exp_samples": allowed},
                ],
            }
        ],
    }  # fmt: skip
    path = tmp_path / "license.test.yml"
    path.write_text(json.dumps(doc), encoding="utf-8")  # JSON is YAML too
    assert "SUCCESS" in promtool("test", "rules", str(path))


def test_dashboard_json_is_what_the_generator_writes() -> None:
    gen = generator()
    assert DASHBOARD_JSON.read_text(encoding="utf-8") == gen.render(), (
        "meter.json is stale: run python deploy/grafana/build_dashboard.py"
    )
    assert gen.main(["--check"]) == 0


def test_dashboard_shape() -> None:
    d = dashboard()
    assert d["uid"] == "meter"
    (month,) = d["templating"]["list"]
    assert month["name"] == "month"
    assert month["query"]["query"] == "label_values(meter_provider_points, month)"
    assert month["sort"] == 2  # descending: the current month is the first, the default
    assert not month["current"]
    titles = {p["title"] for p in d["panels"]}
    assert titles >= PANELS, PANELS - titles
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, p["title"]


def test_license_row_has_a_panel_for_each_license_alert() -> None:
    panels = dashboard()["panels"]
    (start,) = [i for i, p in enumerate(panels) if p["title"] == "License usage (vendor rules)"]
    end = next((i for i, p in enumerate(panels) if i > start and p["type"] == "row"), None)
    row = panels[start + 1 : end]
    license_alerts = {a for a in ALERTS if a.startswith("MeterLicense")}
    shown = {a for p in row for a in license_alerts if a in p["description"]}
    assert shown == license_alerts
    # a provider without a license sees that said, not an empty panel
    by_title = {p["title"]: p for p in row}
    no_value = by_title["Licensed points"]["fieldConfig"]["defaults"]["noValue"]
    assert "No license declared" in no_value
    # the expiry colours change where the alerts do
    steps = by_title["Days to license expiry"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, -60, 0, 30]


def test_license_panels_draw_the_lines_the_alerts_use(tmp_path: Path) -> None:
    """The dashboard computes the lines from the workers' series; on the vendor's
    200-point example (two workers) they are the recorded 220 and 240 + new points."""
    queries = {
        (p["title"], t["legendFormat"]): t["expr"].replace("$month", "2026-11")
        for p in dashboard()["panels"]
        for t in p.get("targets", [])
    }
    warning = queries[("License used points vs the warning line ($month)", "warning line")]
    allowed = queries[("License used points vs the allowance ($month)", "allowance")]
    used = queries[("License used points vs the allowance ($month)", "used")]
    series = [
        {"series": f'meter_license_{name}{{job="meter", instance="w{w}"{labels}}}',
         "values": f"{value}x5"}
        for w, prev_new, used_points in ((1, 6, 120), (2, 4, 101))
        for name, labels, value in (
            ("licensed_points", "", 200),
            ("previous_new_points", ', month="2026-11"', prev_new),
            ("used_points", ', month="2026-11"', used_points),
            ("used_points", ', month="2026-10"', 1000),
        )
    ]  # fmt: skip
    doc = {
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {"expr": q, "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": v}]}
                for q, v in ((warning, 220), (allowed, 250), (used, 221))
            ],
        }],
    }  # fmt: skip
    path = tmp_path / "dashboard.test.yml"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert "SUCCESS" in promtool("test", "rules", str(path))


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool check rules parses every expr; the queries go in as recording rules
    (a JSON document is YAML too)."""
    queries = dashboard_queries(current_month())
    assert len(queries) >= 15
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}", "expr": q}
                          for i, (_, q) in enumerate(queries)],
            }
        ]
    }  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules), encoding="utf-8")
    out = promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(queries)} rules found" in out


def test_compose_wires_prometheus_and_grafana() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"kafka-1", "worker-1", "worker-2", "prometheus", "grafana"} <= set(services)
    for w in ("worker-1", "worker-2"):
        assert services[w]["command"][:3] == ["worker", "--http-host", "0.0.0.0"]
        brokers = services[w]["environment"]["METER_BROKER"].split(",")
        assert brokers == ["kafka-1:9092", "kafka-2:9092", "kafka-3:9092"]
    prom = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "meter"  # the dashboard's up{job="meter"} and the rules
    (static,) = job["static_configs"]
    assert sorted(static["targets"]) == ["worker-1:9464", "worker-2:9464"]
    assert prom["global"]["scrape_interval"] == "5s"
    # every host path mounted into prometheus and grafana exists
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    ds = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text("utf-8")
    )
    (source,) = ds["datasources"]
    assert source["uid"] == "prometheus"  # what every dashboard panel refers to
    assert source["url"] == "http://prometheus:9090"
    boards = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/meter.yml").read_text("utf-8")
    )
    (provider,) = boards["providers"]
    mounted = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert provider["options"]["path"] in mounted
