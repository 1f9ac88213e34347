"""Fallback load generator ("pygen") for machines without a C compiler: the same flags and the
same JSON as native/loadgen.c, in one Python process with epoll. It is slow (tens of
thousands of requests per second at best), so the bench labels its numbers and warns that it
may be the bottleneck.

usage: python bench/pygen.py -p PORT [-a ADDR] [-c CONNS] [-d S] [-w S] [-r RATE] [-g S]
                             [-u PATH] [-H 'Name: value']...
"""
from __future__ import annotations

import json
import math
import os
import re
import select
import socket
import sys
import time

_CL = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


def hidx(v: int) -> int:
    if v < 128:
        return v
    shift = v.bit_length() - 7
    return (shift + 1) * 64 + ((v >> shift) - 64)


def hval(i: int) -> float:
    if i < 128:
        return float(i)
    shift = i // 64 - 1
    return float((i % 64 + 64) << shift) + ((1 << shift) - 1) / 2


def main(argv: list[str]) -> int:
    opts = {"a": "127.0.0.1", "c": "1", "d": "5", "w": "1", "r": "0", "g": "2", "u": "/", "t": "1",
            "s": "0"}
    headers = []
    it = iter(argv)
    for flag in it:
        val = next(it)
        if flag == "-H":
            headers.append(val)
        else:
            opts[flag.lstrip("-")] = val
    port, conns = int(opts["p"]), int(opts["c"])
    dur, warm, rate, drain = float(opts["d"]), float(opts["w"]), float(opts["r"]), float(opts["g"])
    if not any(h.lower().startswith("host:") for h in headers):
        headers.insert(0, "Host: localhost")
    req = (f"GET {opts['u']} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()

    ep = select.epoll()
    socks, state = [], {}
    for _ in range(conns):
        s = socket.create_connection((opts["a"], port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
        state[s.fileno()] = {"sock": s, "busy": False, "start": 0, "buf": b"", "q": []}
        ep.register(s.fileno(), select.EPOLLIN)

    hist: dict[int, int] = {}
    done = errors = non2xx = sent = timeouts = 0
    lat_sum = lag_sum = lag_max = lag_n = 0
    start = time.monotonic_ns() + 2_000_000
    ws = start + int(warm * 1e9)
    we = ws + int(dur * 1e9)
    drain_end = we + int(drain * 1e9)
    openloop = rate > 0
    interval = 1e9 / rate if openloop else 0
    k, next_due, scheduling = 0, start, openloop
    while time.monotonic_ns() < start:
        pass

    def send(st, t):
        nonlocal sent
        st["busy"], st["start"] = True, t
        sent += 1
        st["sock"].send(req)

    if not openloop:
        for st in state.values():
            send(st, time.monotonic_ns())
    order = list(state.values())
    while True:
        now = time.monotonic_ns()
        if openloop:
            while scheduling and next_due <= now:
                if next_due >= we:
                    scheduling = False
                    break
                st = order[k % conns]
                if not st["busy"] and not st["q"]:
                    lag = now - next_due
                    lag_sum += lag
                    lag_n += 1
                    lag_max = max(lag_max, lag)
                    send(st, next_due)
                else:
                    st["q"].append(next_due)
                k += 1
                next_due = start + int(k * interval)
            if not scheduling:
                if not any(st["busy"] or st["q"] for st in order):
                    break
                if now >= drain_end:
                    for st in order:
                        timeouts += (st["busy"] and st["start"] >= ws) + \
                            sum(t >= ws for t in st["q"])
                    break
                timeout = (drain_end - now) / 1e9
            else:
                timeout = (next_due - now) / 1e9
        else:
            if now >= we:
                break
            timeout = (we - now) / 1e9
        for fd, _ in ep.poll(max(timeout, 0)):
            st = state[fd]
            try:
                data = st["sock"].recv(65536)
            except BlockingIOError:
                continue
            if not data:
                print("pygen: connection closed by the target", file=sys.stderr)
                return 3
            buf = st["buf"] + data
            while st["busy"]:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                m = _CL.search(buf, 0, end + 2)
                total = end + 4 + (int(m.group(1)) if m else 0)
                if len(buf) < total:
                    break
                status = int(buf[9:12])
                buf = buf[total:]
                t = time.monotonic_ns()
                st["busy"] = False
                inwin = ws <= st["start"] < we if openloop else ws <= t < we
                if inwin:
                    if 200 <= status < 300:
                        lat = t - st["start"]
                        i = hidx(lat)
                        hist[i] = hist.get(i, 0) + 1
                        lat_sum += lat
                        done += 1
                    else:
                        non2xx += 1
                if openloop and st["q"]:
                    send(st, st["q"].pop(0))
                elif not openloop and t < we:
                    send(st, t)
            st["buf"] = buf
    cpu = os.times()
    pct = {}
    for name, p in (("p50", 50), ("p75", 75), ("p90", 90), ("p99", 99), ("p99.9", 99.9),
                    ("p99.99", 99.99)):
        want, cum, val = max(1, math.ceil(done * p / 100)), 0, 0.0
        for i in sorted(hist):
            cum += hist[i]
            if cum >= want:
                val = hval(i)
                break
        pct[name] = round(val / 1e3, 2)
    out = {
        "generator": "pygen", "mode": "open" if openloop else "closed", "rate": rate,
        "conns": conns, "threads": 1, "duration_s": dur, "warmup_s": warm, "requests": done,
        "sent": sent, "errors": errors, "non2xx": non2xx, "timeouts": timeouts, "dropped": 0,
        "reconnects": 0, "rps": done / dur, "cpu_s": cpu.user + cpu.system,
        "wall_s": (time.monotonic_ns() - start) / 1e9,
        "latency_us": {"mean": round(lat_sum / done / 1e3, 2) if done else 0.0, **pct,
                       "max": round(hval(max(hist)) / 1e3, 2) if hist else 0.0},
        "sched_lag_us": {"mean": lag_sum / lag_n / 1e3 if lag_n else 0.0, "max": lag_max / 1e3},
        "hist_us": [[round(hval(i) / 1e3, 3), hist[i]] for i in sorted(hist)],
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
