"""PoolBook: every test runs against the pure twin and the compiled extension.

The compiled parameter fails (it does not skip) when meshcore._ext.pool is missing, unless the run
is explicitly pure (MESHCORE_NO_EXTENSIONS=1).
"""
import gc
import math
import os
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcore.upstream import pool as pool_mod
from meshcore.upstream.pool import PoolBookC, PoolBookPy

NO_EXT = bool(os.environ.get("MESHCORE_NO_EXTENSIONS"))


@pytest.fixture(params=["pure", "compiled"])
def Book(request):
    if request.param == "pure":
        return PoolBookPy
    if PoolBookC is None:
        if NO_EXT:
            pytest.skip("MESHCORE_NO_EXTENSIONS=1: pure-Python run")
        pytest.fail("meshcore._ext.pool is not built; run "
                    "`MESHCORE_EXT=pool python setup.py build_ext --inplace`")
    return PoolBookC


class Conn:
    """Stand-in for an upstream connection; weak-referenceable for leak checks."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Conn({self.name})"


def test_selection_prefers_compiled():
    if PoolBookC is None:
        assert pool_mod.PoolBook is PoolBookPy
    else:
        assert pool_mod.PoolBook is PoolBookC


def test_lifo_order(Book):
    b = Book(2)
    for k in range(3):
        b.on_open(0)
        assert b.put_idle(0, f"c{k}", float(k))
    assert b.idle_count(0) == 3
    assert [b.take_idle(0, 3.0, 100.0) for _ in range(4)] == ["c2", "c1", "c0", None]
    assert b.idle_count(0) == 0
    assert b.cx_active(0) == 3  # taken-out connections are still open
    assert b.pop_to_close() == []


def test_take_idle_empty_and_other_endpoint(Book):
    b = Book(3)
    assert b.take_idle(1, 0.0, 10.0) is None
    b.on_open(2)
    b.put_idle(2, "x", 0.0)
    assert b.take_idle(1, 0.0, 10.0) is None
    assert b.take_idle(2, 0.0, 10.0) == "x"


def test_idle_timeout_boundary(Book):
    b = Book(1)
    b.on_open(0)
    b.put_idle(0, "a", 10.0)
    # reusable while now - returned_at < idle_timeout; exactly idle_timeout is expired
    assert b.take_idle(0, 14.999, 5.0) == "a"
    b.put_idle(0, "a", 10.0)
    assert b.take_idle(0, 15.0, 5.0) is None
    assert b.pop_to_close() == ["a"]
    assert b.cx_active(0) == 0


def test_take_idle_skips_expired_and_queues_them(Book):
    b = Book(1)
    for k, t in enumerate([0.0, 1.0, 2.0, 9.0]):
        b.on_open(0)
        b.put_idle(0, f"c{k}", t)
    # at now=10 with timeout 5: c3 (idle 1 s) is fine
    assert b.take_idle(0, 10.0, 5.0) == "c3"
    assert b.pop_to_close() == []
    # next take meets c2, c1, c0: all expired -> None, all queued in pop order
    assert b.take_idle(0, 10.0, 5.0) is None
    assert b.statistics()["to_close"] == 3
    assert b.pop_to_close() == ["c2", "c1", "c0"]
    assert b.pop_to_close() == []
    assert b.idle_count(0) == 0
    assert b.cx_active(0) == 1  # c3 is out with the caller; the expired ones are un-counted


def test_take_idle_stops_at_first_fresh(Book):
    b = Book(1)
    for name, t in [("old", 0.0), ("fresh", 8.0), ("stale", 1.0)]:  # non-monotonic returns
        b.on_open(0)
        b.put_idle(0, name, t)
    assert b.take_idle(0, 10.0, 5.0) == "fresh"
    assert b.pop_to_close() == ["stale"]
    assert b.idle_count(0) == 1


def test_infinite_idle_timeout(Book):
    b = Book(1)
    b.on_open(0)
    b.put_idle(0, "a", 0.0)
    assert b.take_idle(0, 1e12, math.inf) == "a"


def test_max_idle(Book):
    b = Book(2, max_idle_per_endpoint=2)
    assert b.max_idle_per_endpoint == 2 and b.n_endpoints == 2
    for k in range(3):
        b.on_open(0)
    assert b.put_idle(0, "a", 0.0) is True
    assert b.put_idle(0, "b", 0.0) is True
    assert b.put_idle(0, "c", 0.0) is False  # refused: caller closes it and calls on_close
    assert b.idle_count(0) == 2
    assert b.cx_active(0) == 3  # refusing does not un-count
    b.on_close(0)
    assert b.cx_active(0) == 2
    assert b.put_idle(1, "d", 0.0) is True  # the cap is per endpoint
    assert b.take_idle(0, 0.0, 1.0) == "b"
    assert b.put_idle(0, "c", 0.0) is True


def test_max_idle_zero_disables_pooling(Book):
    b = Book(1, 0)
    assert b.put_idle(0, "a", 0.0) is False
    assert b.take_idle(0, 0.0, 1.0) is None


def test_default_max_idle(Book):
    b = Book(1)
    assert b.max_idle_per_endpoint == 64
    assert all(b.put_idle(0, k, 0.0) for k in range(64))
    assert b.put_idle(0, 64, 0.0) is False


def test_counts(Book):
    b = Book(3)
    b.on_open(1)
    b.on_open(1)
    b.on_open(2)
    assert [b.cx_active(i) for i in range(3)] == [0, 2, 1]
    b.on_close(1)
    assert [b.cx_active(i) for i in range(3)] == [0, 1, 1]
    b.rq_start(0)
    b.rq_start(0)
    b.rq_start(2)
    assert [b.rq_active(i) for i in range(3)] == [2, 0, 1]
    b.rq_end(0)
    assert [b.rq_active(i) for i in range(3)] == [1, 0, 1]
    assert b.statistics()["count_errors"] == 0


def test_counters_never_negative(Book):
    b = Book(1)
    b.on_close(0)
    b.rq_end(0)
    assert b.cx_active(0) == 0
    assert b.rq_active(0) == 0
    assert b.statistics()["count_errors"] == 2


def test_sweep(Book):
    b = Book(3)
    for ep, name, t in [(0, "a0", 0.0), (0, "a1", 6.0), (0, "a2", 1.0), (2, "c0", 2.0),
                        (2, "c1", 9.0)]:
        b.on_open(ep)
        b.put_idle(ep, name, t)
    out = b.sweep(10.0, 5.0)
    assert sorted(out) == ["a0", "a2", "c0"]
    assert [b.idle_count(i) for i in range(3)] == [1, 0, 1]
    assert [b.cx_active(i) for i in range(3)] == [1, 0, 1]
    assert b.sweep(10.0, 5.0) == []
    # survivors keep their order and stamps
    b.on_open(0)
    b.put_idle(0, "a3", 10.0)
    assert b.take_idle(0, 10.5, 5.0) == "a3"
    assert b.take_idle(0, 10.5, 5.0) == "a1"


def test_sweep_includes_queued(Book):
    b = Book(1)
    b.on_open(0)
    b.put_idle(0, "old", 0.0)
    assert b.take_idle(0, 100.0, 5.0) is None  # queued for close
    assert b.sweep(100.0, 5.0) == ["old"]
    assert b.pop_to_close() == []


def test_drain_all(Book):
    b = Book(3)
    for ep, name in [(0, "a"), (0, "b"), (2, "c")]:
        b.on_open(ep)
        b.put_idle(ep, name, 0.0)
    b.on_open(1)  # in use, not idle: not drained, still counted
    b.on_open(2)
    b.put_idle(2, "d", 0.0)
    assert b.take_idle(2, 100.0, 1.0) is None  # d and c expire -> queued
    b.on_open(0)
    b.put_idle(0, "e", 100.0)
    out = b.drain_all()
    assert sorted(out) == ["a", "b", "c", "d", "e"]
    assert b.statistics()["idle"] == 0
    assert b.statistics()["to_close"] == 0
    assert [b.cx_active(i) for i in range(3)] == [0, 1, 0]
    assert b.drain_all() == []
    assert b.statistics()["count_errors"] == 0


def test_remove_idle(Book):
    b = Book(2)
    x, y, z = object(), object(), object()
    for conn, when in [(x, 1.0), (y, 2.0), (z, 3.0)]:
        b.on_open(0)
        b.put_idle(0, conn, when)
    assert b.remove_idle(0, y) is True
    assert b.cx_active(0) == 2 and b.idle_count(0) == 2
    assert b.remove_idle(0, y) is False  # no longer pooled: nothing changes
    assert b.remove_idle(1, x) is False
    assert b.cx_active(0) == 2
    # the others keep their order and their returned_at stamps: z is fresh, x expired
    assert b.take_idle(0, 5.5, 3.0) is z
    assert b.take_idle(0, 5.5, 3.0) is None
    assert b.pop_to_close() == [x]
    assert b.statistics()["count_errors"] == 0


def test_statistics(Book):
    b = Book(2, 8)
    b.on_open(0)
    b.on_open(0)
    b.on_open(1)
    b.put_idle(0, "a", 0.0)
    b.rq_start(1)
    s = b.statistics()
    assert s == {
        "endpoints": 2,
        "max_idle_per_endpoint": 8,
        "cx_active": 3,
        "idle": 1,
        "rq_active": 1,
        "to_close": 0,
        "count_errors": 0,
        "cx_active_per_endpoint": [2, 1],
        "idle_per_endpoint": [1, 0],
        "rq_active_per_endpoint": [0, 1],
    }
    s["cx_active_per_endpoint"].append(99)  # a copy
    assert b.statistics()["cx_active_per_endpoint"] == [2, 1]
    assert "cx_active=3" in repr(b)


@pytest.mark.parametrize("ep", [-1, 2, 3, 10**6, 2**70, -(2**70)])
def test_index_error(Book, ep):
    b = Book(2)
    b.on_open(0)
    b.put_idle(0, "a", 0.0)
    calls = [
        lambda: b.take_idle(ep, 0.0, 1.0),
        lambda: b.put_idle(ep, "x", 0.0),
        lambda: b.on_open(ep),
        lambda: b.on_close(ep),
        lambda: b.cx_active(ep),
        lambda: b.idle_count(ep),
        lambda: b.rq_start(ep),
        lambda: b.rq_end(ep),
        lambda: b.rq_active(ep),
    ]
    for call in calls:
        with pytest.raises(IndexError):
            call()
    # nothing changed
    assert b.statistics()["cx_active_per_endpoint"] == [1, 0]
    assert b.statistics()["idle"] == 1
    assert b.statistics()["count_errors"] == 0


def test_zero_endpoints(Book):
    b = Book(0)
    with pytest.raises(IndexError):
        b.take_idle(0, 0.0, 1.0)
    assert b.sweep(0.0, 1.0) == []
    assert b.drain_all() == []
    assert b.statistics()["endpoints"] == 0


def test_bad_construction(Book):
    with pytest.raises(ValueError):
        Book(-1)
    with pytest.raises(ValueError):
        Book(1, -1)
    with pytest.raises(TypeError):
        Book(1.5)


def test_bad_index_type(Book):
    b = Book(2)
    with pytest.raises(TypeError):
        b.rq_start(0.5)
    with pytest.raises(TypeError):
        b.rq_start("0")


def test_book_does_not_leak_connections(Book):
    b = Book(2)
    conns = [Conn(k) for k in range(10)]
    refs = [weakref.ref(c) for c in conns]
    for c in conns:
        b.on_open(0)
        b.put_idle(0, c, 0.0)
    b.take_idle(0, 0.0, 1.0)
    b.take_idle(0, 100.0, 1.0)
    b.pop_to_close()
    del conns, c
    gc.collect()
    assert all(r() is None for r in refs)
    # a cycle through the book is collectable (the compiled stacks are GC-visible lists)
    b2 = Book(1)
    c = Conn("cyclic")
    c.book = b2
    b2.put_idle(0, c, 0.0)
    r = weakref.ref(c)
    del b2, c
    gc.collect()
    assert r() is None


# --- differential check: each implementation replays random operations like the pure twin --------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.integers(0, 2), st.integers(0, 30)),
        st.tuples(st.just("put"), st.integers(0, 2), st.integers(0, 30)),
        st.tuples(st.just("open"), st.integers(0, 2)),
        st.tuples(st.just("close"), st.integers(0, 2)),
        st.tuples(st.just("rq"), st.integers(0, 2)),
        st.tuples(st.just("rqend"), st.integers(0, 2)),
        st.tuples(st.just("pop"),),
        st.tuples(st.just("sweep"), st.integers(0, 30)),
        st.tuples(st.just("drain"),),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=ops)
def test_twins_agree(Book, operations):
    """`Book` replays random operation sequences exactly as the pure reference does."""
    books = [PoolBookPy(3, 3), Book(3, 3)]
    serial = 0
    timeout = 7.0
    results = [[] for _ in books]
    for op in operations:
        serial += 1
        for book, res in zip(books, results):
            kind = op[0]
            if kind == "take":
                res.append(book.take_idle(op[1], float(op[2]), timeout))
            elif kind == "put":
                res.append(book.put_idle(op[1], serial, float(op[2])))
            elif kind == "open":
                book.on_open(op[1])
            elif kind == "close":
                book.on_close(op[1])
            elif kind == "rq":
                book.rq_start(op[1])
            elif kind == "rqend":
                book.rq_end(op[1])
            elif kind == "pop":
                res.append(book.pop_to_close())
            elif kind == "sweep":
                res.append(sorted(book.sweep(float(op[1]), timeout)))
            else:
                res.append(sorted(book.drain_all()))
            res.append(book.statistics())
    for res in results[1:]:
        assert res == results[0]
