"""Admin HTTP requests as metrics (hub/metrics.py): `admin_requests_total{route, method,
status}` and `admin_request_seconds{route, method}`, by route *template*
(`/v1/nodes/{id}`, never a node id; `unmatched` for paths no route serves) so the label
values stay few whatever clients ask for. The admin latency SLO (p95 under 200 ms on the
critical routes, deploy/prometheus/rules.yml) is computed from the histogram.

The middleware is the outermost (admin_http/app.py): it sees the final status of every
response, problem+json refusals, 401s and 413s included, and times the whole request.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from openred.hub.metrics import Metrics

__all__ = ["request_metrics"]

# Anything else a client sends as a method counts as "other" (bounded label values).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def request_metrics(metrics: Metrics) -> Any:
    requests = metrics.admin_requests
    seconds = metrics.admin_request_seconds

    @web.middleware
    async def observe(request: web.Request, handler: Any) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            resp: web.StreamResponse = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:  # raised responses (redirects, aiohttp's own)
            status = exc.status
            raise
        finally:
            route = route_template(request)
            method = request.method if request.method in METHODS else "other"
            requests[(route, method, str(status))] += 1
            seconds.labels(route, method).observe(time.perf_counter() - t0)

    return observe
