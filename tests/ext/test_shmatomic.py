"""Shared-memory atomics: every test runs against the pure fallback and the compiled extension.

The compiled parameter fails (it does not skip) when meshcore._ext.shmatomic is missing, unless the
run is explicitly pure (MESHCORE_NO_EXTENSIONS=1). The cross-process tests start real `spawn`
processes on a real SharedMemory segment; the pure fallback is atomic across processes only with
an injected multiprocessing lock, so that is how it is tested there.
"""
import multiprocessing
import os
from multiprocessing import shared_memory

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.shm import atomics
from meshcore.shm.layout import ClusterRow, HostRow, Layout
from meshcore.shm.segment import Segment
from meshcore.upstream import outlier
from meshcore.upstream.outcome import Outcome

NO_EXT = bool(os.environ.get("MESHCORE_NO_EXTENSIONS"))
M32 = 2**32 - 1
M64 = 2**64 - 1


def _compiled_or_fail():
    if atomics.COMPILED is None:
        if NO_EXT:
            pytest.skip("MESHCORE_NO_EXTENSIONS=1: pure-Python run")
        pytest.fail("meshcore._ext.shmatomic is not built; run "
                    "`MESHCORE_EXT=shmatomic python setup.py build_ext --inplace`")
    return atomics.COMPILED


@pytest.fixture(params=["pure", "compiled"])
def impl(request):
    if request.param == "pure":
        return atomics.PURE
    return _compiled_or_fail()


@pytest.fixture(params=["pure", "compiled"])
def impl_name(request):
    if request.param == "compiled":
        _compiled_or_fail()
    return request.param


def test_selection_prefers_compiled():
    if atomics.COMPILED is None:
        assert atomics.Cells is atomics.CellsPy
        assert atomics.CROSS_PROCESS_ATOMIC is False
    else:
        assert atomics.Cells is atomics.CellsC
        assert atomics.MEMORY_ORDER == "seq_cst"
        assert atomics.CROSS_PROCESS_ATOMIC is True


# ------------------------------------------------------------------------------------------------
# Single-process semantics


def test_load_store_32_64(impl):
    buf = bytearray(64)
    c = impl.Cells(buf)
    c.store32(4, 0xDEADBEEF)
    c.store64(8, 0x0102030405060708)
    assert c.load32(4) == 0xDEADBEEF
    assert c.load64(8) == 0x0102030405060708
    assert int.from_bytes(buf[4:8], "little") == 0xDEADBEEF  # native order on x86-64/arm64
    assert int.from_bytes(buf[8:16], "little") == 0x0102030405060708
    c.store32(60, M32)
    c.store64(56 - 8, M64)
    assert c.load32(60) == M32 and c.load64(48) == M64
    assert len(c) == c.nbytes == 64
    c.release()


def test_fetch_add_returns_old_and_wraps(impl):
    c = impl.Cells(bytearray(16))
    assert c.fetch_add32(0, 5) == 0
    assert c.fetch_add32(0, -2) == 5
    assert c.load32(0) == 3
    assert c.fetch_add32(0, -4) == 3
    assert c.load32(0) == M32  # wraps modulo 2^32
    assert c.fetch_add32(0, 1) == M32 and c.load32(0) == 0
    assert c.fetch_add32(0, 2**40 + 7) == 0 and c.load32(0) == 7  # delta taken modulo 2^32
    assert c.fetch_add64(8, -1) == 0 and c.load64(8) == M64
    assert c.fetch_add64(8, 2) == M64 and c.load64(8) == 1
    assert c.fetch_add64(8, 2**63 - 1) == 1 and c.load64(8) == 2**63


def test_cas(impl):
    c = impl.Cells(bytearray(16))
    assert c.cas32(4, 0, 9) is True
    assert c.cas32(4, 0, 10) is False
    assert c.load32(4) == 9
    assert c.cas64(8, 0, M64) is True
    assert c.cas64(8, 0, 1) is False
    assert c.cas64(8, M64, 2) is True and c.load64(8) == 2


def test_incr64_single_writer(impl):
    c = impl.Cells(bytearray(16))
    assert c.incr64(8) == 1
    assert c.incr64(8, 41) == 42
    assert c.incr64(8, -2) == 40
    assert c.load64(8) == 40


@pytest.mark.parametrize("op,args,exc", [
    ("load32", (-4,), IndexError),
    ("load32", (64,), IndexError),
    ("load32", (62,), IndexError),          # would straddle the end
    ("load32", (2,), ValueError),           # misaligned
    ("load64", (60,), IndexError),
    ("load64", (4,), ValueError),
    ("store32", (0, -1), OverflowError),
    ("store32", (0, 2**32), OverflowError),
    ("store64", (0, 2**64), OverflowError),
    ("store64", (0, -1), OverflowError),
    ("cas32", (0, 2**32, 0), OverflowError),
    ("cas64", (0, 0, -1), OverflowError),
    ("fetch_add32", (0, 2**63), OverflowError),
    ("fetch_add64", (0, -(2**63) - 1), OverflowError),
    ("load32", (1.0,), TypeError),
    ("store32", (0, 1.5), TypeError),
    ("store64", (3, 0), ValueError),
    ("fetch_add64", (64, 1), IndexError),
    ("incr64", (-8, 1), IndexError),
])
def test_bad_arguments_raise_cleanly(impl, op, args, exc):
    buf = bytearray(64)
    c = impl.Cells(buf)
    with pytest.raises(exc):
        getattr(c, op)(*args)
    assert buf == bytearray(64)  # nothing written


def test_readonly_and_non_buffers_rejected(impl):
    with pytest.raises((BufferError, TypeError)):
        impl.Cells(b"\0" * 16)
    with pytest.raises((BufferError, TypeError)):
        impl.Cells(memoryview(bytearray(16)).toreadonly())
    with pytest.raises(TypeError):
        impl.Cells(16)
    with pytest.raises((BufferError, TypeError)):
        impl.load32(b"\0" * 16, 0)


def test_release_then_use_raises(impl):
    buf = bytearray(16)
    c = impl.Cells(buf)
    assert not c.released
    c.release()
    c.release()  # idempotent
    assert c.released
    for call in (lambda: c.load32(0), lambda: c.store64(8, 1), lambda: c.cas32(0, 0, 1)):
        with pytest.raises(ValueError):
            call()


def test_cells_pins_the_buffer(impl):
    buf = bytearray(16)
    with impl.Cells(buf) as c:
        c.store32(0, 1)
        with pytest.raises(BufferError):
            buf.extend(b"x")  # cannot move the memory under a live Cells
    assert c.released
    buf.extend(b"x")


def test_shared_memory_cannot_close_under_cells(impl):
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        c = impl.Cells(shm.buf)
        c.store64(0, 7)
        with pytest.raises(BufferError):
            shm.close()
        c.release()
    finally:
        shm.close()
        shm.unlink()


def test_module_functions(impl):
    buf = bytearray(32)
    assert impl.fetch_add32(buf, 4, 3) == 0
    assert impl.load32(buf, 4) == 3
    impl.store32(buf, 4, 10)
    assert impl.cas32(buf, 4, 10, 11) and not impl.cas32(buf, 4, 10, 12)
    assert impl.load32(buf, 4) == 11
    impl.store64(buf, 8, 2**40)
    assert impl.fetch_add64(buf, 8, 1) == 2**40
    assert impl.cas64(buf, 8, 2**40 + 1, 5) and impl.load64(buf, 8) == 5
    with pytest.raises(IndexError):
        impl.load64(buf, 32)
    with pytest.raises(ValueError):
        impl.load32(buf, 6)
    with pytest.raises((BufferError, TypeError)):
        impl.store32(bytes(8), 0, 1)
    buf.extend(b"ok")  # the module functions released their exports


_ops = st.one_of(
    st.tuples(st.just("store32"), st.integers(0, 15), st.integers(0, M32)),
    st.tuples(st.just("fetch_add32"), st.integers(0, 15), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("cas32"), st.integers(0, 15), st.integers(0, 3), st.integers(0, M32)),
    st.tuples(st.just("load32"), st.integers(0, 15)),
    st.tuples(st.just("store64"), st.integers(0, 7), st.integers(0, M64)),
    st.tuples(st.just("fetch_add64"), st.integers(0, 7), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("cas64"), st.integers(0, 7), st.integers(0, 3), st.integers(0, M64)),
    st.tuples(st.just("load64"), st.integers(0, 7)),
    st.tuples(st.just("incr64"), st.integers(0, 7), st.integers(-(2**63), 2**63 - 1)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_ops, max_size=40))
def test_compiled_matches_pure(ops):
    compiled = _compiled_or_fail()
    bufs = (bytearray(64), bytearray(64))
    cells = (atomics.PURE.Cells(bufs[0]), compiled.Cells(bufs[1]))
    for op in ops:
        name, idx, *args = op
        off = idx * (4 if name.endswith("32") else 8)
        results = [getattr(c, name)(off, *args) for c in cells]
        assert results[0] == results[1], op
    assert bufs[0] == bufs[1]
    for c in cells:
        c.release()


# ------------------------------------------------------------------------------------------------
# Cross-process (spawn). Child functions live at module level so spawn can import them.

HAMMER_N = 20000


def _child_cells(name, impl_name, lock):
    seg = Segment.attach(name)
    if impl_name == "compiled":
        return seg, atomics.CellsC(seg.buf)
    return seg, atomics.CellsPy(seg.buf, lock=lock)


def _hammer(name, impl_name, lock, barrier, off32, off64, n):
    seg, c = _child_cells(name, impl_name, lock)
    barrier.wait(60)
    for _ in range(n):
        c.fetch_add32(off32, 1)
        c.fetch_add64(off64, 3)
    c.release()
    seg.close()


def _cas_race(name, impl_name, lock, barrier, me, base, n_cells, results):
    seg, c = _child_cells(name, impl_name, lock)
    barrier.wait(60)
    won = [k for k in range(n_cells) if c.cas64(base + 64 * k, 0, me)]
    results.put((me, won))
    c.release()
    seg.close()


def _eject_race(name, impl_name, lock, barrier, n, results):
    seg, c = _child_cells(name, impl_name, lock)
    host = HostRow(c, seg.layout.host_off(0), 0)
    cluster = ClusterRow(c, seg.layout.cluster_off(0), 0)
    policy = outlier.OutlierPolicy(consecutive_5xx=0, enforcing_consecutive_5xx=0,
                                   consecutive_gateway_failure=3,
                                   enforcing_consecutive_gateway_failure=100,
                                   max_ejection_percent=100)
    barrier.wait(60)
    wins = sum(outlier.on_result(host, cluster, Outcome.GATEWAY_ERROR, 1_000, policy, 1)
               for _ in range(n))
    results.put(wins)
    c.release()
    seg.close()


def _run(ctx, target, args_list, timeout=120):
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
            assert p.exitcode == 0, f"child exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture
def segment():
    seg = Segment.create(Layout(max_hosts=64, max_clusters=2, workers=2))
    yield seg
    seg.close()
    seg.unlink()


N_PROCS = 3


def test_cross_process_fetch_add_is_exact(segment, impl_name):
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock() if impl_name == "pure" else None
    barrier = ctx.Barrier(N_PROCS)
    off32 = segment.layout.host_off(5) + 8
    off64 = segment.layout.host_off(6)
    n = HAMMER_N if impl_name == "compiled" else HAMMER_N // 4
    _run(ctx, _hammer, [(segment.name, impl_name, lock, barrier, off32, off64, n)] * N_PROCS)
    assert segment.cells.load32(off32) == N_PROCS * n
    assert segment.cells.load64(off64) == 3 * N_PROCS * n


def test_cross_process_cas_exactly_one_winner(segment, impl_name):
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock() if impl_name == "pure" else None
    barrier = ctx.Barrier(N_PROCS)
    results = ctx.Queue()
    n_cells = 60
    base = segment.layout.host_off(0)
    _run(ctx, _cas_race, [(segment.name, impl_name, lock, barrier, me, base, n_cells, results)
                          for me in range(1, N_PROCS + 1)])
    won = dict(results.get(timeout=10) for _ in range(N_PROCS))
    owners = {}
    for me, cells_won in won.items():
        for k in cells_won:
            assert k not in owners, f"cell {k} won by {owners.get(k)} and {me}"
            owners[k] = me
    assert sorted(owners) == list(range(n_cells))  # every cell won exactly once
    for k, me in owners.items():
        assert segment.cells.load64(base + 64 * k) == me


def test_cross_process_ejection_happens_once(segment, impl_name):
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock() if impl_name == "pure" else None
    barrier = ctx.Barrier(N_PROCS)
    results = ctx.Queue()
    _run(ctx, _eject_race, [(segment.name, impl_name, lock, barrier, 200, results)] * N_PROCS)
    wins = [results.get(timeout=10) for _ in range(N_PROCS)]
    assert sum(wins) == 1
    cl = segment.cluster(0).snapshot()
    assert cl["ejections_active"] == 1
    assert cl["ejections_enforced_total"] == 1
    assert cl["ejections_detected_consecutive_gateway_failure"] == 1
    assert cl["ejections_overflow"] == 0
    h = segment.host(0)
    assert h.ejected_until_ms() == 1_000 + 30_000
    assert h.n_ejections() == 1
