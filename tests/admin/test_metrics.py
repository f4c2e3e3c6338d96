"""`/metrics` parsed with prometheus_client's parser: every metric of README.md
"Metrics" with the right type and labels, no per-node label, process metrics."""

from __future__ import annotations

from typing import Any

from openred.protocol.identity import Identity
from prometheus_client.parser import text_string_to_metric_families

from tests.admin.conftest import Api
from tests.hub.nodes import RawNode

P = "openred_hub_"
# name (as the parser reports it: counters without _total) -> (type, labels)
EXPECTED: dict[str, tuple[str, set[str]]] = {
    P + "connections": ("gauge", set()),
    P + "handshakes": ("counter", {"result"}),
    P + "frames_in": ("counter", {"type"}),
    P + "frames_out": ("counter", {"type"}),
    P + "messages_routed": ("counter", {"route"}),
    P + "route_seconds": ("histogram", set()),
    P + "store_write_seconds": ("histogram", set()),
    P + "broker_publish_seconds": ("histogram", set()),
    P + "send_queue_frames": ("histogram", set()),
    P + "rate_limited": ("counter", set()),
    P + "slow_consumer_disconnects": ("counter", set()),
    P + "auth_failures": ("counter", {"reason"}),
    # failures, health, SLO inputs (hub/metrics.py)
    P + "store_operations": ("counter", {"op", "outcome"}),
    P + "broker_operations": ("counter", {"op", "outcome"}),
    P + "breaker_state": ("gauge", {"backend", "state"}),
    P + "breaker_opened": ("counter", {"backend"}),
    P + "backend_up": ("gauge", {"backend"}),
    P + "error_frames": ("counter", {"code"}),
    P + "admin_requests": ("counter", {"route", "method", "status"}),
    P + "admin_request_seconds": ("histogram", {"route", "method"}),
    P + "qos1_pending": ("gauge", set()),
    P + "store_pool_in_use": ("gauge", set()),
    P + "store_pool_size": ("gauge", set()),
    P + "event_loop_lag_seconds": ("histogram", set()),
}


async def scrape(api: Api) -> dict[str, Any]:
    r = await api.get("/metrics", token=None)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.body.decode())}


async def test_every_listed_metric_with_its_type(api: Api) -> None:
    hub = api.hub
    a = await RawNode.connect(hub)
    b = await RawNode.connect(hub)
    await a.request({"t": "send", "id": 1, "to": b.node_id, "body": b"x"})
    await b.recv_type("msg")
    await a.request({"t": "send", "id": 2, "to": b.node_id, "body": b"x", "qos": 1})
    bad = await RawNode.open(hub, Identity.generate())
    await bad.send({"t": "hello", "v": 1, "key": b"k" * 32, "sig": b"s" * 64})
    await bad.closed()
    assert (await api.get("/healthz", token=None)).status == 200

    families = await scrape(api)
    for name, (mtype, labels) in EXPECTED.items():
        assert name in families, f"{name} missing from /metrics"
        fam = families[name]
        assert fam.type == mtype, (name, fam.type)
        for s in fam.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    assert families[P + "connections"].samples[0].value == 2
    assert {s.labels["result"] for s in families[P + "handshakes"].samples} >= {"ok", "failed"}
    assert {s.labels["reason"] for s in families[P + "auth_failures"].samples}
    assert {s.labels["type"] for s in families[P + "frames_in"].samples} >= {"send"}
    assert {s.labels["route"] for s in families[P + "messages_routed"].samples} >= {"local"}
    assert any(s.name.endswith("_count") and s.value > 0
               for s in families[P + "store_write_seconds"].samples)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in families.values() for s in fam.samples}
    assert values[(P + "store_operations_total", (("op", "enqueue_many"), ("outcome", "ok")))] >= 1
    assert values[(P + "breaker_state", (("backend", "store"), ("state", "closed")))] == 1
    assert values[(P + "backend_up", (("backend", "store"),))] == 1
    assert values[(P + "qos1_pending", ())] >= 0
    assert values[(P + "store_pool_size", ())] >= 1
    assert values[(P + "admin_requests_total",
                   (("method", "GET"), ("route", "/healthz"), ("status", "200")))] == 1
    # send_queue_frames is sampled (one flush in 32) and route_seconds per sampled
    # message: present with their type, not necessarily observed yet.
    # Labelled sparingly: no node id ever appears as a label value.
    for fam in families.values():
        for s in fam.samples:
            assert a.node_id not in s.labels.values() and b.node_id not in s.labels.values()
    # Process metrics (Linux).
    assert families["process_cpu_seconds"].type == "counter"
    assert families["process_resident_memory_bytes"].type == "gauge"
    await a.close()
    await b.close()
