"""deploy/ without a Docker engine, Kubernetes or promtool: every YAML file parses, the
alert rules name only metrics (and labels) the hub exports, the image runs
`openred-hub`, and the files agree with each other (compose service names, mounts,
kustomization resources, the packages the Dockerfile copies)."""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from hub.config import load_config
from tests.admin.test_metrics import EXPECTED

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))

# Sample names the hub exports (ARCHITECTURE.md "Metrics"; EXPECTED is checked against a
# live /metrics by tests/admin/test_metrics.py) -> the labels each may carry. Prometheus
# adds job and instance to every series; `up` is Prometheus' own.
SCRAPE_LABELS = {"job", "instance"}
SAMPLES: dict[str, set[str]] = {"up": set()}
for _name, (_type, _labels) in EXPECTED.items():
    if _type == "counter":
        SAMPLES[_name + "_total"] = _labels
    elif _type == "histogram":
        SAMPLES[_name + "_bucket"] = _labels | {"le"}
        SAMPLES[_name + "_count"] = _labels
        SAMPLES[_name + "_sum"] = _labels
    else:
        SAMPLES[_name] = _labels
LABEL_VALUES = {"route": {"local", "remote", "queued", "dropped"}}

PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan"}


def load(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def metric_selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The metric selectors of a PromQL expression: (name, {label: value})."""
    expr = re.sub(r"#[^\n]*", " ", expr)
    found: list[tuple[str, dict[str, str]]] = []
    # name{matchers}
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        matchers = dict(re.findall(r'([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', m.group(2)))
        found.append((m.group(1), matchers))
    rest = re.sub(r"(?<![\w.])[a-zA-Z_:][\w:]*\s*\{[^}]*\}", " ", expr)
    rest = re.sub(r'"(?:\\.|[^"\\])*"', " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
    # bare names that are not function calls, keywords or parts of numbers
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()", rest):
        if m.group(1).lower() not in PROMQL_WORDS:
            found.append((m.group(1), {}))
    return found


def test_metric_selector_parser() -> None:
    expr = ('sum by (instance, le) (rate(openred_hub_route_seconds_bucket{job="x"}[5m])) '
            '> 1e-3 * histogram_quantile(0.99, up) and on (instance) bogus_metric')
    assert metric_selectors(expr) == [("openred_hub_route_seconds_bucket", {"job": "x"}),
                                      ("up", {}), ("bogus_metric", {})]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert load(path), f"{path} is empty"


def test_every_deploy_file_expected() -> None:
    names = {str(p.relative_to(DEPLOY)) for p in YAML_FILES}
    assert names >= {
        "compose/docker-compose.yml", "prometheus/prometheus.yml", "prometheus/rules.yml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/openred.yml", "k8s/kustomization.yaml",
        "k8s/deployment.yaml", "k8s/service.yaml", "k8s/configmap.yaml",
        "k8s/secret.example.yaml", "k8s/migrate-job.yaml", "k8s/ingress.yaml",
        "k8s/pdb.yaml"}, names


def test_alert_rules_use_exported_metrics_only() -> None:
    (doc,) = load(DEPLOY / "prometheus/rules.yml")
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len({r["alert"] for r in rules}) == len(rules)
    used = set()
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        selectors = metric_selectors(rule["expr"])
        assert selectors, rule["alert"]
        for name, matchers in selectors:
            assert name in SAMPLES, f"{rule['alert']}: {name} is not exported by the hub"
            extra = set(matchers) - SAMPLES[name] - SCRAPE_LABELS
            assert not extra, f"{rule['alert']}: {name} has no label {extra}"
            for label, value in matchers.items():
                if label in LABEL_VALUES:
                    assert value in LABEL_VALUES[label], (rule["alert"], label, value)
            used.add(name)
    # What the alerts must watch.
    assert used >= {"up", "openred_hub_auth_failures_total",
                    "openred_hub_slow_consumer_disconnects_total",
                    "openred_hub_route_seconds_bucket", "openred_hub_store_write_seconds_bucket",
                    "openred_hub_messages_routed_total"}, used


def test_prometheus_scrapes_the_hubs_and_loads_the_rules() -> None:
    (cfg,) = load(DEPLOY / "prometheus/prometheus.yml")
    assert cfg["rule_files"] == ["rules.yml"]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "openred-hub"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.endswith(":8766") for t in targets)
    services = load(DEPLOY / "compose/docker-compose.yml")[0]["services"]
    assert {t.split(":")[0] for t in targets} == {s for s in services if s.startswith("hub-")}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        assert op != "?", f"{name} is required: {arg}"
        return arg if op == "-" else ""

    return re.sub(r"\$\{(\w+)(?::([?-])([^}]*))?\}", sub, value)


def final_stage(dockerfile: str) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    start = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[start:]


def instruction(lines: list[str], name: str) -> list[str]:
    return [ln.split(None, 1)[1] for ln in lines if ln.split(None, 1)[0].upper() == name]


def test_dockerfile() -> None:
    text = (DEPLOY / "docker/Dockerfile").read_text()
    stage = final_stage(text)
    assert [json.loads(e) for e in instruction(stage, "ENTRYPOINT")] == [["openred-hub"]]
    assert [json.loads(c) for c in instruction(stage, "CMD")] == [["serve"]]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "openred-hub" in pyproject["project"]["scripts"]
    (user,) = instruction(stage, "USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert {p for e in instruction(stage, "EXPOSE") for p in e.split()} == {"8765", "8766"}
    (health,) = instruction(stage, "HEALTHCHECK")
    probe = json.loads(health.split(" CMD ", 1)[1])
    assert probe[0] == "python" and "/healthz" in probe[-1] and "urllib" in probe[-1]
    assert instruction(stage, "STOPSIGNAL") == ["SIGTERM"]
    env = " ".join(instruction(stage, "ENV"))
    assert "OPENRED_HUB_SERVER_WS_HOST=0.0.0.0" in env
    assert "OPENRED_HUB_SERVER_ADMIN_HOST=0.0.0.0" in env
    assert not re.search(r"apt-get|build-essential|gcc", "\n".join(stage))
    # The builder copies every top-level package the wheel is built from.
    copied = set(re.findall(r"^COPY (\w+)/ ", text, re.M))
    packages = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert packages <= copied, packages - copied
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "bench/results", "**/*.db"} <= set(ignore)


def test_compose_agrees_with_the_other_files() -> None:
    (compose,) = load(DEPLOY / "compose/docker-compose.yml")
    services = compose["services"]
    hubs = {n: s for n, s in services.items() if n.startswith("hub-")}
    assert len(hubs) == 2
    envs = [s["environment"] for s in hubs.values()]
    assert len({e["OPENRED_HUB_SERVER_HUB_ID"] for e in envs}) == 1
    assert len({e["OPENRED_HUB_SERVER_INSTANCE_ID"] for e in envs}) == 2
    for e in envs:
        assert e["OPENRED_HUB_STORE_URL"].startswith("postgresql://")
        assert e["OPENRED_HUB_BROKER_URL"].startswith("redis://")
        assert e["OPENRED_HUB_ADMIN_TOKENS"].startswith("${")  # from .env, never literal
    for hub in hubs.values():
        assert hub["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # With .env filled in, each hub's and the migrate job's environment is a
    # configuration the hub accepts (unknown OPENRED_HUB_* variables would stop it).
    dotenv = {"POSTGRES_PASSWORD": "0123abcd", "OPENRED_ADMIN_TOKEN": "a" * 64,
              "OPENRED_JWT_SECRET": "b" * 64}
    for service in [*hubs.values(), services["migrate"]]:
        env = {k: interpolate(str(v), dotenv) for k, v in service["environment"].items()}
        cfg = load_config(ROOT / "hub.toml", env=env)
        assert cfg.store.url == "postgresql://openred:0123abcd@postgres:5432/openred"
    cfg = load_config(ROOT / "hub.toml", env={
        k: interpolate(str(v), {**dotenv, "OPENRED_JWT_SECRET": ""})
        for k, v in envs[0].items()})
    assert cfg.auth.jwt_secret is None  # optional in .env
    # The hubs believe X-Forwarded-For from nginx's fixed address, and from nothing else
    # (server.trusted_proxies): nginx's address is pinned, inside the network's subnet.
    nginx_ip = services["nginx"]["networks"]["default"]["ipv4_address"]
    (subnet,) = [c["subnet"] for c in compose["networks"]["default"]["ipam"]["config"]]
    assert ipaddress.ip_address(nginx_ip) in ipaddress.ip_network(subnet)
    assert cfg.server.trusted_proxies == (f"{nginx_ip}/32",)
    # ... and nodes reach the hubs' WebSocket port through nginx only.
    assert not [p for h in hubs.values() for p in h.get("ports", []) if "8765" in str(p)]
    assert services["migrate"]["command"] == ["migrate"]
    # nginx.conf's upstream servers are compose services.
    nginx_conf = (DEPLOY / "nginx/nginx.conf").read_text()
    upstream_hosts = set(re.findall(r"^\s*server\s+([\w.-]+):\d+", nginx_conf, re.M))
    assert upstream_hosts and upstream_hosts <= set(services), upstream_hosts
    # Every bind-mounted file exists; Grafana's provider reads where the dashboard is.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / "compose" / source).exists(), source
    (dashboard,) = [v.split(":")[1] for v in services["grafana"]["volumes"]
                    if v.endswith("openred-hub.json:ro")]
    (provider,) = load(DEPLOY / "grafana/provisioning/dashboards/openred.yml")
    assert provider["providers"][0]["options"]["path"] == str(Path(dashboard).parent)


def test_kubernetes_manifests() -> None:
    (kustomization,) = load(DEPLOY / "k8s/kustomization.yaml")
    resources = kustomization["resources"]
    assert "secret.example.yaml" not in resources  # placeholders are never applied
    docs = {r: load(DEPLOY / "k8s" / r)[0] for r in resources}
    assert {d["kind"] for d in docs.values()} == {
        "ConfigMap", "Deployment", "Service", "Job", "Ingress", "PodDisruptionBudget"}
    dep = docs["deployment.yaml"]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    # Service links would inject OPENRED_HUB_SERVICE_HOST etc., which the hub refuses.
    assert pod["enableServiceLinks"] is False
    assert docs["migrate-job.yaml"]["spec"]["template"]["spec"]["enableServiceLinks"] is False
    assert pod["terminationGracePeriodSeconds"] == 20
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["containerPort"] for p in c["ports"]} == {8765, 8766}
    env = {e["name"]: e for e in c["env"]}
    assert env["OPENRED_HUB_SERVER_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] \
        == "metadata.name"
    assert docs["pdb.yaml"]["spec"]["minAvailable"] == 1
    # The ConfigMap and the example Secret make a configuration the hub accepts.
    secret = load(DEPLOY / "k8s/secret.example.yaml")[0]
    env = {**docs["configmap.yaml"]["data"], **secret["stringData"],
           "OPENRED_HUB_SERVER_INSTANCE_ID": "openred-hub-7d9f8c6b5-x2x9k"}
    cfg = load_config(ROOT / "hub.toml", env=env)
    assert cfg.store.url.startswith("postgresql://") and not cfg.store.auto_migrate
    assert cfg.broker.url.startswith("redis://") and cfg.admin.tokens
