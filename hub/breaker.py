"""Backend failures fail fast: the circuit breaker, and the guarded store and broker that
every call of the hub to its backends goes through (docs/protocol.md §9 `unavailable`).

Owned here:

- `Breaker`, one state machine per backend. **Closed**: calls go through; after
  `failures` consecutive failures or timeouts, all within `window_s`, it opens.
  **Open**: calls fail at once, without touching the backend, for `open_s`. **Half-open**
  (then): one call at a time goes through as the probe; its success closes the breaker,
  its failure opens it again for another `open_s`. A backend that can tell by itself
  that it is back (the Redis broker's `on_broker_up`) closes it at once (`reset`).
- `GuardedStore`: the `Store` the hub sees (hub/app.py wraps the one it opens). Every
  call passes the store's breaker, is counted by outcome (`store_operations_total`:
  ok, refused, error, timeout, rejected) and, for the group-committed writes, timed
  (`store_write_seconds`, failures included). Reads are cut at `store.timeout_s`
  (cancelling a read loses nothing); writes are not cut here: a write that returned
  `unavailable` must not commit later (the `Store` contract), so PostgreSQL's own
  statement, pool and connect timeouts (set from `store.timeout_s` by
  `persistence.backends.open_store`) bound them instead.
- `GuardedBroker`: the same for the Redis broker (`broker_operations_total`). The Redis
  broker already knows when its connections are down and fails fast by itself: those
  instant failures open the breaker like any other, and its `on_broker_up` (its
  reconnection loop is the real probe) closes it at once, so routing resumes as soon as
  Redis is back, not an `open_s` later. The memory broker cannot fail and is not
  wrapped.

With tracing on (hub/tracing.py), both are also where backend calls become spans: every
store call a client span (`db.system`, `db.operation.name`: one layer, not each store
method), the broker's publishes and what it brings from other instances messaging spans.
Off, nothing of it is in place (bound at start-up).

Both wrappers forward any method they do not know (new contract methods included) the
same way: coroutine methods guarded, `*_nowait` methods dropped while the breaker is
open (the contract lets them drop), anything else as it is.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from openred.hub.broker import BrokerUnavailable
from openred.persistence.store import QueueFull, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from openred.hub.broker import Broker, BrokerHandler
    from openred.hub.metrics import Metrics
    from openred.hub.tracing import Tracing
    from openred.persistence.store import Store

__all__ = ["Breaker", "BreakerState", "GuardedBroker", "GuardedStore"]

log = logging.getLogger("openred.hub.breaker")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Breaker:
    """One backend's circuit breaker (module docstring). Callers ask `allow()` before a
    call and report `success()`, `failure()` or `neutral()` (no verdict: cancelled, or a
    call that cannot probe) after it. No I/O, no task: cheap enough for every call."""

    __slots__ = ("_clock", "_opened_at", "_probe_at", "_streak", "_streak_start",
                 "failures", "name", "open_s", "opened", "probe_timeout_s", "state",
                 "window_s")

    def __init__(self, name: str, *, failures: int = 5, window_s: float = 10.0,
                 open_s: float = 5.0, probe_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or window_s <= 0 or open_s <= 0 or probe_timeout_s <= 0:
            raise ValueError("breaker: failures >= 1 and positive durations needed")
        self.name = name
        self.failures = failures
        self.window_s = window_s
        self.open_s = open_s
        # A probe that never reports (its caller was cancelled and said nothing) frees
        # the half-open slot after this long, so the breaker cannot stay stuck.
        self.probe_timeout_s = probe_timeout_s
        self.state = CLOSED
        self.opened = 0  # times it opened (openred_hub_breaker_opened_total)
        self._clock = clock
        self._streak = 0
        self._streak_start = 0.0
        self._opened_at = 0.0
        self._probe_at: float | None = None

    def allow(self) -> bool:
        """May a call go to the backend now? In half-open, True makes that call the
        probe."""
        state = self.state
        if state is CLOSED:
            return True
        now = self._clock()
        if state is OPEN:
            if now - self._opened_at < self.open_s:
                return False
            self._set(HALF_OPEN)
        elif self._probe_at is not None and now - self._probe_at < self.probe_timeout_s:
            return False  # one probe at a time
        self._probe_at = now
        return True

    def success(self) -> None:
        self._streak = 0
        if self.state is HALF_OPEN:
            self._set(CLOSED)
        # OPEN: a call let through before the breaker opened answered late; the probe
        # decides, not it.

    def failure(self) -> None:
        state = self.state
        if state is OPEN:
            return
        now = self._clock()
        if state is HALF_OPEN:
            self._open(now)
            return
        if self._streak == 0 or now - self._streak_start > self.window_s:
            self._streak, self._streak_start = 1, now
        else:
            self._streak += 1
        if self._streak >= self.failures:
            self._open(now)

    def neutral(self) -> None:
        """A call ended without a verdict on the backend: free the probe slot."""
        if self.state is HALF_OPEN:
            self._probe_at = None

    def reset(self) -> None:
        """The backend says it is back (e.g. the Redis broker reconnected)."""
        self._streak = 0
        if self.state is not CLOSED:
            self._set(CLOSED)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._streak = 0
        self.opened += 1
        self._set(OPEN)

    def _set(self, state: BreakerState) -> None:
        was, self.state = self.state, state
        self._probe_at = None
        if state is OPEN and was is CLOSED:
            log.warning("circuit breaker open", extra={
                "event": "breaker_open", "backend": self.name, "open_s": self.open_s})
        elif state is CLOSED:
            log.info("circuit breaker closed", extra={
                "event": "breaker_closed", "backend": self.name})


def _timed_out(exc: BaseException) -> bool:
    """Whether a backend error comes from a timeout (anywhere in its causes)."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, TimeoutError):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


# Store methods cut at store.timeout_s here: reads, which are safe to cancel.
STORE_READS = frozenset({
    "ping", "get_node", "list_nodes", "pending", "count_pending", "message_state",
    "history_since", "last_seq", "audit_query", "revocations_since", "undelivered",
    "pending_total", "history_before",
})
# Timed in store_write_seconds: the group-committed message writes.
STORE_WRITES = frozenset({"enqueue", "enqueue_many", "ack", "append_history",
                          "session_start"})
# Writes answering each item with its outcome instead of raising: an item answered
# StoreUnavailable is the call's failure (the others may have been stored).
STORE_MANY = frozenset({"enqueue_many"})
# Store calls waiting for a connection slot (GuardedStore) beyond which a call is refused
# at once (`unavailable`, no breaker verdict): a bound on what a storm can queue.
MAX_QUEUED = 50_000
# Never guarded: lifecycle, and what must run whatever the breaker says.
_PASSTHROUGH = frozenset({"open", "close", "migrate", "start", "maintain"})


class _Guard:
    """What both wrappers share: attribute forwarding that builds (once per name) a
    guarded function for each method of the wrapped backend."""

    _inner: Any
    _breaker: Breaker
    _ops: Any  # defaultdict[tuple[str, str], int] of hub/metrics.py

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._inner, name)
        if name.startswith("_") or name in _PASSTHROUGH or not callable(attr):
            return attr  # not cached: attributes such as counters change
        if name.endswith("_nowait"):
            wrapped = self._nowait(name, attr)
        elif inspect.iscoroutinefunction(attr):
            wrapped = self._guarded(name, attr)
        else:
            return attr
        object.__setattr__(self, name, wrapped)  # next time found without __getattr__
        return wrapped

    def _nowait(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        breaker, ops = self._breaker, self._ops
        rejected = (op, "rejected")

        def call(*args: Any, **kwargs: Any) -> Any:
            if breaker.state is OPEN:  # dropped (and counted), as the contract allows
                ops[rejected] += 1
                return None
            return fn(*args, **kwargs)

        return call

    def _guarded(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError


class GuardedStore(_Guard):
    """The hub's `Store`: the wrapped store behind the store breaker (module
    docstring). Raises StoreUnavailable at once while the breaker is open."""

    def __init__(self, store: Store, breaker: Breaker, metrics: Metrics,
                 timeout_s: float, tracing: Tracing | None = None,
                 db_system: str = "") -> None:
        self._inner = store
        self._breaker = breaker
        self._metrics = metrics
        self._ops = metrics.store_ops
        self.timeout_s = timeout_s
        self._tracing = tracing
        self._db_system = db_system
        # Calls that take a pool connection of their own (every one but the group-
        # committed writes, which queue in the store's writer) wait here for one, so a
        # reconnect storm queues instead of timing out inside the pool and opening the
        # breaker (which turned 10,000 reconnecting nodes into a minute-long outage).
        # Two connections stay for the writers (PostgreSQL's two lanes: stores, acks);
        # the in-doubt resolver, rare, takes the next one a read gives back. A store
        # with one connection (SQLite: its own thread, which queues and batches) is not
        # gated.
        pool = store.pool_usage()[1]
        self._slots = asyncio.Semaphore(pool - 2) if pool > 2 else None
        self._queued = 0

    @property
    def inner(self) -> Store:
        return self._inner  # type: ignore[no-any-return]

    def _guarded(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        breaker, ops, timeout_s = self._breaker, self._ops, self.timeout_s
        read = op in STORE_READS
        many = op in STORE_MANY
        observe = self._metrics.store_write_seconds.observe if op in STORE_WRITES else None
        keys = {o: (op, o) for o in ("ok", "refused", "error", "timeout", "rejected")}

        slots = None if op in STORE_WRITES else self._slots

        async def call(*args: Any, **kwargs: Any) -> Any:
            assert slots is not None
            if self._queued >= MAX_QUEUED and slots.locked():
                ops[keys["rejected"]] += 1  # no verdict: the store is busy, not down
                raise StoreUnavailable("store unavailable: too many calls waiting")
            self._queued += 1
            try:
                await slots.acquire()
            finally:
                self._queued -= 1
            try:
                return await run(*args, **kwargs)
            finally:
                slots.release()

        async def run(*args: Any, **kwargs: Any) -> Any:
            if not breaker.allow():
                ops[keys["rejected"]] += 1
                raise StoreUnavailable("store unavailable: circuit breaker open")
            t0 = time.perf_counter()
            outcome: str | None = None
            try:
                if read:
                    try:
                        async with asyncio.timeout(timeout_s):
                            result = await fn(*args, **kwargs)
                    except TimeoutError:
                        raise StoreUnavailable(
                            f"store unavailable: no answer in {timeout_s} s") from None
                else:
                    result = await fn(*args, **kwargs)
                down = next((r for r in result if isinstance(r, StoreUnavailable)),
                            None) if many else None
                if down is not None:
                    outcome = "timeout" if _timed_out(down) else "error"
                    breaker.failure()
                    return result
                outcome = "ok"
                breaker.success()
                return result
            except StoreUnavailable as exc:
                outcome = "timeout" if _timed_out(exc) else "error"
                breaker.failure()
                raise
            except (QueueFull, StoreError):  # the store answered: this value is refused
                outcome = "refused"
                breaker.success()
                raise
            except Exception:  # a bug, not the backend: counted, no verdict
                outcome = "error"
                breaker.neutral()
                raise
            except BaseException:  # cancelled: neither counted nor a verdict
                breaker.neutral()
                raise
            finally:
                if outcome is not None:
                    ops[keys[outcome]] += 1
                    if observe is not None:
                        observe(time.perf_counter() - t0)

        # No slot to take (the group-committed writes, or an ungated store): one
        # coroutine frame less per call.
        fn_ = run if slots is None else call
        if self._tracing is not None:
            return self._tracing.store_call(op, self._db_system, fn_)
        return fn_


class _BrokerHandler:
    """The hub's handler as the broker sees it: the same bound methods (no extra call on
    the message path), except `on_broker_up`, which closes the breaker first."""

    def __init__(self, handler: BrokerHandler, breaker: Breaker,
                 tracing: Tracing | None = None) -> None:
        self._handler = handler
        self._breaker = breaker
        self.on_node_frame = handler.on_node_frame
        self.on_topic_frame = handler.on_topic_frame
        self.on_control = handler.on_control
        if tracing is not None:  # bound here, once: off, the message path is unchanged
            self.on_node_frame = tracing.broker_node_receiver(handler.on_node_frame)
            topics: dict[str, Any] = getattr(handler, "topics", {})
            self.on_topic_frame = tracing.broker_topic_receiver(
                handler.on_topic_frame, lambda topic: len(topics.get(topic, ())))

    def on_broker_up(self) -> None:
        self._breaker.reset()
        on_up = getattr(self._handler, "on_broker_up", None)
        if on_up is not None:
            on_up()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._handler, name)


class GuardedBroker(_Guard):
    """The hub's `Broker` when it is Redis: behind the broker breaker (module
    docstring). Raises BrokerUnavailable at once while the breaker is open."""

    def __init__(self, broker: Broker, breaker: Breaker, metrics: Metrics,
                 tracing: Tracing | None = None) -> None:
        self._inner = broker
        self._breaker = breaker
        self._ops = metrics.broker_ops
        self._tracing = tracing
        if tracing is not None:  # an instance attribute shadowing the method: off, no layer
            self.publish_to_node_nowait = tracing.broker_publish_nowait(  # type: ignore[method-assign]
                self.publish_to_node_nowait)

    @property
    def inner(self) -> Broker:
        return self._inner  # type: ignore[no-any-return]

    async def start(self, instance_id: str, handler: BrokerHandler) -> None:
        await self._inner.start(instance_id,
                                _BrokerHandler(handler, self._breaker, self._tracing))

    def publish_to_node_nowait(self, node_id: str, frame: bytes, qos: int, mid: str,
                               want_result: bool = False) -> asyncio.Future[bool] | None:
        """The QoS 0 hot path: a breaker check and a counter, no task."""
        breaker, ops = self._breaker, self._ops
        if not breaker.allow():
            ops[("publish_to_node", "rejected")] += 1
            raise BrokerUnavailable("broker unavailable: circuit breaker open")
        try:
            fut: asyncio.Future[bool] | None = self._inner.publish_to_node_nowait(
                node_id, frame, qos, mid, want_result)
        except BrokerUnavailable as exc:
            ops[("publish_to_node", "timeout" if _timed_out(exc) else "error")] += 1
            breaker.failure()
            raise
        if fut is None:
            ops[("publish_to_node", "ok")] += 1  # queued: its fate is not reported back
            breaker.neutral()
        else:
            fut.add_done_callback(self._published)
        return fut

    def _published(self, fut: asyncio.Future[bool]) -> None:
        if fut.cancelled():
            self._breaker.neutral()
            return
        exc = fut.exception()
        if exc is None:
            self._ops[("publish_to_node", "ok")] += 1
            self._breaker.success()
        else:
            self._ops[("publish_to_node", "timeout" if _timed_out(exc) else "error")] += 1
            self._breaker.failure()

    def _guarded(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        breaker, ops = self._breaker, self._ops
        keys = {o: (op, o) for o in ("ok", "error", "timeout", "rejected")}

        async def call(*args: Any, **kwargs: Any) -> Any:
            if not breaker.allow():
                ops[keys["rejected"]] += 1
                raise BrokerUnavailable("broker unavailable: circuit breaker open")
            outcome: str | None = None
            try:
                result = await fn(*args, **kwargs)
                outcome = "ok"
                breaker.success()
                return result
            except (BrokerUnavailable, TimeoutError) as exc:
                outcome = "timeout" if _timed_out(exc) else "error"
                breaker.failure()
                raise
            except Exception:  # not a backend failure (e.g. a bug): counted, no verdict
                outcome = "error"
                breaker.neutral()
                raise
            except BaseException:  # cancelled
                breaker.neutral()
                raise
            finally:
                if outcome is not None:
                    ops[keys[outcome]] += 1

        if self._tracing is not None and op in ("publish_to_node", "publish_to_topic"):
            return self._tracing.broker_publish(op, call)
        return call
