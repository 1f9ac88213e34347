"""Admin request handling without sockets: methods, routing, filters, /clusters rendering."""
import json

from meshcore import admin
from meshcore.config.policy import ClusterPolicy, Endpoint
from meshcore.metrics.envoy import Stat
from meshcore.shm.atomics import CellsPy
from meshcore.shm.layout import H_CX_ACTIVE, H_STATE, Layout
from meshcore.stats_render import cluster_views, render_clusters_json, render_clusters_text
from meshcore.upstream.breaker import BreakerLimits


class FakeSupervisor:
    listen = ("127.0.0.1", 15001)
    snapshot = None

    def __init__(self):
        self.failed = False
        self.quits = []
        self.resets = 0

    def health_state(self):
        return "DRAINING" if self.failed else "LIVE"

    def set_health_failed(self, failed):
        self.failed = failed

    def quit(self, why):
        self.quits.append(why)

    def reset_counters(self):
        self.resets += 1

    def stats(self):
        return [Stat("cluster.a.upstream_rq_total", 3, "counter", "x"),
                Stat("cluster.a.upstream_rq_retry", 0, "counter", "x")]

    def histograms_json(self):
        return {"supported_quantiles": [50], "computed_quantiles": []}


def call(sup, method, target):
    raw = admin.handle(sup, method, target)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode(), body


def test_mutations_need_post_and_work_with_it():
    sup = FakeSupervisor()
    for path in (b"/healthcheck/fail", b"/quitquitquit", b"/reset_counters", b"/logging"):
        for method in (b"GET", b"HEAD", b"PUT"):
            status, _, body = call(sup, method, path)
            assert status == 405 and body == b"Method %s not allowed, POST required.\n" % method
    assert call(sup, b"POST", b"/healthcheck/fail")[0] == 200
    assert call(sup, b"GET", b"/ready")[::2] == (503, b"DRAINING\n")
    call(sup, b"POST", b"/healthcheck/ok")
    assert call(sup, b"GET", b"/ready")[::2] == (200, b"LIVE\n")
    call(sup, b"POST", b"/quitquitquit")
    call(sup, b"POST", b"/reset_counters")
    assert sup.quits and sup.resets == 1


def test_stats_filters_and_errors():
    sup = FakeSupervisor()
    assert call(sup, b"GET", b"/stats")[2] == (b"cluster.a.upstream_rq_retry: 0\n"
                                               b"cluster.a.upstream_rq_total: 3\n")
    assert call(sup, b"GET", b"/stats?usedonly")[2] == b"cluster.a.upstream_rq_total: 3\n"
    assert call(sup, b"GET", b"/stats?filter=retry")[2] == b"cluster.a.upstream_rq_retry: 0\n"
    status, head, body = call(sup, b"GET", b"/stats?format=json&filter=total")
    assert "application/json" in head
    assert json.loads(body)["stats"][0] == {"name": "cluster.a.upstream_rq_total", "value": 3}
    status, _, body = call(sup, b"GET", b"/stats?filter=%28")
    assert status == 400 and body.startswith(b"Invalid regex")
    status, head, body = call(sup, b"HEAD", b"/stats")
    assert status == 200 and body == b"" and "content-length: 62" in head
    assert call(sup, b"GET", b"/nope")[0] == 404
    assert call(sup, b"DELETE", b"/stats")[0] == 405


def test_help_lists_every_endpoint():
    body = call(FakeSupervisor(), b"GET", b"/help")[2].decode()
    for path, (post, text, _) in admin.ENDPOINTS.items():
        assert f"  {path}{' (POST)' if post else ''}: {text}\n" in body


def test_clusters_text_and_json_from_rows():
    lay = Layout(2, 1, 2)
    cells = CellsPy(bytearray(lay.size))
    eps = (Endpoint("10.0.0.1", 80, 3, (), "10.0.0.1:80"), Endpoint("::1", 81, 1, (), "[::1]:81"))
    policy = ClusterPolicy("outbound|80||a", "a", 80, "", eps,
                           limits=BreakerLimits(max_connections=5))
    cells.store64(lay.host_off(1) + H_STATE, 10_000 + 42_000)  # ejected until now + 42 s
    cells.store32(lay.host_off(0) + H_CX_ACTIVE, 2)
    cells.incr64(lay.host_stats_off(0, 0) + 8 * 2, 4)  # rq_total on worker 0
    cells.incr64(lay.host_stats_off(1, 0) + 8 * 2, 1)  # and worker 1
    views = cluster_views(cells, lay, [("outbound|80||a", policy, (0, (0, 1)))], 10_000)
    text = render_clusters_text(views)
    assert "outbound|80||a::10.0.0.1:80::rq_total::5\n" in text
    assert "outbound|80||a::10.0.0.1:80::cx_active::2\n" in text
    assert "outbound|80||a::10.0.0.1:80::health_flags::healthy\n" in text
    assert "outbound|80||a::10.0.0.1:80::weight::3\n" in text
    assert "outbound|80||a::[::1]:81::health_flags::/failed_outlier_check\n" in text
    assert "outbound|80||a::[::1]:81::ejection_time_left_ms::42000\n" in text
    assert "outbound|80||a::default_priority::max_connections::5\n" in text
    doc = render_clusters_json(views)
    hosts = doc["cluster_statuses"][0]["host_statuses"]
    assert hosts[0]["stats"][5] == {"name": "rq_total", "value": "5"}
    assert hosts[0]["stats"][0] == {"name": "cx_connect_fail"}  # zero: left out, as Envoy does
    assert hosts[1]["health_status"] == {"eds_health_status": "HEALTHY",
                                         "failed_outlier_check": True}
    assert hosts[1]["ejection_time_left_ms"] == 42000
    # an expired ejection not yet swept is healthy, as the balancer sees it
    views = cluster_views(cells, lay, [("outbound|80||a", policy, (0, (0, 1)))], 60_000)
    assert "[::1]:81::health_flags::healthy" in render_clusters_text(views)
