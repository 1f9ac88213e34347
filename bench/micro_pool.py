"""Micro-benchmark: pool bookkeeping and balancer picks, compiled vs pure.

    python bench/micro_pool.py [--number N] [--repeat R] [--json]

Reports nanoseconds per operation (best of R runs of N operations each; timeit's loop overhead is
included and printed separately as "empty statement"):

* pool checkout+checkin pair: `take_idle` + `put_idle` on a warm endpoint;
* pool request cycle: `take_idle` + `rq_start` + `rq_end` + `put_idle`;
* balancer `pick` for each kind and weight shape; LEAST_REQUEST reads `rq_active` from the book,
  so it is timed with the compiled and with the pure book (balancers themselves are pure Python).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshcore.upstream.balancer import make_balancer  # noqa: E402
from meshcore.upstream.pool import PoolBookC, PoolBookPy  # noqa: E402

N_ENDPOINTS = 16


def _ns(stmt: str, env: dict, number: int, repeat: int) -> float:
    timer = timeit.Timer(stmt, globals=env)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def _warm_book(Book):
    book = Book(N_ENDPOINTS, 64)
    for ep in range(N_ENDPOINTS):
        for k in range(4):
            book.on_open(ep)
            book.put_idle(ep, object(), 0.0)
        for _ in range(ep % 3):
            book.rq_start(ep)
    return book


def run(number: int, repeat: int) -> list[tuple[str, str, float]]:
    books = [("pure", PoolBookPy)]
    if PoolBookC is not None:
        books.insert(0, ("compiled", PoolBookC))
    rows = []
    rows.append(("empty statement (timeit loop overhead)", "-", _ns("pass", {}, number, repeat)))
    for label, Book in books:
        book = _warm_book(Book)
        env = {"book": book, "inf": float("inf")}
        rows.append(("pool checkout+checkin pair", label, _ns(
            "c = book.take_idle(5, 1.0, 60.0); book.put_idle(5, c, 1.0)", env, number, repeat)))
        rows.append(("pool request cycle (take, rq_start, rq_end, put)", label, _ns(
            "c = book.take_idle(5, 1.0, 60.0); book.rq_start(5); book.rq_end(5); "
            "book.put_idle(5, c, 1.0)", env, number, repeat)))
        rows.append(("pool rq_active read", label, _ns("book.rq_active(5)", env, number, repeat)))

    unequal = [1 + (i * 7) % 5 for i in range(N_ENDPOINTS)]  # weights 1..5, period 48
    huge = [1000 + i for i in range(N_ENDPOINTS)]             # period > table cap: heap EDF
    cases = [
        ("ROUND_ROBIN", "equal", [1] * N_ENDPOINTS, False),
        ("ROUND_ROBIN", "weighted (EDF table)", unequal, False),
        ("ROUND_ROBIN", "weighted (heap EDF)", huge, False),
        ("RANDOM", "equal", [1] * N_ENDPOINTS, False),
        ("LEAST_REQUEST", "equal (p2c)", [1] * N_ENDPOINTS, True),
        ("LEAST_REQUEST", "weighted (EDF)", unequal, True),
    ]
    for kind, shape, weights, reads_book in cases:
        for label, Book in (books if reads_book else books[:1]):
            book = _warm_book(Book)
            b = make_balancer(kind, weights, random.Random(1))
            env = {"b": b, "book": book}
            rows.append((f"pick {kind} {shape}", label if reads_book else "-",
                         _ns("b.pick(book)", env, number, repeat)))
    b = make_balancer("ROUND_ROBIN", [1] * N_ENDPOINTS, random.Random(1))
    rows.append(("pick ROUND_ROBIN equal, exclude={one host} (retry path)", "-",
                 _ns("b.pick(None, ex)", {"b": b, "ex": frozenset({3})}, number, repeat)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=200_000, help="operations per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if PoolBookC is None:
        print("note: meshcore._ext.pool not available; pure only", file=sys.stderr)
    rows = run(args.number, args.repeat)
    if args.json:
        print(json.dumps({
            "python": platform.python_version(),
            "machine": platform.machine(),
            "results": [{"case": c, "book": k, "ns": round(ns, 1)} for c, k, ns in rows],
        }, indent=2))
        return 0
    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"{N_ENDPOINTS} endpoints, best of {args.repeat} x {args.number}")
    width = max(len(c) for c, _, _ in rows)
    print(f"{'case':<{width}}  {'book':<8}  {'ns/op':>8}")
    for case, kind, ns in rows:
        print(f"{case:<{width}}  {kind:<8}  {ns:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
