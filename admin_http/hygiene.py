"""HTTP hygiene of the admin listener (README "Operator surface"): what holds for every
connection and response, before and around the routes.

Owned here:
- `AdminSite`: the listening socket (TLS with `admin.tls_cert` / `admin.tls_key`),
  whose connections are served by `AdminRequestHandler`. A connection must deliver
  complete request headers within `admin.header_timeout_s` of its connect or of its
  previous response, else it is closed (aiohttp's keep-alive timer, armed at the
  connect, closes a connection still waiting for a complete request: a slowloris that
  trickles header bytes gets no extension). A body that stops arriving after a refusal
  is waited for at most `LINGER_S`.
- `AdminRequestHandler.handle_error`: what the HTTP parser rejects (garbage, a bad
  method, an over-long line or header) is answered problem+json with the security
  headers, naming the status only: never the request's bytes. Logged at debug, so
  garbage cannot flood the log.
- `refuse_large_bodies`, the outermost middleware: a declared `Content-Length` over the
  request limit gets 413 at once and the connection is closed, without reading the
  body (a chunked body over the limit is refused when read, by the routes).
- every response: the security headers, `Server: openred-hub` (no versions), and with
  TLS `Strict-Transport-Security`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from openred.admin_http.problems import problem_response

if TYPE_CHECKING:
    from openred.hub.config import AdminConfig

__all__ = ["SECURITY_HEADERS", "SERVER", "AdminRequestHandler", "AdminSite", "install",
           "ssl_context"]

log = logging.getLogger("openred.admin")

SERVER = "openred-hub"
HSTS = "max-age=31536000"
LINGER_S = 2.0
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
_TLS_KEY = web.AppKey("openred.admin_tls", bool)


def ssl_context(cfg: AdminConfig) -> ssl.SSLContext | None:
    if not (cfg.tls_cert and cfg.tls_key):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return ctx


def _headers(headers: Any, tls: bool) -> None:
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    headers["Server"] = SERVER
    if tls:
        headers["Strict-Transport-Security"] = HSTS


class AdminRequestHandler(RequestHandler):
    """aiohttp's connection handler, with parser errors answered as problem+json."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        log.debug("admin request refused by the parser", extra={
            "event": "admin_bad_http", "status": status, "ip": request.remote,
            "error": type(exc).__name__ if exc is not None else None})
        if request.writer.output_size > 0:  # as aiohttp: the response is already going
            raise ConnectionError("response already sent, cannot send an error")
        try:
            detail = HTTPStatus(status).phrase.lower()
        except ValueError:
            detail = "error"
        if status < 500:
            detail = f"malformed request: {detail}"
        resp = problem_response(status, detail)
        _headers(resp.headers, self.ssl_context is not None)
        resp.force_close()
        return resp


class AdminSite(web.BaseSite):
    """A TCP site like aiohttp's TCPSite, serving its connections with
    `AdminRequestHandler` and the admin timeouts."""

    __slots__ = ("_bound", "_host", "_kwargs", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, cfg: AdminConfig,
                 *, backlog: int = 128) -> None:
        super().__init__(runner, ssl_context=ssl_context(cfg), backlog=backlog)
        self._host = host
        self._port = port
        self._bound = port
        self._kwargs: dict[str, Any] = {"keepalive_timeout": cfg.header_timeout_s,
                                        "lingering_time": LINGER_S, "access_log": None}

    @property
    def port(self) -> int:
        return self._bound

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        kwargs = self._kwargs
        self._server = await loop.create_server(
            lambda: AdminRequestHandler(server, loop=loop, **kwargs), self._host, self._port,
            ssl=self._ssl_context, backlog=self._backlog, reuse_address=True)
        if self._server.sockets:
            self._bound = self._server.sockets[0].getsockname()[1]


def install(app: web.Application, cfg: AdminConfig, max_body_bytes: int) -> None:
    """Add the outermost middleware and the response headers to `app`."""
    tls = bool(cfg.tls_cert and cfg.tls_key)
    app[_TLS_KEY] = tls

    @web.middleware
    async def refuse_large_bodies(request: web.Request, handler: Any) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > max_body_bytes:
            resp = problem_response(413, f"request body too large: at most {max_body_bytes} "
                                         "bytes")
            resp.force_close()  # the body is never read
            return resp
        result: web.StreamResponse = await handler(request)
        return result

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        _headers(response.headers, tls)

    app.middlewares.insert(0, refuse_large_bodies)
    app.on_response_prepare.append(on_prepare)
