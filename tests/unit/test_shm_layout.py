"""Shared-memory byte layout: alignment, no overlap, sizes, header round trip, stat tables."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.shm import layout as L
from meshcore.shm.atomics import CellsPy
from meshcore.shm.layout import (
    CACHE_LINE,
    CLUSTER_FIELDS,
    CLUSTER_ROW_SIZE,
    HEADER_SIZE,
    HOST_FIELDS,
    HOST_ROW_SIZE,
    OUTLIER_STATS,
    WORKER_CLUSTER_COUNTERS,
    WORKER_ROW_SIZE,
    ClusterRow,
    HostRow,
    Layout,
    LayoutError,
    WorkerStatsRow,
)


def test_row_sizes_are_cache_lines():
    assert CACHE_LINE == HEADER_SIZE == HOST_ROW_SIZE == CLUSTER_ROW_SIZE == 64
    assert WORKER_ROW_SIZE % 64 == 0
    assert len(WORKER_CLUSTER_COUNTERS) * 8 <= WORKER_ROW_SIZE


def test_size_formula():
    lay = Layout(max_hosts=10, max_clusters=3, workers=4)
    assert lay.size == (64 + 10 * 64 + 3 * 64 + 4 * 3 * WORKER_ROW_SIZE + 4 * 10 * 64
                        + 4 * (64 + L.ISTIO_ROWS * L.ISTIO_ROW_SIZE) + 4 * 3 * 192 + 4 * 3 * 64)
    assert Layout(0, 0, 0).size == 64
    assert Layout(1, 1, 1, istio_rows=2).size == (64 + 64 + 64 + WORKER_ROW_SIZE + 64 + 64 + 1024
                                                  + 192 + 64)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 50), st.integers(0, 20), st.integers(0, 8))
def test_every_row_aligned_disjoint_and_inside(max_hosts, max_clusters, workers):
    lay = Layout(max_hosts, max_clusters, workers)
    spans = [(0, HEADER_SIZE)]
    spans += [(lay.host_off(i), lay.host_off(i) + HOST_ROW_SIZE) for i in range(max_hosts)]
    spans += [(lay.cluster_off(i), lay.cluster_off(i) + CLUSTER_ROW_SIZE)
              for i in range(max_clusters)]
    spans += [(lay.worker_row_off(w, c), lay.worker_row_off(w, c) + WORKER_ROW_SIZE)
              for w in range(workers) for c in range(max_clusters)]
    spans += [(lay.host_stats_off(w, h), lay.host_stats_off(w, h) + L.HOST_STATS_ROW_SIZE)
              for w in range(workers) for h in range(max_hosts)]
    spans += [(lay.istio_off(w), lay.istio_off(w) + lay.istio_block) for w in range(workers)]
    spans += [(lay.cluster_hist_off(w, c), lay.cluster_hist_off(w, c) + L.CLUSTER_HIST_ROW_SIZE)
              for w in range(workers) for c in range(max_clusters)]
    spans += [(lay.holdings_off(w, c), lay.holdings_off(w, c) + L.HOLDINGS_ROW_SIZE)
              for w in range(workers) for c in range(max_clusters)]
    spans.sort()
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0, "rows overlap"
    for s, e in spans:
        assert s % CACHE_LINE == 0 and e % CACHE_LINE == 0
        assert 0 <= s < e <= lay.size
    assert sum(e - s for s, e in spans) == lay.size  # no gaps either
    regions = lay.regions()
    assert [r[0] for r in regions] == ["header", "hosts", "clusters", "workers", "host_stats",
                                       "istio", "cluster_hist", "holdings"]
    for (_, _, end), (_, start, _) in zip(regions, regions[1:]):
        assert end == start


def test_each_worker_has_its_own_lines():
    lay = Layout(max_hosts=1, max_clusters=2, workers=3)
    lines = {}
    for w in range(3):
        for c in range(2):
            for i in range(len(WORKER_CLUSTER_COUNTERS)):
                line = lay.stat_off(w, c, i) // CACHE_LINE
                assert lines.setdefault(line, w) == w, "two workers share a cache line"


def test_host_fields_disjoint_aligned_and_inside_the_row():
    used = set()
    for name, off, size in HOST_FIELDS:
        assert off % size == 0, name
        assert off + size <= HOST_ROW_SIZE, name
        span = set(range(off, off + size))
        assert not used & span, name
        used |= span
    assert L.H_STATE == L.H_EJECTED_UNTIL_MS == 0  # one 64-bit word: state and end time
    assert L.H_CONSECUTIVE_5XX % 8 == 0 and L.H_CONSECUTIVE_GATEWAY == L.H_CONSECUTIVE_5XX + 4


def test_cluster_constants_match_field_table():
    assert len(CLUSTER_FIELDS) <= CLUSTER_ROW_SIZE // 4
    assert len(set(CLUSTER_FIELDS)) == len(CLUSTER_FIELDS)
    for i, name in enumerate(CLUSTER_FIELDS):
        assert getattr(L, "C_" + name.upper()) == 4 * i, name
    assert CLUSTER_FIELDS[:4] == ("cx_active", "rq_pending", "rq_active", "rq_retry_active")
    assert OUTLIER_STATS[0] == "ejections_active"


def test_worker_constants_match_counter_table():
    assert len(set(WORKER_CLUSTER_COUNTERS)) == len(WORKER_CLUSTER_COUNTERS)
    for i, name in enumerate(WORKER_CLUSTER_COUNTERS):
        assert getattr(L, "W_" + name.upper()) == i == L.W_INDEX[name]
    for name in ("upstream_rq_total", "upstream_rq_2xx", "upstream_rq_5xx", "upstream_rq_retry",
                 "upstream_rq_retry_success", "upstream_rq_retry_overflow",
                 "upstream_rq_retry_limit_exceeded", "upstream_rq_pending_overflow",
                 "upstream_rq_active_overflow", "upstream_cx_overflow", "upstream_rq_timeout",
                 "upstream_rq_per_try_timeout", "upstream_cx_total", "upstream_cx_connect_fail",
                 "upstream_cx_connect_timeout", "upstream_cx_none_healthy", "lb_healthy_panic"):
        assert name in L.W_INDEX


def test_out_of_range_slots_raise():
    lay = Layout(max_hosts=2, max_clusters=1, workers=1)
    for call in (lambda: lay.host_off(2), lambda: lay.host_off(-1), lambda: lay.cluster_off(1),
                 lambda: lay.worker_row_off(1, 0), lambda: lay.worker_row_off(0, 1),
                 lambda: lay.stat_off(0, 0, len(WORKER_CLUSTER_COUNTERS))):
        with pytest.raises(IndexError):
            call()
    assert lay.stat_off(0, 0, "upstream_rq_total") == lay.worker_row_off(0, 0) + 8 * 7


@pytest.mark.parametrize("args", [(-1, 1, 1), (1, 2**32, 1), (1, 1, 1.5), (1, 1, True)])
def test_invalid_geometry(args):
    with pytest.raises(ValueError):
        Layout(*args)
    with pytest.raises(ValueError):
        Layout(1, 1, 1, worker_row_size=64)


def test_header_round_trip():
    lay = Layout(max_hosts=7, max_clusters=3, workers=2)
    head = lay.pack_header(generation=42)
    assert len(head) == HEADER_SIZE
    buf = bytearray(lay.size)
    buf[:64] = head
    assert Layout.from_header(buf) == (lay, 42)


def test_header_validation():
    lay = Layout(max_hosts=7, max_clusters=3, workers=2)
    good = bytearray(lay.pack_header())
    with pytest.raises(LayoutError, match="magic"):
        Layout.from_header(bytes(64))
    bad = bytearray(good)
    bad[8] = 99  # version
    with pytest.raises(LayoutError, match="version"):
        Layout.from_header(bad)
    bad = bytearray(good)
    bad[40] ^= 0x40  # total size
    with pytest.raises(LayoutError, match="bytes"):
        Layout.from_header(bad)
    with pytest.raises(LayoutError, match="smaller"):
        Layout.from_header(good[:32])


def test_views_read_and_write_their_own_row():
    lay = Layout(max_hosts=3, max_clusters=2, workers=2)
    buf = bytearray(lay.size)
    cells = CellsPy(buf)
    h = HostRow(cells, lay.host_off(1), 1)
    h.rq_start()
    h.rq_start()
    h.rq_end()
    h.cx_open()
    h.cx_close()
    h.cx_close()  # unmatched: clamped
    assert h.rq_active() == 1 and h.cx_active() == 0
    assert h.state() == L.ACTIVE and not h.is_ejected()
    cells.store64(lay.host_off(1) + L.H_STATE, 5000)
    assert h.state() == L.EJECTED and h.ejected_until_ms() == 5000
    assert h.snapshot()["ejected_until_ms"] == 5000
    h.clear()
    assert set(h.snapshot().values()) == {0}

    cl = ClusterRow(cells, lay.cluster_off(1), 1)
    cl.add(L.C_EJECTIONS_OVERFLOW, 3)
    assert cl.get("ejections_overflow") == 3
    assert cl.rq_pending.add(2) == 0 and cl.rq_pending.load() == 2
    assert cl.rq_pending.cas(2, 0) and cl.rq_pending.load() == 0

    w = WorkerStatsRow(cells, lay.worker_row_off(1, 0))
    assert w.inc(L.W_UPSTREAM_RQ_TOTAL) == 1
    assert w.inc(L.W_UPSTREAM_RQ_TOTAL, 4) == 5
    assert w.get(L.W_UPSTREAM_RQ_TOTAL) == 5
    assert w.snapshot()["upstream_rq_total"] == 5
    # nothing else in the buffer changed
    touched = {lay.cluster_off(1) + L.C_EJECTIONS_OVERFLOW,
               lay.worker_row_off(1, 0) + 8 * L.W_UPSTREAM_RQ_TOTAL}
    nonzero = {i for i, b in enumerate(buf) if b}
    assert nonzero <= {t + k for t in touched for k in range(8)}
    w.clear()
    cl.clear()
    assert not any(buf)
