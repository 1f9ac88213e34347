"""The loop's Istio metrics writer (ext/loop.pyx) against its reference,
meshcore.metrics.istio.record: the same records leave the same bytes in the worker's block,
overflow row and adoption by a restarted worker included."""
from __future__ import annotations

import random

import pytest

from meshcore._ext.loop import Loop
from meshcore.metrics.istio import IstioWriter, collect
from meshcore.shm.layout import Layout
from meshcore.shm.segment import Segment


@pytest.fixture
def pair():
    layout = Layout(max_hosts=4, max_clusters=2, workers=2, istio_rows=16)
    segs = [Segment.create(layout), Segment.create(layout)]
    yield segs
    for s in segs:
        s.close()
        s.unlink()


def block(seg, worker=0):
    off = seg.layout.istio_off(worker)
    return bytes(seg.buf[off:off + seg.layout.istio_block])


def records(seed, n):
    rng = random.Random(seed)
    for _ in range(n):
        yield (rng.choice([0, 1, 2, 3, 7, 4194303]), rng.choice([0, 200, 404, 503, 999, 1000, -5]),
               rng.choice([0, 1, 1 << 7, (1 << 32) - 1]), rng.choice([-3, 0, 1, 4, 30, 10 ** 7]),
               rng.choice([0, 1, 600, 10 ** 9]), rng.choice([0, 2, 5000]))


def test_same_cells_as_the_reference(pair):
    c_seg, py_seg = pair
    loop = Loop(None, log_mode=0)
    loop.attach_shm(c_seg.buf)
    loop.setup_metrics(c_seg.layout.istio_off(0), c_seg.layout.istio_rows)
    ref = IstioWriter(py_seg.cells, py_seg.layout, 0)
    for rec in records(1, 3000):  # more label sets than rows: the overflow row fills too
        loop.record_istio(*rec)
        ref.record(*rec)
    assert block(c_seg) == block(py_seg)
    series, overflow, _, _ = collect(c_seg.cells, c_seg.layout)
    assert overflow > 0 and sum(s.requests for s in series.values()) == 3000
    loop.close()


def test_a_restarted_worker_adopts_its_rows(pair):
    c_seg, py_seg = pair
    ref = IstioWriter(py_seg.cells, py_seg.layout, 0)
    first = list(records(2, 40))
    for rec in first:
        ref.record(*rec)
    c_seg.buf[:] = py_seg.buf  # the block as the previous process of this worker left it
    loop = Loop(None, log_mode=0)
    loop.attach_shm(c_seg.buf)
    loop.setup_metrics(c_seg.layout.istio_off(0), c_seg.layout.istio_rows)
    for rec in records(3, 200):
        loop.record_istio(*rec)
        ref.record(*rec)
    assert block(c_seg) == block(py_seg)
    loop.close()
