"""`meshcore demo` without processes: the scenario table against examples/seed, the config
adjustments, the pods' log lines, the log pump, and the walkthrough's verdicts on scripted replies."""
from __future__ import annotations

import os
import re
import socket

import pytest
import yaml

from meshcore.config.compile import compile_sources
from meshcore.config.load import read_sources
from meshcore.demo import render
from meshcore.demo.kubelet import LogLine, LogPump, format_ports_taken, probe_port
from meshcore.demo.pod import access_log_line, sniffer_log_line
from meshcore.demo.scenarios import (DEFAULT_POD_PORT_BASE, POD_BY_NAME, PODS, SCENARIOS, commands,
                                     examples_root, listing, pod_ports)
from meshcore.demo.sidecar import Reply, parse_stats
from meshcore.demo.walkthrough import PART_STEPS, Context

EXAMPLES = examples_root()


def test_examples_are_found_from_the_checkout():
    assert EXAMPLES and os.path.isdir(os.path.join(EXAMPLES, "seed", "1-retry"))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_endpoint_of_a_scenario_is_one_of_its_pods(name):
    """The pod table and the ServiceEntries must agree, port by port and label by label."""
    scenario = SCENARIOS[name]
    by_port = {DEFAULT_POD_PORT_BASE + p.offset: p for p in PODS}
    seen = set()
    for _, docs in render.read_folder(os.path.join(EXAMPLES, scenario.folder)):
        for doc in docs:
            if doc["kind"] != "ServiceEntry":
                continue
            for ep in doc["spec"]["endpoints"]:
                pod = by_port[ep["ports"]["http"]]
                assert ep["labels"] == {"app": pod.app, "version": pod.version}, (name, ep)
                seen.add(pod.name)
    assert seen >= set(scenario.pods) - ({"sniffer"} if "mirror" not in scenario.parts else set())


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_compiles_and_serves_its_hosts(name):
    scenario = SCENARIOS[name]
    snapshot = compile_sources(read_sources([os.path.join(EXAMPLES, scenario.folder)]))
    for host in scenario.hosts.values():
        assert host in snapshot.vhosts, (name, host)


def test_the_single_scenario_folders_still_carry_the_articles_rules():
    with open(os.path.join(EXAMPLES, "seed", "1-retry", "retry-vs.yaml")) as f:
        vs = yaml.safe_load(f)
    assert vs["spec"]["http"][0]["retries"] == {"attempts": 15, "perTryTimeout": "1s",
                                                "retryOn": "gateway-error,reset,5xx"}


def test_all_puts_each_part_in_its_own_namespace():
    hosts = SCENARIOS["all"].hosts
    assert hosts["circuit-breaker"] == "retry-service.circuit-breaker"
    assert hosts["lb-header-hash"] == "myweb-service.lb-header-hash"
    assert hosts["sniffer"] == "sniffer.mirror"
    assert set(SCENARIOS["all"].parts) == {p for s in SCENARIOS.values() if s.name != "all" for p in s.parts}


def test_pod_ports_follow_the_base():
    assert pod_ports(["retry-backend-a", "sniffer"], 18080) == {"retry-backend-a": 18091, "sniffer": 18099}
    assert pod_ports(["retry-backend-a"], 20000) == {"retry-backend-a": 20011}
    assert pod_ports(["retry-backend-a"], 0) == {"retry-backend-a": 0}


def test_listing_and_commands_name_every_scenario_and_the_chosen_ports():
    text = listing()
    for name in SCENARIOS:
        assert f"  {name} " in text
    cmds = "\n".join(commands(SCENARIOS["all"], ("127.0.0.1", 25001), ("127.0.0.1", 25000)))
    assert "http://127.0.0.1:25001/?failRate=50&mode=crash' -H 'Host: retry-service.retry'" in cmds
    assert "-H 'User: tomas' http://127.0.0.1:25001/ -H 'Host: myweb-service.lb-header-hash'" in cmds
    assert "http://127.0.0.1:25000/stats" in cmds and "15001" not in cmds


def _folder(name):
    return render.read_folder(os.path.join(EXAMPLES, SCENARIOS[name].folder))


def test_remap_ports_moves_only_the_mapped_endpoint_ports(tmp_path):
    files = _folder("circuit-breaker")
    moved = render.remap_ports(files, {18091: 41001, 18092: 41002, 18093: 18093})
    assert moved == 2
    render.write_folder(files, str(tmp_path))
    snapshot = compile_sources(read_sources([str(tmp_path)]))
    ports = sorted(e.port for e in snapshot.clusters["outbound|80||retry-service"].endpoints)
    assert ports == [18093, 41001, 41002]


def test_shorten_ejections_caps_the_articles_minute_and_says_so(tmp_path):
    files = _folder("circuit-breaker")
    changes = render.shorten_ejections(files)
    assert changes == ["retry-service: baseEjectionTime 1m -> 5s", "retry-service: interval 10s -> 1s"]
    render.write_folder(files, str(tmp_path))
    outlier = compile_sources(read_sources([str(tmp_path)])).clusters["outbound|80||retry-service"].outlier
    assert outlier.interval_ms == 1000


def test_shorten_ejections_leaves_shorter_times_and_other_kinds():
    files = [("x.yaml", [{"kind": "DestinationRule", "spec": {"host": "h", "trafficPolicy": {
        "outlierDetection": {"baseEjectionTime": "2s", "interval": "500ms"}}}},
        {"kind": "VirtualService", "spec": {}}])]
    assert render.shorten_ejections(files) == []
    assert render.shorten_ejections(_folder("retry")) == []


def test_pod_log_lines_look_like_the_articles():
    line = access_log_line("127.0.0.1", "GET", "/?failRate=90&mode=busy", "HTTP/1.1", 503, 5, "",
                           "curl/7.58.0", 1579079124.0)
    assert re.fullmatch(r'127\.0\.0\.1 - - \[\d\d/Jan/2020:\d\d:\d\d:24\] "GET /\?failRate=90&mode=busy '
                        r'HTTP/1\.1" 503 5 "" "curl/7\.58\.0"', line), line
    cap = sniffer_log_line("127.0.0.1", 37916, "sniffer", 18099, 843, "GET", "/?failRate=1", "HTTP/1.1",
                           "retry-service-shadow", 1579079124.25)
    assert re.fullmatch(r"\d\d:\d\d:24\.250000 IP 127\.0\.0\.1\.37916 > sniffer\.18099: length 843: "
                        r"HTTP: GET /\?failRate=1 HTTP/1\.1 \(Host: retry-service-shadow\)", cap), cap


def test_a_taken_port_is_reported_in_one_line():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        reason = probe_port("127.0.0.1", port)
    assert reason == "address already in use"
    text = format_ports_taken([(f"127.0.0.1:{port}", "proxy", reason), ("127.0.0.1:1", "pod sniffer", reason)])
    assert text == f"cannot listen on 127.0.0.1:{port} (proxy), 127.0.0.1:1 (pod sniffer): address already in use"
    assert "\n" not in text


def test_log_pump_sync_sees_every_line_written_before_it():
    got = []
    pump = LogPump(got.append)
    try:
        r, w = os.pipe()
        done = pump.add(os.fdopen(r, "rb"), "pod-a", 1)
        os.write(w, b"one\ntwo\nthr")
        assert pump.sync()
        assert [ln.text for ln in pump.since(0)] == ["one", "two"]
        os.write(w, b"ee\n")
        os.close(w)
        assert done.wait(5)
        assert [(ln.source, ln.generation, ln.text) for ln in got] == \
            [("pod-a", 1, "one"), ("pod-a", 1, "two"), ("pod-a", 1, "three")]
        mark = pump.mark()
        pump.event("pod-a", 1, "restarted")
        assert [ln.event for ln in pump.since(mark, "pod-a")] == [True]
    finally:
        pump.close()


def test_parse_stats_reads_envoy_lines():
    assert parse_stats("cluster.outbound|80||a.upstream_rq_retry: 7\nserver.live: 1\nbad line\n") == \
        {"cluster.outbound|80||a.upstream_rq_retry": 7, "server.live": 1}


# === the walkthrough's verdicts, on scripted replies =========================================

class FakePump:
    def __init__(self):
        self.lines = []

    def mark(self):
        return len(self.lines)

    def since(self, mark, source=None):
        return [ln for ln in self.lines[mark:] if source is None or ln.source == source]

    def sync(self, timeout=5.0):
        return True

    def log(self, pod, text):
        self.lines.append(LogLine(len(self.lines) + 1, pod, 1, text))


class FakePods:
    def __init__(self, names):
        self.pods = {n: type("P", (), {"spec": POD_BY_NAME[n]})() for n in names}
        self.restart_count = dict.fromkeys(names, 0)

    def restarts(self, name):
        return self.restart_count[name]

    def table(self, names=None):
        return ["NAME"]

    def wait_exited(self, name, generation, timeout):
        self.restart_count[name] += 1
        return True


class FakeProxy:
    """Answers with `script(path, host, headers, call_number)` -> (status, body, pod, [(pod, status)])."""

    def __init__(self, pump, script, workers=2):
        self.pump, self.script, self.calls, self.workers = pump, script, 0, workers
        self.counters = {}

    def get(self, path, host, headers=None, conn=None):
        self.calls += 1
        status, body, pod, tries = self.script(path, host, headers or {}, self.calls)
        for try_pod, try_status in tries:
            self.pump.log(try_pod, f'127.0.0.1 - - [x] "GET {path} HTTP/1.1" {try_status} 2 "" "c"')
        key = f"cluster.outbound|80||{host}.upstream_rq_retry"
        self.counters[key] = self.counters.get(key, 0) + max(0, len(tries) - 1)
        return Reply(status, body.encode(), {"x-pod": pod}, 0.001)

    def stats(self):
        return dict(self.counters)

    def connection(self):
        return type("C", (), {"close": lambda self: None})()

    def workers_running(self):
        return self.workers


def _run(part, script, pods, hosts=None, workers=2):
    pump = FakePump()
    ctx = Context(FakeProxy(pump, script, workers), FakePods(pods), pump,
                  hosts or SCENARIOS[part if part != "mirror" else "mirror"].hosts)
    return list(PART_STEPS[part](ctx))


V1 = ["myweb-v1-a", "myweb-v1-b", "myweb-v1-c"]


def test_lb_random_matches_when_every_v1_pod_answers_and_differs_on_a_v2_answer():
    def good(path, host, headers, n):
        pod = V1[n % 3]
        return 200, f"Version 1: server id {pod}", pod, [(pod, 200)]

    assert all(s.ok for s in _run("lb-random", good, V1 + ["myweb-v2-a"]))

    def leaks_v2(path, host, headers, n):
        return good(path, host, headers, n) if n != 7 else (200, "Version 2: server id x", "myweb-v2-a", [])

    (step,) = _run("lb-random", leaks_v2, V1 + ["myweb-v2-a"])
    assert not step.ok and "not from a v1 pod" in step.why


def test_round_robin_needs_a_strict_turn_on_one_connection():
    def rotating(path, host, headers, n):
        pod = V1[n % 3]
        return 200, f"Version 1: server id {pod}", pod, [(pod, 200)]

    assert [s.ok for s in _run("lb-round-robin", rotating, V1)] == [True, True]

    def sticky_twice(path, host, headers, n):
        pod = V1[(n // 2) % 3]
        return 200, f"Version 1: server id {pod}", pod, [(pod, 200)]

    first, _ = _run("lb-round-robin", sticky_twice, V1)
    assert not first.ok and "strict rotation" in first.why


def test_header_hash_differs_when_one_user_reaches_two_pods():
    def flapping(path, host, headers, n):
        pod = V1[n % 2]
        return 200, f"Version 1: server id {pod}", pod, [(pod, 200)]

    no_header, with_header = _run("lb-header-hash", flapping, V1)
    assert no_header.ok and not with_header.ok


RETRY = ["retry-backend-a", "retry-backend-b", "retry-backend-c"]


def test_retry_matches_when_503s_are_retried_until_a_200():
    def retried(path, host, headers, n):
        if "crash" in path:
            return 200, "{}", "retry-backend-b", [("retry-backend-b", 200)]
        return 200, "{}", "retry-backend-c", [("retry-backend-a", 503), ("retry-backend-c", 200)]

    pump_steps = _run("retry", retried, RETRY)
    assert [s.ok for s in pump_steps[:2]] == [True, True]
    assert not pump_steps[2].ok and "no try crashed" in pump_steps[2].why  # nothing crashed


def test_retry_differs_when_the_proxy_gives_up_before_16_tries():
    def gives_up(path, host, headers, n):
        return 503, "busy", "retry-backend-a", [("retry-backend-a", 503)] * 3

    step = _run("retry", gives_up, RETRY)[0]
    assert not step.ok and "after tries ['503', '503', '503']" in step.why


def test_mirror_differs_when_a_copy_is_missing(monkeypatch):
    monkeypatch.setattr("meshcore.demo.walkthrough.MIRROR_WAIT_S", 0.1)
    def mirrored(path, host, headers, n):
        tries = [("retry-backend-a", 200)] + ([("sniffer", 503)] if n != 5 else [])
        return 200, "{}", "retry-backend-a", tries

    (step,) = _run("mirror", mirrored, RETRY + ["sniffer"])
    assert not step.ok and "20 copies for 21 requests" in step.why


def test_circuit_breaker_differs_when_the_proxy_never_stops_calling_the_pods():
    def never_ejects(path, host, headers, n):
        return 200, "{}", "retry-backend-a", [("retry-backend-b", 503), ("retry-backend-a", 200)]

    opened, fast, recovered = _run("circuit-breaker", never_ejects, RETRY)
    assert not opened.ok and "no call was answered by the proxy alone" in opened.why
    assert not fast.ok and "no call made while all pods were ejected" in fast.why
    assert recovered.ok  # nothing was ejected, so traffic reaches the pods at once
