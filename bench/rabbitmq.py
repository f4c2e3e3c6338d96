"""The `rabbitmq` target of `qos1` (`python -m bench qos1 --targets hub,rabbitmq`): the
same durable QoS 1 shape measured against a running RabbitMQ, so the hub's number has a
broker people know next to it.

RabbitMQ is not started by the bench: it is the one at `--amqp-url` (default: the guest
account on 127.0.0.1:5672), left as it is configured, except that for the run every
thread of its `beam.smp` processes is pinned to the server CPU like the hub (`pinned`;
their affinity is put back afterwards), so both get one core. Where that is not
allowed, it runs on every core, and the notes say so. The load comes from
bench/baselines/rabbitmq/qos1.mjs (Node.js + amqplib, a Python client would cost more
CPU than the broker), pinned to the generator CPU; its packages are installed with
`npm ci` the first time. A missing node/npm or a RabbitMQ
that does not answer skips the target with a problem saying so; the hub rows still run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.procs import Target, cpu_seconds, cpus
from bench.report import Progress

__all__ = ["DEFAULT_AMQP_URL", "beam_pids", "endpoint", "pinned", "prepare", "qos1", "redact"]

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
GENERATOR_DIR = Path(__file__).resolve().parent / "baselines" / "rabbitmq"
SCRIPT = GENERATOR_DIR / "qos1.mjs"


def redact(url: str) -> str:
    """`url` with its password replaced by ***, for anything printed or saved."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def endpoint(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


def beam_pids() -> list[int]:
    """The Erlang VMs running RabbitMQ on this machine (comm `beam.smp`, `rabbit` on the
    command line); an empty list where /proc does not show them."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "beam.smp":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"rabbit" in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


@contextmanager
def pinned(pids: list[int], cpu: int | None) -> Iterator[bool]:
    """Every thread of `pids` on `cpu` while the block runs, then each one's affinity as
    it was. Yields whether all of them could be pinned."""
    if cpu is None or not hasattr(os, "sched_setaffinity") or not pids:
        yield False
        return
    before: dict[int, set[int]] = {}
    ok = True
    try:
        for pid in pids:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                ok = False
                continue
            for tid in tids:
                try:
                    before[tid] = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, {cpu})
                except OSError:  # gone meanwhile, or not ours to move
                    ok = False
        yield ok
    finally:
        for tid, mask in before.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass


def prepare(url: str, say: Callable[[str], None]) -> str | None:
    """None when the rabbitmq target can run, else the sentence saying what is missing.
    Installs the generator's packages (`npm ci`) when they are not there yet."""
    if shutil.which("node") is None:
        return ("rabbitmq target skipped: Node.js (`node`) is not installed; the RabbitMQ "
                "generator (bench/baselines/rabbitmq/qos1.mjs) needs it")
    host, port = endpoint(url)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return (f"rabbitmq target skipped: no RabbitMQ answers at {host}:{port} "
                f"(--amqp-url {redact(url)}): {exc}")
    if not (GENERATOR_DIR / "node_modules" / "amqplib").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            return ("rabbitmq target skipped: npm is not installed, so the generator's "
                    f"packages cannot be installed in {GENERATOR_DIR}")
        say(f"bench: installing the RabbitMQ generator's packages: npm ci in {GENERATOR_DIR}")
        try:
            proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=GENERATOR_DIR,
                                  capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"rabbitmq target skipped: `npm ci` in {GENERATOR_DIR} took over 10 minutes"
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return (f"rabbitmq target skipped: `npm ci` in {GENERATOR_DIR} failed "
                    f"(code {proc.returncode}): " + " | ".join(tail))
        say("bench: " + (proc.stdout.strip().splitlines() or ["npm ci done"])[-1])
    return None


def _on_one_cpu(pids: list[int]) -> bool:
    """Are all the broker's threads held to one CPU (`pinned`) right now?"""
    try:
        masks = {frozenset(os.sched_getaffinity(int(t)))
                 for p in pids for t in os.listdir(f"/proc/{p}/task")}
    except OSError:
        return False
    return len(masks) == 1 and all(len(m) == 1 for m in masks)


def _cpu(pids: list[int]) -> tuple[float, float] | None:
    """(user, system) CPU seconds of `pids` together; None when there are none to read."""
    try:
        parts = [cpu_seconds(p) for p in pids]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(u for u, _ in parts), sum(s for _, s in parts)) if parts else None


async def qos1(target: Target, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Runs qos1.mjs with the scenario's parameters; the broker's CPU is read when the
    script marks the start and the end of its measured window on stderr."""
    cmd = ["node", str(SCRIPT), "--pairs", str(a.pairs), "--window", str(a.window),
           "--body-bytes", str(a.body_bytes), "--seconds", str(a.seconds),
           "--warmup", str(min(2.0, a.seconds / 4))]
    _, gen_cpu = cpus()
    if gen_cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(gen_cpu), *cmd]
    password = urllib.parse.urlsplit(a.amqp_url).password
    # The URL goes through the environment: a command line is readable by every local user.
    env = {**os.environ, "BENCH_AMQP_URL": a.amqp_url}
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    marks: dict[str, tuple[float, tuple[float, float] | None]] = {}
    other: list[str] = []

    async def read_stderr(stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").strip()
            if line in ("warm-up", "measuring", "measured"):
                if line != "warm-up":
                    marks[line] = (time.perf_counter(), _cpu(target.pids))
                progress.set(f"qos1 {target.name}: {line}")
            elif line:
                other.append(line.replace(password, "***") if password else line)

    limit = a.seconds + 120  # connecting 2 x pairs, the warm-up, closing
    try:
        out, _, _ = await asyncio.wait_for(
            asyncio.gather(proc.stdout.read(), read_stderr(proc.stderr), proc.wait()), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"the RabbitMQ generator did not finish within {limit:.0f} s"
                           ) from None
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the RabbitMQ generator exited with code {proc.returncode}: "
                           + " | ".join(other[-5:])[:250])
    r = json.loads(lines[-1])
    server_cpu = sys_share = None
    if "measuring" in marks and "measured" in marks:
        (t0, c0), (t1, c1) = marks["measuring"], marks["measured"]
        if c0 is not None and c1 is not None:
            user, sys_ = c1[0] - c0[0], c1[1] - c0[1]
            server_cpu = round((user + sys_) / max(t1 - t0, 1e-9), 3)
            sys_share = round(sys_ / (user + sys_), 3) if user + sys_ else None
    return {
        "msgs_per_s": r["msgs_per_s"], "messages": r["messages"],
        "ok_p50_ms": r["confirm_p50_ms"], "ok_p99_ms": r["confirm_p99_ms"],
        "seconds": r["seconds"], "generator_cpu": r["generator_cpu"],
        "server_cpu": server_cpu, "server_sys_share": sys_share,
        "errors": r["errors"], "server": r["server"], "ack": r["ack"],
        "prefetch": r["prefetch"], "amqp_url": redact(a.amqp_url),
        "server_pids": list(target.pids), "pinned": _on_one_cpu(target.pids),
        **({"generator_log": other[:5]} if other else {}),
    }
