"""Circuit breaking over shared cluster-row counters (semantics §2b, §5), pure and compiled."""
import os
import threading

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.config import istio
from meshcore.shm import atomics
from meshcore.shm.layout import ClusterRow, Layout
from meshcore.upstream.breaker import (
    DEFAULT_LIMITS,
    UNLIMITED,
    BreakerLimits,
    breaker_limits_from_istio,
    force_acquire,
    is_open,
    release,
    try_acquire,
)

NO_EXT = bool(os.environ.get("MESHCORE_NO_EXTENSIONS"))


@pytest.fixture(params=["pure", "compiled"])
def row(request):
    if request.param == "pure":
        Cells = atomics.CellsPy
    else:
        if atomics.CellsC is None:
            if NO_EXT:
                pytest.skip("MESHCORE_NO_EXTENSIONS=1: pure-Python run")
            pytest.fail("meshcore._ext.shmatomic is not built")
        Cells = atomics.CellsC
    layout = Layout(max_hosts=1, max_clusters=2, workers=1)
    cells = Cells(bytearray(layout.size))
    return ClusterRow(cells, layout.cluster_off(1), 1)


def test_acquire_up_to_limit_then_refuse(row):
    c = row.rq_pending
    assert [try_acquire(c, 3) for _ in range(5)] == [True, True, True, False, False]
    assert c.load() == 3
    assert is_open(c, 3)
    assert release(c)
    assert not is_open(c, 3)
    assert try_acquire(c, 3) and not try_acquire(c, 3)


def test_limit_zero_refuses_everything(row):
    # 0 never reaches try_acquire from Istio (0 = unset), but a raw limit of 0 admits nobody
    assert not try_acquire(row.cx_active, 0)
    assert row.cx_active.load() == 0


def test_unlimited_always_admits(row):
    c = row.rq_active
    assert all(try_acquire(c, UNLIMITED) for _ in range(1000))
    assert c.load() == 1000 and not is_open(c, UNLIMITED)


def test_release_clamps_at_zero(row):
    c = row.rq_retry_active
    assert release(c) is False
    assert c.load() == 0
    try_acquire(c, 1)
    assert release(c) is True and release(c) is False and c.load() == 0


def test_force_acquire_exceeds_limit(row):
    c = row.cx_active
    assert try_acquire(c, 1)
    assert not try_acquire(c, 1)
    force_acquire(c)  # §5.1: a worker's pool may still open one connection per host
    assert c.load() == 2 and is_open(c, 1)


def test_resources_are_independent_cells(row):
    try_acquire(row.cx_active, 10)
    try_acquire(row.rq_pending, 10)
    try_acquire(row.rq_pending, 10)
    try_acquire(row.rq_active, 10)
    assert row.snapshot()["cx_active"] == 1
    assert row.snapshot()["rq_pending"] == 2
    assert row.snapshot()["rq_active"] == 1
    assert row.snapshot()["rq_retry_active"] == 0


@settings(max_examples=100, deadline=None)
@given(limit=st.integers(1, 5), ops=st.lists(st.booleans(), max_size=60))
def test_never_exceeds_limit_and_tracks_holders(limit, ops):
    layout = Layout(max_hosts=1, max_clusters=1, workers=1)
    for Cells in filter(None, (atomics.CellsPy, atomics.CellsC)):
        c = ClusterRow(Cells(bytearray(layout.size)), layout.cluster_off(0)).rq_active
        held = 0
        for acquire in ops:
            if acquire:
                ok = try_acquire(c, limit)
                assert ok == (held < limit)
                held += ok
            else:
                assert release(c) == (held > 0)
                held = max(0, held - 1)
            assert c.load() == held <= limit


def test_threads_never_exceed_limit(row):
    c = row.rq_active
    limit = 4
    peak = []
    admitted = []
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        n = 0
        for _ in range(2000):
            if try_acquire(c, limit):
                peak.append(c.load())
                n += 1
                release(c)
        admitted.append(n)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(peak) <= limit
    assert c.load() == 0 and sum(admitted) > 0


def _cp(**yaml):
    return msgspec.convert(yaml, istio.ConnectionPoolSettings, dec_hook=istio.dec_hook)


def test_limits_from_istio():
    assert breaker_limits_from_istio(None) == DEFAULT_LIMITS == BreakerLimits(
        UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED)
    assert breaker_limits_from_istio(_cp()) == DEFAULT_LIMITS
    assert breaker_limits_from_istio(_cp(
        tcp={"maxConnections": 1, "connectTimeout": "1s"},
        http={"http1MaxPendingRequests": 1, "http2MaxRequests": 7, "maxRetries": 3,
              "maxRequestsPerConnection": 1},
    )) == BreakerLimits(max_connections=1, max_pending_requests=1, max_requests=7, max_retries=3)


def test_limits_zero_means_unset():
    lim = breaker_limits_from_istio(_cp(tcp={"maxConnections": 0},
                                        http={"http1MaxPendingRequests": 0, "maxRetries": 0}))
    assert lim == DEFAULT_LIMITS
    lim = breaker_limits_from_istio(_cp(http={"http2MaxRequests": 5}))
    assert lim == BreakerLimits(max_requests=5)
