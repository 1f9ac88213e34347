"""The article's steps, performed against the running demo and compared with what the article reports.

Each step sends the article's requests to the proxy (its listen port; `/stats` and `/server_info` on
its admin port), reads the pods' logs as `kubectl logs` would, prints what the article reports next
to what happened here, and says whether they match. Only outcomes the scenario guarantees are
checked; where chance decides (a 90 % failing pod behind 16 tries still fails all of them 18.5 %
of the time) every outcome the article's config allows is accepted, and the step says which one
happened.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field

ACCESS_STATUS = re.compile(r'" (\d{3}|-) ')
MIRROR_WAIT_S = 10.0  # copies are fire-and-forget: they may reach the sniffer after the answers


@dataclass
class Step:
    title: str        # the article's command, in words
    article: str      # what the article reports
    here: str = ""    # what happened here
    ok: bool = False
    why: str = ""     # what differs, when not ok
    details: list = field(default_factory=list)  # extra lines (pod logs, tables)


class Context:
    """What a walkthrough needs: the proxy over HTTP, the pods' logs, the hosts of each part."""

    def __init__(self, sidecar, pods, pump, hosts: dict, ejection_note: str = ""):
        self.proxy = sidecar
        self.pods = pods
        self.pump = pump
        self.hosts = hosts
        self.ejection_note = ejection_note

    def cluster(self, part: str, subset: str = "") -> str:
        """The Envoy cluster name prefix of a part's service in /stats."""
        return f"cluster.outbound|80|{subset}|{self.hosts[part]}."

    def stat(self, part: str, name: str, subset: str = "") -> int:
        return self.proxy.stats().get(self.cluster(part, subset) + name, 0)

    def pod_lines(self, mark: int, names=None) -> list:
        """Request lines the pods logged since `mark` (every pod line that is not a start line)."""
        if not self.pump.sync(timeout=15):
            raise OSError("the pods' logs could not be read within 15 s")
        names = set(names or self.pods.pods)
        return [ln for ln in self.pump.since(mark) if ln.source in names and not ln.event
                and (ACCESS_STATUS.search(ln.text) or ln.text.startswith("crash: GET")
                     or " HTTP: " in ln.text)]


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _url(host: str, path: str) -> str:
    """As the article's curl writes it: retry-service?failRate=50&mode=crash."""
    return host + (path[1:] if path.startswith("/?") else path)


def _status(line) -> str:
    if line.text.startswith("crash: GET"):
        return "crash"
    m = ACCESS_STATUS.search(line.text)
    return m.group(1) if m else "?"


def _counts(lines) -> str:
    c = Counter(_status(ln) for ln in lines)
    return " + ".join(f"{n} × {s}" for s, n in sorted(c.items(), reverse=True)) or "nothing"


def _prefixed(ctx, lines, limit=20) -> list[str]:
    out = [f"  [{ctx.pods.pods[ln.source].spec.label}] {ln.text}" for ln in lines[:limit]]
    if len(lines) > limit:
        out.append(f"... {len(lines) - limit} more")
    return out


# === retry ===================================================================================

def retry_steps(ctx: Context):
    host = ctx.hosts["retry"]
    pods = _retry_pods(ctx)
    yield _retry_busy(ctx, host, pods, fail=50, calls=10)
    yield _retry_busy(ctx, host, pods, fail=90, calls=1)
    yield _retry_crash(ctx, host, pods)


def _retry_pods(ctx):
    return [n for n in ctx.pods.pods if n.startswith("retry-backend")]


def _retry_busy(ctx, host, pods, fail: int, calls: int) -> Step:
    path = f"/?failRate={fail}&mode=busy"
    step = Step(f"curl '{_url(host, path)}'" + (f", {calls} times" if calls > 1 else ""),
                "always 200 {}: the sidecar retries the 503s on other pods" if fail == 50 else
                "the pod logs show several 503s, then one 200, for one client request")
    retries0 = ctx.stat("retry", "upstream_rq_retry")
    exhausted0 = ctx.stat("retry", "upstream_rq_retry_limit_exceeded")
    calls_seen = []  # (reply, the pod log lines of its tries)
    for _ in range(calls):
        mark = ctx.pump.mark()
        reply = ctx.proxy.get(path, host)
        calls_seen.append((reply, ctx.pod_lines(mark, pods)))
    lines = [ln for _, tries in calls_seen for ln in tries]
    retries = ctx.stat("retry", "upstream_rq_retry") - retries0
    exhausted = ctx.stat("retry", "upstream_rq_retry_limit_exceeded") - exhausted0
    answers = Counter(f"{r.status} {r.text}" for r, _ in calls_seen)
    step.here = (f"{', '.join(f'{n} × {a}' for a, n in answers.items())}; the pods logged "
                 f"{len(lines)} tries ({_counts(lines)}); /stats upstream_rq_retry +{retries}")
    if fail == 90:
        step.details = ["pod logs (kubectl logs -l app=retry -f):"] + _prefixed(ctx, lines)
    # Every 503 a pod answers is retried while attempts remain (1 + 15 tries): a call ends with
    # the pods' one 200 after 503s, or with the 16th 503. /stats counts each try after the first.
    failed = 0
    for reply, tries in calls_seen:
        statuses = [_status(ln) for ln in tries]
        if reply.status == 200 and reply.text == "{}" and statuses[-1:] == ["200"] \
                and set(statuses[:-1]) <= {"503"} and len(tries) <= 16:
            continue
        if reply.status == 503 and statuses == ["503"] * 16:
            failed += 1
            continue
        step.why = f"a call answered {reply.status} {reply.text!r} after tries {statuses}"
        return step
    if retries != len(lines) - calls:
        step.why = f"/stats counted {retries} retries for {len(lines)} tries of {calls} call(s)"
    elif failed and fail == 50:
        step.why = "a call failed all 16 tries at 50 % (chance 1 in 65,536)"
    else:
        step.ok = True
        if failed:
            step.here += (f"; all 16 tries failed (as 0.9^16 = 18.5 % of calls do): the last 503 "
                          f"went to the client, upstream_rq_retry_limit_exceeded +{exhausted}")
    return step


def _retry_crash(ctx, host, pods) -> Step:
    path = "/?failRate=50&mode=crash"
    step = Step(f"curl '{_url(host, path)}' until a pod has crashed (3 to 12 calls)",
                "always 200; sometimes slower: a pod hung and died, the sidecar tried the others; "
                "the pods show restarts")
    restarts0 = {n: ctx.pods.restarts(n) for n in pods}
    mark = ctx.pump.mark()
    replies = []
    crashed = []
    while len(replies) < 12 and (len(replies) < 3 or not crashed):
        replies.append(ctx.proxy.get(path, host))
        crashed = [ln for ln in ctx.pod_lines(mark, pods) if _status(ln) == "crash"]
    # Every process that logged a crash line dies 2 s after it: wait for its replacement.
    dying = {(ln.source, ln.generation) for ln in crashed}
    restarted = all(ctx.pods.wait_exited(name, gen, timeout=15) for name, gen in dying)
    restarts = {n: ctx.pods.restarts(n) - restarts0[n] for n in pods}
    answers = Counter(f"{r.status} {r.text}" for r in replies)
    step.here = (f"{', '.join(f'{n} × {a}' for a, n in answers.items())} in "
                 f"{', '.join(f'{r.elapsed:.1f}' for r in replies)} s; "
                 f"{_n(len(crashed), 'try', 'tries')} hung (the pod hangs 2 s, then its process "
                 "exits); restarts: "
                 + ", ".join(f"{n} +{k}" for n, k in restarts.items()))
    step.details = ["pods (kubectl get pods -l app=retry):"] + [f"  {row}" for row in ctx.pods.table(pods)]
    if any(r.status != 200 or r.text != "{}" for r in replies):
        step.why = "a call did not answer 200 {}"
    elif not crashed:
        step.why = "no try crashed in 12 calls at 50 % (chance 1 in 4,096 or less)"
    elif not restarted or sum(restarts.values()) < len(dying):
        step.why = "a crashed pod was not restarted"
    else:
        step.ok = True
    return step


# === circuit breaker ==========================================================================

def circuit_breaker_steps(ctx: Context):
    host = ctx.hosts["circuit-breaker"]
    pods = _retry_pods(ctx)
    path = "/?failRate=90&mode=busy"
    # 1. calls until one is answered by the proxy alone
    step = Step(f"curl '{_url(host, path)}' until the proxy answers alone (the article: 2 or 3 times)",
                "the first calls still end in 200 after retries; by then each pod has failed twice "
                "in a row and is ejected")
    outcomes = []
    opened = None
    enforced0 = ctx.stat("circuit-breaker", "outlier_detection.ejections_enforced_total")
    for _ in range(20):
        mark = ctx.pump.mark()
        r = ctx.proxy.get(path, host)
        tries = ctx.pod_lines(mark, pods)
        outcomes.append(f"{r.status} after {_n(len(tries), 'try', 'tries')}")
        if r.status == 503 and not tries:
            opened = r
            break
    stats = ctx.proxy.stats()
    ejected = stats.get(ctx.cluster("circuit-breaker") + "outlier_detection.ejections_active", 0)
    enforced = stats.get(ctx.cluster("circuit-breaker") + "outlier_detection.ejections_enforced_total",
                         0) - enforced0
    step.here = (f"calls: {'; '.join(outcomes)}; /stats ejections_enforced_total +{enforced}, "
                 f"ejections_active {ejected}")
    if len(outcomes) > 1 and outcomes[-2].startswith("503"):
        step.here += ("; the call that saw the last pod ejected ended in the proxy's 503, as "
                      "nothing healthy was left to retry on")
    if opened is None:
        step.why = "no call was answered by the proxy alone in 20 calls"
    elif opened.text != "no healthy upstream":
        step.why = f"the proxy's 503 said {opened.text!r}, not 'no healthy upstream'"
    elif enforced < len(pods):
        step.why = f"{enforced} ejections; maxEjectionPercent 100 ejects all {len(pods)} pods"
    else:
        step.ok = True
    yield step

    # 2. while every pod is out: fast 503s, nothing reaches the pods
    step = Step(f"curl '{_url(host, path)}' again, 3 times",
                "503 straight from the sidecar; the pods' logs show nothing new")
    seen = []
    for _ in range(3):
        before = ctx.stat("circuit-breaker", "outlier_detection.ejections_active")
        mark = ctx.pump.mark()
        r = ctx.proxy.get(path, host)
        tries = ctx.pod_lines(mark, pods)
        after = ctx.stat("circuit-breaker", "outlier_detection.ejections_active")
        if before != len(pods) or after != len(pods):
            break  # the ejection ended meanwhile: this call proves nothing
        seen.append((r, tries))
    step.here = "; ".join(f"{r.status} '{r.text}' in {r.elapsed * 1000:.0f} ms, {len(t)} pod log lines"
                          for r, t in seen) or "the ejection ended before a call could be made"
    if not seen:
        step.why = "no call made while all pods were ejected"
    elif any(r.status != 503 or t or r.text != "no healthy upstream" for r, t in seen):
        step.why = "a call reached a pod, or was not the proxy's 503 'no healthy upstream'"
    else:
        step.ok = True
    yield step

    # 3. after the ejection time, traffic reaches the pods again
    step = Step(f"wait for the ejection to end ({ctx.ejection_note or 'as configured'}), then curl '{_url(host, path)}'",
                "after the ejection time (1 minute) traffic reaches the pods again")
    started = time.monotonic()
    while time.monotonic() - started < 30:
        if ctx.stat("circuit-breaker", "outlier_detection.ejections_active") == 0:
            break
        time.sleep(0.1)
    waited = time.monotonic() - started
    back = ctx.stat("circuit-breaker", "outlier_detection.ejections_active") == 0
    mark = ctx.pump.mark()
    r = ctx.proxy.get(path, host)
    tries = ctx.pod_lines(mark, pods)
    step.here = (f"ejections_active 0 after {waited:.1f} s more; then {r.status} after "
                 f"{_n(len(tries), 'try', 'tries')} ({_counts(tries)})")
    if not back:
        step.why = "the pods were still ejected after 30 s"
    elif not tries:
        step.why = "the call did not reach any pod"
    else:
        step.ok = True
    yield step


# === load balancing ==========================================================================

def _v1(ctx) -> list[str]:
    return [n for n in ctx.pods.pods if n.startswith("myweb-v1")]


def _article_loop(ctx, host, n, headers=None, conn=None) -> list:
    replies = []
    for _ in range(n):
        replies.append(ctx.proxy.get("/", host, headers, conn=conn))
    return replies


def _answers(replies, limit=6) -> list[str]:
    out = [f"{r.text}   ({r.pod})" for r in replies[:limit]]
    return out + ([f"... {len(replies) - limit} more"] if len(replies) > limit else [])


def _only_v1(replies, v1) -> str:
    bad = [r for r in replies if r.status != 200 or r.pod not in v1 or not r.text.startswith("Version 1: server id ")]
    return f"{len(bad)} answers not from a v1 pod (e.g. {bad[0].status} {bad[0].pod or bad[0].text})" if bad else ""


def lb_random_steps(ctx: Context):
    host, v1 = ctx.hosts["lb-random"], _v1(ctx)
    step = Step(f"while true; do curl -s {host}; sleep 0.2; done  (30 calls)",
                "answers from different pods of subset v1")
    replies = _article_loop(ctx, host, 30)
    seen = Counter(r.pod for r in replies)
    step.here = "answers per pod: " + ", ".join(f"{p} {n}" for p, n in sorted(seen.items()))
    step.details = _answers(replies)
    step.why = _only_v1(replies, v1) or ("" if len(seen) == len(v1) else
                                         f"{len(seen)} of the {len(v1)} v1 pods answered 30 random picks")
    step.ok = not step.why
    yield step


def lb_round_robin_steps(ctx: Context):
    host, v1 = ctx.hosts["lb-round-robin"], _v1(ctx)
    workers = ctx.proxy.workers_running()
    step = Step(f"curl {host} 6 times on one keep-alive connection",
                "ROUND_ROBIN: the v1 pods in turn")
    conn = ctx.proxy.connection()
    try:
        replies = _article_loop(ctx, host, 6, conn=conn)
    finally:
        conn.close()
    order = [r.pod for r in replies]
    step.here = "pods in order: " + ", ".join(order)
    step.why = _only_v1(replies, v1) or (
        "" if len(set(order[:3])) == 3 and all(order[i] == order[i - 3] for i in range(3, 6))
        else "not a strict rotation over the 3 v1 pods")
    step.ok = not step.why
    yield step

    step = Step(f"while true; do curl -s {host}; sleep 0.2; done  (12 calls, a new connection each)",
                "answers from the v1 pods in turn")
    replies = _article_loop(ctx, host, 12)
    seen = Counter(r.pod for r in replies)
    spread = max(seen.values()) - min(seen.values()) if len(seen) == len(v1) else None
    step.here = ("pods in order: " + ", ".join(r.pod.replace("myweb-", "") for r in replies)
                 + f"; per pod: {', '.join(f'{p} {n}' for p, n in sorted(seen.items()))}")
    if workers > 1:
        step.here += (f". With {workers} workers each new connection lands on one of them and each "
                      "worker keeps its own round-robin cursor (as each Envoy worker thread has its "
                      "own load balancer), so the turns interleave; per pod the counts differ by at "
                      f"most {workers}")
    step.why = _only_v1(replies, v1) or ("" if spread is not None and spread <= workers else
                                         f"per-pod counts {dict(seen)} are not within {workers}")
    step.ok = not step.why
    yield step


def lb_header_hash_steps(ctx: Context):
    host, v1 = ctx.hosts["lb-header-hash"], _v1(ctx)
    step = Step(f"while true; do curl -s {host}; sleep 0.2; done  (15 calls, no User header)",
                "answers still come from different v1 pods")
    replies = _article_loop(ctx, host, 15)
    seen = Counter(r.pod for r in replies)
    step.here = "answers per pod: " + ", ".join(f"{p} {n}" for p, n in sorted(seen.items()))
    step.why = _only_v1(replies, v1) or ("" if len(seen) >= 2 else "every answer came from one pod")
    step.ok = not step.why
    yield step

    step = Step(f"while true; do curl -s -H 'User: tomas' {host}; sleep 0.2; done  (10 calls)",
                "every answer comes from the same pod")
    replies = _article_loop(ctx, host, 10, {"User": "tomas"})
    seen = Counter(r.pod for r in replies)
    step.here = "answers per pod: " + ", ".join(f"{p} {n}" for p, n in sorted(seen.items()))
    step.details = _answers(replies, 3)
    step.why = _only_v1(replies, v1) or ("" if len(seen) == 1 else "the answers came from several pods")
    step.ok = not step.why
    yield step


# === mirror ==================================================================================

def mirror_steps(ctx: Context):
    host, sniffer_host = ctx.hosts["mirror"], ctx.hosts["sniffer"]
    pods = _retry_pods(ctx)
    path = "/?failRate=1&mode=busy"
    step = Step(f"for x in {{0..20}}; do curl -s '{_url(host, path)}'; done  (21 calls)",
                "the client gets the usual answers; the sniffer receives a copy of every request")
    mark = ctx.pump.mark()
    replies = [ctx.proxy.get(path, host) for _ in range(21)]
    deadline = time.monotonic() + MIRROR_WAIT_S
    copies = []
    while time.monotonic() < deadline:
        copies = ctx.pod_lines(mark, ["sniffer"])
        if len(copies) >= 21:
            break
        time.sleep(0.05)
    copies = ctx.pod_lines(mark, ["sniffer"])
    served = ctx.pod_lines(mark, pods)
    shadow = f"(Host: {host}-shadow)"
    answers = Counter(f"{r.status} {r.text}" for r in replies)
    step.here = (f"client: {', '.join(f'{n} × {a}' for a, n in answers.items())}; the retry pods "
                 f"logged {len(served)} requests; the sniffer captured {len(copies)} copies")
    if any(r.status == 503 for r in replies):
        step.here += ("; a 503 'busy' is the pod's own answer at failRate=1 (Istio 1.24+ no longer "
                      "retries a 503 by default)")
    step.details = ["sniffer log (kubectl logs $snifferPod):"] + _prefixed(ctx, copies, 3)
    usual = {(200, "{}"), (503, "busy")}
    if any((r.status, r.text) not in usual or r.pod not in pods for r in replies):
        step.why = "a client answer was not a retry pod's 200 {} or 503 busy"
    elif len(served) != 21:
        step.why = f"the retry pods logged {len(served)} requests for 21 calls"
    elif len(copies) != 21:
        step.why = f"{len(copies)} copies for 21 requests"
    elif not all(f"GET {path} HTTP/1.1 {shadow}" in ln.text for ln in copies):
        step.why = f"a copy was not 'GET {path}' with Host {host}-shadow"
    else:
        step.ok = True
    yield step


PART_STEPS = {
    "retry": retry_steps,
    "circuit-breaker": circuit_breaker_steps,
    "lb-random": lb_random_steps,
    "lb-round-robin": lb_round_robin_steps,
    "lb-header-hash": lb_header_hash_steps,
    "mirror": mirror_steps,
}
