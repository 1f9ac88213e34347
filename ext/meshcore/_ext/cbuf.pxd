# A growable byte buffer for the compiled data path (header-only: inline functions, no module).
#
# Bytes live in data[start:end]; consuming advances `start` and an emptied buffer rewinds to 0, so
# the common case (everything consumed in one pass) never moves memory. A buffer that grew past
# SHRINK_OVER and became empty is freed by buf_shrink, so an idle connection holds no memory.
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove

cdef enum:
    BUF_MIN = 4096
    SHRINK_OVER = 65536

cdef struct Buf:
    char* data
    Py_ssize_t start
    Py_ssize_t end
    Py_ssize_t cap


cdef inline Py_ssize_t buf_len(const Buf* b) noexcept nogil:
    return b.end - b.start


cdef inline char* buf_ptr(const Buf* b) noexcept nogil:
    return b.data + b.start


cdef inline int buf_reserve(Buf* b, Py_ssize_t extra) except -1:
    """Make room for `extra` more bytes at data[end:] (compacting first, growing if needed)."""
    cdef Py_ssize_t n, cap
    cdef char* p
    if b.cap - b.end >= extra:
        return 0
    n = b.end - b.start
    if b.start and b.cap - n >= extra:
        memmove(b.data, b.data + b.start, n)
        b.start = 0
        b.end = n
        return 0
    cap = b.cap if b.cap else BUF_MIN
    while cap - n < extra:
        cap *= 2
    if b.start:
        memmove(b.data, b.data + b.start, n)
        b.start = 0
        b.end = n
    p = <char*>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline int buf_append(Buf* b, const char* p, Py_ssize_t n) except -1:
    if n <= 0:
        return 0
    buf_reserve(b, n)
    memcpy(b.data + b.end, p, n)
    b.end += n
    return 0


cdef inline void buf_consume(Buf* b, Py_ssize_t n) noexcept nogil:
    b.start += n
    if b.start >= b.end:
        b.start = 0
        b.end = 0


cdef inline void buf_clear(Buf* b) noexcept nogil:
    b.start = 0
    b.end = 0


cdef inline void buf_free(Buf* b) noexcept nogil:
    if b.data != NULL:
        free(b.data)
    b.data = NULL
    b.start = 0
    b.end = 0
    b.cap = 0


cdef inline void buf_shrink(Buf* b) noexcept nogil:
    """Free an empty buffer's memory once it has grown large (idle connections hold nothing)."""
    if b.end == b.start and b.cap > SHRINK_OVER:
        buf_free(b)


cdef inline int buf_append_hex(Buf* b, unsigned long long v) except -1:
    """Append `v` in lowercase hex (a chunk-size line's digits)."""
    cdef char tmp[17]
    cdef int i = 16
    if v == 0:
        return buf_append(b, "0", 1)
    while v:
        i -= 1
        tmp[i] = b"0123456789abcdef"[v & 15]
        v >>= 4
    return buf_append(b, tmp + i, 16 - i)


cdef inline int buf_append_dec(Buf* b, long long v) except -1:
    cdef char tmp[24]
    cdef int i = 24
    cdef bint neg = v < 0
    cdef unsigned long long u = <unsigned long long>(-v if neg else v)
    if u == 0:
        return buf_append(b, "0", 1)
    while u:
        i -= 1
        tmp[i] = <char>(48 + u % 10)
        u //= 10
    if neg:
        i -= 1
        tmp[i] = 45
    return buf_append(b, tmp + i, 24 - i)
