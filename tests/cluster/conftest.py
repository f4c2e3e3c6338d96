"""Multi-instance fixtures: real hub PROCESSES sharing one Redis and one PostgreSQL
(README "Many instances"), a private Redis a test may kill and restart, and a real nginx.

- `make_cluster(n, broker_url=None, **env)` starts `n` hub processes
  (`python -m openred.hub serve`, cwd tmp_path, no inherited `OPENRED_HUB_*` variable) on free
  ports, with one PostgreSQL schema and one `hub_id` per test (the Redis key and channel
  prefix includes `hub_id`, so tests never see each other's traffic), a distinct
  `instance_id` per process, and admin token `tok`. It returns once every `/readyz`
  answers 200. Teardown SIGTERMs (then SIGKILLs) the processes, drops the schema and
  deletes the test's Redis keys.
- `HubProcess` has `.ws_port` / `.admin_port` (so `RawNode.connect(hub)` works),
  `.kill()` (SIGKILL), `.stop()` (SIGTERM) and `.restart()` (same ports).
- `redis_server` is a private `redis-server` on a free port in tmp_path (`.kill()`,
  `.restart()` on the same port), for the "Redis down" tests that must not stop the
  shared one.
- `make_nginx(ws_ports, admin_ports)` starts a real nginx with the config shipped in
  deploy/nginx/nginx.conf rendered for free ports (`render_nginx`); absent nginx skips
  locally and fails under CI=true.
- `redis_cluster`: a local 3-master Redis Cluster (tests/broker/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.broker.conftest import redis_cluster  # noqa: F401 (a fixture for these tests)
from tests.conftest import timeout
from tests.ports import free_port
from tests.services import missing, need_pg, need_redis

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
ADMIN_TOKEN = "tok"


async def eventually(check: Callable[[], Awaitable[bool]], wait: float = 5.0,
                     every: float = 0.05, what: str = "condition") -> None:
    """Poll `check` until it is true, failing after `wait` (scaled) seconds."""
    deadline = asyncio.get_running_loop().time() + timeout(wait)
    while True:
        try:
            if await check():
                return
        except (OSError, aiohttp.ClientError, TimeoutError):
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {wait} s")
        await asyncio.sleep(every)


async def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str,
                     wait: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout(wait)
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not listening on {port} within {wait} s")
        await asyncio.sleep(0.05)


def _terminate_sync(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    await asyncio.to_thread(_terminate_sync, proc, grace)


# -- hub processes ---------------------------------------------------------------------


class HubProcess:
    """One `python -m openred.hub serve` process; ports stay the same across restarts."""

    def __init__(self, name: str, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.instance_id = name
        self.ws_port = free_port()
        self.admin_port = free_port()
        self.cwd = cwd
        self.env = {**env,
                    "OPENRED_HUB_SERVER_INSTANCE_ID": name,
                    "OPENRED_HUB_SERVER_WS_PORT": str(self.ws_port),
                    "OPENRED_HUB_SERVER_ADMIN_PORT": str(self.admin_port)}
        self.log = cwd / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/v1/ws"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def spawn(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "openred.hub", "serve"], cwd=self.cwd, env=self.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    async def ready(self, wait: float = 20.0) -> None:
        """Wait for `/readyz` 200: the store answers (the broker may be `degraded`)."""
        assert self.proc is not None
        deadline = asyncio.get_running_loop().time() + timeout(wait)
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"hub {self.name} exited with {self.proc.returncode}:"
                                         f"\n{self.log.read_text()[-3000:]}")
                try:
                    async with http.get(f"{self.admin}/readyz",
                                        timeout=aiohttp.ClientTimeout(total=3)) as r:
                        if r.status == 200:
                            return
                except (OSError, aiohttp.ClientError, TimeoutError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"hub {self.name} not ready within {wait} s:\n"
                                         f"{self.log.read_text()[-3000:]}")
                await asyncio.sleep(0.05)

    async def start(self) -> None:
        self.spawn()
        await self.ready()

    def kill(self) -> None:
        """SIGKILL: no bye, no clean close; Redis and the peers see the sockets drop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self, grace: float = 15.0) -> None:
        if self.proc is not None:
            await _terminate(self.proc, grace)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    def __init__(self, hubs: list[HubProcess], hub_id: str, schema: str) -> None:
        self.hubs = hubs
        self.hub_id = hub_id
        self.schema = schema

    def __getitem__(self, i: int) -> HubProcess:
        return self.hubs[i]

    def __len__(self) -> int:
        return len(self.hubs)


ClusterFactory = Callable[..., Awaitable[Cluster]]


def _with_schema(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


async def _redis_cleanup(url: str, prefix: str) -> None:
    from tests.broker.conftest import delete_keys

    try:
        await delete_keys(url, prefix)
    except Exception:  # a private Redis the test killed, a cluster already stopped
        pass


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[ClusterFactory]:
    import asyncpg

    dsn = need_pg()
    shared_redis = need_redis()
    tag = secrets.token_hex(4)
    hub_id = f"c{tag}"
    schema = f"cl_{tag}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    clusters: list[Cluster] = []
    brokers: set[str] = set()

    async def factory(n: int = 2, broker_url: str | None = None,
                      **extra: str) -> Cluster:
        url = broker_url or shared_redis
        brokers.add(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRED_HUB_")}
        env.update({
            "OPENRED_HUB_STORE_URL": _with_schema(dsn, schema),
            "OPENRED_HUB_STORE_POOL_SIZE": "4",
            "OPENRED_HUB_BROKER_URL": url,
            "OPENRED_HUB_SERVER_HUB_ID": hub_id,
            "OPENRED_HUB_SERVER_SHUTDOWN_GRACE_S": "2",
            "OPENRED_HUB_ADMIN_TOKENS": ADMIN_TOKEN,
            "OPENRED_HUB_LOG_LEVEL": "warning",
            "OPENRED_HUB_LOG_FORMAT": "text",
        })
        env.update({f"OPENRED_HUB_{k.upper()}": v for k, v in extra.items()})
        first = len(clusters) * 10
        hubs = [HubProcess(f"{hub_id}-{first + i + 1}", env, tmp_path) for i in range(n)]
        # The first one applies the migrations; the others then start in parallel.
        await hubs[0].start()
        for h in hubs[1:]:
            h.spawn()
        await asyncio.gather(*(h.ready() for h in hubs[1:]))
        cluster = Cluster(hubs, hub_id, schema)
        clusters.append(cluster)
        return cluster

    yield factory
    await asyncio.gather(*(h.stop() for c in clusters for h in c.hubs))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
    for url in brokers:
        await _redis_cleanup(url, f"openred:{hub_id}:")


# -- a private Redis -------------------------------------------------------------------


class RedisServer:
    """A throw-away `redis-server` (no persistence) that a test may kill and restart."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.spawn()
        assert self.proc is not None
        await _wait_port(self.port, self.proc, "redis-server")

    def spawn(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        with open(self.dir / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def restart(self) -> None:
        self.kill()
        await self.start()


def need_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    if path is None:
        missing(f"{name} is not installed (apt-get install {name})")
    assert path is not None
    return path


# -- nginx -----------------------------------------------------------------------------


def render_nginx(conf: str, *, listen: int, admin_listen: int, ws_ports: list[int],
                 admin_ports: list[int], prefix: Path) -> str:
    """The shipped config for this machine: our ports, files under `prefix`, in the
    foreground. Only addresses and paths change; every proxy setting is the shipped one."""

    def upstream(name: str, ports: list[int]) -> Callable[[re.Match[str]], str]:
        def sub(m: re.Match[str]) -> str:
            body = re.sub(r"^\s*server\s+[^;]+;\s*\n", "", m.group(2), flags=re.M)
            servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n"
                              for p in ports)
            return f"{m.group(1)}\n{servers}{body}}}"
        return sub

    out = re.sub(r"(upstream\s+openred_hub_ws\s*\{)([^}]*)\}", upstream("ws", ws_ports), conf)
    out = re.sub(r"(upstream\s+openred_hub_admin\s*\{)([^}]*)\}",
                 upstream("admin", admin_ports), out)
    out, n = re.subn(r"listen\s+[^;]*:8080;", f"listen 127.0.0.1:{listen};", out)
    assert n == 1, "the shipped nginx.conf must listen on ...:8080 for WebSockets"
    out, n = re.subn(r"listen\s+[^;]*:8081;", f"listen 127.0.0.1:{admin_listen};", out)
    assert n == 1, "the shipped nginx.conf must listen on ...:8081 for the admin surface"
    out = re.sub(r"^\s*(user|pid|error_log|daemon)\s[^;]*;\s*$", "", out, flags=re.M)
    out = re.sub(r"access_log\s[^;]*;", "access_log off;", out)
    temp = "".join(f"    {d}_temp_path {prefix}/{d};\n"
                   for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    out = re.sub(r"http\s*\{", lambda m: m.group(0) + "\n" + temp, out, count=1)
    head = (f"daemon off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n")
    return head + out


class Nginx:
    def __init__(self, binary: str, prefix: Path) -> None:
        self.binary = binary
        self.prefix = prefix
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_port(self) -> int:  # so RawNode.connect(nginx) goes through it
        return self.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    async def start(self, ws_ports: list[int], admin_ports: list[int]) -> None:
        self.spawn(ws_ports, admin_ports)
        assert self.proc is not None
        await _wait_port(self.port, self.proc, "nginx")

    def spawn(self, ws_ports: list[int], admin_ports: list[int]) -> None:
        conf = render_nginx(NGINX_CONF.read_text(), listen=self.port,
                            admin_listen=self.admin_port, ws_ports=ws_ports,
                            admin_ports=admin_ports, prefix=self.prefix)
        path = self.prefix / "nginx.conf"
        path.write_text(conf)
        args = [self.binary, "-c", str(path), "-p", f"{self.prefix}/",
                "-e", str(self.prefix / "error.log")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        with open(self.prefix / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    async def stop(self) -> None:
        if self.proc is not None:
            await _terminate(self.proc, 5.0)  # SIGTERM: fast shutdown


@pytest.fixture
async def make_nginx(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Nginx]]]:
    binary = need_binary("nginx")
    started: list[Nginx] = []

    async def factory(ws_ports: list[int], admin_ports: list[int]) -> Nginx:
        prefix = tmp_path / f"nginx{len(started)}"
        prefix.mkdir()
        n = Nginx(binary, prefix)
        await n.start(ws_ports, admin_ports)
        started.append(n)
        return n

    yield factory
    for n in started:
        await n.stop()


__all__ = ["ADMIN_TOKEN", "Cluster", "ClusterFactory", "HubProcess", "Nginx", "RedisServer",
           "eventually", "free_port", "render_nginx"]
