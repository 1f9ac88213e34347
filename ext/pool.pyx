# Compiled twin of meshcore/upstream/pool.py (PoolBookPy): per-cluster, per-worker connection pool
# bookkeeping. Same API, same rules (read the module docstring there); this file only changes the
# representation:
#   * counters are C arrays of Py_ssize_t indexed by endpoint;
#   * each endpoint's idle stack is a Python list (append/pop at the end; the list keeps the
#     references, so the cyclic GC sees them) plus a parallel, lazily grown C array of doubles with
#     each connection's returned_at time.
# Out-of-range endpoint indexes raise IndexError before anything changes.
cimport cython
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.number cimport PyNumber_AsSsize_t
from cpython.list cimport PyList_GET_SIZE
from libc.string cimport memset

cdef enum:
    _MIN_STAMP_CAP = 4


@cython.final
cdef class PoolBook:
    """Per-cluster pool bookkeeping with C counters and per-endpoint idle stacks."""

    # The layout and the C-callable methods are declared in ext/meshcore/_ext/pool.pxd, so the
    # event loop (ext/loop.pyx) uses this very book for its upstream pools.

    def __cinit__(self, Py_ssize_t n_endpoints, Py_ssize_t max_idle_per_endpoint=64):
        cdef Py_ssize_t k, size
        if n_endpoints < 0:
            raise ValueError(f"n_endpoints must be >= 0, got {n_endpoints}")
        if max_idle_per_endpoint < 0:
            raise ValueError(f"max_idle_per_endpoint must be >= 0, got {max_idle_per_endpoint}")
        self._max_idle = max_idle_per_endpoint
        self._count_errors = 0
        self._to_close = []
        self._conns = [[] for k in range(n_endpoints)]
        size = n_endpoints if n_endpoints > 0 else 1
        self._stamps = <double **>PyMem_Malloc(size * sizeof(double *))
        self._stamp_cap = <Py_ssize_t *>PyMem_Malloc(size * sizeof(Py_ssize_t))
        self._cx = <Py_ssize_t *>PyMem_Malloc(size * sizeof(Py_ssize_t))
        self._rq = <Py_ssize_t *>PyMem_Malloc(size * sizeof(Py_ssize_t))
        if (self._stamps == NULL or self._stamp_cap == NULL or self._cx == NULL
                or self._rq == NULL):
            raise MemoryError()
        memset(self._stamps, 0, size * sizeof(double *))
        memset(self._stamp_cap, 0, size * sizeof(Py_ssize_t))
        memset(self._cx, 0, size * sizeof(Py_ssize_t))
        memset(self._rq, 0, size * sizeof(Py_ssize_t))
        self._n = n_endpoints  # only now: __dealloc__ walks _stamps[0:_n]

    def __dealloc__(self):
        cdef Py_ssize_t k
        if self._stamps != NULL:
            for k in range(self._n):
                PyMem_Free(self._stamps[k])
            PyMem_Free(self._stamps)
            self._stamps = NULL
        PyMem_Free(self._stamp_cap)
        PyMem_Free(self._cx)
        PyMem_Free(self._rq)
        self._stamp_cap = NULL
        self._cx = NULL
        self._rq = NULL

    @property
    def n_endpoints(self):
        return self._n

    @property
    def max_idle_per_endpoint(self):
        return self._max_idle

    cdef Py_ssize_t _index(self, object ep) except -1:
        cdef Py_ssize_t i = PyNumber_AsSsize_t(ep, IndexError)
        if i < 0 or i >= self._n:
            raise IndexError(
                f"endpoint index {ep!r} out of range for a pool of {self._n} endpoints")
        return i

    cdef void _dec_cx(self, Py_ssize_t i) noexcept:
        if self._cx[i] > 0:
            self._cx[i] -= 1
        else:
            self._count_errors += 1

    cdef int _grow(self, Py_ssize_t i) except -1:
        cdef Py_ssize_t cap = self._stamp_cap[i] * 2
        cdef double *p
        if cap < _MIN_STAMP_CAP:
            cap = _MIN_STAMP_CAP
        if cap > self._max_idle:
            cap = self._max_idle
        p = <double *>PyMem_Realloc(self._stamps[i], cap * sizeof(double))
        if p == NULL:
            raise MemoryError()
        self._stamps[i] = p
        self._stamp_cap[i] = cap
        return 0

    # --- idle connections ---------------------------------------------------------------------

    cpdef object take_idle(self, object ep, double now, double idle_timeout):
        """Pop the warmest reusable idle connection of `ep`, or None (expired ones are queued for
        pop_to_close() and un-counted from cx_active)."""
        cdef Py_ssize_t i = self._index(ep)
        cdef list conns = self._conns[i]
        cdef Py_ssize_t k = PyList_GET_SIZE(conns)
        cdef double *st = self._stamps[i]
        while k > 0:
            k -= 1
            conn = conns.pop()
            if now - st[k] < idle_timeout:
                return conn
            self._to_close.append(conn)
            self._dec_cx(i)
        return None

    cpdef bint put_idle(self, object ep, object conn, double now) except -1:
        """Return a reusable connection; False (book unchanged) when `ep` already holds the maximum
        number of idle connections: the caller closes it and calls on_close(ep)."""
        cdef Py_ssize_t i = self._index(ep)
        cdef list conns = self._conns[i]
        cdef Py_ssize_t k = PyList_GET_SIZE(conns)
        if k >= self._max_idle:
            return False
        if k >= self._stamp_cap[i]:
            self._grow(i)
        conns.append(conn)
        self._stamps[i][k] = now
        return True

    cpdef list pop_to_close(self):
        """Connections queued for closing by take_idle (already un-counted); clears the queue."""
        cdef list out = self._to_close
        if PyList_GET_SIZE(out) == 0:
            return []
        self._to_close = []
        return out

    cpdef list sweep(self, double now, double idle_timeout):
        """Remove and return every expired idle connection plus any still queued by take_idle
        (all already un-counted from cx_active)."""
        cdef list out = self._to_close
        cdef list conns
        cdef Py_ssize_t i, j, keep, size
        cdef double *st
        self._to_close = []
        for i in range(self._n):
            conns = self._conns[i]
            size = PyList_GET_SIZE(conns)
            if size == 0:
                continue
            st = self._stamps[i]
            keep = 0
            for j in range(size):
                if now - st[j] < idle_timeout:
                    if keep != j:
                        conns[keep] = conns[j]
                        st[keep] = st[j]
                    keep += 1
                else:
                    out.append(conns[j])
                    self._dec_cx(i)
            if keep != size:
                del conns[keep:]
        return out

    cpdef list drain_all(self):
        """Remove and return every connection the book holds (idle and queued for closing), all
        already un-counted from cx_active."""
        cdef list out = self._to_close
        cdef list conns
        cdef Py_ssize_t i, size
        self._to_close = []
        for i in range(self._n):
            conns = self._conns[i]
            size = PyList_GET_SIZE(conns)
            if size == 0:
                continue
            out.extend(conns)
            del conns[:]
            if self._cx[i] >= size:
                self._cx[i] -= size
            else:
                self._count_errors += size - self._cx[i]
                self._cx[i] = 0
        return out

    cpdef bint remove_idle(self, object ep, object conn) except -1:
        """Take one specific idle connection out of `ep`'s stack (it turned unusable while
        pooled); un-counted from cx_active. False (book unchanged) when it is not pooled."""
        cdef Py_ssize_t i = self._index(ep)
        cdef list conns = self._conns[i]
        cdef Py_ssize_t k = PyList_GET_SIZE(conns)
        cdef double *st = self._stamps[i]
        cdef Py_ssize_t j
        while k > 0:
            k -= 1
            if conns[k] is conn:
                del conns[k]
                for j in range(k, PyList_GET_SIZE(conns)):
                    st[j] = st[j + 1]
                self._dec_cx(i)
                return True
        return False

    # --- counters -------------------------------------------------------------------------------

    cpdef on_open(self, object ep):
        self._cx[self._index(ep)] += 1

    cpdef on_close(self, object ep):
        self._dec_cx(self._index(ep))

    cpdef Py_ssize_t cx_active(self, object ep) except -1:
        return self._cx[self._index(ep)]

    cpdef Py_ssize_t idle_count(self, object ep) except -1:
        return PyList_GET_SIZE(self._conns[self._index(ep)])

    cpdef rq_start(self, object ep):
        self._rq[self._index(ep)] += 1

    cpdef rq_end(self, object ep):
        cdef Py_ssize_t i = self._index(ep)
        if self._rq[i] > 0:
            self._rq[i] -= 1
        else:
            self._count_errors += 1

    cpdef Py_ssize_t rq_active(self, object ep) except -1:
        return self._rq[self._index(ep)]

    cpdef dict statistics(self):
        """Totals and per-endpoint lists (fresh objects; mutating them does not affect the book)."""
        cdef Py_ssize_t i, cx = 0, idle = 0, rq = 0
        cdef list cx_l = [], idle_l = [], rq_l = []
        cdef Py_ssize_t k
        for i in range(self._n):
            k = PyList_GET_SIZE(self._conns[i])
            cx += self._cx[i]
            idle += k
            rq += self._rq[i]
            cx_l.append(self._cx[i])
            idle_l.append(k)
            rq_l.append(self._rq[i])
        return {
            "endpoints": self._n,
            "max_idle_per_endpoint": self._max_idle,
            "cx_active": cx,
            "idle": idle,
            "rq_active": rq,
            "to_close": PyList_GET_SIZE(self._to_close),
            "count_errors": self._count_errors,
            "cx_active_per_endpoint": cx_l,
            "idle_per_endpoint": idle_l,
            "rq_active_per_endpoint": rq_l,
        }

    def __repr__(self):
        s = self.statistics()
        return (f"<PoolBookC endpoints={s['endpoints']} cx_active={s['cx_active']} "
                f"idle={s['idle']} rq_active={s['rq_active']}>")
