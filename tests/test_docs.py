"""The README's examples run: what it shows is what meter does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson
from jsonschema import Draft202012Validator, FormatChecker

from meter.cli import build_parser
from meter.domain import Event, Ledger, load_ratecards, parse, parse_ratecards
from meter.stream.acls import ROLES, role_acls
from meter.stream.config import Topics

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def json_blocks() -> list[str]:
    return [body for lang, body in BLOCKS if lang == "json"]


def test_the_event_example_meets_the_contract() -> None:
    [example] = [b for b in json_blocks() if '"specversion"' in b]
    assert isinstance(parse(example.encode()), Event)


def test_the_rate_card_example_loads() -> None:
    [example] = [b for b in json_blocks() if '"effective"' in b]
    doc = orjson.loads(example)
    doc["ratecards"] = [
        c for c in doc["ratecards"] if "..." not in orjson.dumps(c["rates"]).decode()
    ]
    cards = parse_ratecards(doc, "README")
    assert cards.versions == ("vcsp-2026",)
    assert cards.cards[0].points("vm", "rental") == 0
    assert cards.cards[0].points("replica", "rental") == 10


def test_the_rate_json_example_is_real_output() -> None:
    [example] = [b for b in json_blocks() if '"rejected_not_listed"' in b]
    out = subprocess.run(
        [sys.executable, "-m", "meter", "rate", "examples/readme.jsonl", "--format", "json"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    doc = orjson.loads(out.stdout)
    # The license view rides along; its generated_at and status move with the clock, so the
    # README shows the tenant usage document, and this checks the license key is there.
    assert doc.pop("license_usage")["view"] == "license"
    assert doc == orjson.loads(example)


def test_the_usage_record_example_follows_its_schema() -> None:
    [example] = [b for b in json_blocks() if '"revision"' in b]
    schema = orjson.loads((ROOT / "schemas" / "usage-record.v1.schema.json").read_bytes())
    record = orjson.loads(example)
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(record)
    # The revision is what the built-in card's heights give for that content (subscription).
    cards = load_ratecards()
    ledger = Ledger(cards.height)
    for wtype, u in record["usage"].items():
        for n in range(u["workloads"]):
            points = u["points"] // u["workloads"]
            ledger.add("acme", "2026-11", wtype, f"w{n}", (points, "vcsp-2026", "subscription"))
    tm = ledger.tenant_month("acme", "2026-11")
    assert tm is not None
    assert record["revision"] == tm.revision


def test_every_command_the_readme_shows_exists() -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    shown = set(
        re.findall(r"^\s*meter (\w+)", "\n".join(b for lang, b in BLOCKS if lang == "sh"), re.M)
    )
    shown |= set(re.findall(r"`meter (\w+)", README))
    assert shown, "no commands found in the README"
    assert shown <= commands, shown - commands


def test_no_section_appears_twice() -> None:
    headers = re.findall(r"^#+ .*$", README, re.M)
    assert len(headers) == len(set(headers)), [h for h in headers if headers.count(h) > 1]


def test_the_acl_table_is_what_meter_needs() -> None:
    """The README's "Access control" table lists exactly :mod:`meter.stream.acls`."""
    section = README.split("#### Access control", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (\w+) \| (topic|group) `([^`]+)` \| ([^|]+) \|$", section, re.M)
    shown = {
        (role, resource, name, op.strip().rstrip("¹²³⁴"))
        for role, resource, name, ops in rows
        for op in ops.split(",")
    }
    topics = Topics.derived()
    wanted = {
        (role, a.resource, a.name, a.operation) for role in ROLES for a in role_acls(role, topics)
    }
    assert shown == wanted, (shown - wanted, wanted - shown)
