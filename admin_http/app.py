"""The admin HTTP application: `/healthz`, `/readyz`, `/metrics` (README.md
"Operator surface"), and the security headers of every response. The `/v1/` routes, their
auth and problem+json errors are added by `admin_http.routes`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from openred.admin_http.hygiene import install as install_hygiene
from openred.admin_http.metrics import request_metrics
from openred.admin_http.routes import add_routes
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

if TYPE_CHECKING:
    from openred.hub.node import HubNode

__all__ = ["HUB_KEY", "REGISTRY_KEY", "make_app", "max_request_bytes"]

HUB_KEY = web.AppKey("hub", object)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
READY_TIMEOUT_S = 2.0


@web.middleware
async def security_headers(request: web.Request, handler):  # type: ignore[no-untyped-def]
    resp = await handler(request)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    if request.path.startswith("/v1/"):
        resp.headers["Cache-Control"] = "no-store"
    return resp


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    hub: HubNode = request.app[HUB_KEY]  # type: ignore[assignment]
    failed = []
    for name, probe in (("store", hub.store.ping), ("broker", hub.broker.ping)):
        try:
            await asyncio.wait_for(probe(), READY_TIMEOUT_S)
        except Exception:
            failed.append(name)
    if not hub.accepting:
        failed.append("shutting_down")
    if failed == ["broker"]:
        # Degraded, not down: the broker is shared by every instance, so answering 503
        # for it would take every instance out of the load balancer at once. Without it
        # this one still serves its own nodes (direct messages, topics numbered by the
        # store, QoS 1 stored), and catches up when it is back (docs/protocol.md §6).
        return web.json_response({"status": "degraded", "failed": failed})
    if failed:
        return web.json_response({"status": "unavailable", "failed": failed}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def max_request_bytes(hub: HubNode) -> int:
    """64 KiB, or what `POST /v1/messages` needs for a limits.max_body_bytes body in
    base64 plus its other members (4 KiB), whichever is larger."""
    return max(64 * 1024, 4 * -(-hub.cfg.limits.max_body_bytes // 3) + 4096)


def make_app(hub: HubNode, registry: CollectorRegistry) -> web.Application:
    app = web.Application(middlewares=[security_headers],
                          client_max_size=max_request_bytes(hub))
    app[HUB_KEY] = hub
    app[REGISTRY_KEY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    add_routes(app, hub, registry)
    # admin_http/hygiene.py: 413 for declared bodies over the limit (outermost), the
    # Server, security and HSTS headers on every response.
    install_hygiene(app, hub.cfg.admin, max_request_bytes(hub))
    # Outermost: every request counted and timed by route template (admin_http/metrics.py).
    app.middlewares.insert(0, request_metrics(hub.metrics))
    if hub.tracing is not None:
        # Outermost of all: a server span per request, by route template and status
        # (hub/tracing.py); only in place when tracing is on.
        app.middlewares.insert(0, hub.tracing.http_middleware())
    return app
