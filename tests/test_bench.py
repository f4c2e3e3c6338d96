"""`python -m bench` end to end, every scenario at toy size: the hub (and, where it costs
nothing to install, the websockets baseline) started by the bench itself, the JSON line
read back and checked for what each scenario promises (nothing lost, all delivered,
all back). Numbers are not judged here: speed goals live in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.services import missing, need_redis

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def bench(*args: str, problems: bool = False) -> dict[str, Any]:
    """One bench run's record. `problems`: the run may report problems."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--runs", "1", "--no-save", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout[-2000:]
    record: dict[str, Any] = json.loads(lines[-1])
    assert problems or record["problems"] == [], record["problems"]
    return record


def test_direct_against_the_websockets_baseline() -> None:
    r = bench("direct", "--seconds", "1", "--pairs", "4", "--targets", "hub,websockets")
    hub, ws = r["results"]["hub"], r["results"]["websockets"]
    assert hub["msgs_per_s"] > 0 and ws["msgs_per_s"] > 0
    assert hub["disconnects"] == 0 and hub["errors"] == {}
    assert r["ratios"]["hub/websockets"] == round(hub["msgs_per_s"] / ws["msgs_per_s"], 2)
    assert 0 < hub["generator_cpu"] and 0 < hub["server_cpu"]


def test_latency_loses_nothing() -> None:
    hub = bench("latency", "--seconds", "1", "--pairs", "4", "--rate", "500",
                "--no-baselines")["results"]["hub"]
    assert hub["lost"] == 0 and hub["samples"] >= 300
    assert 0 < hub["p50_ms"] <= hub["p99_ms"] <= hub["max_ms"]


def test_idle_counts_memory_per_session() -> None:
    hub = bench("idle", "--sessions", "100", "--settle", "0.5",
                "--no-baselines")["results"]["hub"]
    assert hub["alive"] == 100
    assert hub["kib_per_session"] > 0


def test_servers_get_every_file_descriptor_the_machine_allows() -> None:
    """A server the bench starts may open as many sockets as the machine lets it (its
    hard limit, raised where allowed), not a fixed 65,536: `idle --sessions 100000`
    must not stop at the bench's own cap. Started from a soft limit of 256."""
    import resource

    from bench.procs import NOFILE

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = ("import resource; from bench.procs import raise_nofile; raise_nofile(); "
            "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    assert proc.returncode == 0, proc.stderr
    soft_after, hard_after = map(int, proc.stdout.split())
    assert soft_after == hard_after >= min(hard, NOFILE)
    assert NOFILE >= 100_000 + 300


def test_fanout_delivers_everything() -> None:
    hub = bench("fanout", "--seconds", "1", "--subscribers", "30", "--rate", "5",
                "--drain", "3", "--no-baselines")["results"]["hub"]
    assert hub["all_delivered"] and hub["delivered"] == hub["expected"] > 0


def test_qos1_through_sqlite() -> None:
    r = bench("qos1", "--seconds", "1", "--pairs", "2", "--window", "4",
              "--store-url", "sqlite")
    (result,) = r["results"].values()
    assert result["msgs_per_s"] > 0 and result["errors"] == {}


def test_storm_brings_everyone_back_with_their_messages() -> None:
    hub = bench("storm", "--nodes", "40", "--per-node", "2",
                "--no-baselines")["results"]["hub"]
    assert (hub["lost"], hub["duplicates"], hub["misdelivered"], hub["refused"]) == (0, 0, 0, 0)
    assert hub["complete"] == hub["back"] == 40 and hub["all_messages_s"] is not None


def test_cluster_routes_every_message_through_redis() -> None:
    url = need_redis()
    r = bench("cluster", "--seconds", "1", "--pairs", "4", "--targets", "hub-cluster",
              "--redis-url", url)
    two = r["results"]["hub x2 + redis"]
    assert two["msgs_per_s"] > 0 and two["disconnects"] == 0 and two["errors"] == {}


def test_qos1_against_rabbitmq() -> None:
    """The same-run RabbitMQ comparison, against the RabbitMQ of the machine."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing("Node.js/npm not installed (the RabbitMQ generator needs them)")
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        missing("no RabbitMQ answers on 127.0.0.1:5672 (start it: rabbitmq-server -detached)")
    r = bench("qos1", "--seconds", "1", "--pairs", "2", "--window", "4",
              "--store-url", "sqlite", "--targets", "hub,rabbitmq")
    hub, rmq = r["results"]["hub sqlite"], r["results"]["rabbitmq"]
    assert rmq["msgs_per_s"] > 0 and rmq["errors"] == {} and rmq["generator_cpu"] > 0
    assert "guest:guest" not in json.dumps(r)
    assert r["ratios"]["hub sqlite/rabbitmq"] == round(hub["msgs_per_s"] / rmq["msgs_per_s"], 2)


def test_qos1_without_rabbitmq_still_measures_the_hub() -> None:
    """Nothing answers at --amqp-url: the rabbitmq row is a problem that says so (the
    password not in it), the hub row is measured all the same."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        r = bench("qos1", "--seconds", "1", "--pairs", "2", "--window", "4",
                  "--store-url", "sqlite", "--targets", "hub,rabbitmq",
                  "--amqp-url", f"amqp://guest:s3cret@127.0.0.1:{port}/",
                  problems=True)
    assert r["results"]["hub sqlite"]["msgs_per_s"] > 0 and "rabbitmq" not in r["results"]
    assert any(f"no RabbitMQ answers at 127.0.0.1:{port}" in p for p in r["problems"])
    assert "s3cret" not in json.dumps(r)
