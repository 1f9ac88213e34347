"""Envoy-style /stats text from the shared-memory rows."""
from meshcore.shm import layout as L
from meshcore.shm.atomics import CellsPy
from meshcore.shm.layout import ClusterRow, Layout, WorkerStatsRow
from meshcore.stats_render import StatsCluster, cluster_stats, render_stats
from meshcore.upstream.breaker import BreakerLimits, try_acquire


class Src:
    def __init__(self, workers=3, hosts=4, clusters=2):
        self.layout = Layout(max_hosts=hosts, max_clusters=clusters, workers=workers)
        self.cells = CellsPy(bytearray(self.layout.size))


def test_worker_counters_are_summed_and_gauges_copied():
    src = Src()
    for w, n in ((0, 5), (1, 7), (2, 1)):
        WorkerStatsRow(src.cells, src.layout.worker_row_off(w, 1)).inc(L.W_UPSTREAM_RQ_TOTAL, n)
    WorkerStatsRow(src.cells, src.layout.worker_row_off(2, 1)).inc(L.W_UPSTREAM_RQ_RETRY, 2)
    WorkerStatsRow(src.cells, src.layout.worker_row_off(0, 0)).inc(L.W_UPSTREAM_RQ_TOTAL, 100)
    row = ClusterRow(src.cells, src.layout.cluster_off(1), 1)
    row.cx_active.add(2)
    row.rq_pending.add(1)
    row.rq_active.add(3)
    st = cluster_stats(src.cells, src.layout, StatsCluster("b", 1))
    assert st["upstream_rq_total"] == 13  # cluster 0's 100 not included
    assert st["upstream_rq_retry"] == 2
    assert st["upstream_cx_active"] == 2
    assert st["upstream_rq_pending_active"] == 1
    assert st["upstream_rq_active"] == 3
    assert not any(k.startswith("outlier_detection.") for k in st)
    assert "membership_total" not in st


def test_render_format_and_sorting():
    src = Src()
    WorkerStatsRow(src.cells, src.layout.worker_row_off(1, 0)).inc(L.W_UPSTREAM_RQ_2XX, 4)
    text = render_stats(src, [StatsCluster("outbound|80||b.ns.svc.cluster.local", 0),
                              ("outbound|80||a.ns.svc.cluster.local", 1)])
    lines = text.splitlines()
    assert text.endswith("\n")
    names = [ln.split(": ")[0] for ln in lines]
    assert names == sorted(names)
    assert "cluster.outbound|80||b.ns.svc.cluster.local.upstream_rq_2xx: 4" in lines
    assert "cluster.outbound|80||a.ns.svc.cluster.local.upstream_rq_2xx: 0" in lines
    assert names[0].startswith("cluster.outbound|80||a.")
    per_cluster = len(L.WORKER_CLUSTER_COUNTERS) + 3 + 5
    assert len(lines) == 2 * per_cluster
    for ln in lines:
        name, value = ln.split(": ")
        assert value.isdigit() and name.startswith("cluster.")


def test_outlier_breaker_and_membership_lines():
    src = Src(workers=1, hosts=4)
    row = ClusterRow(src.cells, src.layout.cluster_off(0), 0)
    row.add(L.C_EJECTIONS_ACTIVE, 1)
    row.add(L.C_EJECTIONS_ENFORCED_CONSECUTIVE_5XX, 3)
    try_acquire(row.cx_active, 1)
    src.cells.store64(src.layout.host_off(2) + L.H_STATE, 9_000)  # ejected until 9 s
    lim = BreakerLimits(max_connections=1, max_pending_requests=5)
    cl = StatsCluster("c", 0, host_slots=(0, 1, 2), limits=lim, outlier=True)
    st = cluster_stats(src.cells, src.layout, cl, now_ms=5_000)
    assert st["outlier_detection.ejections_active"] == 1
    assert st["outlier_detection.ejections_enforced_consecutive_5xx"] == 3
    assert st["outlier_detection.ejections_overflow"] == 0
    assert set(k[len("outlier_detection."):] for k in st if k.startswith("outlier_")) == set(
        L.OUTLIER_STATS)
    assert st["circuit_breakers.default.cx_open"] == 1
    assert st["circuit_breakers.default.rq_pending_open"] == 0
    assert st["circuit_breakers.default.rq_open"] == 0
    assert st["circuit_breakers.default.cx_pool_open"] == 0
    assert (st["membership_total"], st["membership_healthy"]) == (3, 2)
    assert cluster_stats(src.cells, src.layout, cl, now_ms=9_000)["membership_healthy"] == 3
    text = render_stats(src.cells, [cl], now_ms=5_000, layout=src.layout)
    assert "cluster.c.outlier_detection.ejections_active: 1\n" in text
    assert "cluster.c.circuit_breakers.default.cx_open: 1\n" in text
