"""The benchmark scenarios (docs/benchmarks.md). Each is
`async def name(target, args, progress) -> dict`,
run once per target per run in its own event loop (uvloop), with the target's servers
already started (bench/procs.py). Every result carries the generator's own CPU share
(`generator_cpu`, resource.getrusage of this process over the measured window) and the
servers' (`server_cpu`, from /proc, Redis included for the cluster targets).

- `direct`: pairs x window, QoS 0: each receiver, for every n messages it reads, makes its
  sender write n more, so `window` messages per pair are always in flight.
- `latency`: a fixed offered rate spread over pairs; the send time (perf_counter_ns, 8
  bytes) opens each body and is read back at the receiver.
- `idle`: N sessions held open; server RSS per session from VmRSS before and after.
- `fanout`: 1 publisher -> N subscribers at a fixed rate; every delivery timed.
- `qos1`: like `direct` with QoS 1: `window` sends per pair awaiting `ok stored`, the
  receivers ack what they read (one `ack` with `mids` per read). Its `rabbitmq` target
  runs the same shape against RabbitMQ instead (bench/rabbitmq.py: durable queues,
  persistent publishes, publisher confirms, acks with `multiple`).
- `storm`: N nodes known to the hub, each with K QoS 1 messages stored while away, all
  reconnect at once: time until all are back and have all their messages; loss check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import secrets
import time
from array import array
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
from openred.protocol.frames import array_header
from openred.protocol.identity import Identity

from bench.lean import LeanNode, client_frame, frames_of, read_stamp
from bench.procs import Target, cpu_seconds, nofile_of, rss_kib
from bench.profile import Profiler
from bench.rabbitmq import qos1 as rabbitmq_qos1
from bench.report import Progress, cdf_points, percentiles

__all__ = ["SCENARIO_FUNCS"]

packb = msgpack.Packer(use_bin_type=True).pack
ns = time.perf_counter_ns
SAMPLE_S = 0.5  # timeline resolution


class Meter:
    """Elapsed time, a counter's rate, generator and server CPU over one window, and
    the counter's timeline (seconds into the window, count)."""

    def __init__(self, target: Target, count: Callable[[], int],
                 a: argparse.Namespace | None = None) -> None:
        self.pids = list(target.pids)
        self.count = count
        self.timeline: list[tuple[float, int]] = []
        self.profiler: Profiler | None = None
        if a is not None and getattr(a, "profiling", False) and target.kind == "hub" \
                and self.pids:
            self.profiler = Profiler(self.pids[0], f"{a.scenario}-{target.name}")

    def _srv(self) -> tuple[float, float] | None:
        try:
            parts = [cpu_seconds(p) for p in self.pids]
        except (OSError, ValueError, IndexError):
            return None
        return sum(u for u, _ in parts), sum(s for _, s in parts)

    def start(self) -> Meter:
        self.t0 = time.perf_counter()
        self.n0 = self.count()
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.srv0 = self._srv()
        self.timeline = [(0.0, 0)]
        if self.profiler is not None:
            self.profiler.start()
        return self

    def sample(self) -> None:
        self.timeline.append((round(time.perf_counter() - self.t0, 3), self.count() - self.n0))

    async def sample_for(self, seconds: float) -> None:
        end = self.t0 + seconds
        while (now := time.perf_counter()) < end:
            await asyncio.sleep(min(SAMPLE_S, end - now))
            self.sample()

    def stop(self) -> dict[str, Any]:
        self.sample()
        t1 = time.perf_counter()
        n = self.count() - self.n0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        srv1 = self._srv()
        elapsed = max(t1 - self.t0, 1e-9)
        gen = (ru1.ru_utime + ru1.ru_stime - self.ru0.ru_utime - self.ru0.ru_stime) / elapsed
        out: dict[str, Any] = {
            "seconds": round(elapsed, 2), "count": n, "rate": n / elapsed,
            "generator_cpu": round(gen, 3), "server_cpu": None, "server_sys_share": None,
            "_timeline": self.timeline,
        }
        if self.srv0 is not None and srv1 is not None:
            user, sys_ = srv1[0] - self.srv0[0], srv1[1] - self.srv0[1]
            out["server_cpu"] = round((user + sys_) / elapsed, 3)
            out["server_sys_share"] = round(sys_ / (user + sys_), 3) if user + sys_ else None
        if self.profiler is not None:
            out["profile"] = self.profiler.stop()
        return out


# Connections from one source address to one hub share the ephemeral port range
# (net.ipv4.ip_local_port_range: 28,232 ports by default). Past this many, loopback
# connections are spread over 127.0.0.1, 127.0.0.2, ... (all of 127/8 is local on Linux).
PORTS_PER_SOURCE = 25_000


def source_of(host: str, i: int, n: int) -> str | None:
    """The local address the i-th of n connections to `host` binds, or None (the kernel's
    choice) when one source address has ports enough or `host` is not loopback."""
    if n <= PORTS_PER_SOURCE or not host.startswith("127."):
        return None
    sources = -(-n // PORTS_PER_SOURCE)
    return f"127.0.0.{1 + i % sources}"


async def connect_many(target: Target, n: int, *, endpoint_of: Callable[[int], int] | None = None,
                       identities: list[Identity] | None = None,
                       hello_extra: dict[str, Any] | None = None, concurrency: int = 256,
                       kw_of: Callable[[int], dict[str, Any]] | None = None,
                       retries: int = 0, wait_s: float = 30.0,
                       stats: Counter[str] | None = None,
                       on_connected: Callable[[int, LeanNode], None] | None = None,
                       ) -> list[LeanNode]:
    """n nodes, at most `concurrency` handshakes at a time; failed attempts retried (with
    jittered backoff) up to `retries` times, counted in `stats`."""
    sem = asyncio.Semaphore(max(1, concurrency))
    tag = secrets.token_hex(3)
    nodes: list[LeanNode | None] = [None] * n

    async def one(i: int) -> None:
        host, port = target.endpoints[endpoint_of(i) if endpoint_of else 0]
        kw = dict(kw_of(i)) if kw_of else {}
        local = source_of(host, i, n)
        if local is not None:
            kw["local_host"] = local
        attempt = 0
        while True:
            async with sem:
                try:
                    if target.plain:
                        node = await LeanNode.connect(host, port, plain_id=f"n{i}-{tag}",
                                                      hello_extra=hello_extra,
                                                      wait_s=wait_s, **kw)
                    else:
                        node = await LeanNode.connect(
                            host, port, identities[i] if identities else None,
                            hello_extra=hello_extra, wait_s=wait_s, **kw)
                    break
                except (OSError, ConnectionError, TimeoutError) as exc:
                    attempt += 1
                    if stats is not None:
                        stats[f"connect failed: {type(exc).__name__}: {str(exc)[:60]}"] += 1
                    if attempt > retries:
                        raise
            await asyncio.sleep(random.random() * min(2.0, 0.05 * 2 ** attempt))
        nodes[i] = node
        if on_connected is not None:
            on_connected(i, node)

    await asyncio.gather(*(one(i) for i in range(n)))
    return [node for node in nodes if node is not None]


async def wait_until(cond: Callable[[], bool], limit_s: float, step_s: float = 0.05) -> bool:
    """Poll `cond` until it holds (True) or `limit_s` has passed (False)."""
    deadline = time.perf_counter() + limit_s
    while not cond():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(step_s)
    return True


def _close_all(*groups: list[LeanNode]) -> int:
    """Close every node; returns how many had been closed or lost before (a server-side
    close during the run is a problem worth reporting)."""
    gone = 0
    for group in groups:
        for node in group:
            if not node.is_open:
                gone += 1
            node.close()
    return gone


def _error_counter(errors: Counter[str]) -> Callable[[bytes], None]:
    def on_reply(payload: bytes) -> None:
        for f in frames_of(payload):
            errors[str(f.get("code") or f.get("t"))] += 1
    return on_reply


# -- direct / cluster ---------------------------------------------------------------------


async def direct(target: Target, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    n_ep = len(target.endpoints)
    body = os.urandom(a.body_bytes)
    senders = await connect_many(target, a.pairs, endpoint_of=lambda i: i % n_ep)
    receivers = await connect_many(target, a.pairs, endpoint_of=lambda i: (i + 1) % n_ep,
                                   hello_extra={"batch": True} if a.batch else None)
    errors: Counter[str] = Counter()
    on_reply = _error_counter(errors)
    for s, r in zip(senders, receivers, strict=True):
        s.on_payload = on_reply
        payload = packb({"t": "send", "to": r.node_id, "body": body})
        def refill_batch(n: int, s: LeanNode = s, payload: bytes = payload) -> None:
            s.write(client_frame(array_header(n) + payload * n))

        def refill_frames(n: int, s: LeanNode = s, frame: bytes = client_frame(payload)) -> None:
            s.write(frame * n)

        refill = refill_batch if a.batch else refill_frames
        r.on_messages = refill
        refill(a.window)

    def count() -> int:
        return sum(r.received for r in receivers)

    meter = Meter(target, count, a)
    progress.set(f"{a.scenario} {target.name}: warm-up",
                 lambda: f"{count():,} msgs")
    await asyncio.sleep(min(2.0, a.seconds / 4))
    meter.start()
    progress.set(f"{a.scenario} {target.name}",
                 lambda: f"{meter.count() - meter.n0:,} msgs, "
                 f"{(meter.count() - meter.n0) / max(1e-9, time.perf_counter() - meter.t0):,.0f}"
                 " msgs/s")
    await meter.sample_for(a.seconds)
    m = meter.stop()
    gone = _close_all(senders, receivers)
    return {
        "msgs_per_s": round(m.pop("rate")), "messages": m.pop("count"), **m,
        "errors": dict(errors), "disconnects": gone,
    }


# -- latency ------------------------------------------------------------------------------


def check_room(target: Target, sessions: int) -> None:
    """Fail at once, naming the limit, when a server or this generator cannot hold
    `sessions` connections (one file descriptor each, plus a few)."""
    limits = {f"{target.name} (pid {pid})": nofile_of(pid) for pid in target.pids}
    limits["the generator"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    per_server = -(-sessions // max(1, len(target.pids))) if target.pids else sessions
    for who, limit in limits.items():
        need = sessions if who == "the generator" else per_server
        if limit is not None and need + 200 > limit:
            raise SystemExit(
                f"{need:,} sessions need {need + 200:,} file descriptors, but {who} may "
                f"open {limit:,} (RLIMIT_NOFILE). Raise the hard limit (ulimit -Hn, or "
                f"LimitNOFILE=) as root and run again.")


async def latency(target: Target, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    n_ep = len(target.endpoints)
    idle_nodes: list[LeanNode] = []
    rss_idle: dict[str, Any] = {}
    if a.idle_sessions:
        # Sessions that only answer heartbeats while the pairs are measured: what a
        # busy instance's event loop and memory look like with many nodes connected.
        check_room(target, a.idle_sessions + 2 * a.pairs)
        done = [0]
        progress.set(f"latency {target.name}: connecting idle sessions",
                     lambda: f"{done[0]:,}/{a.idle_sessions:,}")
        rss0 = sum(rss_kib(p) for p in target.pids)
        t0 = time.perf_counter()
        idle_nodes = await connect_many(
            target, a.idle_sessions, endpoint_of=lambda i: i % n_ep,
            concurrency=a.concurrency,
            on_connected=lambda i, node: done.__setitem__(0, done[0] + 1))
        connect_s = time.perf_counter() - t0
        rss1 = sum(rss_kib(p) for p in target.pids)
        rss_idle = {"idle_sessions": len(idle_nodes),
                    "idle_kib_per_session": round((rss1 - rss0) / max(1, len(idle_nodes)), 2),
                    "idle_connects_per_s": round(len(idle_nodes) / connect_s)}
    senders = await connect_many(target, a.pairs, endpoint_of=lambda i: i % n_ep)
    receivers = await connect_many(target, a.pairs, endpoint_of=lambda i: (i + 1) % n_ep)
    lat = array("q")
    recording = [False]
    errors: Counter[str] = Counter()
    on_reply = _error_counter(errors)

    def on_payload(payload: bytes) -> None:
        now = ns()
        if recording[0]:
            for f in frames_of(payload):
                body = f.get("body")
                if body is not None:
                    lat.append(now - read_stamp(body))

    pad = os.urandom(max(0, a.body_bytes - 8))
    prefixes = []
    for s, r in zip(senders, receivers, strict=True):
        s.on_payload = on_reply
        r.on_payload = on_payload
        whole = client_frame(packb({"t": "send", "to": r.node_id,
                                    "body": b"\x00" * (8 + len(pad))}))
        prefixes.append((s, whole[:len(whole) - 8 - len(pad)]))  # body is the last field
    sent = [0]
    n_pairs = len(prefixes)

    async def pace(duration: float) -> None:
        t_start = time.perf_counter()
        done = 0
        i = 0
        while (now := time.perf_counter()) - t_start < duration:
            due = int((now - t_start) * a.rate) - done
            for _ in range(due):
                s, prefix = prefixes[i % n_pairs]
                i += 1
                s.write(prefix + ns().to_bytes(8, "little") + pad)
            done += due
            sent[0] += due
            # uvloop's timers have 1 ms resolution (a shorter sleep spins the CPU)
            await asyncio.sleep(max(0.001, t_start + (done + 1) / a.rate - time.perf_counter()))

    def count() -> int:
        return sum(r.received for r in receivers)

    progress.set(f"latency {target.name}: warm-up", lambda: f"{sent[0]:,} sent")
    await pace(min(2.0, a.seconds / 4))
    recording[0] = True
    meter = Meter(target, count, a).start()
    sent0 = sent[0]
    progress.set(f"latency {target.name}",
                 lambda: f"{sent[0] - sent0:,} sent, p99 so far "
                 f"{percentiles(lat[-20000:])['p99_ms']} ms (last 20k)")
    sampler = asyncio.ensure_future(meter.sample_for(a.seconds))
    await pace(a.seconds)
    await sampler
    m = meter.stop()
    sent_measured = sent[0] - sent0
    await wait_until(lambda: count() >= sent[0], 3.0)
    lost = sent[0] - count()
    recording[0] = False
    gone = _close_all(senders, receivers)
    if idle_nodes:
        rss_idle["idle_alive"] = sum(1 for node in idle_nodes if node.is_open)
        _close_all(idle_nodes)
    pct = percentiles(lat)
    return {
        **rss_idle,
        "offered_per_s": a.rate, "sent_per_s": round(sent_measured / m["seconds"]),
        **pct, "samples": len(lat), "lost": lost, **m, "errors": dict(errors),
        "disconnects": gone, "_cdf": cdf_points(lat), "_timeline_unit": "msgs/s received",
    }


# -- idle ---------------------------------------------------------------------------------


async def idle(target: Target, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    check_room(target, a.sessions + 100)
    warm = await connect_many(target, 100)  # lazy imports, first allocations
    await asyncio.sleep(1.0)
    rss0 = sum(rss_kib(p) for p in target.pids)
    done = [0]

    def connected(i: int, node: LeanNode) -> None:
        done[0] += 1

    meter = Meter(target, lambda: done[0], a).start()
    progress.set(f"idle {target.name}: connecting", lambda: f"{done[0]:,}/{a.sessions:,}")
    nodes = await connect_many(target, a.sessions, concurrency=a.concurrency,
                               on_connected=connected)
    m = meter.stop()
    progress.set(f"idle {target.name}: settling", lambda: "")
    await asyncio.sleep(a.settle)
    rss1 = sum(rss_kib(p) for p in target.pids)
    alive = sum(1 for node in nodes if node.is_open)
    _close_all(nodes, warm)
    return {
        "sessions": a.sessions, "kib_per_session": round((rss1 - rss0) / a.sessions, 2),
        "rss_before_mib": round(rss0 / 1024, 1), "rss_after_mib": round(rss1 / 1024, 1),
        "connect_s": m["seconds"], "connects_per_s": round(a.sessions / m["seconds"]),
        "alive": alive, "generator_cpu": m["generator_cpu"], "server_cpu": m["server_cpu"],
        **({"profile": m["profile"]} if "profile" in m else {}),
        "_timeline": m["_timeline"], "_timeline_unit": "sessions connected",
        "_timeline_cumulative": True,
    }


# -- fanout -------------------------------------------------------------------------------


async def fanout(target: Target, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    topic = "bench/" + secrets.token_hex(4)
    lat = array("q")
    subscribed = [0]
    delivered = [0]
    errors: Counter[str] = Counter()
    measured = b"\x01"

    # 10,000 deliveries a publish make the generator's per-message cost count: a
    # single `msg` frame is read from its body's field (found by its msgpack header:
    # key "body", bin 8 of the known size) instead of being decoded whole.
    body_tag = b"\xa4body\xc4" + bytes((a.body_bytes,)) if a.body_bytes < 256 else None

    def on_payload(payload: bytes) -> None:
        now = ns()
        if body_tag is not None and payload[1:7] == b"\xa1t\xa3msg":
            i = payload.find(body_tag)
            if i > 0:
                i += len(body_tag)
                if payload[i + 8:i + 9] == measured:
                    delivered[0] += 1
                    lat.append(now - read_stamp(payload[i:i + 8]))
                return
        for f in frames_of(payload):
            t = f.get("t")
            if t == "msg":
                body = f["body"]
                if body[8:9] == measured:
                    delivered[0] += 1
                    lat.append(now - read_stamp(body))
            elif t == "ok":
                subscribed[0] += 1
            elif t == "error":
                errors[str(f.get("code"))] += 1

    done = [0]

    def connected(i: int, node: LeanNode) -> None:
        done[0] += 1
        node.send({"t": "sub", "id": 1, "topic": topic})

    progress.set(f"fanout {target.name}: subscribing",
                 lambda: f"{done[0]:,} connected, {subscribed[0]:,}/{a.subscribers:,} subscribed")
    subs = await connect_many(target, a.subscribers, concurrency=a.concurrency,
                              kw_of=lambda i: {"on_payload": on_payload},
                              on_connected=connected)
    await wait_until(lambda: subscribed[0] >= a.subscribers, 60.0)
    if subscribed[0] < a.subscribers:
        raise RuntimeError(f"only {subscribed[0]} of {a.subscribers} subscriptions confirmed")
    (pub,) = await connect_many(target, 1)
    pub.on_payload = _error_counter(errors)
    pad = os.urandom(max(0, a.body_bytes - 9))
    published = [0]

    async def pace(duration: float, flag: bytes) -> None:
        t_start = time.perf_counter()
        done_local = 0
        while (now := time.perf_counter()) - t_start < duration:
            due = int((now - t_start) * a.rate) + 1 - done_local  # first one at t = 0
            for _ in range(due):
                pub.send({"t": "pub", "topic": topic,
                          "body": ns().to_bytes(8, "little") + flag + pad})
            done_local += due
            if flag == measured:
                published[0] += due
            await asyncio.sleep(max(0.001, t_start + done_local / a.rate
                                    - time.perf_counter()))

    progress.set(f"fanout {target.name}: warm-up", lambda: "")
    await pace(min(1.0, a.seconds / 4), b"\x00")
    await asyncio.sleep(0.5)
    meter = Meter(target, lambda: delivered[0], a).start()
    progress.set(f"fanout {target.name}",
                 lambda: f"{published[0]:,} published, {delivered[0]:,} delivered")
    sampler = asyncio.ensure_future(meter.sample_for(a.seconds))
    await pace(a.seconds, measured)
    await sampler
    m = meter.stop()
    expected = published[0] * a.subscribers
    await wait_until(lambda: delivered[0] >= expected, a.drain)
    pct = percentiles(lat)
    late = sum(1 for v in lat if v > 50_000_000)
    gone = _close_all(subs, [pub])
    return {
        "subscribers": a.subscribers, "pub_per_s": a.rate, "published": published[0],
        "expected": expected, "delivered": delivered[0],
        "all_delivered": delivered[0] == expected and expected > 0,
        **pct, "late_50ms_share": round(late / len(lat), 4) if len(lat) else None,
        "deliveries_per_s": round(m["rate"]), "generator_cpu": m["generator_cpu"],
        "server_cpu": m["server_cpu"], "errors": dict(errors), "disconnects": gone,
        **({"profile": m["profile"]} if "profile" in m else {}),
        "_cdf": cdf_points(lat), "_timeline": m["_timeline"],
        "_timeline_unit": "deliveries/s",
    }


# -- qos1 ---------------------------------------------------------------------------------


async def qos1(target: Target, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """QoS 1 stored + delivered + acked: each sender keeps `window` sends awaiting their
    `ok stored`; each receiver acks what it gets, one ack frame per read (`mids`)."""
    if target.kind == "rabbitmq":
        return await rabbitmq_qos1(target, a, progress)
    body = os.urandom(a.body_bytes)
    n_ep = len(target.endpoints)
    senders = await connect_many(target, a.pairs, endpoint_of=lambda i: i % n_ep)
    receivers = await connect_many(target, a.pairs, endpoint_of=lambda i: (i + 1) % n_ep)
    latencies = array("q")
    acked = [0]
    errors: Counter[str] = Counter()
    for s, r in zip(senders, receivers, strict=True):
        sent_at: dict[int, int] = {}
        next_id = [0]

        def send_more(n: int, s: LeanNode = s, r: LeanNode = r,
                      sent_at: dict[int, int] = sent_at, next_id: list[int] = next_id) -> None:
            now = ns()
            out = []
            for _ in range(n):
                next_id[0] += 1
                sent_at[next_id[0]] = now
                out.append(client_frame(packb(
                    {"t": "send", "id": next_id[0], "to": r.node_id, "body": body, "qos": 1})))
            s.write(b"".join(out))

        def on_reply(payload: bytes, sent_at: dict[int, int] = sent_at,
                     send_more: Any = send_more) -> None:
            now = ns()
            n = 0
            for f in frames_of(payload):
                t0 = sent_at.pop(f.get("id"), None)  # type: ignore[arg-type]
                if t0 is not None:
                    latencies.append(now - t0)
                    n += 1
                if f.get("t") == "error":
                    errors[str(f.get("code"))] += 1
            if n:
                send_more(n)

        mids: list[str] = []

        def on_msg(payload: bytes, mids: list[str] = mids) -> None:
            for f in frames_of(payload):
                if f.get("t") == "msg":
                    mids.append(f["mid"])

        def flush_acks(n: int, r: LeanNode = r, mids: list[str] = mids) -> None:
            if mids:
                r.send({"t": "ack", "mids": list(mids)})
                acked[0] += len(mids)
                mids.clear()

        s.on_payload = on_reply
        r.on_payload = on_msg
        r.on_messages = flush_acks
        send_more(a.window)
    meter = Meter(target, lambda: acked[0], a)
    progress.set(f"qos1 {target.name}: warm-up", lambda: f"{acked[0]:,} acked")
    await asyncio.sleep(min(2.0, a.seconds / 4))
    del latencies[:]
    meter.start()
    progress.set(f"qos1 {target.name}",
                 lambda: f"{acked[0] - meter.n0:,} delivered and acked")
    await meter.sample_for(a.seconds)
    m = meter.stop()
    lat = list(latencies)
    gone = _close_all(senders, receivers)
    pct = percentiles(lat)
    return {
        "msgs_per_s": round(m.pop("rate")), "messages": m.pop("count"),
        "ok_p50_ms": pct["p50_ms"], "ok_p99_ms": pct["p99_ms"], **m,
        "errors": dict(errors), "disconnects": gone, "_cdf": cdf_points(lat),
        "_timeline_unit": "msgs/s delivered and acked",
    }


# -- storm --------------------------------------------------------------------------------


async def storm(target: Target, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    n, k = a.nodes, a.per_node
    stats: Counter[str] = Counter()
    progress.set("storm: keys", lambda: "")
    ids = [Identity.generate() for _ in range(n)]
    done = [0]

    def connected(i: int, node: LeanNode) -> None:
        done[0] += 1

    # 1. Every node has been here once (the hub knows it), then all go away.
    progress.set(f"storm {target.name}: first connection", lambda: f"{done[0]:,}/{n:,}")
    t_first = time.perf_counter()
    nodes = await connect_many(target, n, identities=ids, concurrency=a.concurrency,
                               on_connected=connected, retries=5, wait_s=a.timeout,
                               stats=stats)
    first_s = time.perf_counter() - t_first
    _close_all(nodes)
    del nodes
    await asyncio.sleep(2.0)

    # 2. K QoS 1 messages stored per node while it is away (body: node index, message index).
    (sender,) = await connect_many(target, 1)
    total = n * k
    oks = [0]
    errors: Counter[str] = Counter()
    pad = os.urandom(max(0, a.body_bytes - 8))
    order = [(i, j) for j in range(k) for i in range(n)]
    next_i = [0]
    all_stored = asyncio.get_running_loop().create_future()

    def send_more(m: int) -> None:
        out = []
        for _ in range(min(m, total - next_i[0])):
            i, j = order[next_i[0]]
            next_i[0] += 1
            out.append(client_frame(packb({
                "t": "send", "id": next_i[0], "to": ids[i].node_id, "qos": 1,
                "body": i.to_bytes(4, "big") + j.to_bytes(4, "big") + pad})))
        if out:
            sender.write(b"".join(out))

    def on_reply(payload: bytes) -> None:
        m = 0
        for f in frames_of(payload):
            m += 1
            if f.get("t") == "error":
                errors[str(f.get("code"))] += 1
        oks[0] += m
        if oks[0] >= total and not all_stored.done():
            all_stored.set_result(None)
        send_more(m)

    sender.on_payload = on_reply
    progress.set(f"storm {target.name}: storing", lambda: f"{oks[0]:,}/{total:,}")
    t_store = time.perf_counter()
    send_more(a.window)
    await asyncio.wait_for(all_stored, max(60.0, total / 200))
    store_s = time.perf_counter() - t_store
    sender.close()

    # 3. All reconnect at once; each acks what it gets, once per read.
    got: list[set[int]] = [set() for _ in range(n)]
    dups = [0]
    wrong = [0]
    complete = [0]
    back = [0]
    done_at: list[float] = []
    back_at: list[float] = []
    t0 = time.perf_counter()  # reset when the reconnects start
    finished = asyncio.get_running_loop().create_future()
    holder: dict[int, LeanNode] = {}

    def handler(i: int) -> Callable[[bytes], None]:
        mine = got[i]

        def on_payload(payload: bytes) -> None:
            mids = []
            for f in frames_of(payload):
                if f.get("t") != "msg" or f.get("qos") != 1:
                    continue
                mids.append(f["mid"])
                b = f["body"]
                if int.from_bytes(b[:4], "big") != i:
                    wrong[0] += 1
                    continue
                j = int.from_bytes(b[4:8], "big")
                if j in mine:
                    dups[0] += 1
                else:
                    mine.add(j)
            node = holder.get(i)
            if mids and node is not None:
                node.send({"t": "ack", "mids": mids})
            elif mids:
                pending_acks.setdefault(i, []).extend(mids)
            if len(mine) == k and len(done_at) < n and i not in finished_ids:
                finished_ids.add(i)
                done_at.append(time.perf_counter() - t0)
                complete[0] += 1
                if complete[0] == n and not finished.done():
                    finished.set_result(None)

        return on_payload

    pending_acks: dict[int, list[str]] = {}
    finished_ids: set[int] = set()

    def reconnected(i: int, node: LeanNode) -> None:
        holder[i] = node
        back[0] += 1
        back_at.append(node.welcomed_at - t0)
        if i in pending_acks:
            node.send({"t": "ack", "mids": pending_acks.pop(i)})

    def status() -> str:
        return f"{back[0]:,}/{n:,} back, {complete[0]:,} with all {k} messages"

    progress.set(f"storm {target.name}: reconnect", status)
    meter = Meter(target, lambda: complete[0], a).start()
    t0 = meter.t0

    async def sample() -> None:
        while not finished.done():
            await asyncio.sleep(SAMPLE_S)
            meter.sample()

    sampler = asyncio.ensure_future(sample())
    connecting = asyncio.ensure_future(connect_many(
        target, n, identities=ids, concurrency=a.storm_concurrency or n,
        kw_of=lambda i: {"on_payload": handler(i)}, retries=20, wait_s=a.timeout,
        stats=stats, on_connected=reconnected))
    try:
        await asyncio.wait_for(asyncio.shield(finished), a.timeout)
    except TimeoutError:
        pass
    sampler.cancel()
    m = meter.stop()
    received = sum(len(s) for s in got)
    await asyncio.sleep(1.0)  # late duplicates, if any
    if not connecting.done():
        connecting.cancel()
    nodes = list(holder.values())
    _close_all(nodes)
    done_sorted = sorted(done_at)
    return {
        "nodes": n, "per_node": k, "stored": total, "store_per_s": round(total / store_s),
        "first_connect_s": round(first_s, 2),
        "back": back[0], "back_s": round(max(back_at), 2) if back_at else None,
        "complete": complete[0],
        "all_messages_s": round(done_sorted[-1], 2) if complete[0] == n else None,
        "p50_node_s": round(done_sorted[len(done_sorted) // 2], 2) if done_sorted else None,
        # A send the hub refused (an error instead of `ok stored`) was never accepted.
        "refused": sum(errors.values()),
        "received": received, "lost": total - sum(errors.values()) - received,
        "duplicates": dups[0],
        "misdelivered": wrong[0], "store_errors": dict(errors), "connect_retries": dict(stats),
        "generator_cpu": m["generator_cpu"], "server_cpu": m["server_cpu"],
        **({"profile": m["profile"]} if "profile" in m else {}),
        "_timeline": m["_timeline"], "_timeline_unit": "nodes back with all their messages",
        "_timeline_cumulative": True,
    }


SCENARIO_FUNCS = {
    "direct": direct, "cluster": direct, "latency": latency, "idle": idle,
    "fanout": fanout, "qos1": qos1, "storm": storm,
}
