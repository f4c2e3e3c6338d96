"""Start-up and shutdown of one hub process: store, broker, WebSocket server, admin HTTP,
in that order, and torn down in reverse (STYLE.md "Resources").

`RunningHub` is what tests and `openred-hub serve` use: `async with RunningHub(cfg) as h`
gives a live hub on `h.ws_port` / `h.admin_port` (port 0 in the config picks free ones).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from openred.admin_http.app import make_app
from openred.admin_http.hygiene import AdminSite
from openred.hub.backends import open_broker
from openred.hub.breaker import Breaker, GuardedBroker, GuardedStore
from openred.hub.broker import Broker
from openred.hub.config import BrokerConfig, Config, StoreConfig
from openred.hub.metrics import Metrics
from openred.hub.node import HubNode
from openred.hub.observe import Observer
from openred.hub.tokens import TokenVerifier
from openred.hub.tracing import Tracing, open_tracing
from openred.persistence.backends import open_store
from openred.persistence.store import Store
from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.registry import CollectorRegistry

__all__ = ["RunningHub", "install_uvloop", "serve"]

log = logging.getLogger("openred.hub")


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on Windows
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def token_verifier(cfg: Config) -> TokenVerifier | None:
    a = cfg.auth
    pem = Path(a.jwt_public_key_file).read_bytes() if a.jwt_public_key_file else None
    if a.jwt_secret is None and pem is None:
        return None
    algorithms = [alg for alg in a.jwt_algorithms
                  if (alg == "HS256" and a.jwt_secret) or (alg != "HS256" and pem)]
    if not algorithms:
        return None
    return TokenVerifier(algorithms=algorithms, secret=a.jwt_secret if "HS256" in algorithms
                         else None, public_key_pem=pem, audience=a.jwt_audience,
                         leeway_s=a.clock_skew_s)


class RunningHub:
    """One hub process's resources, opened by `start()` and released by `stop()`.

    Everything `start()` opens is pushed on one `AsyncExitStack`. When a step fails (a
    port taken, the store unreachable or refusing to open), what was opened before it
    is released in reverse order and the error propagates; `stop()` unwinds the same
    stack. Its top entry, pushed once everything is up, is the drain (STYLE.md
    "Resources": stop accepting, say `bye`, drain with a deadline), so the admin surface
    still answers `/readyz` (503 shutting_down) while sessions drain, and the backends
    go last.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.node: HubNode | None = None
        self._stack: AsyncExitStack | None = None
        self._admin: web.AppRunner | None = None  # tests/admin/test_openapi.py reads its app
        self.ws_port = cfg.server.ws_port
        self.admin_port = cfg.server.admin_port

    async def __aenter__(self) -> RunningHub:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        cfg = self.cfg
        # A registry per start: a start that failed, or a stopped hub, starts again clean.
        self.registry = CollectorRegistry()
        self.registry.register(PROCESS_COLLECTOR)
        self.registry.register(PLATFORM_COLLECTOR)
        async with AsyncExitStack() as stack:
            metrics = Metrics(self.registry)
            # None when tracing is off (nothing of OpenTelemetry imported); closed last,
            # so the spans of the drain are exported too (hub/tracing.py).
            tracing = open_tracing(cfg)
            if tracing is not None:
                stack.push_async_callback(tracing.close)
            store = open_store(cfg.store.url, auto_migrate=cfg.store.auto_migrate,
                               pool_size=cfg.store.pool_size,
                               retention_days=cfg.store.retention_days,
                               read_url=cfg.store.read_url, timeout_s=cfg.store.timeout_s)
            # Closed also when open() fails: it may hold a half-opened connection or thread.
            stack.push_async_callback(store.close)
            await store.open()
            self.store = store
            # Every call of the hub to its store and (Redis) broker goes through a
            # circuit breaker (hub/breaker.py): a backend that stops answering costs a
            # node one store.timeout_s, then `unavailable` at once.
            guarded, broker = guard_backends(cfg, store, metrics, tracing)
            node = HubNode(cfg, guarded, broker, metrics, token_verifier(cfg))
            node.tracing = tracing
            stack.push_async_callback(broker.close)
            await broker.start(cfg.server.instance_id, node)
            # Revoked tokens (hub/revocations.py) and the shared handshake limit.
            stack.push_async_callback(node.admission.ip_limiter.close)
            stack.push_async_callback(node.admission.revocations.close)
            await node.admission.revocations.start()
            node.start()
            observer = Observer(guarded, broker, metrics, timeout_s=cfg.store.timeout_s)
            observer.start()  # event-loop lag, backend health, the QoS 1 backlog
            stack.push_async_callback(observer.stop)
            shut = _Once(node.shutdown, cfg.server.shutdown_grace_s)
            stack.push_async_callback(shut)  # its housekeeping task, when a later step fails
            self.node = node
            stack.callback(setattr, self, "node", None)
            ssl_ctx = None
            if cfg.server.tls_cert and cfg.server.tls_key:
                ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ssl_ctx.load_cert_chain(cfg.server.tls_cert, cfg.server.tls_key)
            loop = asyncio.get_running_loop()
            server = await loop.create_server(
                node.new_connection, cfg.server.ws_host, cfg.server.ws_port, ssl=ssl_ctx,
                backlog=4096, reuse_address=True)
            stack.push_async_callback(_close_server, server)
            self.ws_port = server.sockets[0].getsockname()[1]
            runner = web.AppRunner(make_app(node, self.registry), access_log=None,
                                   handle_signals=False)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            self._admin = runner
            stack.callback(setattr, self, "_admin", None)
            # TLS (admin.tls_*), the header timeout, problem+json for parser errors.
            site = AdminSite(runner, cfg.server.admin_host, cfg.server.admin_port, cfg.admin)
            await site.start()
            self.admin_port = runner.addresses[0][1]

            async def drain() -> None:
                server.close()  # stop accepting first
                await shut()

            stack.push_async_callback(drain)
            self._stack = stack.pop_all()
        if not cfg.admin.tokens:
            log.warning("no admin tokens configured: every /v1/ admin route answers 401",
                        extra={"event": "admin_disabled"})
        log.info("hub listening", extra={
            "event": "listening", "ws": f"{cfg.server.ws_host}:{self.ws_port}",
            "admin": f"{cfg.server.admin_host}:{self.admin_port}",
            "instance": cfg.server.instance_id, "hub_id": cfg.server.hub_id})

    async def stop(self) -> None:
        """Stop accepting, say bye, drain with a deadline, then release the admin
        surface, the server and the backends (the reverse of `start`). Idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


def guard_backends(cfg: Config, store: Store, metrics: Metrics,
                   tracing: Tracing | None = None) -> tuple[Store, Broker]:
    """The store and the broker as the hub sees them: behind their breakers, counted by
    outcome, traced when tracing is on (hub/breaker.py). The memory broker cannot fail
    (nor reach another instance): it is not wrapped."""
    def breaker(name: str, c: StoreConfig | BrokerConfig) -> Breaker:
        b = Breaker(name, failures=c.breaker_failures, window_s=c.breaker_window_s,
                    open_s=c.breaker_open_s, probe_timeout_s=2 * cfg.store.timeout_s + 1)
        metrics.breakers[name] = b
        return b

    db_system = "postgresql" if cfg.store.url.startswith("postgres") else "sqlite"
    guarded: Store = GuardedStore(store, breaker("store", cfg.store), metrics,
                                  cfg.store.timeout_s, tracing, db_system)
    metrics.store_pool = store.pool_usage
    broker = open_broker(cfg.broker.url, hub_id=cfg.server.hub_id)
    broker_breaker = breaker("broker", cfg.broker)
    if not cfg.broker.url.startswith("memory:"):
        broker = GuardedBroker(broker, broker_breaker, metrics, tracing)
    return guarded, broker


class _Once:
    """An async call made at most once, however many stack entries ask for it."""

    def __init__(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        self._fn = fn
        self._args = args
        self._done = False

    async def __call__(self) -> None:
        if not self._done:
            self._done = True
            await self._fn(*self._args)


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


def settle_heap() -> None:
    """Once the hub is up, tune the cyclic garbage collector for what it holds.

    Measured with a gc callback timing each collection during `bench qos1` on
    PostgreSQL: a full collection ran about once a second and paused the loop for up to
    55 ms, which was the `ok` p99. Messages in flight live ~100 ms, outliving the young
    generation (collected every 700 allocations, ~1 ms at that rate) and the middle one
    (every 10 of those), so they filled the old one, and each full collection also
    walked the ~72,000 objects of startup. Now:
    - what startup allocated (modules, configuration, the backends' pools) stays for
      the life of the process: `gc.freeze` takes it out of every collection (frozen
      objects are still freed by reference counting; only cycles among them would stay,
      and startup makes none that end);
    - the middle generation is collected every 100 young collections instead of 10,
      longer than a message is in flight, so few reach the old generation.
    `bench qos1` (PostgreSQL, 2 runs each, same session): 17,108 / 18,123 -> 20,795 /
    19,839 msgs/s, `ok` p99 182 / 175 -> 129 ms (docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 100, 20)


async def serve(cfg: Config) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with RunningHub(cfg):
        settle_heap()
        await stop.wait()
        log.info("shutting down", extra={"event": "shutdown"})
    return 0
