"""`python -m bench <scenario>` (also `openred-hub bench ...`): load scenarios against a
hub it starts itself (pinned to CPU 0 with taskset when present) or a running one
(`--url`). Prints a table and one JSON line per run.

Scenarios so far: `direct` (pairs x window, QoS 0). The same-run baselines and the other
scenarios of the benchmark issue build on this module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any

import msgpack

from bench.lean import LeanNode, client_frame

__all__ = ["main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def hub_process(cpu: int | None, store_url: str | None = None
                ) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    port, admin = _free_port(), _free_port()
    tmp = tempfile.mkdtemp(prefix="openred-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRED_HUB_")}
    env.update({
        "OPENRED_HUB_SERVER_WS_PORT": str(port), "OPENRED_HUB_SERVER_ADMIN_PORT": str(admin),
        "OPENRED_HUB_STORE_URL": store_url or f"sqlite:///{tmp}/bench.db",
        # The bench measures the relay, not the per-session limits: lift them.
        "OPENRED_HUB_LIMITS_MSGS_PER_S": "10000000", "OPENRED_HUB_LIMITS_BURST": "10000000",
        "OPENRED_HUB_LIMITS_HANDSHAKES_PER_S": "100000",
        "OPENRED_HUB_LIMITS_SEND_QUEUE_MAX": "100000",
        "OPENRED_HUB_LOG_LEVEL": "warning",
    })
    cmd = [sys.executable, "-m", "hub", "serve"]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("hub did not start") from None
                time.sleep(0.1)
        yield "127.0.0.1", port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def direct(host: str, port: int, pairs: int, window: int, body_bytes: int,
                 seconds: float, hub_pid: int | None) -> dict[str, Any]:
    body = os.urandom(body_bytes)
    senders = [await LeanNode.connect(host, port) for _ in range(pairs)]
    receivers = [await LeanNode.connect(host, port) for _ in range(pairs)]
    for s, r in zip(senders, receivers, strict=True):
        frame = client_frame(msgpack.packb({"t": "send", "to": r.node_id, "body": body},
                                           use_bin_type=True))

        def refill(n: int, s: LeanNode = s, frame: bytes = frame) -> None:
            s.write(frame * n)

        r.on_messages = refill
        s.write(frame * window)
    await asyncio.sleep(min(2.0, seconds / 4))  # warm-up
    t0, n0 = time.perf_counter(), sum(r.received for r in receivers)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    hub0 = _cpu_seconds(hub_pid) if hub_pid else None
    await asyncio.sleep(seconds)
    t1, n1 = time.perf_counter(), sum(r.received for r in receivers)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    hub1 = _cpu_seconds(hub_pid) if hub_pid else None
    for node in senders + receivers:
        node.on_messages = None
        if node.transport is not None:
            node.transport.close()
    elapsed = t1 - t0
    gen_cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / elapsed
    return {
        "scenario": "direct", "pairs": pairs, "window": window, "body_bytes": body_bytes,
        "seconds": round(elapsed, 2), "msgs_per_s": round((n1 - n0) / elapsed),
        "generator_cpu": round(gen_cpu, 3),
        "hub_cpu": round((hub1 - hub0) / elapsed, 3) if hub0 is not None and hub1 is not None else None,
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def qos1(host: str, port: int, pairs: int, window: int, body_bytes: int,
               seconds: float, hub_pid: int | None) -> dict[str, Any]:
    """QoS 1 stored + delivered + acked: each sender keeps `window` sends awaiting their
    `ok stored`; each receiver acks what it gets, one ack frame per read (`mids`)."""
    body = os.urandom(body_bytes)
    senders = [await LeanNode.connect(host, port) for _ in range(pairs)]
    receivers = [await LeanNode.connect(host, port) for _ in range(pairs)]
    latencies: list[float] = []
    acked = [0]
    errors: dict[str, int] = {}
    for s, r in zip(senders, receivers, strict=True):
        sent_at: dict[int, float] = {}
        next_id = [0]

        def send_more(n: int, s: LeanNode = s, r: LeanNode = r,
                      sent_at: dict[int, float] = sent_at, next_id: list[int] = next_id) -> None:
            now = time.perf_counter()
            out = []
            for _ in range(n):
                next_id[0] += 1
                sent_at[next_id[0]] = now
                out.append(client_frame(msgpack.packb(
                    {"t": "send", "id": next_id[0], "to": r.node_id, "body": body, "qos": 1},
                    use_bin_type=True)))
            s.write(b"".join(out))

        def on_reply(payload: bytes, sent_at: dict[int, float] = sent_at,
                     send_more: Any = send_more) -> None:
            f = msgpack.unpackb(payload, raw=False)
            t0 = sent_at.pop(f.get("id"), None)
            if t0 is not None:
                latencies.append(time.perf_counter() - t0)
            if f.get("t") == "error":
                errors[f["code"]] = errors.get(f["code"], 0) + 1
            send_more(1)

        mids: list[str] = []

        def on_msg(payload: bytes, mids: list[str] = mids) -> None:
            mids.append(msgpack.unpackb(payload, raw=False)["mid"])

        def flush_acks(n: int, r: LeanNode = r, mids: list[str] = mids) -> None:
            if mids:
                r.send({"t": "ack", "mids": list(mids)})
                acked[0] += len(mids)
                mids.clear()

        s.on_payload = on_reply
        r.on_payload = on_msg
        r.on_messages = flush_acks
        send_more(window)
    await asyncio.sleep(min(2.0, seconds / 4))
    latencies.clear()
    t0, n0 = time.perf_counter(), acked[0]
    hub0 = _cpu_seconds(hub_pid) if hub_pid else None
    await asyncio.sleep(seconds)
    t1, n1 = time.perf_counter(), acked[0]
    hub1 = _cpu_seconds(hub_pid) if hub_pid else None
    lat = list(latencies)
    for node in senders + receivers:
        node.on_messages = node.on_payload = None
        if node.transport is not None:
            node.transport.close()
    elapsed = t1 - t0
    return {
        "scenario": "qos1", "pairs": pairs, "window": window, "body_bytes": body_bytes,
        "seconds": round(elapsed, 2), "msgs_per_s": round((n1 - n0) / elapsed),
        "ok_p50_ms": round(_percentile(lat, 0.5) * 1000, 2),
        "ok_p99_ms": round(_percentile(lat, 0.99) * 1000, 2),
        "errors": errors,
        "hub_cpu": round((hub1 - hub0) / elapsed, 3) if hub0 is not None and hub1 is not None else None,
        "generator_cpu": None,
    }


SCENARIOS = {"direct": direct, "qos1": qos1}


def _pin_self(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--store-url", help="store.url of the hub it starts (default: SQLite)")
    p.add_argument("--url", help="target a running hub (ws://host:port) instead of starting one")
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--body-bytes", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=3, help="runs; the median is reported")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    ncpu = os.cpu_count() or 1
    hub_cpu, gen_cpu = (0, 1) if ncpu >= 2 else (None, None)
    _pin_self(gen_cpu)
    results = []
    scenario = SCENARIOS[args.scenario]
    for _ in range(args.runs):
        if args.url:
            host, port = args.url.removeprefix("ws://").split("/")[0].split(":")
            results.append(asyncio.run(scenario(host, int(port), args.pairs, args.window,
                                                args.body_bytes, args.seconds, None)))
        else:
            with hub_process(hub_cpu, args.store_url) as (host, port, proc):
                results.append(asyncio.run(scenario(host, port, args.pairs, args.window,
                                                    args.body_bytes, args.seconds, proc.pid)))
    results.sort(key=lambda r: r["msgs_per_s"])
    med = results[len(results) // 2]
    med["runs"] = [r["msgs_per_s"] for r in results]
    med["machine"] = f"{platform.machine()} {ncpu} cpu, Python {platform.python_version()}"
    med["date"] = time.strftime("%Y-%m-%d")
    print(f"{'scenario':10} {'msgs/s':>10} {'hub cpu':>8} {'gen cpu':>8}  runs")
    print(f"{med['scenario']:10} {med['msgs_per_s']:>10} {med['hub_cpu']!s:>8} "
          f"{med['generator_cpu']!s:>8}  {med['runs']}")
    print(json.dumps(med))
    return 0


if __name__ == "__main__":
    sys.exit(main())
