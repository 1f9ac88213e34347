"""The seed article's scenarios: which pods each needs, its Istio YAML, and the article's commands.

Pure data and string building; nothing here starts a process or opens a socket.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_POD_PORT_BASE = 18080  # the ports in examples/seed/*/services.yaml are this plus an offset


@dataclass(frozen=True)
class PodSpec:
    name: str
    app: str           # the `app` label, as `kubectl logs -l app=retry` selects pods
    version: str       # the `version` label, shown in every log line's prefix
    offset: int        # port = pod port base + offset (18080 + offset in examples/seed)
    text: str = "{}"   # what an app pod answers; "Version N" adds ": server id <uuid>"
    sniffer: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


PODS = (
    PodSpec("myweb-v1-a", "myweb", "v1", 1, "Version 1"),
    PodSpec("myweb-v1-b", "myweb", "v1", 2, "Version 1"),
    PodSpec("myweb-v1-c", "myweb", "v1", 3, "Version 1"),
    PodSpec("myweb-v2-a", "myweb", "v2", 4, "Version 2"),
    PodSpec("myweb-v2-b", "myweb", "v2", 5, "Version 2"),
    PodSpec("myweb-v2-c", "myweb", "v2", 6, "Version 2"),
    PodSpec("retry-backend-a", "retry", "v1", 11),
    PodSpec("retry-backend-b", "retry", "v1", 12),
    PodSpec("retry-backend-c", "retry", "v1", 13),
    PodSpec("sniffer", "sniffer", "v1", 19, "", sniffer=True),
)
POD_BY_NAME = {p.name: p for p in PODS}
RETRY_PODS = tuple(p.name for p in PODS if p.app == "retry")
MYWEB_PODS = tuple(p.name for p in PODS if p.app == "myweb")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str                 # one line, for the scenario list
    folder: str                # under examples/
    pods: tuple[str, ...]
    parts: tuple[str, ...]     # the article's scenarios it shows (`all`: every one)
    # the Host each part's requests carry: the article's service names; `all` puts each part in
    # its own namespace (`retry-service.circuit-breaker`), since several parts configure one name
    hosts: dict = field(default_factory=dict)


PARTS = ("retry", "circuit-breaker", "lb-random", "lb-round-robin", "lb-header-hash", "mirror")
SCENARIOS = {s.name: s for s in (
    Scenario("retry", "retries on other pods: 15 attempts, 1 s per try (busy and crash modes)",
             "seed/1-retry", RETRY_PODS, ("retry",), {"retry": "retry-service"}),
    Scenario("circuit-breaker", "outlier detection ejects failing pods; then 503 from the proxy",
             "seed/2-circuit-breaker", RETRY_PODS, ("circuit-breaker",),
             {"circuit-breaker": "retry-service"}),
    Scenario("lb-random", "subset v1, RANDOM: answers from every v1 pod, never v2",
             "seed/3-lb-random", MYWEB_PODS, ("lb-random",), {"lb-random": "myweb-service"}),
    Scenario("lb-round-robin", "subset v1, ROUND_ROBIN: each worker walks the v1 pods in turn",
             "seed/3-lb-round-robin", MYWEB_PODS, ("lb-round-robin",), {"lb-round-robin": "myweb-service"}),
    Scenario("lb-header-hash", "consistent hash on the User header: one user, one pod",
             "seed/3-lb-header-hash", MYWEB_PODS, ("lb-header-hash",), {"lb-header-hash": "myweb-service"}),
    Scenario("mirror", "a copy of every request goes to the sniffer pod",
             "seed/4-mirror", RETRY_PODS + ("sniffer",), ("mirror",),
             {"mirror": "retry-service", "sniffer": "sniffer"}),
    Scenario("all", "every scenario at once, one namespace each (Host: retry-service.retry, ...)",
             "seed-all", tuple(p.name for p in PODS), PARTS,
             {**{part: f"{'myweb' if part.startswith('lb-') else 'retry'}-service.{part}"
                 for part in PARTS}, "sniffer": "sniffer.mirror"}),
)}


def examples_root() -> str | None:
    """examples/ of the source checkout this package runs from, else of the current directory."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in (here, os.getcwd()):
        path = os.path.join(root, "examples")
        if os.path.isdir(os.path.join(path, "seed")):
            return path
    return None


def pod_ports(names, base: int) -> dict[str, int]:
    """Each pod's port for a port base (0: any free port, chosen when the pods bind)."""
    return {n: (base + POD_BY_NAME[n].offset if base else 0) for n in names}


def listing() -> str:
    width = max(len(n) for n in SCENARIOS)
    lines = ["The seed article's scenarios (python -m meshcore demo SCENARIO [--walkthrough]):"]
    lines += [f"  {s.name:<{width}}  {s.title}" for s in SCENARIOS.values()]
    lines += ["",
              "demo SCENARIO starts the scenario's pods (one process each, restarted after a crash),",
              "the proxy with the scenario's folder in examples/, prints the article's commands and",
              "streams the pods' logs. --walkthrough runs the article's steps itself and compares."]
    return "\n".join(lines)


def commands(scenario: Scenario, listen: tuple[str, int], admin: tuple[str, int]) -> list[str]:
    """The article's commands for each part, ready to paste (curl to the proxy stands in for
    `kubectl exec $clientPod -c client -- curl ...`: the proxy is the client pod's sidecar)."""
    url = f"http://{listen[0]}:{listen[1]}"
    stats = f"http://{admin[0]}:{admin[1]}/stats"
    out = []
    for part in scenario.parts:
        host = scenario.hosts[part]
        h = f"-H 'Host: {host}'"
        if part == "retry":
            out += [f"# retry ({host}): a crashing pod is retried on the others; always {{}}",
                    f"curl -s -m 30 '{url}/?failRate=50&mode=crash' {h}; echo",
                    "# 90 % busy: the pod logs show several 503s, then one 200",
                    f"curl -s -m 30 '{url}/?failRate=90&mode=busy' {h}; echo",
                    f"curl -s {stats} | grep '{host}.upstream_rq_retry'"]
        elif part == "circuit-breaker":
            out += [f"# circuit breaker ({host}): run it 3 times; then 503 'no healthy upstream'",
                    "# straight from the proxy, nothing in the pod logs; after 1 minute the pods",
                    "# get traffic again",
                    f"curl -s -m 30 '{url}/?failRate=90&mode=busy' {h}; echo",
                    f"curl -s {stats} | grep '{host}.outlier_detection.ejections_active'"]
        elif part in ("lb-random", "lb-round-robin"):
            out += [f"# {part.replace('lb-', '')} ({host}): answers from the v1 pods only",
                    f"while true; do curl -s {url}/ {h}; sleep 0.2; done"]
        elif part == "lb-header-hash":
            out += [f"# header hash ({host}): without the header any v1 pod; with it always the same",
                    f"while true; do curl -s {url}/ {h}; sleep 0.2; done",
                    f"while true; do curl -s -H 'User: tomas' {url}/ {h}; sleep 0.2; done"]
        elif part == "mirror":
            out += [f"# mirror ({host}): every request is copied to {scenario.hosts['sniffer']}; "
                    "watch the sniffer's log",
                    f"for x in $(seq 0 20); do curl -s '{url}/?failRate=1&mode=busy' {h}; echo; done"]
    return out
