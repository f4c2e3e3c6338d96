"""Hub metrics (README.md "Metrics"): plain counters on the hot path, exported as
Prometheus families at scrape time.

Why not prometheus_client counters per frame: a labelled `.inc()` costs a lock and a
dict lookup; a routed message may cost only a few microseconds in all. The hub bumps ints
here and `StatsCollector` turns them into families when `/metrics` is read. Histograms
are observed per batch or per sampled message, never for every frame.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["Metrics", "StatsCollector"]

PREFIX = "openred_hub_"


class Metrics:
    """Counters of one hub process. Attribute updates only; no I/O."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = 0
        self.handshakes: defaultdict[str, int] = defaultdict(int)
        self.frames_in: defaultdict[str, int] = defaultdict(int)
        self.frames_out: defaultdict[str, int] = defaultdict(int)
        self.routed: defaultdict[str, int] = defaultdict(int)  # local|remote|queued|dropped
        self.rate_limited = 0
        self.slow_consumer_disconnects = 0
        self.auth_failures: defaultdict[str, int] = defaultdict(int)
        # Failures and health (hub/breaker.py, hub/observe.py, admin_http/metrics.py):
        # (operation, outcome) -> count; outcome ok|refused|error|timeout|rejected.
        self.store_ops: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.broker_ops: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.error_frames: defaultdict[str, int] = defaultdict(int)  # by error code
        # (route template, method, status) -> count
        self.admin_requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.breakers: dict[str, Any] = {}  # backend -> hub.breaker.Breaker
        self.backend_up: dict[str, int] = {}  # backend -> 1|0, last health check
        self.qos1_pending: int | None = None  # sampled from the store
        self.store_pool: Any = None  # () -> (in use, size): the store's pool_usage
        buckets_fast = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1)
        self.route_seconds = Histogram(
            PREFIX + "route_seconds", "Receive-to-write time of routed messages (sampled).",
            buckets=buckets_fast, registry=registry)
        self.store_write_seconds = Histogram(
            PREFIX + "store_write_seconds", "Time of store writes as seen by the hub.",
            buckets=buckets_fast, registry=registry)
        self.broker_publish_seconds = Histogram(
            PREFIX + "broker_publish_seconds", "Time of broker publishes.",
            buckets=buckets_fast, registry=registry)
        self.admin_request_seconds = Histogram(
            PREFIX + "admin_request_seconds", "Admin HTTP request time by route template.",
            ["route", "method"],
            # 0.2: the admin latency SLO (deploy/prometheus/rules.yml) on a bucket bound.
            buckets=(.005, .01, .025, .05, .1, .2, .5, 1, 2.5, 5, 10), registry=registry)
        self.event_loop_lag_seconds = Histogram(
            PREFIX + "event_loop_lag_seconds",
            "How late a periodic timer of the event loop fires (hub/observe.py).",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
            registry=registry)
        self.send_queue_frames = Histogram(
            PREFIX + "send_queue_frames", "Frames waiting in a session's send queue at flush.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384),
            registry=registry)
        registry.register(StatsCollector(self))

    def snapshot(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "frames_in": dict(self.frames_in),
            "frames_out": dict(self.frames_out),
            "routed": dict(self.routed),
            "handshakes": dict(self.handshakes),
            "rate_limited": self.rate_limited,
            "slow_consumer_disconnects": self.slow_consumer_disconnects,
        }


class StatsCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        m = self.m
        g = GaugeMetricFamily(PREFIX + "connections", "Open node sessions.")
        g.add_metric([], m.connections)
        yield g
        yield _labelled(PREFIX + "handshakes", "Handshakes by result.", "result", m.handshakes)
        yield _labelled(PREFIX + "frames_in", "Frames received by type.", "type", m.frames_in)
        yield _labelled(PREFIX + "frames_out", "Frames sent by type.", "type", m.frames_out)
        yield _labelled(PREFIX + "messages_routed", "Messages by route.", "route", m.routed)
        c = CounterMetricFamily(PREFIX + "rate_limited", "Frames refused by the rate limit.")
        c.add_metric([], m.rate_limited)
        yield c
        c = CounterMetricFamily(PREFIX + "slow_consumer_disconnects",
                                "Sessions closed as slow consumers.")
        c.add_metric([], m.slow_consumer_disconnects)
        yield c
        yield _labelled(PREFIX + "auth_failures", "Refused handshakes by reason.", "reason",
                        m.auth_failures)
        yield _labelled(PREFIX + "error_frames", "Error frames sent by code.", "code",
                        m.error_frames)
        yield _pairs(PREFIX + "store_operations", "Store calls by operation and outcome.",
                     m.store_ops)
        yield _pairs(PREFIX + "broker_operations", "Broker calls by operation and outcome.",
                     m.broker_ops)
        c = CounterMetricFamily(PREFIX + "admin_requests",
                                "Admin HTTP requests by route template, method and status.",
                                labels=["route", "method", "status"])
        for key, v in sorted(m.admin_requests.items()):
            c.add_metric(list(key), v)
        yield c
        g = GaugeMetricFamily(PREFIX + "breaker_state",
                              "Circuit breaker state per backend (1 for the current state).",
                              labels=["backend", "state"])
        c = CounterMetricFamily(PREFIX + "breaker_opened", "Times a circuit breaker opened.",
                                labels=["backend"])
        for name, breaker in sorted(m.breakers.items()):
            for state in ("closed", "open", "half_open"):
                g.add_metric([name, state], 1 if breaker.state.value == state else 0)
            c.add_metric([name], breaker.opened)
        yield g
        yield c
        g = GaugeMetricFamily(PREFIX + "backend_up",
                              "1 when the backend answered its last health check and its "
                              "breaker is closed.", labels=["backend"])
        for name, up in sorted(m.backend_up.items()):
            breaker = m.breakers.get(name)
            closed = breaker is None or breaker.state.value == "closed"
            g.add_metric([name], 1 if up and closed else 0)
        yield g
        if m.qos1_pending is not None:
            g = GaugeMetricFamily(PREFIX + "qos1_pending",
                                  "Unacked, unexpired QoS 1 messages in the store (sampled).")
            g.add_metric([], m.qos1_pending)
            yield g
        if m.store_pool is not None:
            in_use, size = m.store_pool()
            g = GaugeMetricFamily(PREFIX + "store_pool_in_use",
                                  "Store connections in use.")
            g.add_metric([], in_use)
            yield g
            g = GaugeMetricFamily(PREFIX + "store_pool_size",
                                  "Most store connections the pool may hold.")
            g.add_metric([], size)
            yield g


def _pairs(name: str, doc: str, values: dict[tuple[str, str], int]) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["op", "outcome"])
    for (op, outcome), v in sorted(values.items()):
        c.add_metric([op, outcome], v)
    return c


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=[label])
    for k, v in sorted(values.items()):
        c.add_metric([k], v)
    return c
