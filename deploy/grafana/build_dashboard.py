"""Generate the Grafana dashboard for meter: ``deploy/grafana/dashboards/meter.json``.

    python deploy/grafana/build_dashboard.py          # (re)write the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the committed JSON is stale

Plain Python, no dependencies: the dashboard is data, and the JSON is committed so
Grafana provisions it from files (see ``provisioning/dashboards/meter.yml``).  Edit this
file, not the JSON; a test checks that the JSON is what this script writes.

The license row shows license usage (the vendor's rules: what the provider is billed
on) against the declared license; the usage row shows tenant usage (calendar months).

Queries use two Grafana variables: ``$month`` (the dashboard's month, YYYY-MM, from the
``month`` label of ``meter_provider_points``, newest first, so it defaults to the current month)
and Grafana's ``$__rate_interval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "meter.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
MONTH = 'month="$month"'
RATE = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False) -> Panel:
    t: Panel = {"datasource": DATASOURCE, "refId": ref, "expr": expr, "legendFormat": legend}
    if instant:
        t.update(instant=True, range=False, format="table")
    else:
        t.update(range=True)
    return t


def panel(kind: str, title: str, description: str, targets: list[Panel], **extra: Any) -> Panel:
    p: Panel = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
    }
    p.update(extra)
    return p


def defaults(unit: str = "short", **custom: Any) -> Panel:
    d: Panel = {"unit": unit}
    if custom:
        d["custom"] = custom
    return {"defaults": d, "overrides": []}


def stat(title: str, description: str, expr: str, unit: str = "short", **extra: Any) -> Panel:
    return panel(
        "stat",
        title,
        description,
        [target(expr)],
        fieldConfig=defaults(unit),
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
        **extra,
    )


def timeseries(
    title: str, description: str, targets: list[Panel], unit: str = "short", **extra: Any
) -> Panel:
    fc = extra.pop("fieldConfig", None) or defaults(unit, fillOpacity=10, showPoints="never")
    return panel(
        "timeseries",
        title,
        description,
        targets,
        fieldConfig=fc,
        options={
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        **extra,
    )


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def usage_panels() -> list[Panel]:
    per_tenant = panel(
        "table",
        "Points and workloads per tenant ($month): the top tenants",
        "What each tenant is billed on so far this month: distinct counted workloads and "
        "the points they consume, from the workers' ledgers at scrape time. Only the "
        "--metrics-tenants tenants with the most points on each worker have series (100 by "
        "default); the totals panels sum every tenant (meter_provider_*), and /api/usage "
        "and meter report have every tenant.",
        [
            target(f"sum by (tenant_id) (meter_points{{{MONTH}}})", ref="A", instant=True),
            target(f"sum by (tenant_id) (meter_workloads{{{MONTH}}})", ref="B", instant=True),
        ],
        fieldConfig=defaults("short"),
        options={"showHeader": True, "sortBy": [{"displayName": "Points", "desc": True}]},
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "indexByName": {"tenant_id": 0, "Value #A": 1, "Value #B": 2},
                    "renameByName": {
                        "tenant_id": "Tenant",
                        "Value #A": "Points",
                        "Value #B": "Workloads",
                    },
                },
            },
        ],
    )
    by_type = panel(
        "bargauge",
        "Points by workload type ($month)",
        "Points this month per workload type, all tenants.",
        [
            target(
                f"sum by (workload_type) (meter_provider_points{{{MONTH}}})",
                "{{workload_type}}",
                instant=True,
            )
        ],
        fieldConfig=defaults("short"),
        options={
            "orientation": "horizontal",
            "displayMode": "gradient",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": True},
        },
    )
    trend = timeseries(
        "Month-to-date points",
        "Total points of the month as they accumulate (the panel shows this month so "
        "far). A dip is a worker's series going stale while its partitions move.",
        [
            target(f"sum(meter_provider_points{{{MONTH}}})", "total", "A"),
            target(f"sum by (workload_type) (meter_provider_points{{{MONTH}}})", "{{workload_type}}", "B"),
        ],
        timeFrom="now/M",
    )
    return [
        stat("Points ($month)", "Points of all tenants this month so far.",
             f"sum(meter_provider_points{{{MONTH}}})"),
        stat("Workloads ($month)", "Distinct counted workloads of all tenants this month.",
             f"sum(meter_provider_workloads{{{MONTH}}})"),
        stat("Tenants ($month)", "Tenants with at least one counted workload this month.",
             f"sum(meter_tenants{{{MONTH}}})"),
        stat("Newest event age",
             "Now minus the time field of the newest job event processed. Grows when no "
             "events arrive; negative if a job system's clock runs ahead.",
             "time() - max(meter_newest_event_timestamp_seconds)", "s"),
        per_tenant,
        by_type,
        trend,
    ]  # fmt: skip


def pipeline_panels() -> list[Panel]:
    latency = timeseries(
        "Event-to-total latency",
        "From a job event's arrival in Kafka to the usage record including it being "
        "acknowledged, per published usage record. Target: p99 under 1 s.",
        [
            target(
                "histogram_quantile(0.5, sum by (le) "
                f"(rate(meter_event_to_total_latency_seconds_bucket[{RATE}])))",
                "p50",
                "A",
            ),
            target(
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(meter_event_to_total_latency_seconds_bucket[{RATE}])))",
                "p99",
                "B",
            ),
        ],
        fieldConfig={
            "defaults": {
                "unit": "s",
                "custom": {
                    "fillOpacity": 10,
                    "showPoints": "never",
                    "thresholdsStyle": {"mode": "line"},
                },
                "thresholds": {
                    "mode": "absolute",
                    "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}],
                },
            },
            "overrides": [],
        },
    )
    return [
        timeseries(
            "Events by outcome",
            "Input messages per second by outcome: counted, duplicate, not_counted (failed "
            "session), rejected.",
            [target(f"sum by (outcome) (rate(meter_events_total[{RATE}]))", "{{outcome}}")],
            "ops",
        ),
        timeseries(
            "Rejections by reason",
            "Rejected messages per second by reason; each is on the rejected topic with its "
            "original bytes and a meter.reason header.",
            [target(f"sum by (reason) (rate(meter_events_rejected_total[{RATE}]))", "{{reason}}")],
            "ops",
        ),
        timeseries(
            "Consumer lag",
            "Messages not yet processed per input partition (Fetch high watermark minus "
            "position), as reported by the worker that owns the partition.",
            [
                target(
                    "sum by (topic, partition) (meter_consumer_lag_messages)",
                    "{{topic}}/{{partition}}",
                )
            ],
        ),
        latency,
        timeseries(
            "Newest event age",
            "Now minus the time field of the newest job event processed.",
            [target("time() - max(meter_newest_event_timestamp_seconds)", "age")],
            "s",
        ),
        timeseries(
            "Forwarded, changelog, published",
            "Events re-keyed to their tenant's home partition, ledger changes written to the "
            "changelog and usage records published, per second.",
            [
                target(f"sum(rate(meter_events_forwarded_total[{RATE}]))", "forwarded", "A"),
                target(f"sum(rate(meter_changelog_records_total[{RATE}]))", "changelog", "B"),
                target(f"sum(rate(meter_usage_records_published_total[{RATE}]))", "published", "C"),
            ],
            "ops",
        ),
        forwarded_share(),
    ]


def forwarded_share() -> Panel:
    """Of the events applied to a ledger, the share that took a second write."""
    fc = defaults("percentunit", fillOpacity=10, showPoints="never")
    fc["defaults"].update(min=0, max=1)
    applied = 'meter_events_total{outcome=~"counted|duplicate"}'
    return timeseries(
        "Forwarded share",
        "Of the events applied to a ledger, the share that arrived on another partition "
        "than their tenant's home (murmur2 of tenant_id, Java's default) and was forwarded "
        "to meter.jobs.by-tenant: exact, but a second write. Near 0 when producers key by "
        "tenant_id with a murmur2 partitioner; librdkafka's default (consistent_random) "
        "sends most events elsewhere (measured: 67%): set partitioner=murmur2_random. "
        "See the README, Producer settings that land events home.",
        [
            target(
                f"sum(rate(meter_events_forwarded_total[{RATE}])) / "
                f"clamp_min(sum(rate({applied}[{RATE}])), 1e-9)",
                "forwarded share",
            )
        ],
        fieldConfig=fc,
    )


def worker_panels() -> list[Panel]:
    return [
        timeseries(
            "Home partitions per worker",
            "Home partitions (tenant ledgers) each worker owns; they move on rebalances.",
            [target("sum by (instance) (meter_home_partitions)", "{{instance}}")],
        ),
        timeseries(
            "Rebalances and recovery",
            "Consumer group rebalances seen, and ledger entries replayed from the changelog "
            "when a worker took a home partition.",
            [
                target(
                    f"sum by (instance) (increase(meter_rebalances_total[{RATE}]))",
                    "rebalances {{instance}}",
                    "A",
                ),
                target(
                    f"sum by (instance) (increase(meter_ledger_entries_recovered_total[{RATE}]))",
                    "recovered {{instance}}",
                    "B",
                ),
            ],
        ),
        timeseries(
            "Worker problems",
            "1 while a worker has the problem: halted (broker lost data, or a write that can "
            "never succeed), fenced (ownership in doubt: paused past the session timeout), "
            "recovering, connecting (broker unreachable or login refused); and messages that "
            "raised inside meter (internal errors, dead-lettered). /healthz says why.",
            [
                target(
                    "max by (instance, problem) (meter_problem)",
                    "{{problem}} {{instance}}",
                    "A",
                ),
                target(
                    f"sum by (instance) (increase(meter_internal_errors_total[{RATE}]))",
                    "internal errors {{instance}}",
                    "B",
                ),
            ],
        ),
        panel(
            "table",
            "Workers",
            "Each scraped worker: up (1) or not, and its meter and Python versions.",
            [
                target('up{job="meter"}', ref="A", instant=True),
                target("meter_build_info", ref="B", instant=True),
            ],
            fieldConfig=defaults("short"),
            options={"showHeader": True},
            transformations=[
                {"id": "merge", "options": {}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "__name__": True, "Value #B": True},
                        "renameByName": {"Value #A": "up"},
                    },
                },
            ],
        ),
    ]


#: The license lines, as deploy/prometheus/rules.yml records them (meter-license group)
#: but from the workers' own series, so the panels need no rules loaded.
LICENSED = "max(meter_license_licensed_points)"
USED = f"sum(meter_license_used_points{{{MONTH}}})"
WARNING_LINE = f"{LICENSED} + clamp_min(floor({LICENSED} / 10), 10)"
ALLOWED_LINE = (
    f"{LICENSED} + clamp_min(floor({LICENSED} / 5), 20)"
    f" + sum(meter_license_previous_new_points{{{MONTH}}})"
)
NO_LICENSE = "No license declared (--license FILE)"


def license_stat(title: str, description: str, expr: str, no_value: str, **field: Any) -> Panel:
    p = stat(title, description, expr)
    p["fieldConfig"]["defaults"].update(noValue=no_value, **field)
    p["options"]["graphMode"] = "none"
    return p


def lines(*steps: tuple[str, float | None]) -> Panel:
    """Grafana thresholds: from each value up, its colour (the first from below)."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def dashed(name: str, color: str | None = None) -> Panel:
    """An override drawing the series ``name`` as a dashed line: a limit, not a measure."""
    props: list[Panel] = [
        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
        {"id": "custom.fillOpacity", "value": 0},
    ]
    if color:
        props.append({"id": "color", "value": {"mode": "fixed", "fixedColor": color}})
    return {"matcher": {"id": "byName", "options": name}, "properties": props}


def with_limits(*overrides: Panel) -> Panel:
    fc = defaults("short", fillOpacity=10, showPoints="never")
    fc["overrides"] = list(overrides)
    return fc


def license_panels() -> list[Panel]:
    """License usage (vendor rules): what the vendor bills, against the declared license.
    One panel per license alert: the warning line, the allowance, the expiry."""
    declared = license_stat(
        "License",
        "Whether the provider declared its license (--license FILE with licensed_points "
        "and expires). Without one meter meters and reports as usual, and the license "
        "panels and alerts have nothing to compare with.",
        "max(meter_license_declared)",
        "No data",
        color={"mode": "thresholds"},
        thresholds=lines(("text", None)),
    )
    declared["fieldConfig"]["defaults"]["mappings"] = [
        {
            "type": "value",
            "options": {
                "0": {"text": "Not declared", "color": "text", "index": 0},
                "1": {"text": "Declared", "color": "green", "index": 1},
            },
        }
    ]
    return [
        declared,
        license_stat(
            "Licensed points",
            "Points the provider licensed from the vendor, as declared in the license file.",
            LICENSED,
            NO_LICENSE,
        ),
        license_stat(
            "License used points ($month)",
            "Points the vendor bills for the month by its own rules: workloads with a "
            "restore point in the 31 days before the month's end, each at its highest rate, "
            "new workloads excluded (free in their first month). Not the tenant usage above, "
            "which counts calendar months.",
            USED,
            "No license usage",
        ),
        license_stat(
            "Days to license expiry",
            "Days from today (UTC) to the license's last valid day; negative after it. "
            "Yellow: under 30 days (MeterLicenseExpiring); orange: expired, in the vendor's "
            "60-day grace period (MeterLicenseGracePeriod); red: past the grace period, "
            "workloads are no longer processed (MeterLicenseExpired).",
            "min(meter_license_expiry_days)",
            "No expiry declared",
            unit="suffix: days",
            color={"mode": "thresholds"},
            thresholds=lines(("red", None), ("orange", -60), ("yellow", 0), ("green", 30)),
        ),
        timeseries(
            "License used points vs the warning line ($month)",
            "Used points (vendor rules, new workloads excluded, summed over workers) against "
            "the licensed points and the vendor's warning line, licensed + max(10, 10%). "
            "MeterLicenseOverWarning fires after 15 minutes above the line.",
            [
                target(USED, "used", "A"),
                target(LICENSED, "licensed", "B"),
                target(WARNING_LINE, "warning line", "C"),
            ],
            fieldConfig=with_limits(dashed("licensed"), dashed("warning line", "orange")),
            timeFrom="now/M",
        ),
        timeseries(
            "License used points vs the allowance ($month)",
            "Used points against the allowance: licensed + max(20, 20%) + the new points of "
            "the month before. Past it the vendor no longer processes the workloads above "
            "it; MeterLicenseOverAllowance fires after 15 minutes above the line.",
            [
                target(USED, "used", "A"),
                target(ALLOWED_LINE, "allowance", "B"),
                target(
                    f"sum(meter_license_previous_new_points{{{MONTH}}})",
                    "new points of the month before",
                    "C",
                ),
            ],
            fieldConfig=with_limits(dashed("allowance", "red")),
            timeFrom="now/M",
        ),
        timeseries(
            "New workloads ($month)",
            "Workloads processed for the first time this month and the points they would "
            "consume: free this month; next month they are ordinary workloads, and these "
            "points raise that month's allowance. Beside them, all protected workloads.",
            [
                target(f"sum(meter_license_new_points{{{MONTH}}})", "new points", "A"),
                target(f"sum(meter_license_new_workloads{{{MONTH}}})", "new workloads", "B"),
                target(f"sum(meter_license_workloads{{{MONTH}}})", "protected workloads", "C"),
            ],
            timeFrom="now/M",
        ),
    ]


def layout(sections: list[tuple[str, list[Panel], list[tuple[int, int]]]]) -> list[Panel]:
    """Place panels left to right in a 24-column grid; sizes are (width, height)."""
    out: list[Panel] = []
    y = 0
    pid = 1
    for title, panels, sizes in sections:
        r = row(title)
        r.update(id=pid, gridPos={"h": 1, "w": 24, "x": 0, "y": y})
        out.append(r)
        pid += 1
        y += 1
        x = 0
        line_h = 0
        for p, (w, h) in zip(panels, sizes, strict=True):
            if x + w > 24:
                x, y, line_h = 0, y + line_h, 0
            p["id"] = pid
            p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
            out.append(p)
            pid += 1
            x += w
            line_h = max(line_h, h)
        y += line_h
    return out


def build() -> dict[str, Any]:
    month = {
        "type": "query",
        "name": "month",
        "label": "Month",
        "description": "UTC month (YYYY-MM); workers export the current and previous month.",
        "datasource": DATASOURCE,
        "definition": "label_values(meter_provider_points, month)",
        "query": {"query": "label_values(meter_provider_points, month)", "refId": "month"},
        "refresh": 2,  # on time range change
        "sort": 2,  # alphabetical, descending: the current month first
        "current": {},  # none saved: Grafana selects the first, the current month
        "includeAll": False,
        "multi": False,
        "hide": 0,
    }
    panels = layout(
        [
            ("Usage", usage_panels(), [(6, 4)] * 4 + [(12, 10), (12, 10), (24, 8)]),
            ("License usage (vendor rules)", license_panels(), [(6, 4)] * 4 + [(8, 8)] * 3),
            ("Pipeline", pipeline_panels(), [(12, 8)] * 4 + [(8, 8)] * 3),
            ("Workers", worker_panels(), [(6, 8)] * 4),
        ]
    )
    return {
        "uid": "meter",
        "title": "meter",
        "description": "Usage per tenant and month, license usage against the provider's "
        "license, and the health of the meter workers.",
        "tags": ["meter", "kafka", "billing"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [month]},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expr) of every query in a dashboard."""
    return [
        (p["title"], t["expr"])
        for p in dashboard["panels"]
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
