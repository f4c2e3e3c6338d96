"""The JavaScript/TypeScript client (clients/js): its `node --test` suites, run by `npm
test` (which builds it first) against real hubs it starts itself: unit tests, the
client and reconnect suites, interop with the Python SDK both ways, the browser bundle
size, and an end-to-end test in headless Chromium.

scripts/test installs the Node packages (`npm ci`) and Chromium (Debian's `chromium`)
first. Without node/npm, the packages or Chromium this is skipped, except under CI=true,
where it fails (the Chromium check is the browser test's own: it fails under CI too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import timeout
from tests.services import missing

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "clients" / "js"

pytestmark = pytest.mark.slow


def test_js_client_suites() -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        missing("node and npm are not installed (apt-get install nodejs npm): clients/js")
    assert npm is not None
    if not (JS / "node_modules" / ".package-lock.json").exists():
        missing("clients/js has no node_modules: run `npm ci` in clients/js (scripts/test does)")
    env = dict(os.environ)
    env["OPENRED_VENV"] = str(Path(sys.prefix))  # the hub and the Python SDK of this run
    proc = subprocess.run(
        [npm, "test"], cwd=JS, env=env, capture_output=True, text=True,
        timeout=timeout(900),
    )
    if proc.returncode != 0:
        pytest.fail(f"npm test in clients/js failed ({proc.returncode}):\n"
                    f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}", pytrace=False)
    assert "# fail 0" in proc.stdout, proc.stdout[-5000:]
    if os.environ.get("CI") == "true":
        assert "# skipped 0" in proc.stdout, f"a JS test skipped under CI:\n{proc.stdout[-5000:]}"
