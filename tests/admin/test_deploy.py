"""The Grafana dashboard reads every metric of README.md "Metrics" (and only
metrics the hub exports), every query parsed as PromQL (promql-parser); the Vector
snippet is valid TOML shipping to Elasticsearch."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import promql_parser

from tests.admin.test_metrics import EXPECTED

ROOT = Path(__file__).resolve().parents[2]


def exprs(panels: list[dict[str, Any]]) -> list[str]:
    out = []
    for p in panels:
        out += [t["expr"] for t in p.get("targets", [])]
        out += exprs(p.get("panels", []))
    return out


# Grafana's variables, as a query would see them once substituted.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The metric selectors of a dashboard query: (name, {label: value})."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name or "", {m.name: m.value for m in node.matchers.matchers}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_dashboard_reads_every_metric() -> None:
    dash = json.loads((ROOT / "deploy/grafana/openred-hub.json").read_text())
    found = [s for e in exprs(dash["panels"]) for s in selectors(e)]
    names = {name for name, _ in found}
    for name, (mtype, _) in EXPECTED.items():
        suffix = {"counter": "_total", "histogram": "_bucket", "gauge": ""}[mtype]
        assert name + suffix in names, f"{name}{suffix} not on the dashboard"
    # Metrics that every scraped process exports (process_*, python_*) are read for the
    # hubs only: with the Instance variable at "All", Prometheus' own would show too.
    for name, matchers in found:
        if not name.startswith("openred_hub_"):
            assert matchers.get("job") == "openred-hub", (name, matchers)
    used = {name for name in names if name.startswith("openred_hub_")}
    exported = set()
    for name in EXPECTED:
        exported |= {name, name + "_total", name + "_bucket", name + "_count", name + "_sum"}
    assert used <= exported, used - exported
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_vector_snippet() -> None:
    cfg = tomllib.loads((ROOT / "deploy/logging/vector.toml").read_text())
    sink = cfg["sinks"]["elasticsearch"]
    assert sink["type"] == "elasticsearch" and sink["inputs"] == ["openred_hub_json"]
    assert cfg["transforms"]["openred_hub_json"]["inputs"] == ["openred_hub"]
    assert "@timestamp" in cfg["transforms"]["openred_hub_json"]["source"]
