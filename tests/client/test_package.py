"""The `openred` distribution (clients/python) as a user gets it: installed with pip into
a fresh virtual environment, it brings `openred.client` and `openred.protocol` and
nothing of the hub (no top-level `hub`, `protocol`, `persistence`, `admin_http`,
`bench`; none of the hub's dependencies), its example programs type-check with
`mypy --strict` against the installed package, and one of them runs against a real hub.

Set OPENRED_TEST_WHEELHOUSE to a folder of wheels (for example
`pip wheel websockets msgpack pynacl setuptools mypy -w DIR`) to install from it first
(`--find-links`); otherwise pip uses its index.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import timeout

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("chat.py", "telemetry.py", "rpc.py")
NOT_INSTALLED_MODULES = ("hub", "protocol", "persistence", "admin_http", "bench",
                         "openred.hub", "openred.persistence", "openred.admin_http")
NOT_INSTALLED_DISTS = ("aiohttp", "asyncpg", "redis", "uvloop", "prometheus-client",
                       "prometheus_client", "cryptography", "pyjwt", "jwt", "openred-hub")

pytestmark = pytest.mark.slow


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check", *args]
    wheelhouse = os.environ.get("OPENRED_TEST_WHEELHOUSE")
    if wheelhouse:
        cmd[5:5] = ["--find-links", wheelhouse]
    subprocess.run(cmd, check=True, timeout=timeout(600), cwd=venv.parent,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install ./clients/python` (not editable) and mypy."""
    where = tmp_path_factory.mktemp("pkg")
    env = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True,
                   timeout=timeout(120))
    try:
        _pip(env, str(ROOT / "clients" / "python"))
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"pip install ./clients/python failed:\n{exc.stdout.decode()}")
    finally:
        # pip builds a local project in place; its build/ folder is not ours to keep.
        shutil.rmtree(ROOT / "clients" / "python" / "build", ignore_errors=True)
    return env


def _run(venv: Path, code: str, cwd: Path) -> Any:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True,
                         timeout=timeout(60), cwd=cwd, capture_output=True)
    return json.loads(out.stdout)


def test_installs_the_client_and_the_protocol_only(venv: Path) -> None:
    # cwd is not the checkout: nothing of the repository can be found by accident.
    probe = venv.parent
    found = _run(venv, (
        "import importlib.util, json\n"
        "def has(name):\n"
        "    try:\n"
        "        return importlib.util.find_spec(name) is not None\n"
        "    except ModuleNotFoundError:\n"
        "        return False\n"
        f"names = {[*NOT_INSTALLED_MODULES, 'openred.client', 'openred.protocol']!r}\n"
        "print(json.dumps({n: has(n) for n in names}))\n"), probe)
    assert found.pop("openred.client") and found.pop("openred.protocol")
    assert [n for n, present in found.items() if present] == []
    dists = _run(venv, (
        "import json, importlib.metadata as md\n"
        "print(json.dumps(sorted({d.metadata['Name'].lower() for d in md.distributions()})))\n"
    ), probe)
    assert "openred" in dists
    assert sorted(set(dists) & set(NOT_INSTALLED_DISTS)) == []
    where = _run(venv, (
        "import json, openred.client, openred.protocol, pathlib\n"
        "print(json.dumps([openred.client.__file__, openred.protocol.__file__,"
        " (pathlib.Path(openred.client.__file__).parent / 'py.typed').exists()]))\n"),
        probe)
    assert all("site-packages" in p for p in where[:2]), where
    assert where[2] is True  # typed


def test_examples_type_check_strict_against_the_installed_package(venv: Path,
                                                                  tmp_path: Path) -> None:
    _pip(venv, "mypy")
    for name in EXAMPLES:
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    out = subprocess.run([str(venv / "bin" / "mypy"), "--strict", "--no-incremental",
                          *EXAMPLES], cwd=tmp_path, capture_output=True,
                         timeout=timeout(300))
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


async def test_an_example_runs_against_a_real_hub(venv: Path, make_hub: Any,
                                                  tmp_path: Path) -> None:
    hub = await make_hub()
    script = tmp_path / "rpc.py"
    await asyncio.to_thread(shutil.copy, ROOT / "examples" / "rpc.py", script)
    proc = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "python"), str(script), "--url",
        f"ws://127.0.0.1:{hub.ws_port}/v1/ws", "demo", cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout(60))
    assert proc.returncode == 0, err.decode()
    assert "rpc demo ok" in out.decode()
    assert "remote error, as expected" in out.decode()
