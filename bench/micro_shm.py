"""Micro-benchmark: shared-memory atomics, outlier hot path and breaker, compiled vs pure.

    python bench/micro_shm.py [--number N] [--repeat R] [--json] [--contention]

Reports nanoseconds per operation (best of R runs of N operations each; timeit's loop overhead is
included and printed separately as "empty statement"), single process, no contention:

* atomic ops through a `Cells` object (one call) and through the module functions (buffer taken
  per call), compiled and pure; `incr64` is the single-writer stats add;
* `on_result` for a success (the common case: one 64-bit load, no store), a 5xx, a gateway error,
  and `is_available`, `try_acquire` + `release`, over a real SharedMemory segment.

`--contention` adds a 2-process run (spawn): both processes fetch-add on the SAME cache line, then
on cells 64 bytes apart, to show what false sharing costs (needs 2 free cores to mean anything).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshcore.shm import atomics  # noqa: E402
from meshcore.shm.layout import ClusterRow, HostRow, Layout  # noqa: E402
from meshcore.shm.segment import Segment  # noqa: E402
from meshcore.upstream import breaker, outlier  # noqa: E402
from meshcore.upstream.outcome import Outcome  # noqa: E402


def _ns(stmt: str, env: dict, number: int, repeat: int, setup: str = "pass") -> float:
    timer = timeit.Timer(stmt, setup=setup, globals=env)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def run(number: int, repeat: int) -> list[tuple[str, str, float]]:
    impls = [("pure", atomics.PURE)]
    if atomics.COMPILED is not None:
        impls.insert(0, ("compiled", atomics.COMPILED))
    rows = [("empty statement (timeit loop overhead)", "-", _ns("pass", {}, number, repeat))]
    seg = Segment.create(Layout(max_hosts=16, max_clusters=2, workers=2))
    try:
        for label, impl in impls:
            c = impl.Cells(seg.buf)
            env = {"c": c, "impl": impl, "buf": seg.buf}
            rows.append(("Cells.fetch_add32", label, _ns("c.fetch_add32(128, 1)", env, number,
                                                         repeat)))
            rows.append(("Cells.fetch_add64", label, _ns("c.fetch_add64(136, 1)", env, number,
                                                         repeat)))
            rows.append(("Cells.load64", label, _ns("c.load64(136)", env, number, repeat)))
            rows.append(("Cells.cas32 (succeeds)", label,
                         _ns("c.cas32(144, 0, 0)", env, number, repeat)))
            rows.append(("Cells.incr64 (single writer)", label,
                         _ns("c.incr64(152, 1)", env, number, repeat)))
            rows.append(("module fetch_add32(buf, off, 1)", label,
                         _ns("impl.fetch_add32(buf, 160, 1)", env, number // 4, repeat)))

            hosts = [HostRow(c, seg.layout.host_off(i), i) for i in range(4)]
            cluster = ClusterRow(c, seg.layout.cluster_off(0), 0)
            pol = outlier.OutlierPolicy(consecutive_5xx=10**9, consecutive_gateway_failure=10**9)
            env.update(h=hosts[1], cl=cluster, pol=pol, on_result=outlier.on_result,
                       is_available=outlier.is_available, S=Outcome.SUCCESS,
                       E5=Outcome.HTTP_5XX, GW=Outcome.GATEWAY_ERROR,
                       try_acquire=breaker.try_acquire, release=breaker.release,
                       rq=cluster.rq_active, LIM=1000, UNL=breaker.UNLIMITED)
            rows.append(("on_result SUCCESS (counters already 0)", label,
                         _ns("on_result(h, cl, S, 1000, pol, 4)", env, number, repeat)))
            rows.append(("on_result HTTP_5XX (no detection)", label,
                         _ns("on_result(h, cl, E5, 1000, pol, 4)", env, number, repeat)))
            rows.append(("on_result GATEWAY_ERROR (no detection)", label,
                         _ns("on_result(h, cl, GW, 1000, pol, 4)", env, number, repeat)))
            rows.append(("is_available (active host)", label,
                         _ns("is_available(h, 1000)", env, number, repeat)))
            rows.append(("breaker try_acquire+release (limit 1000)", label,
                         _ns("try_acquire(rq, LIM); release(rq)", env, number, repeat)))
            rows.append(("breaker try_acquire+release (unlimited)", label,
                         _ns("try_acquire(rq, UNL); release(rq)", env, number, repeat)))
            c.release()
    finally:
        seg.close()
        seg.unlink()
    return rows


def _contend(name, off, n, barrier, out):
    seg = Segment.attach(name)
    c = seg.cells
    barrier.wait(60)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        c.fetch_add32(off, 1)
    out.put((time.perf_counter_ns() - t0) / n)
    seg.close()


def contention(n: int) -> list[tuple[str, str, float]]:
    ctx = multiprocessing.get_context("spawn")
    rows = []
    seg = Segment.create(Layout(max_hosts=4, max_clusters=1, workers=1))
    try:
        base = seg.layout.host_off(0)
        for case, offs in (("2 processes, same 64-byte line", (base + 8, base + 12)),
                           ("2 processes, separate lines", (base + 8, base + 64 + 8)),
                           ("1 process alone", (base + 128,))):
            barrier = ctx.Barrier(len(offs))
            out = ctx.Queue()
            procs = [ctx.Process(target=_contend, args=(seg.name, o, n, barrier, out))
                     for o in offs]
            for p in procs:
                p.start()
            for p in procs:
                p.join(120)
            per = [out.get(timeout=10) for _ in offs]
            rows.append((f"fetch_add32 loop, {case}", "compiled" if atomics.HAS_COMPILED
                         else "pure", sum(per) / len(per)))
    finally:
        seg.close()
        seg.unlink()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=200_000, help="operations per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--contention", action="store_true", help="add the 2-process runs")
    args = ap.parse_args(argv)
    if atomics.COMPILED is None:
        print("note: meshcore._ext.shmatomic not available; pure only", file=sys.stderr)
    rows = run(args.number, args.repeat)
    if args.contention:
        rows += contention(args.number * 5)
    if args.json:
        print(json.dumps({
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "results": [{"case": c, "impl": k, "ns": round(ns, 1)} for c, k, ns in rows],
        }, indent=2))
        return 0
    print(f"Python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} CPUs), "
          f"best of {args.repeat} x {args.number}")
    width = max(len(c) for c, _, _ in rows)
    print(f"{'case':<{width}}  {'impl':<8}  {'ns/op':>8}")
    for case, kind, ns in rows:
        print(f"{case:<{width}}  {kind:<8}  {ns:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
