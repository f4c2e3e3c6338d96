"""The example programs (examples/) do what examples/README.md says, run as scripts
against real hubs: the telemetry device and collector through a SIGKILL and restart of
the hub (each reading once, typed disconnect events printed), two chat members in an
encrypted room, and two_nodes.py."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import HubProcess
from tests.conftest import timeout

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


async def start(*args: str, cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=str(cwd), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)


READ: dict[int, list[str]] = {}  # pid -> lines line_with() consumed


async def line_with(proc: asyncio.subprocess.Process, text: str,
                    wait: float = 20.0) -> str:
    assert proc.stdout is not None
    seen = READ.setdefault(proc.pid, [])
    async with asyncio.timeout(timeout(wait)):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"exited before printing {text!r}")
            seen.append(line)
            if text in line:
                return line


async def rest(proc: asyncio.subprocess.Process, wait: float) -> str:
    """Everything the process printed, once it exited."""
    out, _ = await asyncio.wait_for(proc.communicate(), timeout(wait))
    return "".join(READ.pop(proc.pid, [])) + out.decode()


async def test_telemetry_through_a_hub_kill_each_reading_once(hub_process: HubProcess,
                                                              tmp_path: Path) -> None:
    await hub_process.start()
    n = 60
    url = hub_process.url
    collector = await start(str(EXAMPLES / "telemetry.py"), "--url", url, "collector",
                            "--key", "c.key", "--expect", str(n), cwd=tmp_path)
    first = await line_with(collector, " on ws://")
    collector_id = first.split()[1]
    device = await start(str(EXAMPLES / "telemetry.py"), "--url", url, "device",
                         collector_id, "--key", "d.key", "--count", str(n),
                         "--interval-s", "0.05", cwd=tmp_path)
    try:
        await line_with(collector, "#10:")
        hub_process.kill()
        await asyncio.sleep(0.5)
        await hub_process.start()
        dev_text = await rest(device, 90)
        col_text = await rest(collector, 90)
    finally:
        for p in (device, collector):
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert device.returncode == 0, dev_text
    assert collector.returncode == 0, col_text
    assert f"[collector] {n} readings, 0 counted twice" in col_text
    assert "[device] disconnected: code 1006" in dev_text  # the typed event, printed
    assert "retry #1" in dev_text
    assert f"[device] {n} readings confirmed by the hub" in dev_text
    numbers = [int(m.group(1)) for m in re.finditer(r"^\[collector\] \w+ #(\d+): ",
                                                     col_text, re.M)]
    assert sorted(numbers) == list(range(n))


async def test_chat_members_in_an_encrypted_room(make_hub: Any, tmp_path: Path) -> None:
    hub = await make_hub()
    url = f"ws://127.0.0.1:{hub.ws_port}/v1/ws"
    key = "ab" * 32
    alice = await start(str(EXAMPLES / "chat.py"), "--url", url, "--key", "a.key",
                        "--name", "alice", "--room", "club", "--room-key", key,
                        "--for-s", str(timeout(6)), cwd=tmp_path)
    await line_with(alice, "-- alice (")
    bob = await start(str(EXAMPLES / "chat.py"), "--url", url, "--key", "b.key",
                      "--name", "bob", "--room", "club", "--room-key", key,
                      "--say", "hello club", "--for-s", "0.5", cwd=tmp_path)
    outsider = None
    try:
        await line_with(alice, "joined")
        assert "✓ bob: hello club" in await line_with(alice, "bob:")
        await line_with(alice, "left")
        bob_out, _ = await asyncio.wait_for(bob.communicate(), timeout(20))
        assert bob.returncode == 0, bob_out.decode()
        # A late member without the key sees the history, but not the words.
        outsider = await start(str(EXAMPLES / "chat.py"), "--url", url, "--key", "c.key",
                               "--room", "club", "--for-s", "0.1", cwd=tmp_path)
        out, _ = await asyncio.wait_for(outsider.communicate(), timeout(20))
        text = out.decode()
        assert "✓ bob: [encrypted]" in text and "hello club" not in text, text
    finally:
        for p in (alice, bob, outsider):
            if p is not None and p.returncode is None:
                p.kill()
                await p.wait()


async def test_two_nodes_example(make_hub: Any, tmp_path: Path) -> None:
    hub = await make_hub()
    proc = await start(str(EXAMPLES / "two_nodes.py"), "--url",
                       f"ws://127.0.0.1:{hub.ws_port}/v1/ws", cwd=tmp_path)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout(30))
    assert proc.returncode == 0, out.decode()
    assert out.decode().splitlines()[-1] == "all three arrived"
