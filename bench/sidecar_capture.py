"""Added latency of the captured (iptables) path against the explicit path, in one run.

    python -m bench.sidecar_capture [--rate 1000] [--duration 5] [--rounds 3]

Two network namespaces on a bridge (the netns lab of tests/integration/netns.py): a client pod
with `meshcore iptables` and `meshcore run --sidecar` as uid 1337, and a server pod running the
bench's C backend on 8080. From the client pod the bench's C load generator (open loop, one
connection, fixed rate) measures three paths to the same backend, interleaved per round:

  direct    uid 1337 (not captured) to the server pod's address: the baseline
  explicit  the application to 127.0.0.1:15001 with `Host: svc` (loopback is never captured):
            meshcore's explicit-proxy path
  captured  the application to the Service VIP 10.96.0.50:80: redirected to 15001, original
            destination read, routed by the port's table (the sidecar path)

Reported per path: latency percentiles (µs) and the proxy's CPU per request (all its processes,
from /proc schedstat). Needs root, `ip netns` and iptables (as the netns tests). Not a test: it
asserts nothing, it prints what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "integration"))

from bench import native, procs  # noqa: E402
from netns import PYTHON, Lab, shared_tempdir, unavailable  # noqa: E402

PROXY_UID = 1337
APP_UID = 1000
VIP = "10.96.0.50"

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc}}
spec:
  hosts: [svc.default.svc.cluster.local]
  addresses: [{vip}]
  ports: [{{number: 80, name: http, targetPort: 8080}}]
  resolution: STATIC
  endpoints: [{{address: {server}}}]
"""


def _shared_copy(path: str, into: str) -> str:
    """The binaries live under bench/_build; copy them where any uid may run them."""
    out = os.path.join(into, os.path.basename(path))
    shutil.copy(path, out)
    os.chmod(out, 0o755)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s per path (default 1000)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per path per round (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    why = unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    work = shared_tempdir("mcbench-")
    loadgen = _shared_copy(native.build("loadgen"), work)
    backend = _shared_copy(native.build("backend"), work)
    results = {"direct": [], "explicit": [], "captured": []}
    cpu_per_request = {"explicit": [], "captured": []}
    try:
        with Lab() as lab:
            client = lab.add_pod("client")
            server = lab.add_pod("server")
            lab.spawn(server, [backend, "-a", "0.0.0.0", "8080"], ready=None)
            with open(f"{work}/mesh.yaml", "w") as f:
                f.write(CONFIG.format(vip=VIP, server=server.ip))
            lab.run(client, [PYTHON, "-m", "meshcore", "iptables"])
            proxy = lab.spawn(client, [PYTHON, "-m", "meshcore", "run", "--sidecar", "--config",
                                       work, "--workers", "1", "--prometheus", "off",
                                       "--no-access-log"], user=PROXY_UID, ready=None)
            lab.wait_http(client, "http://127.0.0.1:15021/healthz/ready", process=proxy)
            proxy_pids = [p for p in procs.tree(proxy.pid)]
            paths = {
                "direct": (PROXY_UID, [loadgen, "-a", server.ip, "-p", "8080"]),
                "explicit": (APP_UID, [loadgen, "-a", "127.0.0.1", "-p", "15001", "-H", "Host: svc"]),
                "captured": (APP_UID, [loadgen, "-a", VIP, "-p", "80", "-H", "Host: svc"]),
            }
            common = ["-c", "1", "-t", "1", "-r", str(args.rate), "-d", str(args.duration),
                      "-w", "1", "-s", "200"]
            for _ in range(args.rounds):
                for name, (uid, cmd) in paths.items():
                    before = procs.CpuSample(proxy_pids)
                    done = lab.run(client, cmd + common, user=uid, timeout=args.duration + 60)
                    after = procs.CpuSample(proxy_pids)
                    out = json.loads(done.stdout)
                    results[name].append(out)
                    if name != "direct" and out["requests"]:
                        # includes the 1 s warm-up's requests: rate * (duration + warmup)
                        sent = out["sent"] or out["requests"]
                        cpu_per_request[name].append(after.since(before)[0] / sent * 1e6)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for name, runs in results.items():
        lat = {k: statistics.median(r["latency_us"][k] for r in runs) for k in ("p50", "p90", "p99")}
        summary[name] = dict(lat, requests=sum(r["requests"] for r in runs),
                             errors=sum(r["errors"] + r["non2xx"] + r["timeouts"] for r in runs))
        if name in cpu_per_request and cpu_per_request[name]:
            summary[name]["proxy_cpu_us_per_request"] = statistics.median(cpu_per_request[name])
    print(f"{'path':10} {'p50 µs':>9} {'p90 µs':>9} {'p99 µs':>9} {'+p50 vs direct':>15} "
          f"{'proxy CPU µs/req':>17} {'errors':>7}")
    for name, s in summary.items():
        added = s["p50"] - summary["direct"]["p50"]
        cpu = s.get("proxy_cpu_us_per_request")
        print(f"{name:10} {s['p50']:9.1f} {s['p90']:9.1f} {s['p99']:9.1f} {added:15.1f} "
              f"{(f'{cpu:.1f}' if cpu is not None else '-'):>17} {s['errors']:7d}")
    extra = summary["captured"]["p50"] - summary["explicit"]["p50"]
    print(f"captured minus explicit, p50: {extra:+.1f} µs (median of {args.rounds} rounds, "
          f"{args.rate:g} req/s, 1 connection)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": results, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
