"""The processes a bench run starts and measures: hub instances, baseline relays, a
private Redis, throwaway PostgreSQL schemas; CPU pinning, file limits, CPU and memory
readings from /proc.

Servers (and Redis) go to CPU 0, the load generator to CPU 1, with `taskset` when it is
there (one core each on a 2-core machine, as the scenarios specify). Every server's output goes to
a log file whose warnings and errors are reported with the results.
"""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_PG_URL",
    "NOFILE",
    "Server",
    "Target",
    "baseline_process",
    "cpu_seconds",
    "free_port",
    "hub_process",
    "nofile_of",
    "pg_schema",
    "pin_self",
    "raise_nofile",
    "redis_process",
    "rss_kib",
    "start_hub",
]

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
# File descriptors asked for the generator and each server: the kernel's default cap
# (fs.nr_open), so `idle --sessions 100000` is limited only by what the machine allows.
NOFILE = 1 << 20
SERVER_CPU = 0
GENERATOR_CPU = 1
HUB_ENV = {
    # The bench measures the relay, not the per-session limits: lift them.
    "OPENRED_HUB_LIMITS_MSGS_PER_S": "10000000", "OPENRED_HUB_LIMITS_BURST": "10000000",
    "OPENRED_HUB_LIMITS_HANDSHAKES_PER_S": "1000000",
    "OPENRED_HUB_LIMITS_SEND_QUEUE_MAX": "100000",
    # Every simulated node connects from 127.0.0.1: one "IP" holds them all.
    "OPENRED_HUB_LIMITS_MAX_CONNECTIONS_PER_IP": "0",
    "OPENRED_HUB_LIMITS_MAX_CONNECTIONS": "1000000",
    "OPENRED_HUB_LOG_LEVEL": "warning",
    # A token, so the hub does not warn that the admin routes are off.
    "OPENRED_HUB_ADMIN_TOKENS": "bench-" + secrets.token_hex(16),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(n: int = NOFILE) -> int:
    """Raise this process's RLIMIT_NOFILE towards `n` (the hard limit too when allowed,
    e.g. as root); returns the soft limit in force."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in ((n, max(n, hard)), (min(n, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, want)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin_self(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def cpus() -> tuple[int | None, int | None]:
    """(server CPU, generator CPU): 0 and 1 with two cores or more, else unpinned."""
    return (SERVER_CPU, GENERATOR_CPU) if (os.cpu_count() or 1) >= 2 else (None, None)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def nofile_of(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a process (from /proc), None where unreadable."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Server:
    """One process the bench started (a hub instance, a relay, Redis)."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: str
    problems: list[str] = field(default_factory=list)
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        """Note a server that died under load."""
        rc = self.proc.poll()
        if rc is not None and not self.stopping and not any("exited" in p for p in self.problems):
            self.problems.append(f"{self.name} exited with code {rc} during the run")

    def collect_log(self) -> None:
        """Warnings, errors and tracebacks from the server's output (first ones)."""
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        bad = [ln for ln in lines if any(w in ln.lower() for w in (
            '"level": "error"', '"level": "warning"', '"level": "critical"',
            "traceback", "error", "exception"))]
        for ln in bad[:5]:
            self.problems.append(f"{self.name} log: {ln[:300]}")
        if len(bad) > 5:
            self.problems.append(f"{self.name} log: ... {len(bad) - 5} more such lines")


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str,
               timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} at start-up"
                                   ) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start within {timeout:.0f} s") from None
            time.sleep(0.05)


@contextmanager
def _process(name: str, cmd: Sequence[str], port: int, cpu: int | None,
             env: dict[str, str] | None = None, cwd: str | None = None,
             nofile: int = NOFILE) -> Iterator[Server]:
    tmp = tempfile.mkdtemp(prefix="openred-bench-")
    cmd = list(cmd)
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    log_path = os.path.join(tmp, f"{name}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd or tmp, stdout=log, stderr=log,
                                preexec_fn=lambda: raise_nofile(nofile))
    server = Server(name, "127.0.0.1", port, proc, log_path)
    try:
        _wait_port("127.0.0.1", port, proc, name)
        yield server
    finally:
        server.check()
        server.stopping = True
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                server.problems.append(f"{name} did not stop within 15 s of SIGTERM")
                proc.kill()
                proc.wait()
        server.collect_log()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def start_hub(cpu: int | None, store_url: str | None = None, *, broker_url: str | None = None,
              hub_id: str | None = None, name: str = "hub", env: dict[str, str] | None = None,
              nofile: int = NOFILE) -> Iterator[Server]:
    """A hub subprocess (`python -m openred.hub serve`) on free ports, limits lifted (HUB_ENV);
    SQLite in a temporary directory unless `store_url` is given."""
    port, admin = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="openred-bench-store-")
    full = {k: v for k, v in os.environ.items() if not k.startswith("OPENRED_HUB_")}
    full.update(HUB_ENV)
    full.update({
        "OPENRED_HUB_SERVER_WS_PORT": str(port), "OPENRED_HUB_SERVER_ADMIN_PORT": str(admin),
        "OPENRED_HUB_STORE_URL": store_url or f"sqlite:///{tmp}/bench.db",
    })
    if broker_url:
        full["OPENRED_HUB_BROKER_URL"] = broker_url
    if hub_id:
        full["OPENRED_HUB_SERVER_HUB_ID"] = hub_id
    full.update(env or {})
    try:
        with _process(name, [sys.executable, "-m", "openred.hub", "serve"], port, cpu, full,
                      nofile=nofile) as server:
            yield server
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def hub_process(cpu: int | None, store_url: str | None = None
                ) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """The original interface: yields (host, port, process) of a hub subprocess."""
    with start_hub(cpu, store_url) as server:
        yield server.host, server.port, server.proc


BASELINES = {
    "websockets": ["-m", "bench.baselines.ws_relay"],
    "picows": ["-m", "bench.baselines.picows_relay"],
    "picows-coalesced": ["-m", "bench.baselines.picows_relay", "--coalesce"],
}


@contextmanager
def baseline_process(kind: str, cpu: int | None, extra: Sequence[str] = (),
                     name: str | None = None) -> Iterator[Server]:
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, *BASELINES[kind], "--port", str(port), *extra]
    with _process(name or kind, cmd, port, cpu, env) as server:
        yield server


@contextmanager
def redis_process(cpu: int | None, url: str | None = None) -> Iterator[tuple[str, int | None]]:
    """A private Redis pinned like the servers (`redis-server` on a free port, nothing
    persisted): yields (url, pid). With `url`, or without `redis-server`, that shared Redis
    and no pid (the hub and the baseline then use a unique key prefix per run)."""
    if url is None and shutil.which("redis-server"):
        port = free_port()
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--maxclients", "20000"]
        with _process("redis", cmd, port, cpu) as server:
            yield f"redis://127.0.0.1:{port}/0", server.pid
        return
    yield url or "redis://127.0.0.1:6379/0", None


def _with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k not in params] + list(params.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


async def _pg(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def pg_schema(url: str) -> Iterator[str]:
    """A throwaway schema in the PostgreSQL database of `url`: created, handed to the
    hub through `?search_path=` (every table the store migrates lands there), dropped
    with everything in it at the end. Yields the URL to give the hub."""
    schema = "bench_" + secrets.token_hex(6)
    base = _with_query(url)  # as is; asyncpg takes other query parameters as settings
    asyncio.run(_pg(base, f'CREATE SCHEMA "{schema}"'))
    try:
        yield _with_query(url, search_path=schema)
    finally:
        try:
            asyncio.run(_pg(base, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        except Exception as exc:  # pragma: no cover - report, do not mask the run's result
            print(f"bench: could not drop schema {schema}: {exc}", file=sys.stderr)


@dataclass
class Target:
    """What a scenario measures: one or more servers (endpoints), how nodes say hello,
    and the processes whose CPU and memory count as the server's."""

    name: str
    endpoints: list[tuple[str, int]]
    pids: list[int]
    plain: bool  # baseline handshake (`{"t":"hello","node":ID}`) rather than the hub's
    servers: list[Server] = field(default_factory=list)
    kind: str = "hub"

    def problems(self) -> list[str]:
        out: list[str] = []
        for s in self.servers:
            s.check()
            out.extend(s.problems)
        return out


@contextmanager
def start_target(spec: str, *, store_url: str | None = None, redis_url: str | None = None,
                 pg_url: str = DEFAULT_PG_URL, hub_env: dict[str, str] | None = None
                 ) -> Iterator[Target]:
    """`hub`, `hub-cluster` (2 instances + Redis + PostgreSQL), a baseline name from
    BASELINES, or `websockets-redis` (2 websockets relays + Redis). `hub_env`: extra
    OPENRED_HUB_* settings for the hub instances."""
    cpu, _ = cpus()
    with ExitStack() as stack:
        if spec == "hub":
            url = store_url
            if url and url.startswith(("postgresql:", "postgres:")):
                url = stack.enter_context(pg_schema(url))
            s = stack.enter_context(start_hub(cpu, url, env=hub_env))
            yield Target("hub", [(s.host, s.port)], [s.pid], False, [s])
        elif spec == "hub-cluster":
            redis, redis_pid = stack.enter_context(redis_process(cpu, redis_url))
            url = stack.enter_context(pg_schema(store_url or pg_url))
            hub_id = "bench-" + secrets.token_hex(4)
            a = stack.enter_context(start_hub(cpu, url, broker_url=redis, hub_id=hub_id,
                                              name="hub-a", env=hub_env))
            b = stack.enter_context(start_hub(cpu, url, broker_url=redis, hub_id=hub_id,
                                              name="hub-b", env=hub_env))
            pids = [a.pid, b.pid] + ([redis_pid] if redis_pid else [])
            yield Target("hub x2 + redis", [(a.host, a.port), (b.host, b.port)], pids, False,
                         [a, b])
        elif spec == "websockets-redis":
            redis, redis_pid = stack.enter_context(redis_process(cpu, redis_url))
            prefix = "bench:" + secrets.token_hex(4) + ":"
            extra = ["--redis", redis, "--prefix", prefix]
            a = stack.enter_context(baseline_process("websockets", cpu, extra, "ws-relay-a"))
            b = stack.enter_context(baseline_process("websockets", cpu, extra, "ws-relay-b"))
            pids = [a.pid, b.pid] + ([redis_pid] if redis_pid else [])
            yield Target("websockets x2 + redis", [(a.host, a.port), (b.host, b.port)], pids,
                         True, [a, b], kind="baseline")
        else:
            s = stack.enter_context(baseline_process(spec, cpu))
            yield Target(spec, [(s.host, s.port)], [s.pid], True, [s], kind="baseline")
