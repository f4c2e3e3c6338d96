"""The README's client snippet works as written: it is taken from README.md, pointed at a
real hub, and run as a script in its own process."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

from tests.conftest import timeout

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (code,) = [b for b in blocks if "from openred.client import Client" in b]
    return code


async def test_readme_snippet_runs_as_written(make_hub: Any, tmp_path: Path) -> None:
    h = await make_hub()
    code = snippet()
    assert 'URL = "ws://127.0.0.1:8765/v1/ws"' in code
    script = tmp_path / "two_nodes.py"
    script.write_text(code.replace("ws://127.0.0.1:8765/v1/ws",
                                   f"ws://127.0.0.1:{h.ws_port}/v1/ws"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=str(README.parent),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout(30))
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["direct", "room/1"], lines
    assert {line.split(" ", 2)[2] for line in lines} == {"hello, room", "hello, you"}
