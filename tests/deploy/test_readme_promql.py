"""The README's PromQL examples parse (promtool), and none sums months together."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.deploy import ROOT
from tests.deploy.test_promtool import promtool


def readme_queries() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```promql\n(.*?)```", readme, re.S)
    return [
        line.split("#", 1)[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.split("#", 1)[0].strip()
    ]


def test_readme_promql_parses_and_is_per_month(tmp_path: Path) -> None:
    queries = readme_queries()
    assert queries
    for q in queries:
        assert "month" in q, f"{q} adds months together"
    rules = {"groups": [{"name": "readme", "rules": [
        {"record": f"readme:query_{i}", "expr": q} for i, q in enumerate(queries)
    ]}]}  # fmt: skip
    path = tmp_path / "readme-rules.yml"
    path.write_text(json.dumps(rules), encoding="utf-8")
    out = promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(queries)} rules found" in out
