"""Microbenchmark of the HTTP/1.1 head parser: ns per head, compiled vs pure.

    python bench/micro_parser.py            # full run
    python bench/micro_parser.py --quick    # fewer iterations

Heads are parsed out of a bytearray, as the server receives them. Each figure is the best of
several repeats (ns per call). Timings vary run to run; only compare numbers from the same run.
"""
import argparse
import importlib
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshcore.proto import h1_parse as pure  # noqa: E402

SMALL = (b"GET /api/v1/items?id=42&sort=asc HTTP/1.1\r\n"
         b"Host: myweb-service.default.svc.cluster.local\r\n"
         b"User-Agent: curl/8.5.0\r\n"
         b"Accept: */*\r\n"
         b"Accept-Encoding: gzip, deflate\r\n"
         b"X-Request-Id: 3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f\r\n"
         b"\r\n")

LARGE = (b"POST /checkout/v2/cart/items?session=8f14e45fceea167a5a36dedd4bea2543&lang=en-US HTTP/1.1\r\n"
         b"Host: shop.example.com\r\n"
         b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
         b"Chrome/124.0.0.0 Safari/537.36\r\n"
         b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
         b"*/*;q=0.8\r\n"
         b"Accept-Language: en-US,en;q=0.9,de;q=0.8,fr;q=0.7\r\n"
         b"Accept-Encoding: gzip, deflate, br\r\n"
         b"Content-Type: application/x-www-form-urlencoded\r\n"
         b"Content-Length: 512\r\n"
         b"Origin: https://shop.example.com\r\n"
         b"Referer: https://shop.example.com/checkout/v2/cart?step=2&coupon=SPRING\r\n"
         b"Cookie: " + b"; ".join(b"c%02d=%s" % (i, b"v" * 40) for i in range(18)) + b"\r\n"
         b"Connection: keep-alive\r\n"
         b"Sec-Fetch-Dest: document\r\n"
         b"Sec-Fetch-Mode: navigate\r\n"
         b"Sec-Fetch-Site: same-origin\r\n"
         b"X-Forwarded-For: 203.0.113.7, 198.51.100.23\r\n"
         b"X-Forwarded-Proto: https\r\n"
         b"X-Request-Id: 3f2b1c9e-8d7a-4b6c-9e5f-1a2b3c4d5e6f\r\n"
         b"X-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7\r\n"
         b"X-B3-SpanId: e457b5a2e4d86bd1\r\n"
         b"X-B3-Sampled: 1\r\n"
         b"Authorization: Bearer " + b"t" * 300 + b"\r\n"
         b"\r\n")

RESPONSE = (b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: 1234\r\n"
            b"Date: Tue, 26 Nov 2024 06:57:00 GMT\r\n"
            b"Server: istio-envoy\r\n"
            b"X-Envoy-Upstream-Service-Time: 3\r\n"
            b"Cache-Control: no-cache\r\n"
            b"\r\n")


def bench(fn, arg, n, repeat):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn(arg)
        dt = (time.perf_counter_ns() - t0) / n
        best = dt if best is None or dt < best else best
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    scale = 0.1 if args.quick else 1.0

    impls = [("pure", pure)]
    try:
        impls.insert(0, ("compiled", importlib.import_module("meshcore._ext.h1parse")))
    except ImportError as e:
        print(f"compiled: not built ({e})")

    print(f"# h1parse micro-benchmark: Python {platform.python_version()} "
          f"{platform.machine()}, {platform.processor() or platform.platform()}")
    print(f"# small request head {len(SMALL)} B, large request head {len(LARGE)} B, "
          f"response head {len(RESPONSE)} B; ns per call, best of 5")
    cases = [
        ("request head, small", "parse_request", SMALL, 1.0),
        ("request head, 2 KB", "parse_request", LARGE, 0.3),
        ("response head", "parse_response", RESPONSE, 1.0),
    ]
    print(f"{'case':36} " + " ".join(f"{name:>12}" for name, _ in impls))
    for label, fname, data, weight in cases:
        buf = bytearray(data)
        row = []
        for name, mod in impls:
            parse = getattr(mod, fname)
            assert parse(buf).end == len(data)
            n = max(100, int((200_000 if name == "compiled" else 10_000) * scale * weight))
            row.append(bench(parse, buf, n, 5))
        print(f"{label:36} " + " ".join(f"{ns:12.0f}" for ns in row))

    # what a proxy does per request: parse, read routing fields, build the upstream header block
    def full(mod):
        def go(buf):
            h = mod.parse_request(buf)
            h.method, h.path, h.host
            mod.request_body_kind(h)
            return h.forward_headers()
        return go

    for label, data, weight in (("small: parse+route fields+forward", SMALL, 1.0),
                                ("2 KB: parse+route fields+forward", LARGE, 0.3)):
        buf = bytearray(data)
        row = []
        for name, mod in impls:
            n = max(100, int((200_000 if name == "compiled" else 10_000) * scale * weight))
            row.append(bench(full(mod), buf, n, 5))
        print(f"{label:36} " + " ".join(f"{ns:12.0f}" for ns in row))

    body = b"".join(b"%x\r\n%s\r\n" % (64, b"d" * 64) for _ in range(16)) + b"0\r\n\r\n"

    def chunked(mod):
        def go(b):
            r = mod.ChunkedReader()
            pos = 0
            end = len(b)
            while True:
                k, pos, nxt = r.step(b, pos, end)
                if k != mod.DATA:
                    return
                pos = nxt
        return go

    row = []
    for name, mod in impls:
        n = max(100, int((20_000 if name == "compiled" else 1_000) * scale))
        row.append(bench(chunked(mod), body, n, 5))
    print(f"{'chunked body, 16 x 64 B chunks':36} " + " ".join(f"{ns:12.0f}" for ns in row))


if __name__ == "__main__":
    main()
