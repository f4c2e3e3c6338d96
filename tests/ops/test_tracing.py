"""Tracing (docs/tracing.md, docs/protocol.md §13): the `[tracing]` keys, nothing of
OpenTelemetry in a hub that has it off, and one trace across two hub processes, exported
over OTLP/HTTP to a collector this test runs itself (an aiohttp server decoding the
protobuf with `opentelemetry-proto`; no in-memory exporter): a QoS 1 message stored for
an offline node on instance 1 and delivered, hours later as far as the trace can tell,
on instance 2, then a live one across the broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openred.hub.config import ConfigError, load_config
from openred.protocol.identity import Identity

from tests.cluster.conftest import (
    ADMIN_TOKEN,
    ClusterFactory,
    eventually,
    make_cluster,  # noqa: F401 (the fixture)
)
from tests.conftest import timeout
from tests.hub.nodes import RawNode

ROOT = Path(__file__).resolve().parents[2]
BODY = b"tracing-body-must-not-leak-7f3a"
A_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
A_SPAN = "00f067aa0ba902b7"

# -- configuration ---------------------------------------------------------------------


def test_tracing_defaults_off() -> None:
    cfg = load_config(env={})
    assert cfg.tracing.enabled is False
    assert cfg.tracing.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert cfg.tracing.service_name == "openred-hub"
    assert cfg.tracing.sample_ratio == 0.1


def test_tracing_keys_from_env() -> None:
    cfg = load_config(env={
        "OPENRED_HUB_TRACING_ENABLED": "true",
        "OPENRED_HUB_TRACING_ENDPOINT": "https://collector.example:4318/v1/traces",
        "OPENRED_HUB_TRACING_SERVICE_NAME": "hub-eu",
        "OPENRED_HUB_TRACING_SAMPLE_RATIO": "1",
    })
    t = cfg.tracing
    assert (t.enabled, t.endpoint, t.service_name, t.sample_ratio) == (
        True, "https://collector.example:4318/v1/traces", "hub-eu", 1.0)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("SAMPLE_RATIO", "1.5", "tracing.sample_ratio"),
    ("SAMPLE_RATIO", "-0.1", "tracing.sample_ratio"),
    ("SAMPLE_RATIO", "half", "tracing.sample_ratio"),
    ("ENDPOINT", "grpc://collector:4317", "tracing.endpoint"),
    ("ENDPOINT", "http://", "tracing.endpoint"),
    ("SERVICE_NAME", "has space", "tracing.service_name"),
    ("ENABLED", "maybe", "tracing.enabled"),
])
def test_bad_tracing_values_name_the_key(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={f"OPENRED_HUB_TRACING_{key}": value})
    assert expected in str(info.value) or f"OPENRED_HUB_TRACING_{key}" in str(info.value)


def test_bad_sample_ratio_in_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text("[tracing]\nsample_ratio = 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "tracing.sample_ratio" in str(info.value)
    path.write_text("[tracing]\nsampling = 1\n")  # an unknown key
    with pytest.raises(ConfigError, match=r"tracing\.sampling"):
        load_config(path, env={})


# -- off: no OpenTelemetry module in the process ----------------------------------------

_OFF_SCRIPT = textwrap.dedent("""
    import asyncio, importlib.abc, json, sys, traceback
    ROOT = sys.argv[1]
    HUB_CODE = tuple(f"{ROOT}/{d}/" for d in ("hub", "persistence", "admin_http", "protocol"))
    asked = []

    class NoOpenTelemetry(importlib.abc.MetaPathFinder):
        # A hub installed without the `tracing` extra: OpenTelemetry cannot be imported.
        # (redis-py 8 tries to, for its own optional metrics, and does without.) Every
        # attempt made from the hub's own code is recorded.
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] != "opentelemetry":
                return None
            # The import statement's own frame: the innermost one outside importlib
            # (and this finder).
            stack = [f for f in traceback.extract_stack()[:-1]
                     if not f.filename.startswith("<frozen")]
            importer = stack[-1]
            if importer.filename.startswith(HUB_CODE):
                asked.append(f"{name} from {importer.filename}:{importer.lineno}")
            raise ModuleNotFoundError(name)

    sys.meta_path.insert(0, NoOpenTelemetry())
    from openred.hub.app import RunningHub, install_uvloop
    from openred.hub.config import load_config
    from tests.hub.nodes import RawNode

    async def main():
        cfg = load_config(env={"OPENRED_HUB_STORE_URL": "sqlite:///off.db",
                               "OPENRED_HUB_SERVER_WS_PORT": "0",
                               "OPENRED_HUB_SERVER_ADMIN_PORT": "0",
                               "OPENRED_HUB_LOG_LEVEL": "error"})
        async with RunningHub(cfg) as hub:
            a = await RawNode.connect(hub)
            b = await RawNode.connect(hub)
            meta = {"traceparent": "00-%s-%s-01" % ("ab" * 16, "cd" * 8)}
            for qos in (0, 1):
                ok = await a.request({"t": "send", "id": qos, "to": b.node_id, "qos": qos,
                                      "body": b"x", "meta": meta})
                assert ok["t"] == "ok", ok
                msg = await b.recv_type("msg")
                assert msg.get("meta") == meta, msg  # passed through unchanged (§13)
                if qos:
                    await b.request({"t": "ack", "id": 9, "mids": [msg["mid"]]})
            ok = await a.request({"t": "pub", "id": 3, "topic": "t", "body": b"x",
                                  "meta": meta})
            assert ok["t"] == "ok", ok
            await a.close()
            await b.close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
        print(json.dumps({"loaded": loaded, "asked": asked}))

    install_uvloop()
    asyncio.run(main())
""")


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    # A hub started with tracing off (the default), nodes exchanging messages that carry
    # a traceparent: no OpenTelemetry module is needed, none is imported, and the hub's
    # code never even asks for one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRED_HUB_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", _OFF_SCRIPT, str(ROOT)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=timeout(60))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"loaded": [], "asked": []}


_MISSING_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    class NoOpenTelemetry(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(name)
            return None

    sys.meta_path.insert(0, NoOpenTelemetry())
    from openred.hub.__main__ import main
    sys.exit(main(["check-config"]))
""")


def test_tracing_on_without_the_packages_stops_start_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRED_HUB_")}
    env.update(PYTHONPATH=str(ROOT), OPENRED_HUB_TRACING_ENABLED="true")
    out = subprocess.run([sys.executable, "-c", _MISSING_SCRIPT], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=timeout(60))
    assert out.returncode == 2, out.stderr[-3000:]
    assert "tracing.enabled" in out.stderr and "openred-hub[tracing]" in out.stderr


# -- on: one trace across two instances, through a real OTLP/HTTP collector -------------


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    instance: str
    attributes: dict[str, Any]


class Collector:
    """An OTLP/HTTP traces endpoint: `POST /v1/traces` of ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def _export(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        assert request.content_type == "application/x-protobuf"
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        self.requests += 1
        for rs in req.resource_spans:
            res = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(Span(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        s.kind, str(res.get("service.instance.id")),
                        {kv.key: _value(kv.value) for kv in s.attributes}))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind is not None else None


def _one(spans: list[Span], name: str, instance: str, **attrs: Any) -> Span:
    found = [s for s in spans if s.name == name and s.instance == instance
             and all(s.attributes.get(k) == v for k, v in attrs.items())]
    assert len(found) == 1, (name, instance, attrs, spans)
    return found[0]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    await c.start()
    yield c
    await c.close()


def _traceparent(meta: dict[str, str]) -> tuple[str, str]:
    version, trace_id, span_id, flags = meta["traceparent"].split("-")
    assert (version, flags) == ("00", "01")
    return trace_id, span_id


@pytest.mark.slow
async def test_one_trace_across_instances_and_store_and_forward(
        make_cluster: ClusterFactory, collector: Collector,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Spans are exported within 100 ms of their end, not the SDK's default 5 s.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    cluster = await make_cluster(2, tracing_enabled="true",
                                 tracing_endpoint=collector.endpoint,
                                 tracing_sample_ratio="1", log_format="json")
    one, two = cluster[0].instance_id, cluster[1].instance_id
    a = await RawNode.connect(cluster[0])
    b_id = Identity.generate()
    meta = {"traceparent": f"00-{A_TRACE}-{A_SPAN}-01", "tracestate": "vendor=a1",
            "req": "r-1"}

    # B is offline: the message is stored on instance 1 (and the broker finds nobody).
    ok = await a.request({"t": "send", "id": 1, "to": b_id.node_id, "qos": 1, "body": BODY,
                          "meta": meta})
    assert ok["t"] == "ok" and ok["status"] == "stored", ok
    mid = ok["mid"]

    # B comes online on instance 2 later: its queue is replayed from the store.
    b = await RawNode.connect(cluster[1], b_id)
    msg = await b.recv_type("msg", wait=10)
    assert msg["mid"] == mid and msg["body"] == BODY
    got_trace, deliver_id = _traceparent(msg["meta"])
    assert got_trace == A_TRACE and deliver_id != A_SPAN  # the hub's delivery span (§13)
    assert msg["meta"]["tracestate"] == "vendor=a1" and msg["meta"]["req"] == "r-1"
    assert (await b.request({"t": "ack", "id": 2, "mids": [mid]}))["t"] == "ok"

    async def complete() -> bool:
        names = {(s.name, s.instance) for s in collector.trace(A_TRACE)}
        return {("send", one), ("enqueue_many", one), ("broker publish", one), ("deliver", two),
                ("ack", two)} <= names

    await eventually(complete, wait=15, what="the trace at the collector")
    spans = collector.trace(A_TRACE)
    send = _one(spans, "send", one)
    assert send.parent == A_SPAN  # the node's context is the parent (§13)
    assert send.attributes["messaging.destination.name"] == b_id.node_id
    assert send.attributes["openred.qos"] == 1
    enqueue = _one(spans, "enqueue_many", one)
    assert enqueue.parent == send.span_id
    assert enqueue.attributes["db.system"] == "postgresql"
    assert enqueue.attributes["db.operation.name"] == "enqueue_many"
    hop = _one(spans, "broker publish", one)
    assert hop.parent == send.span_id and hop.attributes["openred.routed"] is False
    deliver = _one(spans, "deliver", two)
    # Stored with the message: the delivery on the other instance joins the trace.
    assert deliver.parent == send.span_id and deliver.span_id == deliver_id
    assert deliver.attributes["messaging.message.id"] == mid
    ack = _one(spans, "ack", two, **{"messaging.operation.name": "ack"})
    assert ack.parent == deliver.span_id and ack.attributes["messaging.message.id"] == mid
    store_ack = _one(spans, "ack", two, **{"db.operation.name": "ack"})
    assert store_ack.parent == ack.span_id

    # Live, across the broker: instance 1 publishes, instance 2 receives and delivers.
    trace2 = "5bf92f3577b34da6a3ce929d0e0e4737"
    ok = await a.request({"t": "send", "id": 3, "to": b_id.node_id, "qos": 1, "body": BODY,
                          "meta": {"traceparent": f"00-{trace2}-{A_SPAN}-01"}})
    assert ok["t"] == "ok", ok
    msg = await b.recv_type("msg", wait=10)
    assert _traceparent(msg["meta"])[0] == trace2
    assert (await b.request({"t": "ack", "id": 4, "mids": [msg["mid"]]}))["t"] == "ok"

    async def live() -> bool:
        names = {(s.name, s.instance) for s in collector.trace(trace2)}
        return {("send", one), ("broker publish", one), ("broker receive", two),
                ("deliver", two), ("ack", two)} <= names

    await eventually(live, wait=15, what="the live trace at the collector")
    spans2 = collector.trace(trace2)
    send2 = _one(spans2, "send", one)
    pub = _one(spans2, "broker publish", one)
    assert pub.parent == send2.span_id and pub.attributes["openred.routed"] is True
    rx = _one(spans2, "broker receive", two)
    assert rx.parent == pub.span_id
    deliver2 = _one(spans2, "deliver", two)
    assert deliver2.parent == rx.span_id
    assert _traceparent(msg["meta"])[1] == deliver2.span_id
    assert _one(spans2, "ack", two,
                **{"messaging.operation.name": "ack"}).parent == deliver2.span_id

    # §13: a malformed traceparent is passed through untouched and starts no trace.
    bad = {"traceparent": f"00-{A_TRACE.upper()}-{A_SPAN}-01", "tracestate": "vendor=a1"}
    ok = await a.request({"t": "send", "id": 7, "to": b_id.node_id, "qos": 1, "body": BODY,
                          "meta": bad})
    msg = await b.recv_type("msg", wait=10)
    bad_mid = ok["mid"]
    assert msg["mid"] == bad_mid and msg["meta"] == bad
    assert (await b.request({"t": "ack", "id": 8, "mids": [msg["mid"]]}))["t"] == "ok"

    # A topic publication: the publisher's instance counts its subscribers, the broker
    # carries the context, the subscriber's instance counts its own and hands it on.
    assert (await b.request({"t": "sub", "id": 5, "topic": "news"}))["t"] == "ok"
    trace3 = "6bf92f3577b34da6a3ce929d0e0e4738"
    ok = await a.request({"t": "pub", "id": 6, "topic": "news", "body": BODY,
                          "meta": {"traceparent": f"00-{trace3}-{A_SPAN}-01"}})
    assert ok["t"] == "ok", ok
    msg = await b.recv_type("msg", wait=10)
    assert msg["topic"] == "news"

    async def published() -> bool:
        names = {(s.name, s.instance) for s in collector.trace(trace3)}
        return {("publish", one), ("append_history", one), ("broker publish", one),
                ("broker receive", two)} <= names

    await eventually(published, wait=15, what="the topic trace at the collector")
    spans3 = collector.trace(trace3)
    publish = _one(spans3, "publish", one)
    assert publish.parent == A_SPAN and publish.attributes["openred.fanout.local"] == 0
    assert publish.attributes["messaging.destination.name"] == "news"
    assert _one(spans3, "append_history", one).parent == publish.span_id
    topic_hop = _one(spans3, "broker publish", one)
    assert topic_hop.parent == publish.span_id
    topic_rx = _one(spans3, "broker receive", two)
    assert topic_rx.parent == topic_hop.span_id
    assert topic_rx.attributes["openred.fanout.local"] == 1
    assert _traceparent(msg["meta"]) == (trace3, topic_rx.span_id)

    # The admin surface and the handshakes are traced too (their own traces).
    async with aiohttp.ClientSession() as http, http.get(
            f"{cluster[0].admin}/v1/nodes/{b_id.node_id}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        status = r.status

    async def admin() -> bool:
        return any(s.attributes.get("http.route") == "/v1/nodes/{id}"
                   for s in collector.spans)

    await eventually(admin, wait=15, what="the admin span")
    (http_span,) = [s for s in collector.spans if s.attributes.get("http.route")
                    == "/v1/nodes/{id}"]
    assert http_span.name == "GET /v1/nodes/{id}" and http_span.instance == one
    assert http_span.attributes["http.response.status_code"] == status
    handshakes = [s for s in collector.spans if s.name == "handshake"]
    assert {s.attributes.get("openred.auth.outcome") for s in handshakes} == {"accepted"}
    assert {s.attributes.get("openred.auth.method") for s in handshakes} == {"key"}
    assert any(s.parent == h.span_id and s.name == "session_start"
               for h in handshakes for s in collector.spans)

    assert all(s.attributes.get("messaging.message.id") != bad_mid
               for s in collector.spans), "the malformed traceparent started a trace"

    # Never a body, never a token, in any attribute of any span.
    for s in collector.spans:
        for value in s.attributes.values():
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            assert BODY.decode() not in text, s
            assert "Bearer" not in text and text != ADMIN_TOKEN, s

    await a.close()
    await b.close()


# -- logs joined to traces ---------------------------------------------------------------


async def test_log_lines_within_a_span_carry_its_ids(collector: Collector) -> None:
    import logging

    from openred.hub.log import EcsFormatter, JsonFormatter
    from openred.hub.tracing import Tracing

    cfg = load_config(env={"OPENRED_HUB_TRACING_ENABLED": "true",
                           "OPENRED_HUB_TRACING_ENDPOINT": collector.endpoint,
                           "OPENRED_HUB_TRACING_SAMPLE_RATIO": "1"})
    tracing = Tracing(cfg)
    record = logging.LogRecord("openred.hub", logging.INFO, "", 0, "hub event", (), None)
    record.event = "node_connected"
    try:
        outside = json.loads(JsonFormatter().format(record))
        assert "trace_id" not in outside
        with tracing.tracer.start_as_current_span("handshake") as span:
            c = span.get_span_context()
            line = json.loads(JsonFormatter().format(record))
            ecs = json.loads(EcsFormatter().format(record))
        assert (line["trace_id"], line["span_id"]) == (f"{c.trace_id:032x}",
                                                       f"{c.span_id:016x}")
        assert ecs["trace"] == {"id": f"{c.trace_id:032x}"}
        assert ecs["span"] == {"id": f"{c.span_id:016x}"}
    finally:
        await tracing.close()
    # Closed: the hook is gone with it.
    assert "trace_id" not in json.loads(JsonFormatter().format(record))
    assert any(s.name == "handshake" for s in collector.spans)  # flushed at close
