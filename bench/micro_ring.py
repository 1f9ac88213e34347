"""Micro-benchmark: consistent-hash tables (Envoy RING_HASH / MAGLEV), compiled vs pure.

    python bench/micro_ring.py [--number N] [--repeat R] [--json] [--quick]
    python bench/micro_ring.py --moved      # key movement when one of 3/10/100 endpoints leaves/joins

Reports, for 3, 30 and 100 equal-weight endpoints (Envoy defaults: ring minimum 1024 entries,
Maglev table 65537):

* ns per `pick(h)` (best of R runs of N picks over a fixed set of pre-drawn 64-bit hashes;
  timeit's loop overhead is included and printed separately as "empty statement") and per retry
  re-pick `pick(h, 1)`;
* ms per table build (best of R builds);
* ns per request hash: `hash_key` of a 16-byte header value and `request_hash` for one header
  policy over a parsed request.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import sys
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshcore.upstream import ring as ring_mod  # noqa: E402
from meshcore.upstream.hashkey import HashPolicy, request_hash  # noqa: E402
from meshcore.upstream.ring import MaglevC, MaglevPy, RingHashC, RingHashPy  # noqa: E402

SIZES = (3, 30, 100)


def _ns(stmt: str, env: dict, number: int, repeat: int) -> float:
    timer = timeit.Timer(stmt, globals=env)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def _build_ms(cls, keys, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        cls(keys, [1] * len(keys))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def run(number: int, repeat: int) -> list[tuple[str, str, float, str]]:
    impls = [("pure", RingHashPy, MaglevPy)]
    if RingHashC is not None:
        impls.insert(0, ("compiled", RingHashC, MaglevC))
    rng = random.Random(1)
    hashes = [rng.getrandbits(64) for _ in range(1024)]
    rows = [("empty statement (timeit loop overhead)", "-", _ns("pass", {}, number, repeat), "ns"),
            ("next hash only (overhead included in every pick row)", "-",
             _ns("nxt()", {"nxt": itertools.cycle(hashes).__next__}, number, repeat), "ns")]
    for n in SIZES:
        keys = [f"10.0.{i // 250}.{i % 250 + 1}:8080" for i in range(n)]
        for label, Ring, Mag in impls:
            for kind, cls in (("RING_HASH", Ring), ("MAGLEV", Mag)):
                t = cls(keys, [1] * n)
                # cycle through 1024 random hashes so caches and branches see varied lookups
                env = {"pick": t.pick, "nxt": itertools.cycle(hashes).__next__}
                rows.append((f"pick {kind} n={n}", label, _ns("pick(nxt())", env, number, repeat), "ns"))
                rows.append((f"pick {kind} n={n} attempt=1", label,
                             _ns("pick(nxt(), 1)", env, number, repeat), "ns"))
                rows.append((f"build {kind} n={n}", label,
                             _build_ms(cls, keys, max(1, min(repeat, 3) if label == "pure" else repeat)),
                             "ms"))
    env = {"hk": ring_mod.hash_key, "v": b"user-0123456789ab"}
    rows.append(("hash_key(16 bytes)", "compiled" if ring_mod._c else "pure",
                 _ns("hk(v)", env, number, repeat), "ns"))
    env = {"hk": ring_mod.hash_key_py, "v": b"user-0123456789ab"}
    rows.append(("hash_key(16 bytes)", "pure", _ns("hk(v)", env, number, repeat), "ns"))
    from meshcore.proto.h1_parse import parse_request
    head = parse_request(b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nx-user: user-0123456789ab\r\n"
                         b"accept: */*\r\nuser-agent: bench\r\n\r\n")
    env = {"rh": request_hash, "p": (HashPolicy("header", "x-user"),), "h": head}
    rows.append(("request_hash(header policy, parsed request)", "-",
                 _ns("rh(p, h, '127.0.0.1:1')", env, number, repeat), "ns"))
    return rows


def moved(n_hashes: int = 20000) -> list[tuple[str, int, float, float, float, float]]:
    """Fraction of keys that change endpoint when one of n equal endpoints leaves (mean and max
    over up to 10 different leavers) or when an (n+1)-th joins; hosts compared by key."""
    rng = random.Random(7)
    hashes = [rng.getrandbits(64) for _ in range(n_hashes)]
    out = []
    for name, cls in (("RING_HASH", ring_mod.RingHash), ("MAGLEV", ring_mod.Maglev)):
        for n in (3, 10, 100):
            ks = [f"10.0.{i // 250}.{i % 250 + 1}:8080" for i in range(n + 1)]
            base = cls(ks[:n], [1] * n)
            before = [ks[base.pick(h)] for h in hashes]
            fr = []
            for r in range(min(n, 10)):
                rest = ks[:r] + ks[r + 1:n]
                t = cls(rest, [1] * (n - 1))
                fr.append(sum(rest[t.pick(h)] != b for h, b in zip(hashes, before)) / n_hashes)
            t = cls(ks, [1] * (n + 1))
            joined = sum(ks[t.pick(h)] != b for h, b in zip(hashes, before)) / n_hashes
            out.append((name, n, sum(fr) / len(fr), max(fr), joined, 1 / n))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=200_000, help="picks per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    ap.add_argument("--quick", action="store_true", help="--number 20000 --repeat 2")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--moved", action="store_true",
                    help="print the fraction of keys that move when one of 3/10/100 endpoints "
                         "leaves or joins, instead of timings")
    args = ap.parse_args(argv)
    if args.moved:
        rows = moved()
        if args.json:
            print(json.dumps([{"lb": a, "n": n, "leave_mean": round(m, 4), "leave_max": round(x, 4),
                               "join": round(j, 4), "one_over_n": round(o, 4)}
                              for a, n, m, x, j, o in rows], indent=2))
            return 0
        print(f"{'lb':<10} {'n':>4} {'1/n':>7} {'leave mean':>11} {'leave max':>10} {'join':>7}")
        for a, n, m, x, j, o in rows:
            print(f"{a:<10} {n:>4} {o:7.4f} {m:11.4f} {x:10.4f} {j:7.4f}")
        return 0
    if args.quick:
        args.number, args.repeat = 20_000, 2
    if RingHashC is None:
        print("note: meshcore._ext.ring not available; pure only", file=sys.stderr)
    rows = run(args.number, args.repeat)
    if args.json:
        print(json.dumps({
            "python": platform.python_version(),
            "machine": platform.machine(),
            "results": [{"case": c, "impl": k, "value": round(v, 3), "unit": u} for c, k, v, u in rows],
        }, indent=2))
        return 0
    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"best of {args.repeat} x {args.number} picks")
    width = max(len(c) for c, _, _, _ in rows)
    print(f"{'case':<{width}}  {'impl':<8}  {'value':>10}")
    for case, kind, v, unit in rows:
        print(f"{case:<{width}}  {kind:<8}  {v:8.1f} {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
