"""OpenTelemetry tracing of one hub (docs/tracing.md; docs/protocol.md §13 trace context).

Owned here: the `[tracing]` section turned into a tracer provider exporting over
OTLP/HTTP, every span the hub makes, and the W3C `traceparent` the hub writes into the
`meta` of the frames it hands on (§4.1, §13).

Off costs nothing: `open_tracing` returns None and imports no OpenTelemetry module; the
hub keeps that None (`HubNode.tracing`) and the few places that trace test it once per
batch of frames, never call anything for it per frame, and the wrappers of the store,
the broker and the admin surface are only put in place at start-up when it is on
(hub/app.py, hub/breaker.py, admin_http/app.py).

On, a message is traced only when its node sent a valid `traceparent` (§13: a malformed
one is passed through untouched and starts no trace): the hub then puts its own span in
the frame's `meta` in place of the node's (keeping the node's `tracestate`), so that each
hop (the store, the broker to another instance, the delivery) is a child of the one
before it, also hours later: the context is stored with a QoS 1 message and kept in topic
history, since it is in its `meta`. Spans carry ids, sizes, names and outcomes: never a
body, a signature, a token or a statement's parameters.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from openred.hub.config import Config
    from openred.hub.session import Session
    from openred.protocol.frames import Hello, Pub, Send

__all__ = ["Tracing", "check_available", "open_tracing"]

log = logging.getLogger("openred.hub.tracing")

# Delivery spans of QoS 1 messages written and not yet acked, by mid: the `ack` span of
# a message is the child of its last delivery (§4: the ack frame carries no meta). Bounded:
# past it the oldest are forgotten and their acks start no span.
DELIVERED_TRACKED = 100_000
CLOSE_TIMEOUT_S = 3.0  # within the 5 s a hub has to exit after its grace (deploy/k8s/)
_MESSAGING_SYSTEM = "openred"
_TRACEPARENT = b"traceparent"

_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def check_available() -> None:
    """Raise `ConfigError` naming `tracing.enabled` when the OpenTelemetry packages are
    missing (hub/preflight.py: before anything listens)."""
    from openred.hub.config import ConfigError

    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise ConfigError("tracing.enabled: the OpenTelemetry packages are not installed "
                          "(pip install 'openred-hub[tracing]')",
                          key="tracing.enabled") from None


def open_tracing(cfg: Config) -> Tracing | None:
    """The hub's tracing, or None when `tracing.enabled` is false (nothing imported)."""
    if not cfg.tracing.enabled:
        return None
    return Tracing(cfg)


class Tracing:
    """One hub's tracer provider and the spans it makes (module docstring)."""

    def __init__(self, cfg: Config) -> None:
        from opentelemetry import context, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        t = cfg.tracing
        resource = Resource.create({
            "service.name": t.service_name,
            "service.namespace": cfg.server.hub_id,
            "service.instance.id": cfg.server.instance_id,
        })
        # Parent-based: a node's sampled (or not) context decides for its message; the
        # ratio decides for the traces the hub starts itself.
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(t.sample_ratio)), resource=resource,
            shutdown_on_exit=False)  # close() does, bounded; not an atexit hook
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=t.endpoint)))
        self.tracer = self._provider.get_tracer("openred.hub")
        self._trace = trace
        self._context = context
        self._propagator = TraceContextTextMapPropagator()
        kind = trace.SpanKind
        self._server, self._client = kind.SERVER, kind.CLIENT
        self._producer, self._consumer = kind.PRODUCER, kind.CONSUMER
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._delivered: dict[str, Any] = {}  # mid -> SpanContext of its last delivery
        from openred.hub import log as hub_log

        hub_log.set_trace_ids(self.current_ids)

    async def close(self) -> None:
        """Export what is still buffered, then stop: off the event loop (the exporter's
        HTTP is blocking) and for at most CLOSE_TIMEOUT_S, so that an unreachable
        collector cannot hold the process past its stop grace (the SDK would wait 30 s).
        The thread is a daemon: given up on, it does not keep the process alive."""
        from openred.hub import log as hub_log

        hub_log.set_trace_ids(None)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def shutdown() -> None:
            try:
                self._provider.shutdown()
            finally:
                try:
                    loop.call_soon_threadsafe(_resolve, done)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

        threading.Thread(target=shutdown, name="openred-trace-export", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("spans not exported at shutdown: the collector did not answer",
                        extra={"event": "tracing_flush_timeout"})

    # -- context: W3C traceparent in meta (§13) ----------------------------------------

    def current_ids(self) -> tuple[str, str] | None:
        """(trace_id, span_id) in hex of the span current where a log line is written
        (hub/log.py), or None outside any span."""
        ctx = self._trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return None
        return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"

    def _parent(self, meta: object) -> Any:
        """The context of a `meta`'s valid traceparent (with its tracestate), else None:
        §13, a malformed traceparent starts no trace."""
        if type(meta) is not dict or "traceparent" not in meta:
            return None
        ctx = self._propagator.extract(meta)
        if not self._trace.get_current_span(ctx).get_span_context().is_valid:
            return None
        return ctx

    def _parent_of(self, span_context: Any) -> Any:
        return self._trace.set_span_in_context(self._trace.NonRecordingSpan(span_context))

    @staticmethod
    def _with_span(meta: dict[str, str], span: Any) -> dict[str, str]:
        """`meta` with the hub's span as traceparent (the node's tracestate kept as is:
        §13)."""
        c = span.get_span_context()
        return {**meta, "traceparent": f"00-{c.trace_id:032x}-{c.span_id:016x}-"
                                       f"{int(c.trace_flags):02x}"}

    def _frame_parent(self, frame: bytes) -> tuple[dict[str, Any], Any] | None:
        """A hub frame with a valid traceparent in its meta: (the frame as a map, its
        context). Frames without one are not decoded (the search is a memchr)."""
        if _TRACEPARENT not in frame:
            return None
        try:
            d = _unpackb(frame)
        except Exception:
            return None
        if type(d) is not dict:
            return None
        ctx = self._parent(d.get("meta"))
        return None if ctx is None else (d, ctx)

    def _reframe(self, d: dict[str, Any], span: Any) -> bytes:
        d["meta"] = self._with_span(d["meta"], span)
        return _packb(d)

    # -- frames from nodes ---------------------------------------------------------------

    def on_send(self, session: Session, f: Send) -> None:
        """A `send` with meta (hub/session.py): handled inside a `send` span, child of
        the node's context, whose id replaces the node's traceparent, so the stored
        message, the broker hop and the delivery are its children (§13)."""
        meta = f.meta
        parent = self._parent(meta)
        if meta is None or parent is None:
            session._on_send(f)
            return
        with self.tracer.start_as_current_span(
                "send", context=parent, kind=self._consumer, attributes={
                    "messaging.system": _MESSAGING_SYSTEM,
                    "messaging.operation.type": "receive",
                    "messaging.operation.name": "send",
                    "messaging.destination.name": f.to,
                    "messaging.message.body.size": len(f.body),
                    "openred.qos": f.qos,
                    "openred.node": session.node_id,
                }) as span:
            session._on_send(f._replace(meta=self._with_span(meta, span)))

    def on_pub(self, session: Session, f: Pub) -> None:
        """A `pub` with meta: as `on_send`, the topic publication's span; subscribers
        get it as their traceparent (local ones directly, others after the broker)."""
        meta = f.meta
        parent = self._parent(meta)
        if meta is None or parent is None:
            session._on_pub(f)
            return
        subs = session.hub.topics.get(f.topic, ())
        with self.tracer.start_as_current_span(
                "publish", context=parent, kind=self._consumer, attributes={
                    "messaging.system": _MESSAGING_SYSTEM,
                    "messaging.operation.type": "receive",
                    "messaging.operation.name": "publish",
                    "messaging.destination.name": f.topic,
                    "messaging.message.body.size": len(f.body),
                    "openred.node": session.node_id,
                    # This instance's subscribers but the publisher (§5); other
                    # instances count theirs in their `broker receive` span.
                    "openred.fanout.local": len(subs) - (session in subs),
                }) as span:
            session._on_pub(f._replace(meta=self._with_span(meta, span)))

    async def handshake(self, session: Session, hello: Hello,
                        authenticate: Awaitable[None]) -> None:
        """The handshake (hub/admission.py) inside a `handshake` span: the store and
        broker calls it makes are its children, its log lines carry its ids."""
        with self.tracer.start_as_current_span(
                "handshake", kind=self._server, attributes={
                    "openred.auth.method": "token" if hello.token is not None else "key",
                    "client.address": session.ip,
                }) as span:
            await authenticate
            ok = session.active
            span.set_attribute("openred.auth.outcome", "accepted" if ok else "refused")
            if ok:
                span.set_attribute("openred.node", session.node_id)

    async def ack(self, mids: list[str], acking: Awaitable[None]) -> None:
        """An `ack` (§4): one span per traced mid, child of its last delivery, around
        the store's ack (child of the first)."""
        delivered = self._delivered
        parents = [(m, delivered.pop(m)) for m in mids if m in delivered]
        if not parents:
            await acking
            return
        spans = [self.tracer.start_span("ack", context=self._parent_of(c), kind=self._consumer,
                                        attributes={
                                            "messaging.system": _MESSAGING_SYSTEM,
                                            "messaging.operation.type": "settle",
                                            "messaging.operation.name": "ack",
                                            "messaging.message.id": m,
                                        })
                 for m, c in parents]
        token = self._context.attach(self._trace.set_span_in_context(spans[0]))
        try:
            await acking
        finally:
            self._context.detach(token)
            for span in spans:
                span.end()

    # -- delivery to a node ---------------------------------------------------------------

    def sink(self, session: Session) -> _DeliverySink:
        """What a session's QoS 1 inbox writes to (hub/inbox.py) when tracing is on."""
        return _DeliverySink(self, session)

    def delivered(self, frame: bytes) -> bytes:
        """One delivery attempt of a stored message: a `deliver` span, child of the
        context in the frame's meta (the hub's, stored with it), and the frame with that
        span as the recipient's traceparent (§13)."""
        found = self._frame_parent(frame)
        if found is None:
            return frame
        d, parent = found
        mid = d.get("mid")
        span = self.tracer.start_span("deliver", context=parent, kind=self._producer,
                                      attributes={
                                          "messaging.system": _MESSAGING_SYSTEM,
                                          "messaging.operation.type": "send",
                                          "messaging.operation.name": "deliver",
                                          "messaging.message.id": str(mid),
                                          "openred.qos": d.get("qos", 0),
                                      })
        try:
            out = self._reframe(d, span)
        finally:
            span.end()
        if d.get("qos") == 1 and type(mid) is str:
            delivered = self._delivered
            delivered.pop(mid, None)  # re-inserted last: the oldest go first
            delivered[mid] = span.get_span_context()
            if len(delivered) > DELIVERED_TRACKED:
                del delivered[next(iter(delivered))]
        return out

    # -- the broker -------------------------------------------------------------------------

    def broker_publish(self, op: str, fn: Callable[..., Coroutine[Any, Any, Any]]
                       ) -> Callable[..., Coroutine[Any, Any, Any]]:
        """`publish_to_node` / `publish_to_topic` of the broker (hub/breaker.py): a
        `broker publish` span for a traced frame, which then carries that span."""
        index = 1 if op == "publish_to_node" else 2  # (node, frame, ...) / (topic, seq, frame)
        tracer, producer = self.tracer, self._producer
        destination = "node" if op == "publish_to_node" else "topic"

        async def call(*args: Any, **kwargs: Any) -> Any:
            frame = kwargs.get("frame", args[index] if len(args) > index else None)
            found = None if type(frame) is not bytes else self._frame_parent(frame)
            if found is None:
                return await fn(*args, **kwargs)
            d, parent = found
            with tracer.start_as_current_span("broker publish", context=parent, kind=producer,
                                              attributes={
                                                  "messaging.system": "redis",
                                                  "messaging.operation.type": "send",
                                                  "messaging.operation.name": "publish",
                                                  "messaging.destination.name": args[0],
                                                  "openred.destination.kind": destination,
                                              }) as span:
                frame = self._reframe(d, span)
                if "frame" in kwargs:
                    kwargs["frame"] = frame
                else:
                    args = (*args[:index], frame, *args[index + 1:])
                result = await fn(*args, **kwargs)
                if op == "publish_to_node":
                    span.set_attribute("openred.routed", bool(result))
                return result

        return call

    def broker_publish_nowait(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`publish_to_node_nowait` (QoS 0 across instances): as `broker_publish`."""
        tracer, producer = self.tracer, self._producer

        def call(node_id: str, frame: bytes, *args: Any, **kwargs: Any) -> Any:
            found = self._frame_parent(frame)
            if found is None:
                return fn(node_id, frame, *args, **kwargs)
            d, parent = found
            span = tracer.start_span("broker publish", context=parent, kind=producer,
                                     attributes={
                                         "messaging.system": "redis",
                                         "messaging.operation.type": "send",
                                         "messaging.operation.name": "publish",
                                         "messaging.destination.name": node_id,
                                         "openred.destination.kind": "node",
                                     })
            try:
                return fn(node_id, self._reframe(d, span), *args, **kwargs)
            finally:
                span.end()

        return call

    def broker_node_receiver(self, on_node_frame: Callable[..., None]) -> Callable[..., None]:
        """The broker handler's `on_node_frame`: a `broker receive` span for a traced
        frame from another instance, which then carries that span."""
        def receive(node_id: str, frame: bytes, *args: Any, **kwargs: Any) -> None:
            found = self._frame_parent(frame)
            if found is None:
                on_node_frame(node_id, frame, *args, **kwargs)
                return
            d, parent = found
            with self._receive_span(parent, node_id, d, {}) as span:
                on_node_frame(node_id, self._reframe(d, span), *args, **kwargs)

        return receive

    def _receive_span(self, parent: Any, destination: str, d: dict[str, Any],
                      extra: dict[str, Any]) -> Any:
        """A `broker receive` span of a traced frame `d` from another instance."""
        return self.tracer.start_as_current_span(
            "broker receive", context=parent, kind=self._consumer, attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "receive",
                "messaging.operation.name": "receive",
                "messaging.destination.name": destination,
                "messaging.message.id": str(d.get("mid")),
                **extra,
            })

    def broker_topic_receiver(self, on_topic_frame: Callable[..., None],
                              topics: Callable[[str], int]) -> Callable[..., None]:
        """The broker handler's `on_topic_frame`: as `broker_node_receiver`, with the
        count of this instance's subscribers (`topics(topic)`)."""
        def receive(topic: str, seq: int, frame: bytes, *args: Any, **kwargs: Any) -> None:
            found = self._frame_parent(frame)
            if found is None:
                on_topic_frame(topic, seq, frame, *args, **kwargs)
                return
            d, parent = found
            with self._receive_span(parent, topic, d,
                                    {"openred.fanout.local": topics(topic)}) as span:
                on_topic_frame(topic, seq, self._reframe(d, span), *args, **kwargs)

        return receive

    # -- the store ----------------------------------------------------------------------------

    def store_call(self, op: str, db_system: str,
                   fn: Callable[..., Coroutine[Any, Any, Any]]
                   ) -> Callable[..., Coroutine[Any, Any, Any]]:
        """A store method (hub/breaker.py's GuardedStore) in a client span: the system
        and the operation, never a statement or its parameters.

        Only inside a sampled trace (a traced message, a sampled handshake or admin
        request): a store call on its own would be a root span, and making one, even an
        unsampled one, cost 10-20 % of QoS 1 throughput (docs/benchmarks.md, tracing)."""
        tracer, client, error = self.tracer, self._client, self._error
        current = self._trace.get_current_span
        attributes = {"db.system": db_system, "db.system.name": db_system,
                      "db.operation.name": op}

        async def call(*args: Any, **kwargs: Any) -> Any:
            # The parent may have ended already (a send's span, before its task ran the
            # store call): its context's sampled flag, not is_recording(), decides.
            if not current().get_span_context().trace_flags.sampled:
                return await fn(*args, **kwargs)
            with tracer.start_as_current_span(op, kind=client, attributes=attributes,
                                              record_exception=False,
                                              set_status_on_exception=False) as span:
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    # The class only: a message may quote a value.
                    span.set_attribute("error.type", type(exc).__name__)
                    span.set_status(error)
                    raise

        return call

    # -- the admin surface ----------------------------------------------------------------------

    def http_middleware(self) -> Any:
        """aiohttp middleware (admin_http/app.py, outermost): a server span per request
        by route template and status. No header is recorded (bearer tokens)."""
        from aiohttp import web
        from openred.admin_http.metrics import route_template

        tracer, server, error, propagator = (self.tracer, self._server, self._error,
                                             self._propagator)

        @web.middleware
        async def traced(request: web.Request, handler: Any) -> web.StreamResponse:
            parent = None
            if "traceparent" in request.headers:
                parent = propagator.extract({"traceparent": request.headers["traceparent"],
                                             "tracestate": request.headers.get("tracestate",
                                                                               "")})
            route = route_template(request)
            with tracer.start_as_current_span(
                    f"{request.method} {route}", context=parent, kind=server,
                    record_exception=False, set_status_on_exception=False,
                    attributes={"http.request.method": request.method, "http.route": route,
                                "url.scheme": request.scheme}) as span:
                status = 500
                try:
                    resp: web.StreamResponse = await handler(request)
                    status = resp.status
                    return resp
                except web.HTTPException as exc:
                    status = exc.status
                    raise
                finally:
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(error)

        return traced


class _DeliverySink:
    """A session as its QoS 1 inbox sees it (hub/inbox.py `Sink`), each frame written
    through `Tracing.delivered` (one `deliver` span per attempt)."""

    __slots__ = ("_session", "_tracing", "has_room", "wait_room")

    def __init__(self, tracing: Tracing, session: Session) -> None:
        self._tracing = tracing
        self._session = session
        self.has_room = session.has_room
        self.wait_room = session.wait_room

    @property
    def active(self) -> bool:
        return self._session.active

    def push(self, frame: bytes) -> None:
        self._session.push(self._tracing.delivered(frame))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # slots not set yet: no recursion
            raise AttributeError(name)
        return getattr(self._session, name)
