"""`python -m meshcore top [--admin HOST:PORT]`: a live terminal view of a running proxy.

It reads only the admin JSON endpoints (`/server_info`, `/stats?format=json`,
`/clusters?format=json`), so it works against a remote sidecar's admin port, and against Envoy's
own admin too (where meshcore's `ejection_time_left_ms` is absent, ejected hosts show no time).

Per cluster: healthy/total endpoints, active and total requests, requests per second (from the
difference between two refreshes), p50/p99 of upstream_rq_time, 5xx, retries, overflows
(cx + pending + active-request overflows) and pending requests. Per endpoint: health and
ejection time left, active and total requests, rps, and errors (rq_error).

`snapshot()` fetches, `render()` turns two snapshots into one frame of text (pure, testable
without a terminal), `main()` loops. Errors (the admin unreachable) show in the frame and the
loop goes on.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from typing import NamedTuple

__all__ = ["Snapshot", "snapshot", "parse", "render", "main"]

_OVERFLOWS = ("upstream_cx_overflow", "upstream_rq_pending_overflow",
              "upstream_rq_active_overflow")


class Host(NamedTuple):
    key: str
    ejected: bool
    ejection_left_ms: int | None
    active: int
    total: int
    errors: int


class Cluster(NamedTuple):
    name: str
    counters: dict
    p50: float | None
    p99: float | None
    hosts: tuple


class Snapshot(NamedTuple):
    at: float                  # time.monotonic() when fetched
    admin: str
    state: str
    uptime: str
    workers: int | None
    clusters: dict             # name -> Cluster
    error: str | None = None


def _get(admin: str, path: str, timeout: float):
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def _int(stat: dict) -> int:
    try:
        return int(stat.get("value", 0))
    except (TypeError, ValueError):
        return 0


def parse(admin: str, at: float, server_info: dict, stats: dict, clusters: dict) -> Snapshot:
    """A Snapshot from the three admin JSON documents (Envoy's shapes)."""
    counters: dict[str, dict] = {}
    quantiles: dict[str, tuple] = {}
    for item in stats.get("stats", ()):
        if "histograms" in item:
            hist = item["histograms"]
            supported = hist.get("supported_quantiles", [])
            for q in hist.get("computed_quantiles", ()):
                name = q.get("name", "")
                if name.startswith("cluster.") and name.endswith(".upstream_rq_time"):
                    vals = [v.get("cumulative") for v in q.get("values", ())]
                    by_q = dict(zip(supported, vals))
                    quantiles[name[8:-17]] = (by_q.get(50), by_q.get(99))
            continue
        name = item.get("name", "")
        if name.startswith("cluster."):
            for suffix in ("upstream_rq_total", "upstream_rq_5xx", "upstream_rq_retry",
                           "upstream_rq_active", "upstream_rq_pending_active",
                           "membership_total", "membership_healthy") + _OVERFLOWS:
                if name.endswith("." + suffix):
                    counters.setdefault(name[8:-len(suffix) - 1], {})[suffix] = item["value"]
                    break
    out = {}
    for cs in clusters.get("cluster_statuses", ()):
        name = cs.get("name", "")
        hosts = []
        for hs in cs.get("host_statuses", ()):
            sa = hs.get("address", {}).get("socket_address", {})
            addr = sa.get("address", "?")
            key = f"[{addr}]:{sa.get('port_value')}" if ":" in addr else \
                f"{addr}:{sa.get('port_value')}"
            st = {s.get("name"): _int(s) for s in hs.get("stats", ())}
            ejected = bool(hs.get("health_status", {}).get("failed_outlier_check"))
            left = hs.get("ejection_time_left_ms")
            hosts.append(Host(key, ejected, left, st.get("rq_active", 0), st.get("rq_total", 0),
                              st.get("rq_error", 0)))
        p50, p99 = quantiles.get(name, (None, None))
        out[name] = Cluster(name, counters.get(name, {}), p50, p99, tuple(hosts))
    workers = server_info.get("command_line_options", {}).get("concurrency")
    return Snapshot(at, admin, server_info.get("state", "?"),
                    server_info.get("uptime_current_epoch", "?"), workers, out)


def snapshot(admin: str, timeout: float = 2.0) -> Snapshot:
    """Fetch the three documents; on failure a Snapshot carrying the error."""
    now = time.monotonic()
    try:
        return parse(admin, now, _get(admin, "/server_info", timeout),
                     _get(admin, "/stats?format=json", timeout),
                     _get(admin, "/clusters?format=json", timeout))
    except (OSError, ValueError) as exc:
        return Snapshot(now, admin, "UNREACHABLE", "?", None, {}, error=str(exc))


def _rate(cur: int, prev: int | None, dt: float) -> str:
    if prev is None or dt <= 0:
        return "-"
    return f"{max(0, cur - prev) / dt:.1f}"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


_COLUMNS = ("{:<44} {:<16} {:>6} {:>8} {:>7} {:>7} {:>7} {:>6} {:>6} {:>7} {:>5}")
HEADER = _COLUMNS.format("CLUSTER / ENDPOINT", "HEALTH", "ACTIVE", "TOTAL", "RPS", "P50ms",
                         "P99ms", "5XX", "RETRY", "OVERFL", "PEND")


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def render(cur: Snapshot, prev: Snapshot | None = None, pattern: str | None = None,
           clock: str | None = None) -> str:
    """One frame. `prev` (the previous refresh) gives the rates; `pattern` filters clusters by
    name (regex search)."""
    head = (f"meshcore top - {cur.admin} - {cur.state} - uptime {cur.uptime}"
            + (f" - {cur.workers} workers" if cur.workers else "")
            + (f" - {clock}" if clock else ""))
    lines = [head]
    if cur.error:
        lines.append(f"admin not reachable: {cur.error}")
        return "\n".join(lines) + "\n"
    lines.append(HEADER)
    dt = cur.at - prev.at if prev is not None else 0.0
    rx = re.compile(pattern) if pattern else None
    for name in sorted(cur.clusters):
        if rx is not None and not rx.search(name):
            continue
        c = cur.clusters[name]
        pc = prev.clusters.get(name) if prev is not None else None
        k = c.counters
        healthy = sum(1 for h in c.hosts if not h.ejected)
        health = f"{healthy}/{len(c.hosts)} healthy" if c.hosts else "no endpoints"
        lines.append(_COLUMNS.format(
            _clip(name, 44), health, k.get("upstream_rq_active", 0),
            k.get("upstream_rq_total", 0),
            _rate(k.get("upstream_rq_total", 0),
                  pc.counters.get("upstream_rq_total") if pc else None, dt),
            _ms(c.p50), _ms(c.p99), k.get("upstream_rq_5xx", 0), k.get("upstream_rq_retry", 0),
            sum(k.get(s, 0) for s in _OVERFLOWS), k.get("upstream_rq_pending_active", 0)))
        prev_hosts = {h.key: h for h in pc.hosts} if pc else {}
        for h in c.hosts:
            if h.ejected:
                state = "ejected" if h.ejection_left_ms is None else \
                    f"ejected {h.ejection_left_ms / 1000:.1f}s"
            else:
                state = "healthy"
            ph = prev_hosts.get(h.key)
            lines.append(_COLUMNS.format(
                "  " + h.key, state, h.active, h.total,
                _rate(h.total, ph.total if ph else None, dt), "", "", h.errors, "", "", ""))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshcore top", description=__doc__.split("\n")[0])
    p.add_argument("--admin", default="127.0.0.1:15000", metavar="HOST:PORT",
                   help="admin address of the proxy to watch (default 127.0.0.1:15000)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="refresh period (default 1)")
    p.add_argument("--iterations", type=int, default=0, metavar="N",
                   help="stop after N frames (default 0: until Ctrl-C)")
    p.add_argument("--filter", default=None, metavar="REGEX",
                   help="show only clusters whose name matches (default: all)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.filter:
        try:
            re.compile(args.filter)
        except re.error as exc:
            print(f"meshcore top: --filter: {exc}", file=sys.stderr)
            return 2
    tty = sys.stdout.isatty()
    prev = None
    n = 0
    try:
        while True:
            cur = snapshot(args.admin)
            frame = render(cur, prev, args.filter, time.strftime("%H:%M:%S"))
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + frame)
            else:
                sys.stdout.write(frame + "\n")
            sys.stdout.flush()
            prev = cur if cur.error is None else prev
            n += 1
            if args.iterations and n >= args.iterations:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
