"""`python -m bench <scenario>` (also `openred-hub bench ...`): the benchmarks of
docs/benchmarks.md.

Each run starts the hub (pinned to CPU 0 with taskset when present) and, in the same
run, the baseline relays (bench/baselines/, pinned the same way), drives them with the
lean generator (bench/lean.py, pinned to CPU 1) and reports the median of `--runs` runs
per target, the ratios to the baselines and the goals of docs/benchmarks.md. Output: a
table, one JSON line (also appended to bench/results/<date>.jsonl), with `--plot` PNG charts.

    python -m bench direct                  # hub vs websockets, picows, coalesced picows
    python -m bench latency --rate 5000
    python -m bench idle --sessions 10000
    python -m bench fanout --subscribers 10000 --rate 10
    python -m bench qos1 --store-url sqlite --store-url postgresql://postgres@127.0.0.1/test
    python -m bench qos1 --store-url sqlite --targets hub,rabbitmq   # + RabbitMQ, same shape
    python -m bench cluster                 # 1 hub vs 2 hubs + Redis vs 2 relays + Redis
    python -m bench storm --nodes 10000 --per-node 5

`--url ws://host:port` measures a running hub instead of starting one (no baselines
unless asked with --targets).

qos1's baseline is not started by the bench: `--targets hub,rabbitmq` adds the RabbitMQ
running at `--amqp-url` (bench/rabbitmq.py; it needs Node.js, and installs its generator's
packages with npm the first time), reported with the ratio hub/rabbitmq.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.procs import (
    DEFAULT_PG_URL,
    NOFILE,
    Target,
    cpus,
    hub_process,
    pin_self,
    raise_nofile,
    start_target,
)
from bench.rabbitmq import DEFAULT_AMQP_URL, beam_pids, endpoint, pinned, prepare
from bench.report import Progress, append_jsonl, json_line, machine, plot, print_table
from bench.scenarios import SCENARIO_FUNCS

__all__ = ["hub_process", "main"]

BASELINES = ("websockets", "picows", "picows-coalesced")


@dataclass(frozen=True)
class Spec:
    key: str  # the metric the median run is chosen by
    higher_is_better: bool
    targets: tuple[str, ...]
    columns: list[tuple[str, str]] = field(default_factory=list)


_CPU_COLS = [("generator_cpu", "gen cpu"), ("server_cpu", "server cpu")]
SPECS: dict[str, Spec] = {
    "direct": Spec("msgs_per_s", True, ("hub", *BASELINES), [
        ("target", "target"), ("msgs_per_s", "msgs/s"), ("ratio", "hub/this"), *_CPU_COLS,
        ("server_sys_share", "server sys"), ("disconnects", "closed"), ("runs", "runs")]),
    "latency": Spec("p99_ms", False, ("hub", *BASELINES), [
        ("target", "target"), ("sent_per_s", "sent/s"), ("p50_ms", "p50 ms"),
        ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("p999_ms", "p99.9 ms"),
        ("max_ms", "max ms"), ("lost", "lost"), ("ratio", "hub/this p99"), *_CPU_COLS,
        ("idle_sessions", "idle"), ("idle_kib_per_session", "KiB/idle"),
        ("idle_connects_per_s", "idle connects/s"), ("runs", "runs (p99)")]),
    "idle": Spec("kib_per_session", False, ("hub", "websockets", "picows"), [
        ("target", "target"), ("sessions", "sessions"), ("kib_per_session", "KiB/session"),
        ("rss_before_mib", "RSS before MiB"), ("rss_after_mib", "RSS after MiB"),
        ("connects_per_s", "connects/s"), ("alive", "alive"), ("ratio", "hub/this"),
        *_CPU_COLS, ("runs", "runs")]),
    "fanout": Spec("p99_ms", False, ("hub", "websockets", "picows"), [
        ("target", "target"), ("subscribers", "subs"), ("published", "published"),
        ("delivered", "delivered"), ("all_delivered", "all?"), ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("late_50ms_share", "> 50 ms"),
        ("ratio", "hub/this p99"), *_CPU_COLS, ("runs", "runs (p99)")]),
    "qos1": Spec("msgs_per_s", True, ("hub",), [
        ("target", "target"), ("msgs_per_s", "msgs/s"), ("ratio", "hub/rabbitmq"),
        ("ok_p50_ms", "ok p50 ms"),
        ("ok_p99_ms", "ok p99 ms"), ("errors", "errors"), *_CPU_COLS, ("runs", "runs")]),
    "cluster": Spec("msgs_per_s", True, ("hub", "hub-cluster", "websockets-redis"), [
        ("target", "target"), ("msgs_per_s", "msgs/s"), *_CPU_COLS,
        ("errors", "errors"), ("disconnects", "closed"), ("runs", "runs")]),
    "storm": Spec("all_messages_s", False, ("hub",), [
        ("target", "target"), ("nodes", "nodes"), ("per_node", "msgs/node"),
        ("back_s", "all back s"), ("all_messages_s", "all msgs s"),
        ("p50_node_s", "p50 node s"), ("refused", "refused"), ("lost", "lost"),
        ("duplicates", "dups"), ("misdelivered", "wrong"), ("store_per_s", "stored/s"),
        *_CPU_COLS, ("runs", "runs")]),
}


# What each scenario's result depends on (kept with it in the JSON line).
PARAMS: dict[str, tuple[str, ...]] = {
    "direct": ("seconds", "pairs", "window", "body_bytes", "batch"),
    "cluster": ("seconds", "pairs", "window", "body_bytes", "batch"),
    "latency": ("seconds", "pairs", "rate", "body_bytes", "idle_sessions"),
    "idle": ("sessions", "concurrency", "settle"),
    "fanout": ("seconds", "subscribers", "rate", "body_bytes", "drain", "concurrency"),
    "qos1": ("seconds", "pairs", "window", "body_bytes"),
    "storm": ("nodes", "per_node", "window", "body_bytes", "concurrency", "storm_concurrency",
              "timeout"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SPECS))
    p.add_argument("--runs", type=int, default=3, help="runs; the median is reported (3)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window per run (10)")
    p.add_argument("--targets", help="comma-separated targets instead of the scenario's: hub, "
                   "websockets, picows, picows-coalesced, hub-cluster, websockets-redis; "
                   "qos1: hub (one row per --store-url), rabbitmq")
    p.add_argument("--amqp-url", default=DEFAULT_AMQP_URL, metavar="URL",
                   help="qos1 rabbitmq target: the running RabbitMQ to measure (default: "
                   "its guest account on 127.0.0.1:5672)")
    p.add_argument("--no-baselines", action="store_true", help="the hub only")
    p.add_argument("--url", help="measure a running hub (ws://host:port) instead of starting "
                   "one; its CPU counts only with --pid")
    p.add_argument("--pid", type=int, help="with --url: the running hub's pid")
    p.add_argument("--pairs", type=int, default=50, help="direct, latency, qos1, cluster (50)")
    p.add_argument("--window", type=int, default=32,
                   help="messages in flight per pair (32; storm: QoS 1 sends in flight, 512)")
    p.add_argument("--body-bytes", type=int, default=64, help="body size (64)")
    p.add_argument("--batch", action="store_true",
                   help="direct/cluster: senders write protocol batches, receivers ask for them")
    p.add_argument("--rate", type=float, help="latency: offered msgs/s (5000); fanout: "
                   "publishes/s (10)")
    p.add_argument("--sessions", type=int, default=10_000, help="idle: sessions (10000)")
    p.add_argument("--idle-sessions", type=int, default=0,
                   help="latency: this many more sessions connected and idle (heartbeats "
                        "only) while the pairs are measured (0)")
    p.add_argument("--subscribers", type=int, default=10_000, help="fanout (10000)")
    p.add_argument("--drain", type=float, default=10.0,
                   help="fanout: seconds to wait for late deliveries (10)")
    p.add_argument("--nodes", type=int, default=10_000, help="storm: nodes (10000)")
    p.add_argument("--per-node", type=int, default=5,
                   help="storm: QoS 1 messages queued per node (5)")
    p.add_argument("--concurrency", type=int, default=256,
                   help="handshakes in flight while setting up (256)")
    p.add_argument("--storm-concurrency", type=int, default=0,
                   help="storm: reconnects in flight (0: all at once)")
    p.add_argument("--timeout", type=float, default=120.0, help="storm: give up after (120 s)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="idle: seconds between the last connect and the RSS reading (3)")
    p.add_argument("--store-url", action="append", metavar="URL",
                   help="store of the hub it starts: 'sqlite' (default: a temporary file) or "
                   "postgresql://... (a throwaway schema is created and dropped); qos1 "
                   "takes it repeated, one row each (default: sqlite and " + DEFAULT_PG_URL
                   + "); cluster: the PostgreSQL database for its schemas")
    p.add_argument("--redis-url", help="cluster: use this Redis instead of a private "
                   "redis-server (a unique prefix per run)")
    p.add_argument("--hub-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra configuration for the hubs it starts, e.g. "
                   "OPENRED_HUB_STORE_TOPIC_HISTORY=0 (repeatable)")
    p.add_argument("--plot", action="store_true",
                   help="PNG charts into bench/results/ (needs matplotlib: the bench extra)")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results/")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--profile", action="store_true",
                   help="one extra run of the hub target(s), not in the medians, with py-spy "
                   "on the hub during the measured window: raw stacks into bench/results/, "
                   "own/total time per function in the JSON line")
    return p


@dataclass
class Planned:
    label: str
    spec: str
    store_url: str | None = None


def _plan(a: argparse.Namespace) -> list[Planned]:
    spec = SPECS[a.scenario]
    if a.scenario == "qos1":
        names = a.targets.split(",") if a.targets else ["hub"]
        unknown = sorted(set(names) - {"hub", "rabbitmq"})
        if unknown:
            raise SystemExit(f"bench: qos1 targets are hub and rabbitmq, not {', '.join(unknown)}")
        urls = a.store_url or ["sqlite", DEFAULT_PG_URL]
        plan = [Planned("hub " + ("postgresql" if u.startswith("postgres") else "sqlite"), "hub",
                        None if u == "sqlite" else u) for u in urls] if "hub" in names else []
        if "rabbitmq" in names and not a.no_baselines:
            plan.append(Planned("rabbitmq", "rabbitmq"))
        return plan
    store = (a.store_url or [None])[-1]
    store = None if store == "sqlite" else store
    names = a.targets.split(",") if a.targets else list(spec.targets)
    if a.url and not a.targets:
        names = ["hub"]
    if a.no_baselines:
        names = [n for n in names if n.startswith("hub")]
    if a.scenario == "cluster":
        pg = store or DEFAULT_PG_URL
        return [Planned({"hub": "hub", "hub-cluster": "hub x2 + redis",
                         "websockets-redis": "websockets x2 + redis"}.get(n, n), n,
                        pg if n == "hub" else store) for n in names]
    return [Planned(n, n, store if n == "hub" else None) for n in names]


@contextmanager
def _target(p: Planned, a: argparse.Namespace) -> Iterator[Target]:
    if a.url and p.spec == "hub":
        host, port = a.url.removeprefix("ws://").split("/")[0].rsplit(":", 1)
        yield Target("hub (running)", [(host, int(port))], [a.pid] if a.pid else [], False)
        return
    if p.spec == "rabbitmq":  # a running service: nothing to start, its CPU is beam.smp's
        pids = beam_pids()
        with pinned(pids, cpus()[0]):
            yield Target("rabbitmq", [endpoint(a.amqp_url)], pids, True, kind="rabbitmq")
        return
    hub_env = dict(kv.split("=", 1) for kv in a.hub_env)
    with start_target(p.spec, store_url=p.store_url, redis_url=a.redis_url,
                      hub_env=hub_env) as t:
        t.name = p.label
        yield t


def _median(runs: list[dict[str, Any]], key: str, higher: bool) -> dict[str, Any]:
    def k(r: dict[str, Any]) -> float:
        v = r.get(key)
        if v is None or v != v:
            return float("-inf") if higher else float("inf")
        return float(v)

    good = [r for r in runs if not r.get("failed")] or runs
    ordered = sorted(good, key=k)
    med = dict(ordered[len(ordered) // 2])
    med["runs"] = [r.get(key) for r in runs]
    return med


def _ratio(x: Any, y: Any) -> float | None:
    if not x or not y or x != x or y != y:
        return None
    return round(float(x) / float(y), 2)


def _analyse(a: argparse.Namespace, res: dict[str, dict[str, Any]]) -> tuple[
        dict[str, Any], dict[str, Any], list[str]]:
    """Ratios to the same-run baselines, the goals (docs/benchmarks.md), and notes."""
    ratios: dict[str, Any] = {}
    goals: dict[str, Any] = {}
    notes: list[str] = []
    res = {name: r for name, r in res.items() if not r.get("failed")}
    hub = res.get("hub") or res.get("hub (running)")
    sc = a.scenario

    def goal(name: str, value: Any, met: bool | None, as_specified: bool, want: str) -> None:
        goals[name] = {"want": want, "value": value, "met": met, "as_specified": as_specified}

    if sc == "direct" and hub:
        for b in BASELINES:
            if b in res:
                ratios[f"hub/{b}"] = res[b]["ratio"] = _ratio(hub["msgs_per_s"],
                                                             res[b]["msgs_per_s"])
        spec_ok = (a.pairs, a.window, a.body_bytes, a.batch) == (50, 32, 64, False)
        if "websockets" in res:
            rw = ratios["hub/websockets"]
            goal("direct >= 2x websockets", rw, rw is not None and rw >= 2, spec_ok, ">= 2.0")
        if "picows" in res:
            rp = ratios["hub/picows"]
            goal("direct >= 0.8x picows", rp, rp is not None and rp >= 0.8, spec_ok, ">= 0.8")
        ceiling = res.get("picows-coalesced")
        if ceiling:
            ratios["generator_ceiling_msgs_per_s"] = ceiling["msgs_per_s"]
            ratios["generator_cpu_at_ceiling"] = ceiling["generator_cpu"]
            headroom = _ratio(ceiling["msgs_per_s"], hub["msgs_per_s"])
            ratios["ceiling/hub"] = headroom
            gen = hub.get("generator_cpu") or 0.0
            text = (f"generator ceiling: {ceiling['msgs_per_s']:,} msgs/s against the "
                    f"coalescing picows relay at {ceiling['generator_cpu']:.0%} generator CPU; "
                    f"against the hub ({hub['msgs_per_s']:,} msgs/s) it used {gen:.0%}: ")
            if headroom and headroom >= 1.2 and gen < 0.8:
                text += "the generator is not the bottleneck for the hub"
            elif gen < 0.8:
                text += ("the coalescing relay did not outrun the hub in this run, but the "
                         "generator was not saturated either (a busy machine?)")
            else:
                text += "the GENERATOR MAY BE THE LIMIT of the hub's number"
            notes.append(text)
    elif sc == "latency" and hub:
        for name, r in res.items():
            if name != "hub":
                ratios[f"hub/{name} p99"] = r["ratio"] = _ratio(hub["p99_ms"], r["p99_ms"])
        goal("latency p99 < 1 ms at 5,000 msg/s", hub["p99_ms"],
             hub["p99_ms"] is not None and hub["p99_ms"] < 1.0 and hub["lost"] == 0,
             a.rate == 5000, "< 1 ms, nothing lost")
    elif sc == "idle" and hub:
        for name, r in res.items():
            if name != "hub":
                ratios[f"hub/{name}"] = r["ratio"] = _ratio(hub["kib_per_session"],
                                                             r["kib_per_session"])
        goal("idle <= 12 KiB per session", hub["kib_per_session"],
             hub["kib_per_session"] <= 12 and hub["alive"] == a.sessions,
             a.sessions == 10_000, "<= 12 KiB, all sessions alive")
    elif sc == "fanout" and hub:
        for name, r in res.items():
            if name != "hub":
                ratios[f"hub/{name} p99"] = r["ratio"] = _ratio(hub["p99_ms"], r["p99_ms"])
        goal("fanout 1 -> 10,000 at 10/s: all delivered, p99 < 50 ms", hub["p99_ms"],
             hub["all_delivered"] and hub["p99_ms"] < 50,
             (a.subscribers, a.rate) == (10_000, 10), "all delivered, p99 < 50 ms")
    elif sc == "cluster":
        one, two = res.get("hub"), res.get("hub x2 + redis")
        base = res.get("websockets x2 + redis")
        if two and base:
            rb = ratios["hub-cluster/websockets-redis"] = _ratio(two["msgs_per_s"],
                                                                 base["msgs_per_s"])
            goal("cluster >= 2x two-relay Redis baseline", rb, rb is not None and rb >= 2,
                 (a.pairs, a.window) == (50, 32), ">= 2.0")
        if two and one:
            ro = ratios["hub-cluster/hub"] = _ratio(two["msgs_per_s"], one["msgs_per_s"])
            goal("cluster >= 50 % of one instance", ro, ro is not None and ro >= 0.5,
                 (a.pairs, a.window) == (50, 32), ">= 0.5")
    elif sc == "qos1" and "rabbitmq" in res:
        rmq = res["rabbitmq"]
        for name, r in res.items():
            if name.startswith("hub"):
                ratios[f"{name}/rabbitmq"] = r["ratio"] = _ratio(r["msgs_per_s"],
                                                                  rmq["msgs_per_s"])
                # RabbitMQ is not held to one core like the hub: compare per CPU second too.
                if r["server_cpu"] and rmq["server_cpu"]:
                    ratios[f"{name}/rabbitmq per server cpu"] = _ratio(
                        r["msgs_per_s"] / r["server_cpu"], rmq["msgs_per_s"] / rmq["server_cpu"])
        if rmq["server_cpu"] is None:
            notes.append("rabbitmq: its CPU was not measured (no beam.smp process running "
                         "RabbitMQ found in /proc)")
        else:
            where = ("pinned to the server CPU like the hub" if rmq["pinned"] else
                     "NOT pinned (not allowed here): it may use every core, the generator's "
                     "too, where the hub is held to one")
            notes.append(f"rabbitmq: the broker used {rmq['server_cpu']:.2f} CPU, the "
                         f"generator {rmq['generator_cpu']:.2f}; RabbitMQ was {where}")
    elif sc == "storm" and hub:
        t = hub.get("all_messages_s")
        goal("storm: all back with their messages within 10 s, zero loss", t,
             t is not None and t <= 10 and hub["lost"] == 0 and hub["misdelivered"] == 0
             and hub["refused"] == 0,
             a.nodes == 10_000, "<= 10 s, lost 0")
    for result in res.values():
        gen = result.get("generator_cpu")
        if gen is not None and gen > 0.9:
            notes.append(f"{result['target']}: generator at {gen:.0%} CPU: it may be the limit")
    return ratios, goals, notes


def run_scenario(a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    spec = SPECS[a.scenario]
    fn = SCENARIO_FUNCS[a.scenario]
    plan = _plan(a)
    env = machine()
    problems: list[str] = []
    if any(p.spec == "rabbitmq" for p in plan):
        def say(text: str) -> None:
            progress.clear()
            print(text, file=sys.stderr, flush=True)

        missing = prepare(a.amqp_url, say)
        if missing:
            problems.append(missing)
            plan = [p for p in plan if p.spec != "rabbitmq"]
    runs: dict[str, list[dict[str, Any]]] = {p.label: [] for p in plan}
    for i in range(a.runs):
        for p in plan:
            progress.prefix = f"[run {i + 1}/{a.runs}] "
            progress.set(f"{a.scenario} {p.label}: starting")
            with _target(p, a) as target:
                try:
                    r = asyncio.run(fn(target, a, progress))
                except Exception as exc:
                    r = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
                    problems.append(f"{p.label} run {i + 1}: {r['failed']}")
                r["target"] = p.label
                runs[p.label].append(r)
            problems.extend(f"{p.label} run {i + 1}: {x}" for x in target.problems())
            progress.clear()
    results = {label: _median(rs, spec.key, spec.higher_is_better) for label, rs in runs.items()}
    profiles: dict[str, Any] = {}
    if a.profile:
        a.profiling = True
        progress.prefix = "[profile] "
        for p in plan:
            if not p.spec.startswith("hub"):
                continue
            progress.set(f"{a.scenario} {p.label}: starting")
            with _target(p, a) as target:
                try:
                    r = asyncio.run(fn(target, a, progress))
                    profiles[p.label] = r.get("profile")
                except Exception as exc:
                    problems.append(f"{p.label} profile run: {type(exc).__name__}: {exc}"[:300])
            progress.clear()
        a.profiling = False
    ratios, goals, notes = _analyse(a, results)
    params = {k: getattr(a, k) for k in ("runs", *PARAMS[a.scenario], "url", "store_url",
                                         "redis_url", "hub_env") if getattr(a, k)}
    return {
        "scenario": a.scenario, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": env, "loadavg_after": round(os.getloadavg()[0], 2),
        "params": params, "results": results, "ratios": ratios, "goals": goals,
        "notes": notes, "problems": problems, **({"profiles": profiles} if profiles else {}),
    }


def report(record: dict[str, Any], a: argparse.Namespace) -> None:
    spec = SPECS[record["scenario"]]
    rows = list(record["results"].values())
    m = record["machine"]
    print(f"\n{record['scenario']}: median of {a.runs} run(s), {m['nproc']} cpu {m['cpu']}, "
          f"Python {m['python']}, load {m['loadavg']} -> {record['loadavg_after']}")
    print_table(rows, spec.columns)
    for name, r in record["ratios"].items():
        print(f"ratio {name}: {r}")
    for name, g in record["goals"].items():
        verdict = "met" if g["met"] else "MISSED"
        cond = "" if g["as_specified"] else " (not measured as specified: see params)"
        print(f"goal {name}: {g['value']} (want {g['want']}): {verdict}{cond}")
    for n in record["notes"]:
        print("note:", n)
    for label, prof in record.get("profiles", {}).items():
        if not prof or not prof.get("own"):
            print(f"profile {label}: {prof}")
            continue
        print(f"profile {label} ({prof['samples']} samples, {prof['file']}), own time:")
        for name, share in prof["own"]:
            print(f"  {share:6.1%}  {name}")
    for prob in record["problems"]:
        print("problem:", prob)
    for r in rows:
        if r.get("failed"):
            print(f"failed: {r['target']}: {r['failed']}")
    line = json_line(record)
    print(line)
    if not a.no_save:
        path = append_jsonl(line)
        print(f"(appended to {path})", file=sys.stderr)
    if a.plot:
        for path in plot(record["scenario"], record["results"]):
            print(f"chart: {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.rate is None:
        a.rate = 10.0 if a.scenario == "fanout" else 5000.0
    if a.scenario == "storm" and a.window == 32:
        a.window = 512
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    raise_nofile(NOFILE)
    _, gen_cpu = cpus()
    pin_self(gen_cpu)
    progress = Progress(enabled=not a.quiet)
    progress.start()
    try:
        record = run_scenario(a, progress)
    except KeyboardInterrupt:
        progress.stop()
        print("bench: interrupted (servers stopped, schemas dropped)", file=sys.stderr)
        return 130
    finally:
        progress.stop()
    report(record, a)
    failed = [r for r in record["results"].values() if r.get("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
