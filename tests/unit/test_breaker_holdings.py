"""Breaker units survive worker death: each worker's holdings row, and the supervisor's repair
(meshcore.upstream.breaker.return_holdings / return_worker_holdings), pure and compiled cells,
plus real processes SIGKILLed in the middle of acquiring and releasing."""
import multiprocessing
import os
import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.metrics.istio import (B_DOWNSTREAM_CX_ACTIVE, B_DOWNSTREAM_CX_OVERFLOW,
                                    AcceptOverflow, accept_overflow_total, forget_connections)
from meshcore.shm import atomics
from meshcore.shm.layout import (C_CX_ACTIVE, C_RQ_ACTIVE, C_RQ_PENDING, C_RQ_RETRY_ACTIVE,
                                 ClusterRow, Layout)
from meshcore.shm.segment import Segment
from meshcore.upstream.breaker import (GAUGE_OFFSETS, UNLIMITED, force_acquire, release,
                                       return_holdings, return_worker_holdings, try_acquire)

NO_EXT = bool(os.environ.get("MESHCORE_NO_EXTENSIONS"))
WORKERS = 3


@pytest.fixture(params=["pure", "compiled"])
def cells_cls(request):
    if request.param == "pure":
        return atomics.CellsPy
    if atomics.CellsC is None:
        if NO_EXT:
            pytest.skip("MESHCORE_NO_EXTENSIONS=1: pure-Python run")
        pytest.fail("meshcore._ext.shmatomic is not built")
    return atomics.CellsC


@pytest.fixture
def shm(cells_cls):
    layout = Layout(max_hosts=1, max_clusters=4, workers=WORKERS)
    return cells_cls(bytearray(layout.size)), layout


def rows(cells, layout, slot=2):
    cluster = ClusterRow(cells, layout.cluster_off(slot), slot)
    held = [ClusterRow(cells, layout.holdings_off(w, slot), slot) for w in range(WORKERS)]
    return cluster, held


def gauges(row):
    return tuple(row.cells.load32(row.off + g) for g in GAUGE_OFFSETS)


def test_holdings_follow_acquire_refuse_and_release(shm):
    cells, layout = shm
    cluster, held = rows(cells, layout)
    got = [try_acquire(cluster.cx_active, 3, held[0].cx_active) for _ in range(5)]
    assert got == [True, True, True, False, False]
    assert cluster.cx_active.load() == 3 and held[0].cx_active.load() == 3  # refusals undone
    assert release(cluster.cx_active, held[0].cx_active)
    assert cluster.cx_active.load() == 2 and held[0].cx_active.load() == 2
    force_acquire(cluster.cx_active, held[1].cx_active)
    assert cluster.cx_active.load() == 3 and held[1].cx_active.load() == 1
    assert try_acquire(cluster.rq_active, UNLIMITED, held[2].rq_active)
    assert held[2].rq_active.load() == 1
    # an unmatched release changes neither cell (both clamp at zero)
    assert not release(cluster.rq_pending, held[0].rq_pending)
    assert cluster.rq_pending.load() == 0 and held[0].rq_pending.load() == 0


def test_return_holdings_gives_back_exactly_the_dead_workers_units(shm):
    cells, layout = shm
    cluster, held = rows(cells, layout)
    # the numbers: the dead worker holds 4 connections, 5 requests, 1 pending, 1 retry
    for cell, limit, n in ((C_CX_ACTIVE, 6, 4), (C_RQ_ACTIVE, UNLIMITED, 5), (C_RQ_PENDING, 9, 1),
                           (C_RQ_RETRY_ACTIVE, 3, 1)):
        for _ in range(n):
            assert try_acquire(_cell(cluster, cell), limit, _cell(held[0], cell))
        assert try_acquire(_cell(cluster, cell), limit, _cell(held[1], cell))  # a survivor's
    assert gauges(cluster) == (5, 2, 6, 2)
    assert return_holdings(cells, cluster.off, held[0].off) == (4, 1, 5, 1)
    assert gauges(cluster) == (1, 1, 1, 1) == gauges(held[1])  # the survivor's units remain
    assert gauges(held[0]) == (0, 0, 0, 0)
    assert return_holdings(cells, cluster.off, held[0].off) == (0, 0, 0, 0)  # idempotent
    # the survivor gives its units back as usual: all gauges at zero
    for g in GAUGE_OFFSETS:
        assert release(_cell(cluster, g), _cell(held[1], g))
    assert gauges(cluster) == (0, 0, 0, 0) == gauges(held[1])


def test_return_holdings_never_goes_below_zero(shm):
    cells, layout = shm
    cluster, held = rows(cells, layout)
    cells.store32(held[0].off + C_RQ_ACTIVE, 3)  # e.g. killed between its two steps, twice
    cells.store32(cluster.off + C_RQ_ACTIVE, 2)
    assert return_holdings(cells, cluster.off, held[0].off) == (0, 0, 3, 0)
    assert cluster.rq_active.load() == 0


def test_return_worker_holdings_covers_every_cluster_slot(shm):
    cells, layout = shm
    for slot in (0, 3):
        c, h = rows(cells, layout, slot)
        assert try_acquire(c.cx_active, 10, h[1].cx_active)
        assert try_acquire(c.rq_active, 10, h[2].rq_active)  # another worker's: untouched
    assert return_worker_holdings(cells, layout, 1) == {0: (1, 0, 0, 0), 3: (1, 0, 0, 0)}
    for slot in (0, 3):
        c, h = rows(cells, layout, slot)
        assert gauges(c) == (0, 0, 1, 0) and gauges(h[1]) == (0, 0, 0, 0)
    assert return_worker_holdings(cells, layout, 1) == {}


def _cell(row, off):
    return {C_CX_ACTIVE: row.cx_active, C_RQ_PENDING: row.rq_pending, C_RQ_ACTIVE: row.rq_active,
            C_RQ_RETRY_ACTIVE: row.rq_retry_active}[off]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, WORKERS - 1), st.sampled_from(GAUGE_OFFSETS),
                          st.booleans()), max_size=80),
       st.sets(st.integers(0, WORKERS - 1), max_size=WORKERS), st.integers(1, 6))
def test_after_any_history_and_any_deaths_gauges_equal_the_survivors_units(ops, dead, limit):
    layout = Layout(max_hosts=1, max_clusters=1, workers=WORKERS)
    cells = atomics.CellsPy(bytearray(layout.size))
    cluster = ClusterRow(cells, layout.cluster_off(0))
    held = [ClusterRow(cells, layout.holdings_off(w, 0)) for w in range(WORKERS)]
    model = {(w, g): 0 for w in range(WORKERS) for g in GAUGE_OFFSETS}  # units truly held
    for w, g, take in ops:
        if take:
            if try_acquire(_cell(cluster, g), limit, _cell(held[w], g)):
                model[w, g] += 1
        elif model[w, g]:  # a worker only gives back what it holds
            assert release(_cell(cluster, g), _cell(held[w], g))
            model[w, g] -= 1
        assert cells.load32(cluster.off + g) <= limit
    for w in dead:
        return_holdings(cells, cluster.off, held[w].off)
    for g in GAUGE_OFFSETS:
        alive = sum(model[w, g] for w in range(WORKERS) if w not in dead)
        assert cells.load32(cluster.off + g) == alive
        for w in range(WORKERS):
            assert cells.load32(held[w].off + g) == (0 if w in dead else model[w, g])


# --- real processes on a real segment, SIGKILLed at a random instruction ------------------------

def _churn(name: str, worker: int, limit: int, steady: int, ready) -> None:
    """A worker: take `steady` units and keep them, then take and give back units forever."""
    seg = Segment.attach(name)
    cluster = seg.cluster(0)
    held = seg.holdings(worker, 0)
    for _ in range(steady):
        assert try_acquire(cluster.cx_active, limit, held.cx_active)
        assert try_acquire(cluster.rq_active, UNLIMITED, held.rq_active)
    ready.set()
    while True:
        got = try_acquire(cluster.cx_active, limit, held.cx_active)
        try_acquire(cluster.rq_pending, limit, held.rq_pending)
        if got:
            release(cluster.cx_active, held.cx_active)
        release(cluster.rq_pending, held.rq_pending)


@pytest.mark.skipif(NO_EXT, reason="MESHCORE_NO_EXTENSIONS=1: the pure cells are not atomic "
                                   "across processes")
@pytest.mark.parametrize("rounds", [4])
def test_sigkill_at_any_point_leaves_exactly_the_survivors_units(rounds):
    ctx = multiprocessing.get_context("spawn")
    layout = Layout(max_hosts=1, max_clusters=1, workers=3)
    seg = Segment.create(layout)
    procs = []
    try:
        cluster = seg.cluster(0)
        for r in range(rounds):
            cluster.clear()
            for w in range(3):
                seg.holdings(w, 0).clear()
            events = [ctx.Event() for _ in range(3)]
            steady = (2, 3, 1)
            procs[:] = [ctx.Process(target=_churn, args=(seg.name, w, 50, steady[w], events[w]),
                                    daemon=True) for w in range(3)]
            for p in procs:
                p.start()
            for e in events:
                assert e.wait(30)
            time.sleep(0.05 + 0.03 * r)  # kill in the middle of the churn, somewhere
            victim = r % 3
            os.kill(procs[victim].pid, signal.SIGKILL)
            procs[victim].join(10)
            return_holdings(seg.cells, layout.cluster_off(0), layout.holdings_off(victim, 0))
            # the survivors, stopped (SIGSTOP) between two instructions, hold their steady
            # units plus at most one churning unit each per gauge
            for w in range(3):
                if w != victim:
                    os.kill(procs[w].pid, signal.SIGSTOP)
            survivors = [w for w in range(3) if w != victim]
            for g in GAUGE_OFFSETS:
                gauge = seg.cells.load32(layout.cluster_off(0) + g)
                rows_sum = sum(seg.cells.load32(layout.holdings_off(w, 0) + g) for w in survivors)
                # each survivor's row counts a unit before taking it and after returning it, so
                # the gauge is never above the rows and at most one unit per survivor below;
                # the victim, killed between its two steps, may have returned one unit too many
                assert max(0, rows_sum - len(survivors) - 1) <= gauge <= rows_sum, \
                    (r, g, gauge, rows_sum)
            assert seg.cells.load32(layout.cluster_off(0) + C_RQ_ACTIVE) == sum(
                steady[w] for w in survivors)
            for w in survivors:
                os.kill(procs[w].pid, signal.SIGKILL)
                procs[w].join(10)
                return_holdings(seg.cells, layout.cluster_off(0), layout.holdings_off(w, 0))
            # every worker dead and repaired: nothing is held, nothing leaked
            assert [seg.cells.load32(layout.cluster_off(0) + g) for g in GAUGE_OFFSETS] \
                == [0, 0, 0, 0], r
    finally:
        for p in procs:  # stopped ones too: a SIGSTOPped child would never take a SIGTERM
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
        seg.unlink()
        seg.close()


# --- connections of a dead worker, and its accept overflow count ---------------------------------

def test_forget_connections_and_accept_overflow(shm):
    cells, layout = shm
    off = layout.istio_off(1) + 8 * B_DOWNSTREAM_CX_ACTIVE
    cells.store64(off, 7)
    assert forget_connections(cells, layout, 1) == 7 and cells.load64(off) == 0
    first = AcceptOverflow(cells, layout, 2)
    first.publish(5)
    assert accept_overflow_total(cells, layout) == 5
    again = AcceptOverflow(cells, layout, 2)  # the restarted worker's loop counts from 0 again
    again.publish(0)
    again.publish(3)
    assert accept_overflow_total(cells, layout) == 8
    assert cells.load64(layout.istio_off(2) + 8 * B_DOWNSTREAM_CX_OVERFLOW) == 8
