"""The circuit breaker's state machine (a fake clock) and the guards around the store and
the broker (hub/breaker.py). The guards are tested over a fake store and broker: our own
boundary, the `Store` and `Broker` contracts; the real backends behind a real outage are
tests/ops/test_store_outage.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest
from openred.hub.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, GuardedBroker, GuardedStore
from openred.hub.broker import BrokerUnavailable
from openred.hub.metrics import Metrics
from openred.persistence.store import QueueFull, StoreUnavailable
from prometheus_client.registry import CollectorRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Callable[[], float], **kw: Any) -> Breaker:
    args = {"failures": 3, "window_s": 10.0, "open_s": 5.0, "probe_timeout_s": 4.0} | kw
    return Breaker("store", clock=clock, **args)


def test_opens_after_consecutive_failures_within_the_window() -> None:
    clock = Clock()
    b = breaker(clock)
    b.failure()
    b.failure()
    b.success()  # the streak starts again
    b.failure()
    b.failure()
    assert b.state is CLOSED and b.allow()
    b.failure()
    assert b.state is OPEN and b.opened == 1
    assert not b.allow()


def test_failures_spread_wider_than_the_window_do_not_open() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(10):
        b.failure()
        clock.now += 6.0  # the third of a streak always falls outside 10 s
        b.failure()
        clock.now += 6.0
    assert b.state is CLOSED


def test_half_open_lets_one_probe_through_at_a_time() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow() and b.state is HALF_OPEN  # the probe
    assert not b.allow()  # one at a time
    b.failure()  # the probe failed: open for another open_s
    assert b.state is OPEN and b.opened == 2
    assert not b.allow()
    clock.now += 5.0
    assert b.allow()
    b.success()
    assert b.state is CLOSED and b.allow() and b.allow()


def test_a_probe_that_never_reports_frees_its_slot() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 5.0
    assert b.allow()
    clock.now += 3.9
    assert not b.allow()
    clock.now += 0.2  # probe_timeout_s passed
    assert b.allow()
    b.neutral()  # cancelled: no verdict, the next caller probes
    assert b.allow()


def test_a_late_success_does_not_close_an_open_breaker_but_reset_does() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    b.success()  # a call let through before it opened, answering late
    assert b.state is OPEN
    b.reset()  # the backend says it is back
    assert b.state is CLOSED and b.allow()


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        Breaker("store", failures=0)
    with pytest.raises(ValueError):
        Breaker("store", open_s=0)


# -- the guards -------------------------------------------------------------------------


class FakeStore:
    """Answers as told: `fail` (an exception to raise) or after `delay_s`."""

    def __init__(self) -> None:
        self.fail: BaseException | None = None
        self.delay_s = 0.0
        self.audited: list[str] = []
        self.commits = 7
        self.fail_item: Any = None  # enqueue_many: the last item's outcome

    async def _answer(self) -> int:
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return 1

    async def enqueue(self, msg: Any, max_pending: int) -> None:
        await self._answer()

    async def count_pending(self, node_id: str, now_ms: int) -> int:
        return await self._answer()

    async def enqueue_many(self, items: list[Any]) -> list[Any]:
        await self._answer()
        return [self.fail_item if i == len(items) - 1 else None for i in range(len(items))]

    def pool_usage(self) -> tuple[int, int]:
        return 0, 1  # one connection: not gated (as SQLite)

    async def brand_new_method(self, x: int) -> int:  # a contract method added later
        return x + await self._answer()

    def audit_nowait(self, kind: str, *args: Any) -> None:
        self.audited.append(kind)


class _Metrics(Metrics):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        super().__init__(self.registry)

    def registry_value(self, name: str) -> float | None:
        return self.registry.get_sample_value(name)


def metrics() -> Any:
    return _Metrics()


async def test_guarded_store_counts_outcomes_and_fails_fast_when_open() -> None:
    m = metrics()
    inner = FakeStore()
    clock = Clock()
    b = breaker(clock)
    store: Any = GuardedStore(cast(Any, inner), b, m, timeout_s=0.05)
    await store.enqueue(None, 1)
    inner.fail = QueueFull("full")
    with pytest.raises(QueueFull):
        await store.enqueue(None, 1)
    inner.fail = None
    inner.delay_s = 1.0  # a read cut at timeout_s; a write is never cut here
    with pytest.raises(StoreUnavailable):
        await store.count_pending("n", 0)
    inner.delay_s = 0.0
    inner.fail = StoreUnavailable("down")
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            await store.enqueue(None, 1)
    assert b.state is OPEN
    with pytest.raises(StoreUnavailable, match="circuit breaker open"):
        await store.enqueue(None, 1)
    store.audit_nowait("kick")  # dropped while open, as the contract allows
    assert inner.audited == []
    assert store.commits == 7  # attributes pass through
    assert dict(m.store_ops) == {
        ("enqueue", "ok"): 1, ("enqueue", "refused"): 1, ("count_pending", "timeout"): 1,
        ("enqueue", "error"): 2, ("enqueue", "rejected"): 1, ("audit_nowait", "rejected"): 1}
    # store_write_seconds: every attempted write, failures included; not the rejected.
    observed = m.registry_value("openred_hub_store_write_seconds_count")
    assert observed == 4
    clock.now += 5.0
    inner.fail = None
    assert await store.brand_new_method(1) == 2  # unknown methods are guarded too: a probe
    assert b.state is CLOSED
    assert m.store_ops[("brand_new_method", "ok")] == 1


async def test_an_item_answered_unavailable_is_the_calls_failure() -> None:
    """enqueue_many answers each message: one answered StoreUnavailable (the others may
    be stored) counts against the breaker like a raised one."""
    m = metrics()
    inner = FakeStore()
    b = breaker(Clock())
    store: Any = GuardedStore(cast(Any, inner), b, m, timeout_s=0.05)
    assert await store.enqueue_many([1, 2]) == [None, None]
    inner.fail_item = QueueFull("full")  # the store answered: no failure
    assert isinstance((await store.enqueue_many([1]))[0], QueueFull)
    inner.fail_item = StoreUnavailable("down")
    for _ in range(3):  # the helper's threshold
        outcomes = await store.enqueue_many([1, 2])
        assert outcomes[0] is None and isinstance(outcomes[1], StoreUnavailable)
    assert dict(m.store_ops) == {("enqueue_many", "ok"): 2, ("enqueue_many", "error"): 3}
    assert b.state is OPEN


class FakeBroker:
    def __init__(self) -> None:
        self.fail = False
        self.handler: Any = None

    async def start(self, instance_id: str, handler: Any) -> None:
        self.handler = handler

    async def next_seq(self, topic: str) -> int:
        if self.fail:
            raise BrokerUnavailable("redis unavailable")
        return 1

    def publish_to_node_nowait(self, node_id: str, frame: bytes, qos: int, mid: str,
                               want_result: bool = False) -> asyncio.Future[bool] | None:
        if self.fail:
            raise BrokerUnavailable("redis unavailable")
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        fut.set_result(True)
        return fut if want_result else None


class Handler:
    def __init__(self) -> None:
        self.ups = 0
        self.frames: list[str] = []

    def on_node_frame(self, node_id: str, frame: bytes, qos: int, mid: str) -> None:
        self.frames.append(node_id)

    def on_topic_frame(self, topic: str, seq: int, frame: bytes) -> None: ...

    def on_control(self, node_id: str, command: str, session_id: str | None) -> None: ...

    def on_broker_up(self) -> None:
        self.ups += 1


async def test_guarded_broker_opens_on_failures_and_closes_when_redis_is_back() -> None:
    m = metrics()
    inner = FakeBroker()
    b = breaker(Clock(), open_s=60.0)
    broker: Any = GuardedBroker(cast(Any, inner), b, m)
    handler = Handler()
    await broker.start("i1", handler)
    inner.handler.on_node_frame("n1", b"", 0, "")  # the hub's own method, unwrapped
    assert handler.frames == ["n1"]
    assert await broker.next_seq("t") == 1
    fut = broker.publish_to_node_nowait("n", b"f", 0, "m", True)
    assert await fut
    await asyncio.sleep(0)  # its done callback (the outcome) runs
    inner.fail = True
    for _ in range(3):
        with pytest.raises(BrokerUnavailable):
            broker.publish_to_node_nowait("n", b"f", 0, "m")
    assert b.state is OPEN
    with pytest.raises(BrokerUnavailable, match="circuit breaker open"):
        await broker.next_seq("t")
    inner.fail = False
    inner.handler.on_broker_up()  # Redis is back: closed at once, not after open_s
    assert b.state is CLOSED and handler.ups == 1
    assert await broker.next_seq("t") == 1
    assert dict(m.broker_ops) == {
        ("next_seq", "ok"): 2, ("publish_to_node", "ok"): 1, ("publish_to_node", "error"): 3,
        ("next_seq", "rejected"): 1}
