"""Structured logging set-up: one JSON object per line (or plain text), with an `event`
name and fields passed through `extra`. Secrets are never passed to a logger.

`log.format = "ecs"` writes the same lines in Elastic Common Schema fields, so Filebeat,
Vector or Elastic Agent ship them to Elasticsearch without a mapping of their own
(deploy/logging/): `@timestamp`, `log.level`, `log.logger`, `message`, `ecs.version`,
`event.action` (our event name), `event.dataset`, `event.kind` / `category` / `type` /
`outcome` for the events an operator searches (node connect, disconnect, failed
authentication, admin calls), `event.duration` (ns), `event.reason`, `client.ip`,
`http.*` for admin calls, `error.*` for exceptions, `service.name`; every other field of
the hub's own goes under `openred.` (`openred.node`, `openred.session`,
`openred.close_code`, ...), so nothing collides with an ECS field of another type.

Why not the `ecs-logging` package: its formatter puts every `extra` field at the root of
the document, where ours collide with ECS (`event` is an object in ECS, a string here:
Elasticsearch would reject the line); renaming them is most of what a formatter does,
so the few ECS fields are written here instead.

With tracing on (hub/tracing.py), a line written within a span carries its ids:
`trace_id` and `span_id` in JSON, ECS's `trace.id` and `span.id` in ECS.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["EcsFormatter", "set_trace_ids", "setup_logging"]

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

# (trace_id, span_id) of the current span, or None; set by hub/tracing.py when tracing is
# on. None (off): one global check per line, no OpenTelemetry module imported.
_trace_ids: Callable[[], tuple[str, str] | None] | None = None


def set_trace_ids(fn: Callable[[], tuple[str, str] | None] | None) -> None:
    global _trace_ids
    _trace_ids = fn


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD:
                out[k] = v
        ids = _trace_ids() if _trace_ids is not None else None
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STD)
        line = f"{self.formatTime(record)} {record.levelname.lower():7} {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


ECS_VERSION = "8.11.0"
# Our fields that are ECS fields, wherever they appear.
_ECS_NAMES = {
    "event": "event.action",
    "ip": "client.ip",
    "reason": "event.reason",
    "error": "error.message",
    "instance": "service.node.name",
}
# Admin HTTP events (their `event` starts with "admin"): the request's fields.
_ECS_HTTP = {
    "method": "http.request.method",
    "status": "http.response.status_code",
    "request_id": "http.request.id",
}
# event name -> (category, type, outcome): what an operator filters on.
_ECS_EVENTS: dict[str, tuple[list[str], list[str], str | None]] = {
    "node_connected": (["session"], ["start"], "success"),
    "node_disconnected": (["session"], ["end"], None),
    "auth_failed": (["authentication"], ["start"], "failure"),
    "admin_call": (["web"], ["access"], None),
    "admin_auth_failed": (["authentication", "web"], ["access", "denied"], "failure"),
    "breaker_open": (["database"], ["change"], None),
    "breaker_closed": (["database"], ["change"], None),
}


def _put(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        inner = doc.get(name)
        if not isinstance(inner, dict):
            inner = doc[name] = {}
        doc = inner
    doc[leaf] = value


class EcsFormatter(logging.Formatter):
    """One JSON object per line in Elastic Common Schema fields (module docstring)."""

    def __init__(self, service: str = "openred-hub") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
              + f".{int(record.msecs):03d}Z")
        doc: dict[str, Any] = {"@timestamp": ts, "log": {"level": record.levelname.lower(),
                                                         "logger": record.name},
                               "message": record.getMessage(), "ecs": {"version": ECS_VERSION},
                               "service": {"name": self.service},
                               "event": {"dataset": "openred.hub", "kind": "event"}}
        extra = {k: v for k, v in record.__dict__.items() if k not in _STD}
        action = extra.get("event")
        http = isinstance(action, str) and action.startswith("admin")
        for key, value in extra.items():
            if value is None:
                continue
            name = _ECS_NAMES.get(key) or (_ECS_HTTP.get(key) if http else None)
            if name is not None:
                _put(doc, name, value if name != "event.action" else str(value))
            elif key == "duration_ms" and isinstance(value, int | float):
                _put(doc, "event.duration", int(value * 1_000_000))  # ECS: nanoseconds
            else:
                _put(doc, f"openred.{key}", value)
        if isinstance(action, str) and action in _ECS_EVENTS:
            category, kind, outcome = _ECS_EVENTS[action]
            doc["event"]["category"], doc["event"]["type"] = category, kind
            if outcome is not None:
                doc["event"]["outcome"] = outcome
        ids = _trace_ids() if _trace_ids is not None else None
        if ids is not None:  # ECS trace.id / span.id: Kibana links the line to its trace
            doc["trace"], doc["span"] = {"id": ids[0]}, {"id": ids[1]}
        if http and isinstance(extra.get("status"), int):
            doc["event"].setdefault("outcome", "success" if extra["status"] < 400 else "failure")
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, _ = record.exc_info
            _put(doc, "error.type", exc_type.__name__)
            _put(doc, "error.message", str(exc) or exc_type.__name__)
            _put(doc, "error.stack_trace", self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    elif fmt == "ecs":
        formatter = EcsFormatter()
    else:
        formatter = TextFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library loggers speak per connection or per request at info: keep them quiet.
    for name in ("websockets", "aiohttp.access", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)
