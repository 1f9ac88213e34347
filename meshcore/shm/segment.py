"""The shared-memory segment: create (supervisor), attach (worker), close, unlink (T2).

Rules of this module:

* The supervisor calls `Segment.create(layout)` once: a new POSIX shared-memory object, zeroed,
  header written last (magic included), registered with multiprocessing's resource tracker so it
  is unlinked if the supervisor dies without calling `unlink()`.
* A worker calls `Segment.attach(name)`: maps the object, validates the header (LayoutError on a
  foreign or incompatible segment) and never registers it with a resource tracker (Python < 3.13
  would otherwise unlink the segment when the worker's own tracker exits). On Linux the object
  is opened as /dev/shm/<name>; elsewhere SharedMemory(track=False) (3.13+) is used.
* Row accessors return small views (meshcore.shm.layout) over one `Cells` object:
  `host(slot)`, `cluster(slot)`, `worker_stats(worker, cluster_slot)`. Create them once per
  snapshot and keep them; they are cheap but not free.
* Only atomics, never a lock: a worker killed at any instruction leaves nothing held.
* `close()` releases the Cells (every view then raises ValueError) and unmaps the memory; the
  segment survives until the supervisor calls `unlink()`. Every process that maps it must use the
  same clock for `now_ms` (time.monotonic(), i.e. CLOCK_MONOTONIC, which is system-wide on Linux).
"""
from __future__ import annotations

import mmap
import os
import sys
from multiprocessing import shared_memory

from meshcore.shm.atomics import Cells
from meshcore.shm.layout import (
    HDR_GENERATION,
    HEADER_SIZE,
    ClusterRow,
    HostRow,
    Layout,
    LayoutError,
    WorkerStatsRow,
)

__all__ = ["Segment", "LayoutError"]


class Segment:
    """A mapped meshcore segment. Use `create` or `attach`, not the constructor."""

    __slots__ = ("name", "layout", "cells", "_shm", "_mmap", "_buf", "_owner")

    def __init__(self, name, layout, buf, shm=None, mm=None, owner=False):
        self.name = name
        self.layout = layout
        self._buf = buf
        self._shm = shm
        self._mmap = mm
        self._owner = owner
        self.cells = Cells(buf)

    # --- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def create(cls, layout: Layout, name: str | None = None, generation: int = 0) -> Segment:
        """Create and initialise a new segment (supervisor). `name=None` picks a random one."""
        shm = shared_memory.SharedMemory(name=name, create=True, size=layout.size)
        try:
            buf = shm.buf
            buf[:layout.size] = bytes(layout.size)  # fresh objects are zero-filled; be explicit
            header = layout.pack_header(generation)
            buf[8:HEADER_SIZE] = header[8:]
            buf[0:8] = header[0:8]  # magic last: an attacher never sees a half-written header
            return cls(shm.name, layout, buf, shm=shm, owner=True)
        except BaseException:
            shm.close()
            shm.unlink()
            raise

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map an existing segment by name (worker). Raises FileNotFoundError or LayoutError."""
        if sys.platform.startswith("linux"):
            fd = os.open(os.path.join("/dev/shm", name.lstrip("/")), os.O_RDWR)
            try:
                mm = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            buf = memoryview(mm)
            try:
                layout, _ = Layout.from_header(buf)
                if len(buf) < layout.size:
                    raise LayoutError(f"segment {name!r} is {len(buf)} bytes, header says "
                                      f"{layout.size}")
                return cls(name, layout, buf, mm=mm)
            except BaseException:
                buf.release()
                mm.close()
                raise
        shm = shared_memory.SharedMemory(name=name, track=False)  # Python 3.13+
        try:
            layout, _ = Layout.from_header(shm.buf)
            return cls(shm.name, layout, shm.buf, shm=shm)
        except BaseException:
            shm.close()
            raise

    def close(self) -> None:
        """Release the cells and unmap. Idempotent. Views made from this segment stop working."""
        if self.cells is not None:
            self.cells.release()
        if self._mmap is not None:
            self._buf.release()
            self._mmap.close()
            self._mmap = None
        elif self._shm is not None:
            self._shm.close()
        self._buf = None

    def unlink(self) -> None:
        """Remove the name (supervisor, once, at shutdown); mappings stay valid until closed."""
        if self._shm is not None and self._owner:
            self._shm.unlink()
        else:
            try:
                shared_memory.SharedMemory(name=self.name, track=False).unlink()  # 3.13+
            except TypeError:
                os.unlink(os.path.join("/dev/shm", self.name.lstrip("/")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        state = "closed" if self._buf is None else f"{self.layout.size} bytes"
        return f"<Segment {self.name!r} {state}>"

    @property
    def buf(self) -> memoryview:
        """The mapped bytes (for tools and tests; the hot path goes through `cells`)."""
        if self._buf is None:
            raise ValueError("segment is closed")
        return self._buf

    # --- header ---------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self.cells.load64(HDR_GENERATION)

    @generation.setter
    def generation(self, value: int) -> None:
        self.cells.store64(HDR_GENERATION, value)

    # --- rows -----------------------------------------------------------------------------------
    def host(self, slot: int) -> HostRow:
        return HostRow(self.cells, self.layout.host_off(slot), slot)

    def cluster(self, slot: int) -> ClusterRow:
        return ClusterRow(self.cells, self.layout.cluster_off(slot), slot)

    def worker_stats(self, worker: int, cluster_slot: int) -> WorkerStatsRow:
        return WorkerStatsRow(self.cells, self.layout.worker_row_off(worker, cluster_slot))

    def holdings(self, worker: int, cluster_slot: int) -> ClusterRow:
        """`worker`'s breaker holdings for a cluster: its gauges at the cluster row's offsets."""
        return ClusterRow(self.cells, self.layout.holdings_off(worker, cluster_slot), cluster_slot)
