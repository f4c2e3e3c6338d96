"""The real `openred-hub` command line (`python -m openred.hub`), run as a subprocess
(README.md "Command line" and "Backends and configuration")."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
from openred.hub.tokens import TokenVerifier
from openred.protocol.handshake import ClientHandshake
from openred.protocol.identity import Identity, load_key_file
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import timeout
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SECRET = "c" * 40


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRED_HUB_")}
    # The repo is installed editable; keep it importable from any working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "openred.hub", *args], cwd=tmp_path,
                          env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout(30))


def stderr_lines(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in p.stderr.splitlines() if line.strip()]


def test_check_config_defaults(tmp_path):
    p = run(tmp_path, "check-config")
    assert p.returncode == 0, p.stderr


def test_check_config_with_valid_file(tmp_path):
    (tmp_path / "hub.toml").write_text('[server]\nhub_id = "lab"\n[limits]\nmsgs_per_s = 50\n')
    p = run(tmp_path, "check-config")
    assert p.returncode == 0, p.stderr


def test_unknown_key_in_file(tmp_path):
    (tmp_path / "hub.toml").write_text("[limits]\nmsgs_per_sec = 5\n")
    p = run(tmp_path, "check-config")
    assert p.returncode == 2
    lines = stderr_lines(p)
    assert len(lines) == 1, p.stderr
    assert "limits.msgs_per_sec" in lines[0]


def test_unknown_key_in_given_config_file_stops_serve(tmp_path):
    cfg = tmp_path / "other.toml"
    cfg.write_text("[server]\nws_prot = 1\n")
    p = run(tmp_path, "serve", "--config", str(cfg))
    assert p.returncode == 2
    lines = stderr_lines(p)
    assert len(lines) == 1, p.stderr
    assert "server.ws_prot" in lines[0]


def test_bad_env_value(tmp_path):
    p = run(tmp_path, "check-config", OPENRED_HUB_LIMITS_MSGS_PER_S="abc")
    assert p.returncode == 2
    lines = stderr_lines(p)
    assert len(lines) == 1, p.stderr
    assert "OPENRED_HUB_LIMITS_MSGS_PER_S" in lines[0] or "limits.msgs_per_s" in lines[0]


def test_unknown_env_variable(tmp_path):
    p = run(tmp_path, "check-config", OPENRED_HUB_LIMITS_MSGS_PER_SEC="5")
    assert p.returncode == 2
    lines = stderr_lines(p)
    assert len(lines) == 1, p.stderr
    assert "OPENRED_HUB_LIMITS_MSGS_PER_SEC" in lines[0]


def test_keygen(tmp_path):
    p = run(tmp_path, "keygen", "n.key")
    assert p.returncode == 0, p.stderr
    out = p.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", out), p.stdout
    path = tmp_path / "n.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path).node_id == out
    # An existing key is never overwritten without --force.
    again = run(tmp_path, "keygen", "n.key")
    assert again.returncode != 0
    assert load_key_file(path).node_id == out


def test_token(tmp_path):
    p = run(tmp_path, "token", "--sub", "n1", "--topic", "a/*",
            OPENRED_HUB_AUTH_JWT_SECRET=SECRET)
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    assert p.stdout.count("\n") == 1  # the JWT alone on stdout
    claims = TokenVerifier(algorithms=["HS256"], secret=SECRET).verify(token)
    assert claims.sub == "n1"
    assert claims.topics == ("a/*",)
    assert claims.exp > time.time()


def test_token_without_secret_fails(tmp_path):
    p = run(tmp_path, "token", "--sub", "n1")
    assert p.returncode == 2
    assert p.stdout == ""


def test_migrate(tmp_path):
    p = run(tmp_path, "migrate", OPENRED_HUB_STORE_URL="sqlite:///m.db")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m.db").is_file()
    again = run(tmp_path, "migrate", OPENRED_HUB_STORE_URL="sqlite:///m.db")
    assert again.returncode == 0, again.stderr


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
        return int(r.status)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
async def test_serve_and_graceful_shutdown(tmp_path, sig):
    ws_port, admin_port = free_port(), free_port()
    grace = 2.0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "openred.hub", "serve", "--ws-port", str(ws_port),
        "--admin-port", str(admin_port), cwd=tmp_path,
        env=clean_env(OPENRED_HUB_SERVER_SHUTDOWN_GRACE_S=str(grace),
                      OPENRED_HUB_LOG_LEVEL="warning"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout(20)
        status = None
        while time.monotonic() < deadline:
            assert proc.returncode is None, "hub exited early"
            try:
                status = await asyncio.to_thread(healthz, admin_port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        assert status == 200

        ws = await connect(f"ws://127.0.0.1:{ws_port}/v1/ws", compression=None)
        hs = ClientHandshake(identity=Identity.generate())
        challenge = msgpack.unpackb(await asyncio.wait_for(ws.recv(), timeout(5)))
        await ws.send(hs.hello(challenge))
        welcome = hs.welcome(msgpack.unpackb(await asyncio.wait_for(ws.recv(), timeout(5))))
        assert welcome.node == hs.identity.public_key.hex()

        t0 = time.monotonic()
        proc.send_signal(sig)
        frames = []
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(timeout(grace + 3)):
                while True:
                    frames.append(msgpack.unpackb(await ws.recv()))
        assert info.value.rcvd is not None and info.value.rcvd.code == 1012
        assert len(frames) == 1
        bye = frames[0]
        assert (bye["t"], bye["reason"]) == ("bye", "shutdown")
        assert type(bye["retry_ms"]) is int and bye["retry_ms"] > 0
        rc = await asyncio.wait_for(proc.wait(), timeout(grace + 5))
        assert rc == 0, (await proc.stderr.read()).decode()
        assert time.monotonic() - t0 < grace + 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
