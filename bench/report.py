"""What a bench run prints and keeps: percentiles, the progress line, the table, one
JSON line per scenario (also appended to bench/results/<date>.jsonl), and with --plot
PNG charts (latency CDF, throughput over time) via matplotlib, an optional extra
(`pip install openred-hub[bench]`)."""

from __future__ import annotations

import itertools
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "Progress",
    "append_jsonl",
    "machine",
    "percentiles",
    "plot",
    "print_table",
]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def percentiles(values_ns: Sequence[int], qs: Sequence[float] = (0.5, 0.95, 0.99, 0.999)
                ) -> dict[str, float]:
    """p50/p95/p99/p99.9/max in milliseconds (nearest rank) of latencies in ns."""
    if not values_ns:
        return {**{_qname(q): float("nan") for q in qs}, "max_ms": float("nan")}
    v = sorted(values_ns)
    n = len(v)
    out = {_qname(q): round(v[min(n - 1, int(q * n))] / 1e6, 3) for q in qs}
    out["max_ms"] = round(v[-1] / 1e6, 3)
    return out


def _qname(q: float) -> str:
    return "p" + f"{q * 100:g}".replace(".", "") + "_ms"


def cdf_points(values_ns: Sequence[int], points: int = 2000) -> list[tuple[float, float]]:
    """A downsampled CDF (ms, fraction) for plotting; the tail is kept in full detail."""
    if not values_ns:
        return []
    v = sorted(values_ns)
    n = len(v)
    idx = sorted({min(n - 1, int(n * i / points)) for i in range(points)}
                 | set(range(max(0, n - 200), n)))
    return [(v[i] / 1e6, (i + 1) / n) for i in idx]


class Progress:
    """One status line on stderr, rewritten in place (\\r) once per second, from a
    thread, so no scenario has to schedule it. `set(label, fn)`: fn() gives the text.
    When stderr is not a terminal (a log file), a plain line every 10 seconds instead."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.prefix = ""
        self._label = ""
        self._fn: Callable[[], str] | None = None
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._width = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="progress")
            self._thread.start()

    def set(self, label: str, fn: Callable[[], str] | None = None) -> None:
        with self._lock:
            self._label, self._fn, self._t0 = label, fn, time.monotonic()

    def clear(self) -> None:
        with self._lock:
            self._fn = None
            self._label = ""
            if self.enabled and self._width and sys.stderr.isatty():
                sys.stderr.write("\r" + " " * self._width + "\r")
                sys.stderr.flush()
                self._width = 0

    def stop(self) -> None:
        self._stop.set()
        self.clear()

    def _run(self) -> None:
        tty = sys.stderr.isatty()
        tick = 0
        while not self._stop.wait(1.0):
            tick += 1
            with self._lock:
                if not self._label or (not tty and tick % 10):
                    continue
                try:
                    detail = self._fn() if self._fn is not None else ""
                except Exception:  # a counter read mid-update: skip this second
                    continue
                text = f"{self.prefix}{self._label} {time.monotonic() - self._t0:5.0f} s  {detail}"
                if not tty:
                    sys.stderr.write(text + "\n")
                    sys.stderr.flush()
                    continue
                pad = max(0, self._width - len(text))
                sys.stderr.write("\r" + text + " " * pad)
                sys.stderr.flush()
                self._width = len(text)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "nproc": os.cpu_count(), "cpu": model, "mem_gib": mem_gib,
        "kernel": platform.release(), "python": platform.python_version(),
        **{name: _version(name) for name in ("uvloop", "websockets", "picows", "msgpack")},
        "loadavg": round(os.getloadavg()[0], 2),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]],
                file: Any = None) -> None:
    """rows: dicts; columns: (key, heading)."""
    out = file or sys.stdout
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _clean(value: Any) -> Any:
    """JSON-safe: private keys (leading underscore) dropped, NaN as null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(_clean(record), sort_keys=False)


def append_jsonl(line: str, directory: str = RESULTS_DIR) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, time.strftime("%Y-%m-%d") + ".jsonl")
    with open(path, "a") as f:
        f.write(line + "\n")
    return path


def plot(scenario: str, results: dict[str, dict[str, Any]],
         directory: str = RESULTS_DIR) -> list[str]:
    """Latency CDF (where latencies were measured) and throughput over time, one PNG
    each, into `directory`. Needs matplotlib (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: --plot needs matplotlib (pip install 'openred-hub[bench]')",
              file=sys.stderr)
        return []
    os.makedirs(directory, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    paths = []
    cdfs = {name: r["_cdf"] for name, r in results.items() if r.get("_cdf")}
    if cdfs:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, pts in cdfs.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (log)")
        ax.set_ylabel("fraction of messages")
        ax.set_title(f"{scenario}: latency CDF (median run)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = os.path.join(directory, f"{stamp}-{scenario}-latency-cdf.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    series = {name: r["_timeline"] for name, r in results.items() if r.get("_timeline")}
    if series:
        fig, ax = plt.subplots(figsize=(8, 5))
        unit = "msgs/s"
        cumulative = False
        for name, pts in series.items():
            cumulative = bool(results[name].get("_timeline_cumulative"))
            if cumulative:  # a count over time (storm, idle): the curve itself
                xs, ys = [t for t, _ in pts], [float(n) for _, n in pts]
            else:
                xs, ys = [], []
                for (t0, n0), (t1, n1) in itertools.pairwise(pts):
                    if t1 > t0:
                        xs.append(t1)
                        ys.append((n1 - n0) / (t1 - t0))
            ax.plot(xs, ys, label=name)
            unit = results[name].get("_timeline_unit", unit)
        ax.set_xlabel("seconds into the measured window")
        ax.set_ylabel(unit)
        ax.set_title(f"{scenario}: {'progress' if cumulative else 'throughput'} over time "
                     "(median run)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        kind = "progress" if cumulative else "throughput"
        path = os.path.join(directory, f"{stamp}-{scenario}-{kind}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
