"""Atomic uint32/uint64 cells in a shared buffer: the compiled module, else a pure fallback.

Rules of this module:

* API (identical in both implementations; `meshcore/_ext/shmatomic.pyi` is the stub):
  - `Cells(buf)`: holds a writable export of `buf` (a SharedMemory's `buf`, a bytearray);
    methods `load32/store32/fetch_add32/cas32`, `load64/store64/fetch_add64/cas64`, `incr64`,
    `release()`, `released`, `nbytes`, context manager. Offsets are in bytes.
  - module functions `load32(buf, off)`, `store32(buf, off, v)`, `fetch_add32(buf, off, delta)`,
    `cas32(buf, off, expected, desired)` and the same four for 64 bits.
  - `fetch_add*` returns the value before the addition; deltas are int64 and wrap modulo the cell
    width; `cas*` returns True when it swapped; `incr64` (single-writer add) returns the new value.
  - Errors: IndexError (offset out of range), ValueError (misaligned offset, released Cells),
    OverflowError (value does not fit the cell, delta outside int64), TypeError (not an int),
    BufferError/TypeError (buffer read-only or not a buffer). Never a crash.
* Compiled (`meshcore._ext.shmatomic`): GCC `__atomic_*` builtins, seq_cst for every operation,
  lock-free (checked at compile time), atomic across processes that map the same memory.
  `MEMORY_ORDER == "seq_cst"`, `CROSS_PROCESS_ATOMIC is True`.
* Pure fallback (`CellsPy` and the `*_py` functions): plain reads and writes through typed
  memoryviews, each operation under a lock. By default that lock is one `threading.Lock` for the
  whole process, so the fallback is atomic between threads of ONE process and NOT atomic across
  processes: concurrent `fetch_add` from two workers can lose an update and two concurrent `cas`
  can both succeed. `CellsPy(buf, lock=multiprocessing_lock)` makes it atomic across processes,
  but a process killed while holding that lock blocks every other one forever, so the segment
  never uses that mode (tests do). `CROSS_PROCESS_ATOMIC` is False for the fallback.
  Alignment: the compiled module checks the absolute address, the fallback the offset relative to
  the start of the buffer; they agree on page-aligned buffers such as shared memory.
* `PURE` and `COMPILED` (None when not built or MESHCORE_NO_EXTENSIONS=1) are namespaces with the
  whole API, for tests and benchmarks; the module-level names are bound to the compiled one when
  available.
"""
from __future__ import annotations

import operator
import struct
import threading
import types

from meshcore import _accel

__all__ = [
    "Cells", "CellsPy", "CellsC", "PURE", "COMPILED", "HAS_COMPILED", "MEMORY_ORDER",
    "CROSS_PROCESS_ATOMIC",
    "load32", "store32", "fetch_add32", "cas32", "load64", "store64", "fetch_add64", "cas64",
]

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_F32 = "I" if struct.calcsize("I") == 4 else "L"
_F64 = "Q"
assert struct.calcsize(_F32) == 4 and struct.calcsize(_F64) == 8

_PROCESS_LOCK = threading.Lock()


def _u(value, mask: int, width: int) -> int:
    v = operator.index(value)
    if v < 0:
        raise OverflowError(f"can't convert negative value to uint{width}_t")
    if v > mask:
        raise OverflowError(f"value too large to convert to uint{width}_t")
    return v


def _delta(delta) -> int:
    d = operator.index(delta)
    if d < _I64_MIN or d > _I64_MAX:
        raise OverflowError("delta does not fit int64_t")
    return d


class CellsPy:
    """Pure-Python `Cells`: typed memoryviews under a lock (see the module rules for atomicity)."""

    __slots__ = ("_mv", "_u32", "_u64", "_len", "_lock")

    def __init__(self, buf, lock=None):
        mv = memoryview(buf)
        if mv.readonly:
            mv.release()
            raise BufferError("Cells needs a writable buffer")
        if not mv.c_contiguous:
            mv.release()
            raise BufferError("Cells needs a C-contiguous buffer")
        mv = mv.cast("B")
        n = mv.nbytes
        self._mv = mv
        self._len = n
        self._u32 = mv[: n - n % 4].cast(_F32)
        self._u64 = mv[: n - n % 8].cast(_F64)
        self._lock = _PROCESS_LOCK if lock is None else lock

    # --- lifecycle ------------------------------------------------------------------------------
    def release(self) -> None:
        if self._mv is None:
            return
        self._u32.release()
        self._u64.release()
        self._mv.release()
        self._mv = self._u32 = self._u64 = None
        self._len = 0

    @property
    def released(self) -> bool:
        return self._mv is None

    @property
    def nbytes(self) -> int:
        return self._len

    def __len__(self) -> int:
        return self._len

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def __repr__(self):
        return "<CellsPy released>" if self._mv is None else f"<CellsPy {self._len} bytes>"

    def _i(self, off, size: int) -> int:
        off = operator.index(off)
        if self._mv is None:
            raise ValueError("operation on a released Cells")
        if off < 0 or off > self._len - size:
            raise IndexError(f"offset {off} out of range for a {size}-byte cell in a buffer of "
                             f"{self._len} bytes")
        if off % size:
            raise ValueError(f"offset {off} is not {size}-byte aligned")
        return off // size

    # --- 32-bit -------------------------------------------------------------------------------
    def load32(self, off) -> int:
        i = self._i(off, 4)
        with self._lock:
            return self._u32[i]

    def store32(self, off, value) -> None:
        i = self._i(off, 4)
        v = _u(value, _M32, 32)
        with self._lock:
            self._u32[i] = v

    def fetch_add32(self, off, delta) -> int:
        i = self._i(off, 4)
        d = _delta(delta)
        a = self._u32
        with self._lock:
            old = a[i]
            a[i] = (old + d) & _M32
        return old

    def cas32(self, off, expected, desired) -> bool:
        i = self._i(off, 4)
        e = _u(expected, _M32, 32)
        d = _u(desired, _M32, 32)
        a = self._u32
        with self._lock:
            if a[i] != e:
                return False
            a[i] = d
            return True

    # --- 64-bit -------------------------------------------------------------------------------
    def load64(self, off) -> int:
        i = self._i(off, 8)
        with self._lock:
            return self._u64[i]

    def store64(self, off, value) -> None:
        i = self._i(off, 8)
        v = _u(value, _M64, 64)
        with self._lock:
            self._u64[i] = v

    def fetch_add64(self, off, delta) -> int:
        i = self._i(off, 8)
        d = _delta(delta)
        a = self._u64
        with self._lock:
            old = a[i]
            a[i] = (old + d) & _M64
        return old

    def cas64(self, off, expected, desired) -> bool:
        i = self._i(off, 8)
        e = _u(expected, _M64, 64)
        d = _u(desired, _M64, 64)
        a = self._u64
        with self._lock:
            if a[i] != e:
                return False
            a[i] = d
            return True

    def incr64(self, off, delta=1) -> int:
        """Single-writer add; returns the new value (see the compiled twin)."""
        i = self._i(off, 8)
        d = _delta(delta)
        a = self._u64
        with self._lock:
            v = (a[i] + d) & _M64
            a[i] = v
        return v


def _py_fn(name):
    def fn(buf, off, *args):
        c = CellsPy(buf)
        try:
            return getattr(c, name)(off, *args)
        finally:
            c.release()
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"Pure `{name}` on `buf` (takes the buffer per call)."
    return fn


_OPS = ("load32", "store32", "fetch_add32", "cas32", "load64", "store64", "fetch_add64", "cas64")

PURE = types.SimpleNamespace(
    Cells=CellsPy, MEMORY_ORDER="locked (process-local)", CROSS_PROCESS_ATOMIC=False,
    **{name: _py_fn(name) for name in _OPS},
)

_ext = _accel.load("shmatomic")
COMPILED = _ext
HAS_COMPILED = _ext is not None
CellsC = _ext.Cells if _ext is not None else None

_impl = _ext if _ext is not None else PURE
Cells = _impl.Cells
MEMORY_ORDER: str = _impl.MEMORY_ORDER
CROSS_PROCESS_ATOMIC: bool = _impl.CROSS_PROCESS_ATOMIC
load32 = _impl.load32
store32 = _impl.store32
fetch_add32 = _impl.fetch_add32
cas32 = _impl.cas32
load64 = _impl.load64
store64 = _impl.store64
fetch_add64 = _impl.fetch_add64
cas64 = _impl.cas64
