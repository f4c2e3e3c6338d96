"""The Grafana dashboard reads every metric of ARCHITECTURE.md "Metrics" (and only
metrics the hub exports); the Vector snippet is valid TOML shipping to Elasticsearch."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from tests.admin.test_metrics import EXPECTED

ROOT = Path(__file__).resolve().parents[2]


def exprs(panels: list[dict[str, Any]]) -> list[str]:
    out = []
    for p in panels:
        out += [t["expr"] for t in p.get("targets", [])]
        out += exprs(p.get("panels", []))
    return out


def test_dashboard_reads_every_metric() -> None:
    dash = json.loads((ROOT / "deploy/grafana/openred-hub.json").read_text())
    text = "\n".join(exprs(dash["panels"]))
    for name, (mtype, _) in EXPECTED.items():
        suffix = {"counter": "_total", "histogram": "_bucket", "gauge": ""}[mtype]
        assert name + suffix in text, f"{name}{suffix} not on the dashboard"
    used = set(re.findall(r"openred_hub_[a-z_]+", text))
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
