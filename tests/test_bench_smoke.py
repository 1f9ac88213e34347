"""Smoke test of the benchmark suite (bench/): it runs and writes its outputs.

Never asserts a timing: only that the run completes, that results.json / results.md exist and
hold numbers. Uses the built-in generator and backend, so it needs neither wrk, nginx nor Envoy
(gcc builds them; without gcc the pure-Python fallbacks run).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--targets", "direct,meshcore",
         "--backend", "builtin", "--no-wrk", "--no-plots", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return out, proc


def test_quick_run_writes_json_with_numbers(quick_run):
    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    assert data["backend"]["kind"].startswith("builtin")
    assert not data["failed"], data["failed"]
    summary = data["analysis"]["summary"]
    for target in ("direct", "meshcore"):
        scen = summary[target]
        closed = next(k for k in scen if k.startswith("closed-") and k != "closed-1c")
        assert _number(scen[closed]["rps"]) and scen[closed]["rps"] > 0
        fixed = scen["open-1c-1000"]
        assert _number(fixed["rps"]) and fixed["rps"] > 0
        for p in ("p50", "p90", "p99", "p99.9"):
            assert _number(fixed["latency_us"][p]) and fixed["latency_us"][p] > 0
    assert _number(summary["meshcore"][closed]["cpu_per_1k_s"])
    assert _number(data["memory"]["meshcore"]["peak_rss_per_worker_mb"])
    ratio = data["analysis"]["ratios"]["meshcore"][closed]["rps_vs_direct"]
    assert _number(ratio) and ratio > 0
    for run in data["runs"]:
        assert "error" not in run, run
        assert run["generator"] in ("cgen", "pygen")
        assert run["command"]
    assert data["machine"]["cores"] and data["versions"]["python"]
    assert data["targets"]["meshcore"]["command"].count("--no-access-log") == 1


def test_quick_run_writes_markdown_and_text(quick_run):
    out, proc = quick_run
    md = (out / "results.md").read_text()
    assert "| target |" in md and "| meshcore |" in md
    rows = [line for line in md.splitlines() if line.startswith("| direct |")]
    assert rows and all(re.search(r"\d", r) for r in rows)
    assert "```sh" in md and "-m meshcore run --config" in md
    assert "Maximum throughput" in proc.stdout and (out / "results.txt").exists()
    assert "meshcore" in proc.stderr  # progress lines name the target being measured


def test_meshcore_cli_forwards_bench_verb():
    proc = subprocess.run([sys.executable, "-m", "meshcore", "bench", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--targets", "--duration", "--rounds", "--workers", "--out", "--quick",
                 "--matrix", "--no-plots"):
        assert flag in proc.stdout


def test_generated_configs_are_what_the_issue_specifies():
    from bench import cli, targets

    se = yaml.safe_load(targets.service_entry_yaml([8081]))
    assert se["apiVersion"] == "networking.istio.io/v1beta1" and se["kind"] == "ServiceEntry"
    assert se["spec"]["hosts"] == ["bench-service"]
    assert se["spec"]["ports"] == [{"number": 80, "name": "http", "protocol": "HTTP"}]
    assert se["spec"]["resolution"] == "STATIC"
    assert se["spec"]["endpoints"] == [{"address": "127.0.0.1", "ports": {"http": 8081}}]

    # Envoy's bootstrap is generated from the same Istio YAML (meshcore.config.envoy_bootstrap)
    boot = yaml.safe_load(targets.envoy_bootstrap(10000, 10001, [8081]))
    cluster = boot["static_resources"]["clusters"][0]
    assert cluster["name"] == "outbound|80||bench-service" and cluster["type"] == "STATIC"
    assert all(v == 2**32 - 1 for v in cluster["circuit_breakers"]["thresholds"][0].values())
    eps = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in eps] == [8081]
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    route = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    # no VirtualService: Istio's default route, no timeout and its default retry policy
    assert route["timeout"] == "0s" and route["retry_policy"]["num_retries"] == 2
    assert "access_log" not in hcm["typed_config"]
    vs = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: b}\n" \
         "spec: {hosts: [bench-service], http: [{route: [{destination: {host: bench-service}}], " \
         "timeout: 2s, retries: {attempts: 0}}]}\n"
    boot = yaml.safe_load(targets.envoy_bootstrap(10000, 10001, [8081, 8082], vs, "/tmp/a.log"))
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "2s" and "retry_policy" not in route
    assert hcm["access_log"][0]["typed_config"]["path"] == "/tmp/a.log"
    assert len(boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2

    variants = cli.load_matrix(None)
    assert {"baseline", "access-log", "endpoints-3", "endpoints-30"} <= set(variants)
    extra = cli.variant_yaml("x", {"dr": {"trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}})
    docs = list(yaml.safe_load_all(targets.service_entry_yaml([1, 2, 3], extra)))
    assert [d["kind"] for d in docs] == ["ServiceEntry", "DestinationRule"]
    assert docs[1]["spec"]["host"] == "bench-service"
    assert len(docs[0]["spec"]["endpoints"]) == 3


def test_ratios_are_per_round_medians():
    from bench import report

    def run(rnd, target, rps, p50):
        return {"round": rnd, "target": target, "scenario": "open-1c-1000", "mode": "open",
                "conns": 1, "rps": rps, "latency_us": {"p50": p50, "p90": p50, "p99": p50,
                                                       "p99.9": p50}}
    runs = [run(0, "direct", 1000, 50), run(0, "envoy", 1000, 150), run(0, "meshcore", 1000, 100),
            run(1, "direct", 1000, 60), run(1, "envoy", 1000, 260), run(1, "meshcore", 1000, 80)]
    scen = [{"key": "open-1c-1000", "mode": "open", "conns": 1, "rate": 1000, "frac": None}]
    r = report.ratios(runs, scen, "envoy")["meshcore"]["open-1c-1000"]
    assert r["added_p50_us"] == pytest.approx((50 + 20) / 2)
    assert r["added_p50_vs_ref"] == pytest.approx((0.5 + 0.1) / 2)
    assert r["p50_vs_direct"] == pytest.approx((2.0 + 80 / 60) / 2)
