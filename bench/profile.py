"""`--profile`: py-spy on the hub during the measured window of one extra run (not
counted in the medians), kept as raw collapsed stacks in bench/results/ and summed up as
the functions with the most own time and the most total time (of busy samples: py-spy
leaves out the event loop's idle waits)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from bench.report import RESULTS_DIR

__all__ = ["Profiler", "summarize"]


def _py_spy() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.path.exists(beside) else shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, label: str, rate: int = 200) -> None:
        self.pid = pid
        safe = "".join(c if c.isalnum() else "-" for c in label)
        os.makedirs(RESULTS_DIR, exist_ok=True)
        self.path = os.path.join(RESULTS_DIR, time.strftime("%Y-%m-%d-%H%M%S") + f"-{safe}.stacks")
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def start(self) -> None:
        exe = _py_spy()
        if exe is None:
            self.error = "py-spy not found (pip install py-spy)"
            return
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--format", "raw", "--output", self.path,
             "--rate", str(self.rate), "--nonblocking", "--nolineno"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {"error": self.error}
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return {"error": "py-spy did not stop"}
        if not os.path.exists(self.path):
            return {"error": err.decode(errors="replace").strip().splitlines()[-1:]}
        return {"file": os.path.relpath(self.path), **summarize(self.path)}


def summarize(path: str, top: int = 15) -> dict[str, Any]:
    """Own and total time per function from py-spy's raw collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            samples += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for fr in set(frames):
                total[fr] += n
    if not samples:
        return {"samples": 0}

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[name, round(n / samples, 3)] for name, n in c.most_common(top)]

    return {"samples": samples, "own": share(own), "total": share(total)}
