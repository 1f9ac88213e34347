"""Run one load measurement with the built-in generator (cgen: bench/native/loadgen.c, or the
pygen fallback) or with wrk, and return its figures as a dict.

Every result names the generator that produced it ("generator": "cgen" | "pygen" | "wrk").
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from bench import native
from bench.targets import HOST, _q

HERE = os.path.dirname(os.path.abspath(__file__))

WRK_LUA = """\
-- meshcore bench: print wrk's summary as one JSON line (latency in microseconds)
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors": %d, "non2xx": %d, ' ..
    '"timeouts": %d, "latency_us": {"mean": %.2f, "p50": %.2f, "p75": %.2f, "p90": %.2f, ' ..
    '"p99": %.2f, "p99.9": %.2f, "max": %.2f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect + e.read + e.write, e.status,
    e.timeout, latency.mean, latency:percentile(50), latency:percentile(75),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


class BuiltinGenerator:
    """cgen when gcc can build it, else pygen."""

    def __init__(self, notes: list[str], threads: int = 1, spin_us: float = 100.0,
                 spin_frac: float = 0.1, cpus: str | None = None):
        self.threads, self.spin_us, self.spin_frac, self.cpus = threads, spin_us, spin_frac, cpus
        try:
            self.argv0 = [native.build("loadgen")]
            self.name = "cgen"
            self.label = ("cgen: built-in C epoll generator (bench/native/loadgen.c), "
                          f"{threads} thread(s)")
        except native.BuildError as exc:
            self.argv0 = [sys.executable, os.path.join(HERE, "pygen.py")]
            self.name = "pygen"
            self.label = "pygen: pure-Python fallback generator (slow; may be the bottleneck)"
            notes.append(f"generator: C helper unavailable ({exc}); using pygen, whose numbers "
                         "are limited by the generator itself")

    def argv(self, port: int, conns: int, duration: float, warmup: float,
             rate: float | None = None) -> list[str]:
        argv = list(self.argv0)
        argv += ["-p", str(port), "-c", str(conns), "-t", str(min(self.threads, conns)),
                 "-d", f"{duration:g}", "-w", f"{warmup:g}", "-H", f"Host: {HOST}"]
        if rate:
            argv += ["-r", f"{rate:.1f}", "-s", f"{self.spin_us:g}", "-S", f"{self.spin_frac:g}",
                     "-g", f"{max(1.0, min(5.0, duration)):g}"]
        if self.cpus:
            argv = ["taskset", "-c", self.cpus] + argv
        return argv

    def run(self, port: int, conns: int, duration: float, warmup: float,
            rate: float | None = None) -> dict:
        argv = self.argv(port, conns, duration, warmup, rate)
        timeout = warmup + duration + 30
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name} failed ({proc.returncode}): {proc.stderr.strip()}")
        res = json.loads(proc.stdout)
        res["command"] = " ".join(_q(a) for a in argv)
        # the generator's own load: a busy generator cannot vouch for the target's maximum
        res["generator_cpu_util"] = res["cpu_s"] / res["wall_s"] if res.get("wall_s") else None
        return res


class Wrk:
    """Plain wrk: closed loop only (no fixed rate), used as a second opinion on max rps."""

    def __init__(self, binary: str, cfgdir: str, cpus: str | None = None):
        self.binary, self.cpus = binary, cpus
        self.script = os.path.join(cfgdir, "wrk_report.lua")
        os.makedirs(cfgdir, exist_ok=True)
        with open(self.script, "w") as f:
            f.write(WRK_LUA)
        self.name = "wrk"

    def run(self, port: int, conns: int, duration: float) -> dict:
        secs = max(1, round(duration))
        argv = [self.binary, "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "10s",
                "-H", f"Host: {HOST}", "-s", self.script, f"http://127.0.0.1:{port}/"]
        if self.cpus:
            argv = ["taskset", "-c", self.cpus] + argv
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 30)
        m = re.search(r"^WRKJSON (.*)$", proc.stdout, re.M)
        if proc.returncode != 0 or not m:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}")
        res = json.loads(m.group(1))
        dur = res.pop("duration_us") / 1e6
        res.update({"generator": "wrk", "mode": "closed", "conns": conns, "threads": 1,
                    "duration_s": dur, "warmup_s": 0.0, "sent": res["requests"],
                    "rps": (res["requests"] - res["non2xx"]) / dur,
                    "command": " ".join(_q(a) for a in argv)})
        return res
