# C-level interface of meshcore._ext.h1parse, for other extensions (h1conn, loop) to cimport.
# It lives at ext/meshcore/_ext/ because setup.py builds ext/h1parse.pyx as meshcore._ext.h1parse
# and Cython finds a module's .pxd by its package path on the include path (ext/).
from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    # limits (hardening.md §1; the Python constants MAX_* in the module are the same numbers)
    C_MAX_REQUEST_HEAD = 60 * 1024
    C_MAX_HEADERS = 100
    C_MAX_REQUEST_LINE = 8192
    C_MAX_RESPONSE_HEAD = 80 * 1024
    C_MAX_CHUNK_LINE = 4096
    C_MAX_LEADING_CRLF = 4
    C_MAX_EXCLUDE = 64

cdef enum:
    C_BODY_NONE = 0
    C_BODY_LENGTH = 1
    C_BODY_CHUNKED = 2
    C_BODY_CLOSE = 3
    C_NEED_DATA = 0
    C_DATA = 1
    C_DONE = 2

cdef struct Field:
    uint32_t ns      # name start, end; value start, end: offsets into the head's own bytes
    uint32_t ne
    uint32_t vs
    uint32_t ve
    int kind


cdef class _Head:
    cdef bytes _raw
    cdef Field* _f
    cdef int _n
    cdef Py_ssize_t _end
    cdef long long _cl
    cdef bint _chunked
    cdef bint _keep_alive
    cdef bint _has_conn

    cdef int _store(self, const unsigned char* b, Py_ssize_t start, Py_ssize_t end,
                    Field* f, int nf) except -1
    cdef const unsigned char* _b(self)
    cdef bytes _lname(self, int k)
    cdef bytes _value(self, int k)
    cdef bint _name_is(self, int k, const unsigned char* nm, Py_ssize_t nn)
    cdef object _nominated(self)
    cdef bytes _forward(self, bint resp, object drop)
    cdef bytes _emit(self, unsigned char* keep, Py_ssize_t total)
    cdef bytes _forward_slow(self, bint resp, object drop)
    cdef int find(self, const char* name, Py_ssize_t nn)
    cdef int count_prefix_c(self, const char* prefix, Py_ssize_t pn)


cdef class RequestHead(_Head):
    cdef Py_ssize_t _ms, _me, _ts, _te, _ps, _pe, _hs, _he
    cdef bint _path_slash
    cdef int _version
    cdef bint _expect_continue
    cdef bint _upgrade
    cdef object _method_o, _target_o, _path_o, _host_o


cdef class ResponseHead(_Head):
    cdef int _status
    cdef int _version
    cdef Py_ssize_t _rs, _re
    cdef object _reason_o


cdef class ChunkedReader:
    cdef int _state
    cdef uint64_t _remaining
    cdef uint64_t _total
    cdef Py_ssize_t _trailer_bytes
    cdef int _trailers

    cdef int _fail(self, object reason) except -1
    cdef int step_c(self, const unsigned char* b, Py_ssize_t pos, Py_ssize_t end,
                    Py_ssize_t* out_a, Py_ssize_t* out_b) except -1


cdef RequestHead parse_request_c(const unsigned char* b, Py_ssize_t n, Py_ssize_t start)
cdef ResponseHead parse_response_c(const unsigned char* b, Py_ssize_t n, Py_ssize_t start)
