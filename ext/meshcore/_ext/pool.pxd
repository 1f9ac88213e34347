cimport cython

# C-level interface of meshcore._ext.pool (ext/pool.pyx): the event loop's upstream pools are
# PoolBook instances, called through these cpdef methods at C speed.

@cython.final
cdef class PoolBook:
    cdef Py_ssize_t _n
    cdef Py_ssize_t _max_idle
    cdef list _conns              # per endpoint: a list used as the LIFO stack of idle connections
    cdef list _to_close           # expired connections waiting for pop_to_close()
    cdef double **_stamps         # per endpoint: returned_at of each stacked connection (lazy)
    cdef Py_ssize_t *_stamp_cap   # allocated length of each _stamps[ep]
    cdef Py_ssize_t *_cx          # open connections (idle included)
    cdef Py_ssize_t *_rq          # active requests
    cdef Py_ssize_t _count_errors

    cdef Py_ssize_t _index(self, object ep) except -1
    cdef void _dec_cx(self, Py_ssize_t i) noexcept
    cdef int _grow(self, Py_ssize_t i) except -1
    cpdef object take_idle(self, object ep, double now, double idle_timeout)
    cpdef bint put_idle(self, object ep, object conn, double now) except -1
    cpdef list pop_to_close(self)
    cpdef list sweep(self, double now, double idle_timeout)
    cpdef list drain_all(self)
    cpdef bint remove_idle(self, object ep, object conn) except -1
    cpdef on_open(self, object ep)
    cpdef on_close(self, object ep)
    cpdef Py_ssize_t cx_active(self, object ep) except -1
    cpdef Py_ssize_t idle_count(self, object ep) except -1
    cpdef rq_start(self, object ep)
    cpdef rq_end(self, object ep)
    cpdef Py_ssize_t rq_active(self, object ep) except -1
    cpdef dict statistics(self)
