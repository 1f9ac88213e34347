"""Istio metrics in shared memory: keys, buckets, the single-writer table, overflow, restart
adoption, the sum over workers, and the Prometheus exposition (checked by prometheus_client's
own parser)."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshcore.metrics import istio as I
from meshcore.metrics.envoy import Baseline, collect_stats, render_json, render_text, select
from meshcore.metrics.labels import (Destination, DestinationRegistry, UNKNOWN_DESTINATION,
                                     destination_for_cluster, destination_for_endpoint,
                                     source_identity)
from meshcore.metrics.prometheus import render, render_istio
from meshcore.metrics.recorder import host_attempt, host_stats
from meshcore.config.policy import ClusterPolicy, Endpoint
from meshcore.policy.classify import Kind
from meshcore.shm.atomics import CellsPy
from meshcore.shm.layout import Layout
from meshcore.stats_render import StatsCluster


def cells_for(layout):
    return CellsPy(bytearray(layout.size))


def test_key_round_trip_and_code_range():
    for dest, code, flags in ((0, 0, 0), (1, 200, 0), ((1 << 22) - 1, 999, (1 << 32) - 1),
                              (7, 503, I.flags_mask("URX,UF"))):
        assert I.unpack_key(I.pack_key(dest, code, flags)) == (dest, code, flags)
    assert I.unpack_key(I.pack_key(3, 1000, 0)) == (3, 0, 0)  # not an HTTP status: 0
    assert I.pack_key((1 << 22) - 1, 999, (1 << 32) - 1) != I.OVERFLOW_KEY


def test_flags_mask_and_text():
    assert I.flags_mask("-") == I.flags_mask("") == I.flags_mask(None) == 0
    assert I.flags_text(0) == "-"
    for text in ("URX,UF", "URX,UT", "URX,UC", "URX,UH", "UO,UC", "UH", "NR", "UO", "FI", "DC"):
        assert I.flags_text(I.flags_mask(text)) == text
    assert I.flags_mask("BOGUS") == 0  # never a new label value


def test_bucket_index_is_le():
    assert I.bucket_index(0) == 0          # <= 0.5
    assert I.bucket_index(1) == 1          # <= 1
    assert I.bucket_index(2) == 2          # <= 5
    assert I.bucket_index(3600000) == I.NB - 1
    assert I.bucket_index(3600001) == I.NB  # +Inf only


def test_record_and_collect_sum_over_workers():
    lay = Layout(1, 1, 2, istio_rows=8)
    cells = cells_for(lay)
    w0, w1 = I.IstioWriter(cells, lay, 0), I.IstioWriter(cells, lay, 1)
    w0.record(1, 200, 0, 3, 100, 2000)
    w0.record(1, 200, 0, 7, 100, 0)
    w1.record(1, 200, 0, 7000, 10, 5)
    w1.record(2, 503, I.flags_mask("URX"), 0, 0, 0)
    series, overflow, _, _ = I.collect(cells, lay)
    assert overflow == 0
    ok = series[I.pack_key(1, 200, 0)]
    assert ok.requests == 3
    assert ok.duration_sum == 3 + 7 + 7000
    assert ok.duration[I.bucket_index(3)] == 1 and ok.duration[I.bucket_index(7)] == 1
    assert ok.duration[I.bucket_index(7000)] == 1
    assert ok.request_bytes_sum == 210 and ok.response_bytes_sum == 2005
    assert ok.response_bytes[I.bucket_index(0)] == 1  # an empty body is in the first bucket
    bad = series[I.pack_key(2, 503, I.flags_mask("URX"))]
    assert bad.requests == 1 and bad.duration[0] == 1


def test_full_table_overflows_into_one_counted_row():
    lay = Layout(1, 1, 1, istio_rows=3)  # 2 keyed rows + the overflow row
    cells = cells_for(lay)
    w = I.IstioWriter(cells, lay, 0)
    for code in (200, 201, 202, 203, 200):
        w.record(1, code, 0, 1, 1, 1)
    series, overflow, _, _ = I.collect(cells, lay)
    assert overflow == 2
    assert series[I.pack_key(1, 200, 0)].requests == 2  # known keys keep their rows
    assert series[I.pack_key(1, 201, 0)].requests == 1
    assert series[I.OVERFLOW_KEY].requests == 2
    assert sum(s.requests for s in series.values()) == 5


def test_restarted_worker_adopts_its_rows():
    lay = Layout(1, 1, 1, istio_rows=8)
    cells = cells_for(lay)
    I.IstioWriter(cells, lay, 0).record(1, 200, 0, 1, 1, 1)
    again = I.IstioWriter(cells, lay, 0)  # a new process attaching the same block
    again.record(1, 200, 0, 1, 1, 1)
    again.record(1, 404, I.flags_mask("NR"), 1, 1, 1)
    series, _, _, _ = I.collect(cells, lay)
    assert series[I.pack_key(1, 200, 0)].requests == 2
    assert len(series) == 2


def test_downstream_connection_counters():
    lay = Layout(1, 1, 2)
    cells = cells_for(lay)
    w = I.IstioWriter(cells, lay, 1)
    w.downstream_open()
    w.downstream_open()
    w.downstream_close()
    w.downstream_close()
    w.downstream_close()  # unmatched: never below zero
    w.downstream_open()
    _, _, total, active = I.collect(cells, lay)
    assert (total, active) == (3, 1)


def test_quantile_interpolates_like_promql():
    s = I.Series()
    s.requests = 4
    s.duration[I.bucket_index(7)] = 4  # all in (5, 10]
    assert s.quantile(0.5) == pytest.approx(7.5)
    assert I.Series().quantile(0.5) is None


def test_source_identity_from_flags_and_pod_environment():
    env = {"POD_NAME": "reviews-v2-5b8f4d7c9d-x2k4l", "POD_NAMESPACE": "shop",
           "ISTIO_METAJSON_LABELS": '{"app": "reviews", "version": "v2"}'}
    src = source_identity(environ=env)
    assert (src.workload, src.namespace, src.app, src.version) == ("reviews-v2", "shop",
                                                                   "reviews", "v2")
    assert (src.canonical_service, src.canonical_revision) == ("reviews", "v2")
    src = source_identity("client", "default", "web", "v1", environ=env)
    assert (src.workload, src.namespace, src.app, src.version) == ("client", "default", "web",
                                                                   "v1")
    bare = source_identity(environ={})
    assert bare.workload == bare.namespace == bare.app == "unknown"
    assert source_identity(environ={"ISTIO_METAJSON_LABELS": "{not json"}).app == "unknown"


def _policy(host, labels=()):
    ep = Endpoint("10.0.0.1", 80, 1, tuple(sorted(labels)), "10.0.0.1:80")
    return ClusterPolicy(f"outbound|80||{host}", host, 80, "", (ep,)), ep


def test_destination_labels_from_service_and_endpoint():
    policy, ep = _policy("reviews.shop.svc.cluster.local",
                         {"app": "reviews", "version": "v2",
                          "service.istio.io/workload-name": "reviews-v2"}.items())
    d = destination_for_endpoint(policy, ep)
    assert d == Destination("reviews.shop.svc.cluster.local", "reviews", "shop", "reviews-v2",
                            "shop", "reviews", "v2", "reviews", "v2")
    policy, ep = _policy("myweb-service", {"app": "myweb"}.items())
    d = destination_for_endpoint(policy, ep)
    assert (d.service, d.service_name, d.service_namespace) == ("myweb-service", "myweb-service",
                                                                "unknown")
    assert (d.workload, d.app, d.version, d.canonical_revision) == ("unknown", "myweb",
                                                                    "unknown", "latest")
    assert destination_for_cluster(policy).workload == "unknown"


def test_registry_is_append_only_and_bounded():
    reg = DestinationRegistry(capacity=3)
    a, b, c = (Destination(service=s) for s in "abc")
    assert reg.intern(a) == 1 and reg.intern(b) == 2 and reg.intern(a) == 1
    assert reg.intern(c) == 0 and reg.overflowed == 1  # full: the unknown destination
    assert reg.get(2) == b and reg.get(99) == UNKNOWN_DESTINATION


def test_host_attempt_counts_like_envoy_hosts():
    lay = Layout(2, 1, 2)
    cells = cells_for(lay)
    off0 = lay.host_stats_off(0, 1)
    off1 = lay.host_stats_off(1, 1)
    host_attempt(cells, off0, Kind.RESPONSE, 200, False)
    host_attempt(cells, off0, Kind.RESPONSE, 503, True)
    host_attempt(cells, off1, Kind.CONNECT_FAILURE, 503, False)
    host_attempt(cells, off1, Kind.PER_TRY_TIMEOUT, 504, True)
    host_attempt(cells, off1, Kind.RESET_BEFORE_RESPONSE, 503, True)
    host_attempt(cells, off1, Kind.OVERFLOW, 503, False)
    assert host_stats(cells, lay, 1) == {"cx_total": 2, "cx_connect_fail": 1, "rq_total": 4,
                                         "rq_success": 1, "rq_error": 2, "rq_timeout": 1}
    assert host_stats(cells, lay, 0) == dict.fromkeys(host_stats(cells, lay, 0), 0)


def _exposition(cells, lay, registry, source, baseline=None):
    series, _, _, _ = I.collect(cells, lay)
    stats = collect_stats(cells, lay, [StatsCluster("outbound|80||a", 0, (0,))], 0,
                          listen=("127.0.0.1", 15001))
    return render(series, registry, source, stats, baseline).decode()


def test_exposition_parses_and_histograms_are_cumulative():
    lay = Layout(1, 1, 2, istio_rows=8)
    cells = cells_for(lay)
    reg = DestinationRegistry()
    dest = reg.intern(Destination('we"ird\\svc\nname', "n", "ns"))
    I.IstioWriter(cells, lay, 0).record(dest, 200, 0, 3, 10, 20)
    I.IstioWriter(cells, lay, 1).record(dest, 200, 0, 700, 10, 20)
    I.IstioWriter(cells, lay, 1).record(0, 404, I.flags_mask("NR"), 0, 10, 0)
    text = _exposition(cells, lay, reg, source_identity("c", "default", "web", "v1"))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # prometheus_client strips the _total suffix from counter family names
    req = families["istio_requests"]
    assert req.type == "counter"
    by_code = {}
    for sample in req.samples:
        by_code[sample.labels["response_code"]] = sample.value
        assert sample.labels["reporter"] == "source"
        assert sample.labels["source_workload"] == "c"
    assert by_code == {"200": 2, "404": 1}
    weird = [s for s in req.samples if s.labels["response_code"] == "200"][0]
    assert weird.labels["destination_service"] == 'we"ird\\svc\nname'
    nr = [s for s in req.samples if s.labels["response_code"] == "404"][0]
    assert nr.labels["response_flags"] == "NR" and nr.labels["destination_service"] == "unknown"
    dur = families["istio_request_duration_milliseconds"]
    assert dur.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in dur.samples
               if s.name.endswith("_bucket") and s.labels["response_code"] == "200"]
    values = [v for _, v in buckets]
    assert values == sorted(values) and buckets[-1] == ("+Inf", 2.0)
    assert dict(buckets)["5"] == 1 and dict(buckets)["1000"] == 2
    assert "istio_request_bytes" in families and "istio_response_bytes" in families
    rq = families["envoy_cluster_upstream_rq"]
    assert rq.type == "counter" and rq.samples[0].labels == {"cluster_name": "outbound|80||a"}
    xx = families["envoy_http_downstream_rq_xx"]
    got = {s.labels["envoy_response_code_class"]: s.value for s in xx.samples}
    assert got == {"1": 0, "2": 2, "3": 0, "4": 1, "5": 0}


def test_reset_baselines_counters_not_gauges():
    lay = Layout(1, 1, 1)
    cells = cells_for(lay)
    cl = [StatsCluster("c", 0, (0,))]
    base = Baseline()
    cells.incr64(lay.stat_off(0, 0, "upstream_rq_total"), 5)
    stats = collect_stats(cells, lay, cl, 0)
    base.reset(stats)
    cells.incr64(lay.stat_off(0, 0, "upstream_rq_total"), 2)
    after = {s.name: s.value for s in base.apply(collect_stats(cells, lay, cl, 0))}
    assert after["cluster.c.upstream_rq_total"] == 2
    assert after["cluster.c.membership_total"] == 1  # a gauge: untouched


def test_select_text_and_json():
    lay = Layout(1, 1, 1)
    cells = cells_for(lay)
    cells.incr64(lay.stat_off(0, 0, "upstream_rq_retry"), 3)
    stats = collect_stats(cells, lay, [StatsCluster("c", 0, ())], 0)
    picked = select(stats, r"upstream_rq_retry$")
    assert render_text(picked) == "cluster.c.upstream_rq_retry: 3\n"
    assert render_json(picked) == {"stats": [{"name": "cluster.c.upstream_rq_retry",
                                              "value": 3}]}
    used = select(stats, r"^cluster\.", used_only=True)
    assert [s.name for s in used] == ["cluster.c.upstream_rq_retry"]
    with pytest.raises(Exception):
        select(stats, "(((")


def test_istio_baseline_subtracts_per_row():
    lay = Layout(1, 1, 1, istio_rows=4)
    cells = cells_for(lay)
    w = I.IstioWriter(cells, lay, 0)
    for _ in range(3):
        w.record(0, 200, 0, 1, 1, 1)
    series, _, _, _ = I.collect(cells, lay)
    base = {k: s.requests for k, s in series.items()}
    w.record(0, 200, 0, 1, 1, 1)
    series, _, _, _ = I.collect(cells, lay)
    lines = render_istio(series, DestinationRegistry(), source_identity(environ={}), base)
    total = [l for l in lines if l.startswith("istio_requests_total{")]
    assert len(total) == 1 and total[0].endswith(" 1")


def test_istio_label_names_in_istio_order():
    from meshcore.metrics.prometheus import ISTIO_LABELS
    lay = Layout(1, 1, 1, istio_rows=4)
    cells = cells_for(lay)
    I.IstioWriter(cells, lay, 0).record(0, 200, 0, 1, 1, 1)
    series, _, _, _ = I.collect(cells, lay)
    line = [l for l in render_istio(series, DestinationRegistry(), source_identity(environ={}))
            if l.startswith("istio_requests_total{")][0]
    names = [pair.split("=")[0] for pair in line[line.index("{") + 1:line.rindex("}")].split('",')]
    assert tuple(names) == ISTIO_LABELS
