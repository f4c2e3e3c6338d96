"""A real Prometheus (the `prometheus` binary of Debian's package, put in .venv/bin by
scripts/test) scrapes a running hub for a few seconds with deploy/prometheus/rules.yml
loaded: the target is up, and every recording and alerting rule evaluates without an
error (PromQL that parses can still fail at evaluation: many-to-many matches, a range
over a recorded series, ...). promtool's unit tests (test_validators.py) check what the
rules compute; this checks they run against what the hub really exports.

Without the binary the test is skipped, and fails under CI=true (tests.services.missing).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import timeout
from tests.deploy.test_validators import DEPLOY, tool
from tests.hub.conftest import loop_guard, make_hub  # noqa: F401  (fixtures)
from tests.hub.nodes import RawNode
from tests.ports import free_port


async def api(http: aiohttp.ClientSession, base: str, path: str) -> Any:
    async with http.get(base + path) as r:
        assert r.status == 200, (path, r.status, await r.text())
        body = json.loads(await r.text())
    assert body["status"] == "success", body
    return body["data"]


async def test_prometheus_scrapes_a_hub_and_evaluates_every_rule(
        make_hub: Any, tmp_path: Path) -> None:  # noqa: F811
    prometheus = tool("prometheus", "Debian package prometheus")
    hub = await make_hub()
    # Some traffic, so the rules see counters and histograms with samples.
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x", "qos": 1})

    rules = tmp_path / "rules.yml"
    rules.write_bytes((DEPLOY / "prometheus/rules.yml").read_bytes())
    # A rule broken on purpose (valid PromQL, failing at every evaluation: two series
    # on one side of a one-to-one match), so the check below is seen to catch one.
    canary = tmp_path / "canary.yml"
    canary.write_text(yaml.safe_dump({"groups": [{"name": "canary", "rules": [
        {"record": "canary:broken", "expr": "openred_hub_backend_up * on () up"}]}]}))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(rules), str(canary)],
        # The job name the rules select (deploy/prometheus/prometheus.yml).
        "scrape_configs": [{"job_name": "openred-hub",
                            "static_configs": [{"targets": [f"127.0.0.1:{hub.admin_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as http:
            # Wait for the hub to be scraped, then for every rule to be evaluated again
            # after that (an evaluation on no data at all cannot fail).
            before: dict[str, str] | None = None
            async with asyncio.timeout(timeout(30)):
                while True:
                    await asyncio.sleep(0.25)
                    assert proc.returncode is None, "prometheus exited"
                    try:
                        targets = await api(http, base, "/api/v1/targets")
                        groups = (await api(http, base, "/api/v1/rules"))["groups"]
                    except aiohttp.ClientError:
                        continue  # not listening yet
                    if not targets["activeTargets"]:
                        continue  # discovery not synced yet
                    (target,) = targets["activeTargets"]
                    rules_seen = [r for g in groups for r in g["rules"]]
                    last = {r["name"]: r["lastEvaluation"] for r in rules_seen}
                    if before is None:
                        if target["health"] == "up":
                            before = last
                    elif all(last[name] != at for name, at in before.items()):
                        break
            assert target["labels"]["job"] == "openred-hub", target
            expected = yaml.safe_load(rules.read_text())
            names = {r.get("alert") or r["record"]
                     for g in expected["groups"] for r in g["rules"]}
            assert {r["name"] for r in rules_seen} == names | {"canary:broken"}
            broken = {r["name"]: r.get("lastError") for r in rules_seen if r["health"] != "ok"}
            assert set(broken) == {"canary:broken"}, broken
            # What the backend alerts read is there, from this hub.
            result = (await api(http, base, "/api/v1/query?query=openred_hub_backend_up"))
            assert {(s["metric"]["backend"], s["value"][1]) for s in result["result"]} == {
                ("store", "1"), ("broker", "1")}
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout(10))
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await a.close()
        await b.close()
