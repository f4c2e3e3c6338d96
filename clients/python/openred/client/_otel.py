"""W3C Trace Context in message `meta` (docs/protocol.md §13), through OpenTelemetry
when the node's process has it, and nothing otherwise: the SDK never requires the
package. Only `traceparent` and `tracestate` are carried, the §13 keys, so a propagator
configured with more (baggage) cannot push `meta` past its §4.1 bounds.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TRACE_KEYS", "extract", "inject", "reset"]

TRACE_KEYS = ("traceparent", "tracestate")

_UNSET: Any = object()
_propagate: Any = _UNSET  # the opentelemetry.propagate module, None when absent


def _module() -> Any:
    global _propagate
    if _propagate is _UNSET:
        try:
            _propagate = importlib.import_module("opentelemetry.propagate")
        except ImportError:
            _propagate = None
    return _propagate


def reset() -> None:
    """Look for OpenTelemetry again at the next call (after it was installed)."""
    global _propagate
    _propagate = _UNSET


def inject(meta: dict[str, str]) -> None:
    """Add the current context's `traceparent` / `tracestate` to `meta`, unless the
    application set a `traceparent` itself."""
    if "traceparent" in meta:
        return
    propagate = _module()
    if propagate is None:
        return
    carrier: dict[str, str] = {}
    try:
        propagate.inject(carrier)
    except Exception:  # a tracing failure must never stop a message
        return
    for key in TRACE_KEYS:
        value = carrier.get(key)
        if isinstance(value, str) and value and len(value) <= 512:
            meta[key] = value


def extract(meta: dict[str, str]) -> Any | None:
    """The OpenTelemetry `Context` carried by a received message's `meta`, or None
    (no `traceparent`, or no OpenTelemetry in this process)."""
    if "traceparent" not in meta:
        return None
    propagate = _module()
    if propagate is None:
        return None
    try:
        return propagate.extract({k: meta[k] for k in TRACE_KEYS if k in meta})
    except Exception:
        return None
