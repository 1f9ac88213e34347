# Compiled twin of the pure fallback in meshcore/shm/atomics.py: atomic operations on aligned
# uint32 / uint64 cells at a byte offset of a writable buffer (in practice a memoryview of
# multiprocessing.shared_memory.SharedMemory.buf, shared by the supervisor and every worker).
#
# Rules of this module:
# * Every operation is a GCC/Clang `__atomic_*` builtin with __ATOMIC_SEQ_CST ordering (loads,
#   stores, fetch-add and compare-and-swap alike). On x86-64 a seq_cst load is a plain MOV and every
#   read-modify-write is LOCK-prefixed anyway; only stores pay (XCHG instead of MOV).
#   The one exception is `Cells.incr64`: a relaxed load + relaxed store for cells that have a single
#   writer (a worker's own stats row). It is not atomic against a second writer, but readers never
#   see a torn value.
# * The 8-byte atomics must be lock-free, otherwise libatomic would use a per-process lock table and
#   nothing would be atomic across processes: checked at compile time (_Static_assert).
# * Every offset is bounds-checked (0 <= off and off + size <= len) -> IndexError, and the absolute
#   address must be a multiple of the cell size -> ValueError. A released Cells raises ValueError.
#   Values that do not fit the cell raise OverflowError, non-integers TypeError; deltas are int64
#   and wrap modulo 2^32 or 2^64. No input can make these functions touch memory outside the buffer.
# * `Cells(buf)` holds a PyBUF_WRITABLE export of `buf` until `release()` (or garbage collection),
#   so the memory cannot be unmapped under it: SharedMemory.close() raises BufferError while a
#   Cells is alive. Release the Cells first.
# * Module-level functions take the buffer on every call (get + release of a Py_buffer, ~100 ns);
#   the hot path uses a Cells method, which is one C call.
# * Nothing here takes a lock, so a process that dies mid-operation cannot leave anything held.
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE
from cpython.long cimport PyLong_Check
from cpython.number cimport PyNumber_Index
from libc.stdint cimport uint32_t, uint64_t, int64_t, uintptr_t

cdef extern from *:
    """
    #include <stdint.h>
    _Static_assert(__atomic_always_lock_free(sizeof(uint32_t), 0), "uint32 atomics not lock-free");
    _Static_assert(__atomic_always_lock_free(sizeof(uint64_t), 0), "uint64 atomics not lock-free");

    static inline uint32_t mc_load32(char *p) {
        return __atomic_load_n((uint32_t *)p, __ATOMIC_SEQ_CST);
    }
    static inline void mc_store32(char *p, uint32_t v) {
        __atomic_store_n((uint32_t *)p, v, __ATOMIC_SEQ_CST);
    }
    static inline uint32_t mc_fetch_add32(char *p, uint32_t d) {
        return __atomic_fetch_add((uint32_t *)p, d, __ATOMIC_SEQ_CST);
    }
    static inline int mc_cas32(char *p, uint32_t expected, uint32_t desired) {
        return __atomic_compare_exchange_n((uint32_t *)p, &expected, desired, 0,
                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    static inline uint64_t mc_load64(char *p) {
        return __atomic_load_n((uint64_t *)p, __ATOMIC_SEQ_CST);
    }
    static inline void mc_store64(char *p, uint64_t v) {
        __atomic_store_n((uint64_t *)p, v, __ATOMIC_SEQ_CST);
    }
    static inline uint64_t mc_fetch_add64(char *p, uint64_t d) {
        return __atomic_fetch_add((uint64_t *)p, d, __ATOMIC_SEQ_CST);
    }
    static inline int mc_cas64(char *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n((uint64_t *)p, &expected, desired, 0,
                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    static inline uint64_t mc_incr64(char *p, uint64_t d) {
        uint64_t v = __atomic_load_n((uint64_t *)p, __ATOMIC_RELAXED) + d;
        __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED);
        return v;
    }
    """
    uint32_t mc_load32(char *p)
    void mc_store32(char *p, uint32_t v)
    uint32_t mc_fetch_add32(char *p, uint32_t d)
    bint mc_cas32(char *p, uint32_t expected, uint32_t desired)
    uint64_t mc_load64(char *p)
    void mc_store64(char *p, uint64_t v)
    uint64_t mc_fetch_add64(char *p, uint64_t d)
    bint mc_cas64(char *p, uint64_t expected, uint64_t desired)
    uint64_t mc_incr64(char *p, uint64_t d)

MEMORY_ORDER = "seq_cst"
CROSS_PROCESS_ATOMIC = True


# Cython's own conversion to a C integer accepts floats (truncating through __int__); values and
# deltas go through __index__ first so 1.5 raises TypeError exactly as in the pure twin.
cdef inline uint32_t _u32(object v) except? 0xFFFFFFFF:
    return <uint32_t>(v if PyLong_Check(v) else PyNumber_Index(v))


cdef inline uint64_t _u64(object v) except? 0xFFFFFFFFFFFFFFFF:
    return <uint64_t>(v if PyLong_Check(v) else PyNumber_Index(v))


cdef inline int64_t _i64(object v) except? -1:
    return <int64_t>(v if PyLong_Check(v) else PyNumber_Index(v))


cdef object _bad(char *base, Py_ssize_t length, Py_ssize_t off, Py_ssize_t size, bint released):
    """Build the exception for an operation that failed the bounds or alignment check."""
    if released:
        return ValueError("operation on a released Cells")
    if off < 0 or off > length - size:
        return IndexError(f"offset {off} out of range for a {size}-byte cell in a buffer of "
                          f"{length} bytes")
    return ValueError(f"offset {off} is not {size}-byte aligned (address "
                      f"0x{<uintptr_t>(base + off):x})")


cdef inline char *_cell(char *base, Py_ssize_t length, Py_ssize_t off, Py_ssize_t size,
                        bint released) except NULL:
    if off < 0 or off > length - size or ((<uintptr_t>(base + off)) & <uintptr_t>(size - 1)):
        raise _bad(base, length, off, size, released)
    return base + off


cdef class Cells:
    """Atomic uint32/uint64 cells over a writable buffer (one C call per operation).

    Cells(buf): `buf` is any writable, C-contiguous buffer (a SharedMemory's `buf`, a bytearray).
    Offsets are in bytes. fetch_add* returns the value before the addition; cas* returns True when
    the cell held `expected` and now holds `desired`.
    """

    cdef Py_buffer _view
    cdef char *_base
    cdef Py_ssize_t _len
    cdef bint _held

    def __cinit__(self, buf):
        PyObject_GetBuffer(buf, &self._view, PyBUF_WRITABLE)
        self._held = True
        self._base = <char *>self._view.buf
        self._len = self._view.len

    def __dealloc__(self):
        if self._held:
            self._held = False
            PyBuffer_Release(&self._view)

    def release(self):
        """Drop the buffer export; every later operation raises ValueError. Idempotent."""
        if self._held:
            self._held = False
            self._base = NULL
            self._len = 0
            PyBuffer_Release(&self._view)

    @property
    def released(self):
        return not self._held

    @property
    def nbytes(self):
        return self._len

    def __len__(self):
        return self._len

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def __repr__(self):
        if not self._held:
            return "<Cells released>"
        return f"<Cells {self._len} bytes at 0x{<uintptr_t>self._base:x}>"

    # --- 32-bit -----------------------------------------------------------------------------
    # The cell pointer is computed (bounds/alignment checked) before the value is converted, as in
    # the pure twin, so both raise the same exception for the same bad call.
    def load32(self, Py_ssize_t off):
        return mc_load32(_cell(self._base, self._len, off, 4, not self._held))

    def store32(self, Py_ssize_t off, value):
        cdef char *p = _cell(self._base, self._len, off, 4, not self._held)
        mc_store32(p, _u32(value))

    def fetch_add32(self, Py_ssize_t off, delta):
        cdef char *p = _cell(self._base, self._len, off, 4, not self._held)
        return mc_fetch_add32(p, <uint32_t>_i64(delta))

    def cas32(self, Py_ssize_t off, expected, desired):
        cdef char *p = _cell(self._base, self._len, off, 4, not self._held)
        cdef uint32_t e = _u32(expected)
        return mc_cas32(p, e, _u32(desired))

    # --- 64-bit -----------------------------------------------------------------------------
    def load64(self, Py_ssize_t off):
        return mc_load64(_cell(self._base, self._len, off, 8, not self._held))

    def store64(self, Py_ssize_t off, value):
        cdef char *p = _cell(self._base, self._len, off, 8, not self._held)
        mc_store64(p, _u64(value))

    def fetch_add64(self, Py_ssize_t off, delta):
        cdef char *p = _cell(self._base, self._len, off, 8, not self._held)
        return mc_fetch_add64(p, <uint64_t>_i64(delta))

    def cas64(self, Py_ssize_t off, expected, desired):
        cdef char *p = _cell(self._base, self._len, off, 8, not self._held)
        cdef uint64_t e = _u64(expected)
        return mc_cas64(p, e, _u64(desired))

    def incr64(self, Py_ssize_t off, delta=1):
        """Single-writer add (relaxed load + relaxed store); returns the new value.

        Only for cells with exactly one writing process (a worker's own stats row): two concurrent
        writers can lose updates. Readers never see a torn value.
        """
        cdef char *p = _cell(self._base, self._len, off, 8, not self._held)
        return mc_incr64(p, <uint64_t>_i64(delta))


# --- module-level functions: take the buffer per call (convenient, slower than Cells) ------------

cdef inline char *_get(object buf, Py_buffer *view, Py_ssize_t off, Py_ssize_t size) except NULL:
    cdef char *base
    PyObject_GetBuffer(buf, view, PyBUF_WRITABLE)
    base = <char *>view.buf
    if off < 0 or off > view.len - size or ((<uintptr_t>(base + off)) & <uintptr_t>(size - 1)):
        err = _bad(base, view.len, off, size, False)
        PyBuffer_Release(view)
        raise err
    return base + off


# Values are converted BEFORE the buffer is taken, so a bad value never leaks an export.

def load32(buf, Py_ssize_t off):
    cdef Py_buffer view
    cdef uint32_t v = mc_load32(_get(buf, &view, off, 4))
    PyBuffer_Release(&view)
    return v


def store32(buf, Py_ssize_t off, value):
    cdef Py_buffer view
    cdef uint32_t v = _u32(value)
    mc_store32(_get(buf, &view, off, 4), v)
    PyBuffer_Release(&view)


def fetch_add32(buf, Py_ssize_t off, delta):
    cdef Py_buffer view
    cdef uint32_t d = <uint32_t>_i64(delta)
    cdef uint32_t v = mc_fetch_add32(_get(buf, &view, off, 4), d)
    PyBuffer_Release(&view)
    return v


def cas32(buf, Py_ssize_t off, expected, desired):
    cdef Py_buffer view
    cdef uint32_t e = _u32(expected)
    cdef uint32_t d = _u32(desired)
    cdef bint ok = mc_cas32(_get(buf, &view, off, 4), e, d)
    PyBuffer_Release(&view)
    return ok


def load64(buf, Py_ssize_t off):
    cdef Py_buffer view
    cdef uint64_t v = mc_load64(_get(buf, &view, off, 8))
    PyBuffer_Release(&view)
    return v


def store64(buf, Py_ssize_t off, value):
    cdef Py_buffer view
    cdef uint64_t v = _u64(value)
    mc_store64(_get(buf, &view, off, 8), v)
    PyBuffer_Release(&view)


def fetch_add64(buf, Py_ssize_t off, delta):
    cdef Py_buffer view
    cdef uint64_t d = <uint64_t>_i64(delta)
    cdef uint64_t v = mc_fetch_add64(_get(buf, &view, off, 8), d)
    PyBuffer_Release(&view)
    return v


def cas64(buf, Py_ssize_t off, expected, desired):
    cdef Py_buffer view
    cdef uint64_t e = _u64(expected)
    cdef uint64_t d = _u64(desired)
    cdef bint ok = mc_cas64(_get(buf, &view, off, 8), e, d)
    PyBuffer_Release(&view)
    return ok
