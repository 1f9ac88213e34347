"""loadBalancer.warmup (Envoy slow start) and localityLbSetting (Envoy priorities and locality
weights) in meshcore.upstream.balancer, compiled from Istio YAML."""
from __future__ import annotations

import collections
import random
import textwrap

import pytest

from meshcore.config.compile import compile_sources
from meshcore.errors import ConfigError
from meshcore.upstream.balancer import SlowStart, make_cluster_balancer, stamp_joined


class Book:
    def __init__(self, active=None):
        self.active = active or {}

    def rq_active(self, i):
        return self.active.get(i, 0)


def compile_text(text, **kw):
    return compile_sources({"m.yaml": textwrap.dedent(text).encode()}, resolver=lambda n, p: [], **kw)


def service(localities, dr_lb="", outlier=True):
    eps = "\n".join(f"  - {{address: 10.0.0.{i + 1}, locality: {loc}}}" for i, loc in enumerate(localities))
    od = "\n    outlierDetection: {consecutive5xxErrors: 1}" if outlier else ""
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: s}}
spec:
  hosts: [s.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: s}}
spec:
  host: s.example.com
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN{dr_lb}}}{od}
"""


CLUSTER = "outbound|80||s.example.com"


# ------------------------------------------------------------------------------------------------
# Locality


def test_default_failover_priorities_follow_istio():
    locs = ["us/a/1", "us/a/2", "us/b/1", "eu/a/1", ""]
    s = compile_text(service(locs), locality="us/a/1")
    loc = s.clusters[CLUSTER].locality_lb
    # same subzone 0, same zone 1, same region 2, other region 3, no locality 3 -> compacted
    assert loc.priority == (0, 1, 2, 3, 3)
    # without outlier detection Istio applies no failover (Envoy could never fail over)
    assert compile_text(service(locs, outlier=False), locality="us/a/1").clusters[CLUSTER].locality_lb is None
    # explicit failover: a region other than the `to` one drops below it
    s = compile_text(service(["us/a/1", "eu/a/1", "ap/a/1"],
                             ", localityLbSetting: {failover: [{from: us, to: ap}]}"), locality="us/a/1")
    assert s.clusters[CLUSTER].locality_lb.priority == (0, 2, 1)
    off = compile_text(service(locs, ", localityLbSetting: {enabled: false}"), locality="us/a/1")
    assert off.clusters[CLUSTER].locality_lb is None


def test_distribute_weights_localities():
    s = compile_text(service(["us/a/1", "us/a/2", "us/b/1", "eu/a/1"],
                             ', localityLbSetting: {distribute: [{from: "us/a/*", to: {"us/a/*": 80, "eu/*": 20}}]}',
                             outlier=False), locality="us/a/1")
    loc = s.clusters[CLUSTER].locality_lb
    # us/a/1 and us/a/2 share 80 (40 each), eu 20, us/b matches no `to`: left out
    assert loc.group_weight == (40, 40, 0, 20)
    assert loc.priority == (0, 0, -1, 0)
    b = make_cluster_balancer(s.clusters[CLUSTER], random.Random(1))
    picks = collections.Counter(b.pick(Book()) for _ in range(1000))
    assert picks == {0: 400, 1: 400, 3: 200}
    # a proxy no `from` matches: no locality weights at all
    other = compile_text(service(["us/a/1", "eu/a/1"], ', localityLbSetting: {distribute: [{from: "us/a/*", '
                                                       'to: {"us/a/*": 100}}]}', outlier=False),
                         locality="ap/x/1")
    assert other.clusters[CLUSTER].locality_lb is None


def test_priority_balancer_keeps_to_the_highest_priority_and_spills_over():
    s = compile_text(service(["us/a/1", "us/a/1", "us/a/2", "eu/a/1"]), locality="us/a/1")
    b = make_cluster_balancer(s.clusters[CLUSTER], random.Random(3))
    assert {b.pick(Book()) for _ in range(50)} == {0, 1}  # all healthy: priority 0 only
    # one of two P0 hosts ejected: P0 health 50 % * 1.4 = 70 % of the traffic, 30 % to P1
    picks = collections.Counter(b.pick_healthy(Book(), None, (1, 2, 3)) for _ in range(4000))
    assert set(picks) == {1, 2}
    assert 0.66 < picks[1] / 4000 < 0.74
    # P0 and P1 gone: everything to P2
    assert {b.pick_healthy(Book(), None, (3,)) for _ in range(50)} == {3}
    assert b.pick_healthy(Book(), None, ()) == -1


def test_locality_validation_parity():
    with pytest.raises(ConfigError) as ei:
        compile_text(service(["us/a/1"], ', localityLbSetting: {distribute: [{from: "us/*/x*", to: {"us/a": 50}}], '
                                          'failover: [{from: us, to: us}]}'))
    assert ei.value.problems == [
        "m.yaml: DestinationRule s: spec.trafficPolicy.loadBalancer.localityLbSetting: can not simultaneously "
        "specify 'distribute' and 'failover'"]
    with pytest.raises(ConfigError) as ei:
        compile_text(service(["us/a/1"], ', localityLbSetting: {distribute: [{from: "us/a", to: {"us/a": 50}}]}'))
    assert ei.value.problems == ["m.yaml: DestinationRule s: spec.trafficPolicy.loadBalancer.localityLbSetting"
                                 ".distribute[0].to: total locality weight 50 != 100"]
    with pytest.raises(ConfigError) as ei:
        compile_text(service(["us/a/1"], ', localityLbSetting: {failover: [{from: us/a, to: "eu*"}]}'))
    assert ei.value.problems == [
        "m.yaml: DestinationRule s: spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0]: locality lb "
        "failover only specify region",
        "m.yaml: DestinationRule s: spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0]: locality lb "
        "failover region should not contain '*' wildcard"]


# ------------------------------------------------------------------------------------------------
# Warmup (slow start)


def test_slow_start_factor_is_envoys():
    ss = SlowStart(window=10.0)
    assert ss.factor(0, 0) == pytest.approx(0.1)  # max(1 s, age) / window, at least 10 %
    assert ss.factor(0, 5000) == pytest.approx(0.5)
    assert ss.factor(0, 10000) == 1.0
    aggressive = SlowStart(window=10.0, aggression=2.0, min_weight_percent=5.0)
    assert aggressive.factor(0, 2500) == pytest.approx(0.25 ** 0.5)
    assert aggressive.factor(0, 0) == pytest.approx(0.1 ** 0.5)
    assert SlowStart(10.0, 1.0, 50.0).factor(0, 2000) == 0.5


def test_warmup_compiles_for_round_robin_and_least_request_only():
    s = compile_text(service(["", ""], ", warmup: {duration: 30s, minimumPercent: 20, aggression: 1.5}",
                             outlier=False))
    assert s.clusters[CLUSTER].slow_start == SlowStart(30.0, 1.5, 20.0)
    s = compile_text(service(["", ""], ", warmupDurationSecs: 15s", outlier=False))
    assert s.clusters[CLUSTER].slow_start == SlowStart(15.0)
    s = compile_text(service(["", ""], "", outlier=False).replace("simple: ROUND_ROBIN",
                                                                 "simple: RANDOM, warmup: {duration: 5s}"))
    assert s.clusters[CLUSTER].slow_start is None
    assert any("slow start applies to ROUND_ROBIN and LEAST_REQUEST only" in w for w in s.warnings)
    with pytest.raises(ConfigError) as ei:
        compile_text(service([""], ", warmup: {duration: 0.5ms, minimumPercent: 150, aggression: 0}"))
    assert ei.value.problems == [
        "m.yaml: DestinationRule s: spec.trafficPolicy.loadBalancer.warmup.duration: duration must be greater than 1ms",
        "m.yaml: DestinationRule s: spec.trafficPolicy.loadBalancer.warmup.minimumPercent: minimumPercent value "
        "should be less than or equal to 100",
        "m.yaml: DestinationRule s: spec.trafficPolicy.loadBalancer.warmup.aggression: aggression should be "
        "greater than 0"]


def test_a_host_added_by_a_reload_warms_up():
    base = service(["", ""], ", warmup: {duration: 10s}", outlier=False)
    first = compile_text(base)
    assert stamp_joined(None, first, 0) is first  # the first config: nobody is new
    grown = compile_text(base.replace("  - {address: 10.0.0.2, locality: }",
                                      "  - {address: 10.0.0.2, locality: }\n  - {address: 10.0.0.3, locality: }"))
    stamped = stamp_joined(first, grown, 100_000)
    assert stamped.clusters[CLUSTER].slow_start.joined == (("10.0.0.3:80", 100_000),)
    assert stamp_joined(stamped, grown, 105_000).clusters[CLUSTER].slow_start.joined == (("10.0.0.3:80", 100_000),)
    assert stamp_joined(stamped, grown, 111_000).clusters[CLUSTER].slow_start.joined == ()  # warm now
    now = [100_000]
    b = make_cluster_balancer(stamped.clusters[CLUSTER], random.Random(7), clock=lambda: now[0])

    def share(at):
        now[0] = at
        b.pick(Book())  # let it recompute its weights
        picks = collections.Counter(b.pick(Book()) for _ in range(2100))
        return picks[2] / 2100

    # weights 1, 1, factor: the new host gets f / (2 + f) of the picks
    assert share(100_000) == pytest.approx(0.1 / 2.1, abs=0.01)
    assert share(105_000) == pytest.approx(0.5 / 2.5, abs=0.01)
    assert share(110_000) == pytest.approx(1 / 3, abs=0.01)  # out of its window: plain round robin
