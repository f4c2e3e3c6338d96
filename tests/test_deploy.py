"""deploy/ without a Docker engine or Kubernetes: every YAML file parses, the alert
rules name only metrics (and labels) the hub exports (parsed as PromQL by
promql-parser), the image runs `openred-hub` from pinned dependencies, and the files
agree with each other (compose service names, mounts, kustomization resources, the
packages the Dockerfile copies, stop grace periods, edge limits).

The real tools (promtool, kubernetes-validate, check-jsonschema, yamllint, hadolint,
actionlint) run in tests/deploy/test_validators.py."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from openred.hub.config import config_keys, env_var_name, load_config

from tests.admin.test_metrics import EXPECTED

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))

# Sample names the hub exports (README.md "Metrics"; EXPECTED is checked against a
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
# Label values the rules may select, per metric (a regex matcher's alternatives each).
LABEL_VALUES = {
    "openred_hub_messages_routed_total": {"route": {"local", "remote", "queued", "dropped"}},
    "openred_hub_backend_up": {"backend": {"store", "broker"}},
    "openred_hub_breaker_state": {"backend": {"store", "broker"},
                                  "state": {"closed", "open", "half_open"}},
    "openred_hub_error_frames_total": {"code": {"unavailable", "internal"}},
}
# Recorded series (rules.yml `record:`) may be read by later rules, with these labels.
RECORDED_LABELS = {"job", "instance", "route"}


def load(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def metric_selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The metric selectors of a PromQL expression, (name, {label: value}), from its
    syntax tree (promql-parser); a syntax error raises ValueError."""
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):  # also inside x[5m]
            found.append((node.name or "", {m.name: m.value for m in node.matchers.matchers}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_metric_selector_parser() -> None:
    expr = ('sum by (instance, le) (rate(openred_hub_route_seconds_bucket{job="x"}[5m])) '
            '> 1e-3 * histogram_quantile(0.99, up) and on (instance) bogus_metric  # note')
    assert metric_selectors(expr) == [("openred_hub_route_seconds_bucket", {"job": "x"}),
                                      ("up", {}), ("bogus_metric", {})]
    with pytest.raises(ValueError):
        metric_selectors("sum(rate(up[5m])")


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
        "k8s/pdb.yaml", "k8s/hpa.yaml", "k8s/networkpolicy.yaml",
        "k8s/monitoring/kustomization.yaml", "k8s/monitoring/podmonitor.yaml",
        "k8s/monitoring/prometheus-adapter-values.yaml", "prometheus/rules.test.yml"}, names


def test_alert_rules_use_exported_metrics_only() -> None:
    (doc,) = load(DEPLOY / "prometheus/rules.yml")
    rules = [r for g in doc["groups"] for r in g["rules"]]
    alerts = [r for r in rules if "alert" in r]
    assert len({r["alert"] for r in alerts}) == len(alerts)
    known = dict(SAMPLES)
    used = set()
    for rule in rules:
        what = rule.get("alert") or rule["record"]
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}, what
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert re.fullmatch(r"\d+[smh]", rule["for"]), what
        else:  # level:metric:operations, recorded before any rule reads it
            assert re.fullmatch(r"openred_hub:[a-z0-9_]+(:[a-z0-9_]+)?", what), what
        selectors = metric_selectors(rule["expr"])
        assert selectors, what
        for name, matchers in selectors:
            assert name in known, f"{what}: {name} is not exported by the hub"
            extra = set(matchers) - known[name] - SCRAPE_LABELS
            assert not extra, f"{what}: {name} has no label {extra}"
            for label, value in matchers.items():
                allowed = LABEL_VALUES.get(name, {}).get(label)
                if allowed is not None:
                    assert set(value.split("|")) <= allowed, (what, label, value)
            used.add(name)
        if "record" in rule:
            known[rule["record"]] = RECORDED_LABELS
    # What the alerts must watch.
    assert used >= {"up", "openred_hub_auth_failures_total",
                    "openred_hub_slow_consumer_disconnects_total",
                    "openred_hub_route_seconds_bucket", "openred_hub_store_write_seconds_bucket",
                    "openred_hub_messages_routed_total",
                    # SLOs, backends, backlog, loop lag
                    "openred_hub_error_frames_total", "openred_hub_frames_in_total",
                    "openred_hub_backend_up", "openred_hub_breaker_state",
                    "openred_hub_breaker_opened_total", "openred_hub_qos1_pending",
                    "openred_hub_event_loop_lag_seconds_bucket",
                    "openred_hub_admin_request_seconds_bucket",
                    "openred_hub:frame_errors:ratio_rate1h", "openred_hub:available"}, used


def test_dashboard_reads_recorded_series_that_rules_yml_records() -> None:
    """The SLO panels read recording rules (openred_hub:*): each one rules.yml records
    (tests/admin/test_deploy.py checks the exported metrics)."""
    dashboard = json.loads((DEPLOY / "grafana/openred-hub.json").read_text())
    (doc,) = load(DEPLOY / "prometheus/rules.yml")
    recorded = {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}
    read = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
            for name, _ in metric_selectors(target["expr"].replace("$__rate_interval", "5m"))
            if name.startswith("openred_hub:")}
    assert read and read <= recorded, read - recorded


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
    # The builder copies every folder the two wheels are built from (package-dir of
    # pyproject.toml and of clients/python/pyproject.toml, whose paths are its own).
    copied = set(re.findall(r"^COPY ([\w/]+?)/ ", text, re.M))
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    folders |= {os.path.normpath(os.path.join("clients/python", d))
                for d in client["tool"]["setuptools"]["package-dir"].values()}
    assert all(any(f == c or f.startswith(c + "/") for c in copied) for f in folders), (
        folders, copied)
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
        "ConfigMap", "Deployment", "Service", "Job", "Ingress", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "NetworkPolicy"}
    dep = docs["deployment.yaml"]
    # The HPA owns the replica count: a `replicas:` here would reset it on every apply.
    assert "replicas" not in dep["spec"]
    pod = dep["spec"]["template"]["spec"]
    # Service links would inject OPENRED_HUB_SERVICE_HOST etc., which the hub refuses.
    assert pod["enableServiceLinks"] is False
    assert docs["migrate-job.yaml"]["spec"]["template"]["spec"]["enableServiceLinks"] is False
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


# -- stop grace, autoscaling, network policy, monitoring --------------------------------

# The hub exits within server.shutdown_grace_s plus this (stop accepting, `bye`, drain
# until the grace ends, cancel, release the store and broker: deploy/docker/Dockerfile).
EXIT_AFTER_GRACE_S = 5


def k8s_config() -> Any:
    """The configuration a hub pod runs with (ConfigMap + example Secret + pod env)."""
    (configmap,) = load(DEPLOY / "k8s/configmap.yaml")
    (secret,) = load(DEPLOY / "k8s/secret.example.yaml")
    return load_config(ROOT / "hub.toml", env={
        **configmap["data"], **secret["stringData"],
        "OPENRED_HUB_SERVER_INSTANCE_ID": "openred-hub-7d9f8c6b5-x2x9k"})


def test_stop_grace_agrees_with_shutdown_grace() -> None:
    """preStop + server.shutdown_grace_s + the exit time fit in the termination grace
    period (else Kubernetes SIGKILLs the hub mid-drain), without a needless margin
    (a rollout waits that long for each pod that hangs); the same for compose."""
    grace = k8s_config().server.shutdown_grace_s
    (dep,) = load(DEPLOY / "k8s/deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert 0 < pre_stop <= 10
    total = pre_stop + grace + EXIT_AFTER_GRACE_S
    assert total <= pod["terminationGracePeriodSeconds"] <= total + 10, (
        pre_stop, grace, pod["terminationGracePeriodSeconds"])
    # compose: no preStop; stop_grace_period covers the drain and the exit.
    (compose,) = load(DEPLOY / "compose/docker-compose.yml")
    for name, service in compose["services"].items():
        if name.startswith("hub-"):
            env = {k: interpolate(str(v), {"POSTGRES_PASSWORD": "x", "OPENRED_ADMIN_TOKEN": "a"})
                   for k, v in service["environment"].items()}
            hub_grace = load_config(ROOT / "hub.toml", env=env).server.shutdown_grace_s
            m = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
            assert m is not None, service["stop_grace_period"]
            period = int(m.group(1))
            assert hub_grace + EXIT_AFTER_GRACE_S <= period <= hub_grace + 15, name


def test_horizontal_pod_autoscaler() -> None:
    (hpa,) = load(DEPLOY / "k8s/hpa.yaml")
    (dep,) = load(DEPLOY / "k8s/deployment.yaml")
    (pdb,) = load(DEPLOY / "k8s/pdb.yaml")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": dep["metadata"]["name"]}
    assert spec["minReplicas"] > pdb["spec"]["minAvailable"]
    assert spec["maxReplicas"] > spec["minReplicas"]
    metrics = {m["type"]: m for m in spec["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert "cpu" in container["resources"]["requests"]  # Utilization is of the request
    # Connections per pod: the hub's gauge, through the Prometheus adapter.
    pods = metrics["Pods"]["pods"]
    assert pods["metric"]["name"] == "openred_hub_connections"
    assert ("openred_hub_connections", "gauge") == (
        pods["metric"]["name"], EXPECTED["openred_hub_connections"][0])
    assert pods["target"]["type"] == "AverageValue" and int(pods["target"]["averageValue"]) > 0
    (adapter,) = load(DEPLOY / "k8s/monitoring/prometheus-adapter-values.yaml")
    (rule,) = adapter["rules"]["custom"]
    assert [n for n, _ in metric_selectors(rule["seriesQuery"])] == ["openred_hub_connections"]
    assert rule["name"]["as"] == pods["metric"]["name"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # Slow down: each removed pod's sessions all reconnect elsewhere.
    down = spec["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])


def test_network_policy() -> None:
    (policy,) = load(DEPLOY / "k8s/networkpolicy.yaml")
    (dep,) = load(DEPLOY / "k8s/deployment.yaml")
    (service,) = load(DEPLOY / "k8s/service.yaml")
    spec = policy["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    # In: the WebSocket port from the ingress controller, the admin port from Prometheus,
    # nothing else.
    ingress = {(r["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
                tuple(p["port"] for p in r["ports"])) for r in spec["ingress"]}
    assert ingress == {("ingress-nginx", (ports["ws"],)), ("prometheus", (ports["admin"],))}
    # Out: DNS, PostgreSQL, Redis, OTLP; no rule without ports (that would allow all).
    egress = {p["port"] for r in spec["egress"] for p in r["ports"]}
    assert egress == {53, 5432, 6379, 4317, 4318}
    assert all(r.get("ports") and r.get("to") for r in spec["egress"])


def test_pod_monitor() -> None:
    (monitor,) = load(DEPLOY / "k8s/monitoring/podmonitor.yaml")
    (dep,) = load(DEPLOY / "k8s/deployment.yaml")
    (kustomization,) = load(DEPLOY / "k8s/monitoring/kustomization.yaml")
    assert kustomization["resources"] == ["podmonitor.yaml"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert endpoint["port"] in {p["name"] for p in container["ports"]}
    assert endpoint["path"] == "/metrics"
    # The alert rules and the dashboard select job="openred-hub".
    assert {"action": "replace", "targetLabel": "job", "replacement": "openred-hub"} \
        in endpoint["relabelings"]


# -- edge limits ------------------------------------------------------------------------------


def nginx_location(conf: str, head: str) -> str:
    body = conf[conf.index(head):]
    return body[:body.index("}")]


def test_edge_limits_in_nginx_and_ingress() -> None:
    """limit_req / limit_conn on the upgrade path and the admin API (nginx.conf), the
    same numbers as the Ingress annotations; nginx -t on this file runs in
    tests/cluster/test_nginx.py."""
    conf = (DEPLOY / "nginx/nginx.conf").read_text()
    zones = {m.group(1): m.group(2) for m in re.finditer(
        r"limit_req_zone\s+\$binary_remote_addr\s+zone=(\w+):\d+m\s+rate=(\d+)r/s;", conf)}
    conn_zones = set(re.findall(r"limit_conn_zone\s+\$binary_remote_addr\s+zone=(\w+):", conf))
    limits = {}
    for head in ("location = /v1/ws", "listen 127.0.0.1:8081"):
        loc = nginx_location(conf, head) if head.startswith("location") else \
            nginx_location(conf[conf.index(head):], "location /")
        req = re.search(r"limit_req\s+zone=(\w+)\s+burst=(\d+)\s+nodelay;", loc)
        conn = re.search(r"limit_conn\s+(\w+)\s+(\d+);", loc)
        assert req and conn, head
        assert req.group(1) in zones and conn.group(1) in conn_zones, head
        limits[head] = (int(zones[req.group(1)]), int(req.group(2)), int(conn.group(2)))
    assert re.search(r"limit_req_status 429;", conf) and re.search(r"limit_conn_status 429;", conf)
    rate, burst, sessions = limits["location = /v1/ws"]
    # The proxy holds each client to the hub's own default per-IP cap; behind it, with
    # no trusted proxies listed, every node shares the controller's address, so the
    # ConfigMap turns the hub's per-IP cap off (it would cap the whole pod).
    from openred.hub.config import load_config

    assert sessions == load_config(None, env={}).limits.max_connections_per_ip
    k8s = k8s_config()
    assert not k8s.server.trusted_proxies and k8s.limits.max_connections_per_ip == 0
    (ingress,) = load(DEPLOY / "k8s/ingress.yaml")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert int(notes[prefix + "limit-rps"]) == rate
    assert int(notes[prefix + "limit-rps"]) * int(notes[prefix + "limit-burst-multiplier"]) \
        == burst
    assert int(notes[prefix + "limit-connections"]) == sessions


# -- the image: reproducible ---------------------------------------------------------------


def lock_pins(path: Path) -> dict[str, str]:
    """name -> version of a pip-compile --generate-hashes file, each with its hashes."""
    text = path.read_text()
    pins = {}
    for block in re.split(r"\n(?=[a-z0-9])", text):
        m = re.match(r"([a-z0-9][a-z0-9._-]*)==([^\s;\\]+)", block)
        if m:
            assert "--hash=sha256:" in block, f"{m.group(1)} has no hash in {path.name}"
            pins[m.group(1)] = m.group(2)
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_image_is_reproducible() -> None:
    text = (DEPLOY / "docker/Dockerfile").read_text()
    # The base by digest (with the tag kept for readers), for both stages.
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base), base
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert "imagetools inspect" in text  # how to bump it
    # Dependencies from the lock files only, by hash, as wheels.
    runs = " ".join(instruction([ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()
                                 if ln.strip() and not ln.startswith("#")], "RUN"))
    assert "--require-hashes --only-binary :all: -r /tmp/requirements.lock" in \
        re.sub(r"\s+", " ", runs)
    assert "--require-hashes --only-binary :all: -r /tmp/build.lock" in re.sub(r"\s+", " ", runs)
    assert "--no-build-isolation --no-index" in runs  # the hub's wheel: nothing fetched
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {"!deploy/docker/requirements.lock", "!deploy/docker/build.lock"} <= set(ignore)
    # The lock pins every dependency of both distributions (and the build lock
    # setuptools), except the client distribution, which is built from this tree too.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())
    pins = lock_pins(DEPLOY / "docker/requirements.lock")
    own = canonical(client["project"]["name"])
    for dep in pyproject["project"]["dependencies"] + client["project"]["dependencies"]:
        m = re.match(r"[A-Za-z0-9._-]+", dep)
        assert m is not None, dep
        name = canonical(m.group(0))
        if name == own:
            assert f"/wheels/{own}-*.whl" in runs  # built and installed from clients/python
            continue
        assert name in pins, f"{name} is not in requirements.lock: run deploy/docker/update-locks"
    build = lock_pins(DEPLOY / "docker/build.lock")
    assert set(build) == {"setuptools"}
    assert pyproject["build-system"]["requires"] == ["setuptools>=68"]


def test_final_image_has_no_pip_and_oci_labels() -> None:
    stage = final_stage((DEPLOY / "docker/Dockerfile").read_text())
    runs = " ".join(instruction(stage, "RUN"))
    assert "pip uninstall --yes --quiet pip setuptools wheel" in runs
    assert not re.search(r"pip (install|wheel)", runs)
    labels = " ".join(instruction(stage, "LABEL"))
    for key in ("title", "description", "licenses", "version", "revision", "created",
                "source", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    args = {a.split("=")[0] for a in instruction(stage, "ARG")}
    assert {"VERSION", "REVISION", "CREATED", "SOURCE"} <= args


# -- tracing: Jaeger in compose, the ConfigMap keys, the dashboard's link ------------------


def test_tracing_is_wired_to_jaeger_and_grafana() -> None:
    """docs/tracing.md: the compose hubs export to the Jaeger service's OTLP/HTTP port,
    the image can (its lock has the `tracing` extra), the ConfigMap names every
    [tracing] key, and the dashboard's "Traces" link opens a provisioned data source."""
    (compose,) = load(DEPLOY / "compose/docker-compose.yml")
    services = compose["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    dotenv = {"POSTGRES_PASSWORD": "0123abcd", "OPENRED_ADMIN_TOKEN": "a" * 64}
    for name in ("hub-1", "hub-2"):
        env = {k: interpolate(str(v), dotenv) for k, v in
               services[name]["environment"].items()}
        tracing = load_config(ROOT / "hub.toml", env=env).tracing
        assert tracing.enabled
        assert tracing.endpoint == "http://jaeger:4318/v1/traces"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = lock_pins(DEPLOY / "docker/requirements.lock")
    for dep in pyproject["project"]["optional-dependencies"]["tracing"]:
        m = re.match(r"[A-Za-z0-9._-]+", dep)
        assert m is not None and canonical(m.group(0)) in pins, dep
    (configmap,) = load(DEPLOY / "k8s/configmap.yaml")
    keys = {k for k in configmap["data"] if k.startswith("OPENRED_HUB_TRACING_")}
    assert keys == {env_var_name(f"tracing.{k}") for k in config_keys()["tracing"]}
    assert k8s_config().tracing.enabled is False  # the operator turns it on
    (source,) = load(DEPLOY / "grafana/provisioning/datasources/jaeger.yml")
    (ds,) = source["datasources"]
    assert ds["type"] == "jaeger" and ds["url"] == "http://jaeger:16686"
    dashboard = json.loads((DEPLOY / "grafana/openred-hub.json").read_text())
    (link,) = [x for x in dashboard["links"] if x["title"] == "Traces"]
    assert link["url"].startswith("/explore?")
    panes = json.loads(urllib.parse.unquote(link["url"].split("panes=", 1)[1]))
    (pane,) = panes.values()
    assert pane["datasource"] == ds["uid"]
    assert pane["queries"][0]["service"] == load_config(env={}).tracing.service_name
