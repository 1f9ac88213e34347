# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Strict HTTP/1.1 head and chunked-body parser, compiled (``meshcore._ext.h1parse``).

The twin of ``meshcore/proto/h1_parse.py``: same API, same results, same ProtocolError status and
reason. See that module's docstring for the rules and the choices made. This version does not build
Python objects per header at parse time: it copies the head bytes once and keeps
(name, value) offsets in a C array; bytes are made only in get()/get_all()/headers()/
forward_headers() and in the lazily built method/target/path/host/reason attributes.
"""

from cpython.bytes cimport (PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE,
                            PyBytes_Check, PyBytes_CheckExact)
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Check
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memchr, memcpy, memcmp
from libc.stdint cimport uint32_t, uint64_t

from meshcore.errors import ProtocolError

MAX_REQUEST_HEAD = 60 * 1024
MAX_HEADERS = 100
MAX_REQUEST_LINE = 8192
MAX_RESPONSE_HEAD = 80 * 1024
MAX_CHUNK_LINE = 4096
MAX_LEADING_CRLF = 4

BODY_NONE = C_BODY_NONE
BODY_LENGTH = C_BODY_LENGTH
BODY_CHUNKED = C_BODY_CHUNKED
BODY_CLOSE = C_BODY_CLOSE

NEED_DATA = C_NEED_DATA
DATA = C_DATA
DONE = C_DONE


cdef enum:
    K_OTHER = 0
    K_HOST = 1
    K_CL = 2
    K_TE = 3            # transfer-encoding
    K_CONNECTION = 4
    K_EXPECT = 5
    K_UPGRADE = 6
    K_KEEPALIVE = 7
    K_PROXYCONN = 8
    K_TEHDR = 9         # te

cdef enum:
    S_SIZE = 0
    S_DATA = 1
    S_DATA_CRLF = 2
    S_TRAILER = 3
    S_DONE = 4
    S_ERROR = 5

cdef long long CL_MAX = 9223372036854775807LL

R_LINE_TOO_LONG = "request line too long"
R_HEAD_TOO_LARGE = "header section too large"
R_TOO_MANY_HEADERS = "too many header fields"
R_BARE_LF = "line not terminated by CRLF"
R_METHOD = "invalid method"
R_NO_TARGET = "missing request target"
R_TARGET = "invalid request target"
R_NO_VERSION = "missing HTTP version"
R_VERSION = "invalid HTTP version"
R_VERSION_UNSUPPORTED = "unsupported HTTP version"
R_CONNECT_TARGET = "CONNECT requires an authority-form target"
R_ASTERISK = "asterisk-form target requires OPTIONS"
R_ABS_AUTHORITY = "invalid authority in request target"
R_TARGET_FORM = "invalid request target form"
R_FRAGMENT = "fragment in request target"
R_OBS_FOLD = "line starts with whitespace (obs-fold)"
R_NO_COLON = "field line without colon"
R_WS_COLON = "whitespace before colon"
R_NAME = "invalid field name"
R_EMPTY_NAME = "empty field name"
R_VALUE = "invalid character in field value"
R_HOST_MULTI = "multiple Host fields"
R_HOST_MISSING = "missing Host"
R_HOST = "invalid Host"
R_CL_MULTI = "multiple Content-Length fields"
R_CL = "invalid Content-Length"
R_TE_HTTP10 = "Transfer-Encoding in an HTTP/1.0 message"
R_TE_MULTI = "multiple Transfer-Encoding fields"
R_CL_TE = "Content-Length with Transfer-Encoding"
R_TE_TWICE = "chunked applied more than once"
R_TE_NOT_LAST = "chunked is not the final transfer coding"
R_TE_UNKNOWN = "unsupported transfer coding"
R_CONNECT_BODY = "CONNECT with a request body"
R_CONNECTION = "invalid Connection field"
R_EXPECT = "unsupported expectation"
R_STATUS_LINE = "invalid status line"
R_STATUS_CODE = "invalid status code"
R_RESP_TOO_LARGE = "response header section too large"
R_RESP_TOO_MANY = "too many response header fields"
R_204_BODY = "204 response with a body"
R_CHUNK_LINE_TOO_LONG = "chunk line too long"
R_CHUNK_SIZE = "invalid chunk size"
R_CHUNK_SIZE_LARGE = "chunk size too large"
R_CHUNK_WS = "whitespace at end of chunk line"
R_CHUNK_EXT = "invalid chunk extension"
R_CHUNK_EXT_NAME = "empty chunk extension name"
R_CHUNK_EXT_VALUE = "invalid chunk extension value"
R_CHUNK_DATA_CRLF = "chunk data not followed by CRLF"
R_TRAILERS_TOO_LARGE = "trailer section too large"
R_TOO_MANY_TRAILERS = "too many trailer fields"
R_CHUNKED_FAILED = "chunked body already failed"

# ---------------------------------------------------------------------------------------------
# character tables

cdef unsigned char T_TCHAR[256]
cdef unsigned char T_FVAL[256]      # field-value bytes: HTAB, SP, VCHAR, obs-text
cdef unsigned char T_REGNAME[256]   # unreserved
cdef unsigned char T_IPV6[256]
cdef unsigned char T_QDTEXT[256]
cdef unsigned char T_QPAIR[256]
cdef unsigned char T_LOWER[256]
cdef signed char T_HEX[256]


cdef void _init_tables():
    cdef int c
    cdef bytes tspecial = b"!#$%&'*+-.^_`|~"
    for c in range(256):
        T_TCHAR[c] = 0
        T_FVAL[c] = 1 if (c == 9 or c == 32 or (0x21 <= c <= 0x7E) or c >= 0x80) else 0
        T_REGNAME[c] = 0
        T_IPV6[c] = 0
        T_QDTEXT[c] = 1 if (c == 9 or c == 32 or c == 0x21 or (0x23 <= c <= 0x5B)
                            or (0x5D <= c <= 0x7E) or c >= 0x80) else 0
        T_QPAIR[c] = 1 if (c == 9 or c == 32 or (0x21 <= c <= 0x7E) or c >= 0x80) else 0
        T_LOWER[c] = c + 32 if (0x41 <= c <= 0x5A) else c
        T_HEX[c] = -1
    for c in range(0x30, 0x3A):
        T_TCHAR[c] = 1
        T_REGNAME[c] = 1
        T_IPV6[c] = 1
        T_HEX[c] = c - 0x30
    for c in range(0x41, 0x5B):
        T_TCHAR[c] = 1
        T_TCHAR[c + 32] = 1
        T_REGNAME[c] = 1
        T_REGNAME[c + 32] = 1
    for c in range(6):
        T_IPV6[0x41 + c] = 1
        T_IPV6[0x61 + c] = 1
        T_HEX[0x41 + c] = 10 + c
        T_HEX[0x61 + c] = 10 + c
    T_IPV6[0x3A] = 1
    T_IPV6[0x2E] = 1
    for c in tspecial:
        T_TCHAR[c] = 1
    for c in b"-._~":
        T_REGNAME[c] = 1


_init_tables()


cdef inline bint _is_lower(bytes x):
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(x)
    cdef Py_ssize_t i
    for i in range(PyBytes_GET_SIZE(x)):
        if T_LOWER[p[i]] != p[i]:
            return False
    return True


cdef inline bint _ows(unsigned char c) noexcept nogil:
    return c == 32 or c == 9


cdef inline bint _eq_lower(const unsigned char* s, const char* lit, Py_ssize_t n) noexcept nogil:
    # Valid only for the bytes a token or field value may hold (see h1_parse._lower).
    cdef Py_ssize_t i
    for i in range(n):
        if (s[i] | 0x20) != <unsigned char>lit[i]:
            return False
    return True


cdef inline bint _same_name(const unsigned char* a, Py_ssize_t an, const unsigned char* x,
                            Py_ssize_t xn) noexcept nogil:
    cdef Py_ssize_t i
    if an != xn:
        return False
    for i in range(an):
        if T_LOWER[a[i]] != T_LOWER[x[i]]:
            return False
    return True


cdef inline int _kind(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    if n == 4:
        if _eq_lower(s, b"host", 4):
            return K_HOST
    elif n == 14:
        if _eq_lower(s, b"content-length", 14):
            return K_CL
    elif n == 10:
        if _eq_lower(s, b"connection", 10):
            return K_CONNECTION
        if _eq_lower(s, b"keep-alive", 10):
            return K_KEEPALIVE
    elif n == 17:
        if _eq_lower(s, b"transfer-encoding", 17):
            return K_TE
    elif n == 6:
        if _eq_lower(s, b"expect", 6):
            return K_EXPECT
    elif n == 7:
        if _eq_lower(s, b"upgrade", 7):
            return K_UPGRADE
    elif n == 2:
        if _eq_lower(s, b"te", 2):
            return K_TEHDR
    elif n == 16:
        if _eq_lower(s, b"proxy-connection", 16):
            return K_PROXYCONN
    return K_OTHER


cdef inline object _buf_keep(object buf):
    if PyBytes_Check(buf) or PyByteArray_Check(buf):
        return buf
    return bytes(buf)


cdef inline const unsigned char* _buf_ptr(object buf, Py_ssize_t* n):
    if PyBytes_Check(buf):
        n[0] = PyBytes_GET_SIZE(buf)
        return <const unsigned char*>PyBytes_AS_STRING(buf)
    n[0] = PyByteArray_GET_SIZE(buf)
    return <const unsigned char*>PyByteArray_AS_STRING(buf)


cdef inline int _raise(object reason, int status) except -1:
    raise ProtocolError(reason, status)


cdef bint _valid_authority(const unsigned char* b, Py_ssize_t s, Py_ssize_t e,
                           bint require_port) noexcept nogil:
    cdef Py_ssize_t i
    cdef bint colon = False
    cdef long port = 0
    if s == e:
        return False
    if b[s] == 0x5B:
        i = s + 1
        while i < e and T_IPV6[b[i]]:
            if b[i] == 0x3A:
                colon = True
            i += 1
        if i >= e or b[i] != 0x5D or i == s + 1 or not colon:
            return False
        i += 1
    else:
        i = s
        while i < e and T_REGNAME[b[i]]:
            i += 1
        if i == s:
            return False
    if i == e:
        return not require_port
    if b[i] != 0x3A:
        return False
    i += 1
    if e - i < 1 or e - i > 5:
        return False
    while i < e:
        if b[i] < 0x30 or b[i] > 0x39:
            return False
        port = port * 10 + (b[i] - 0x30)
        i += 1
    return port <= 65535


cdef inline bint _value_ok(const unsigned char* b, Py_ssize_t i, Py_ssize_t q) noexcept nogil:
    """All of b[i:q] are field-value bytes (HTAB, SP, VCHAR, obs-text)? Eight bytes at a time:
    a word with no byte below 0x20 and no 0x7F is fine; any other word is checked bytewise."""
    cdef uint64_t w, x, hit
    cdef Py_ssize_t k
    while i + 8 <= q:
        memcpy(&w, b + i, 8)
        x = w ^ 0x7F7F7F7F7F7F7F7FULL
        hit = (((w - 0x2020202020202020ULL) & ~w)
               | ((x - 0x0101010101010101ULL) & ~x)) & 0x8080808080808080ULL
        if hit:
            for k in range(8):
                if not T_FVAL[b[i + k]]:
                    return False
        i += 8
    while i < q:
        if not T_FVAL[b[i]]:
            return False
        i += 1
    return True


cdef int _field_line(const unsigned char* b, Py_ssize_t p, Py_ssize_t q, int status,
                     Field* f) except -1:
    """Validate the field line b[p:q] (without CRLF), left to right; fill f (absolute offsets)."""
    cdef Py_ssize_t i, colon, vs, ve
    cdef unsigned char c = b[p]
    if c == 32 or c == 9:
        _raise(R_OBS_FOLD, status)
    i = p
    while i < q and T_TCHAR[b[i]]:
        i += 1
    if i == q:
        _raise(R_NO_COLON, status)
    c = b[i]
    if c != 0x3A:
        if c == 32 or c == 9:
            _raise(R_WS_COLON, status)
        _raise(R_NAME, status)
    if i == p:
        _raise(R_EMPTY_NAME, status)
    colon = i
    if not _value_ok(b, i + 1, q):
        _raise(R_VALUE, status)
    vs = colon + 1
    while vs < q and _ows(b[vs]):
        vs += 1
    ve = q
    while ve > vs and _ows(b[ve - 1]):
        ve -= 1
    f.ns = <uint32_t>p
    f.ne = <uint32_t>colon
    f.vs = <uint32_t>vs
    f.ve = <uint32_t>ve
    return 0


cdef int _scan_fields(const unsigned char* b, Py_ssize_t p, Py_ssize_t n, Py_ssize_t limit,
                      int status, int status_limit, object r_large, object r_many,
                      Field* f, int* nf, Py_ssize_t* endp) except -1:
    """Scan field lines from p (absolute offsets). 1: complete, 0: need more data."""
    cdef int nh = 0
    cdef Py_ssize_t bound = limit if limit < n else n
    cdef Py_ssize_t j, q
    cdef const unsigned char* lf
    while True:
        if nh == C_MAX_HEADERS and p < n and b[p] != 13:
            _raise(r_many, status_limit)
        lf = NULL
        if p < bound:
            lf = <const unsigned char*>memchr(b + p, 10, <size_t>(bound - p))
        if lf == NULL:
            if n >= limit:
                _raise(r_large, status_limit)
            return 0
        j = lf - b
        if j == p or b[j - 1] != 13:
            _raise(R_BARE_LF, status)
        q = j - 1
        if q == p:
            nf[0] = nh
            endp[0] = j + 1
            return 1
        _field_line(b, p, q, status, &f[nh])
        f[nh].kind = _kind(b + p, f[nh].ne - p)
        nh += 1
        p = j + 1


cdef struct Conn:
    bint close
    bint keep_alive
    bint upgrade


cdef int _connection_tokens(const unsigned char* b, Field* f, int nf, int status,
                            Conn* out) except -1:
    cdef int k
    cdef Py_ssize_t i, e, s, t, u
    out.close = False
    out.keep_alive = False
    out.upgrade = False
    for k in range(nf):
        if f[k].kind != K_CONNECTION:
            continue
        i = f[k].vs
        e = f[k].ve
        while True:
            s = i
            while i < e and b[i] != 0x2C:
                i += 1
            t = s
            u = i
            while t < u and _ows(b[t]):
                t += 1
            while u > t and _ows(b[u - 1]):
                u -= 1
            if u > t:
                s = t
                while s < u and T_TCHAR[b[s]]:
                    s += 1
                if s != u:
                    _raise(R_CONNECTION, status)
                if u - t == 5 and _eq_lower(b + t, b"close", 5):
                    out.close = True
                elif u - t == 10 and _eq_lower(b + t, b"keep-alive", 10):
                    out.keep_alive = True
                elif u - t == 7 and _eq_lower(b + t, b"upgrade", 7):
                    out.upgrade = True
            if i >= e:
                break
            i += 1
    return 0


cdef int _transfer_coding(const unsigned char* b, Py_ssize_t s, Py_ssize_t e, int status) except -1:
    """1 for exactly `chunked`; raise otherwise (misuse of chunked is 400 when status is 501)."""
    cdef Py_ssize_t i, t, u
    cdef int count = 0
    cdef bint last = False
    cdef int misuse = 400 if status == 501 else status
    if e - s == 7 and _eq_lower(b + s, b"chunked", 7):
        return 1
    i = s
    while True:
        t = i
        while i < e and b[i] != 0x2C:
            i += 1
        u = i
        while t < u and _ows(b[t]):
            t += 1
        while u > t and _ows(b[u - 1]):
            u -= 1
        if u > t:  # empty list elements are ignored
            last = u - t == 7 and _eq_lower(b + t, b"chunked", 7)
            if last:
                count += 1
        if i >= e:
            break
        i += 1
    if count > 1:
        _raise(R_TE_TWICE, misuse)
    if count == 1 and not last:
        _raise(R_TE_NOT_LAST, misuse)
    _raise(R_TE_UNKNOWN, status)
    return 0


cdef long long _content_length(const unsigned char* b, Py_ssize_t s, Py_ssize_t e,
                               int status) except -2:
    cdef uint64_t v = 0
    cdef Py_ssize_t i
    if e - s < 1 or e - s > 19:
        _raise(R_CL, status)
    for i in range(s, e):
        if b[i] < 0x30 or b[i] > 0x39:
            _raise(R_CL, status)
        v = v * 10 + (b[i] - 0x30)
    if v > <uint64_t>CL_MAX:
        _raise(R_CL, status)
    return <long long>v


# ---------------------------------------------------------------------------------------------
# heads

cdef class _Head:
    def __dealloc__(self):
        if self._f != NULL:
            PyMem_Free(self._f)
            self._f = NULL

    cdef int _store(self, const unsigned char* b, Py_ssize_t start, Py_ssize_t end,
                    Field* f, int nf) except -1:
        cdef int k
        self._raw = PyBytes_FromStringAndSize(<const char*>(b + start), end - start)
        self._end = end
        self._n = nf
        if nf:
            self._f = <Field*>PyMem_Malloc(nf * sizeof(Field))
            if self._f == NULL:
                raise MemoryError()
            for k in range(nf):
                self._f[k].ns = f[k].ns - <uint32_t>start
                self._f[k].ne = f[k].ne - <uint32_t>start
                self._f[k].vs = f[k].vs - <uint32_t>start
                self._f[k].ve = f[k].ve - <uint32_t>start
                self._f[k].kind = f[k].kind
        return 0

    @property
    def end(self):
        return self._end

    @property
    def content_length(self):
        return self._cl

    @property
    def chunked(self):
        return self._chunked

    @property
    def keep_alive(self):
        return self._keep_alive

    @property
    def n_headers(self):
        return self._n

    cdef const unsigned char* _b(self):
        return <const unsigned char*>PyBytes_AS_STRING(self._raw)

    cdef bytes _lname(self, int k):
        cdef const unsigned char* b = self._b()
        cdef Py_ssize_t n = self._f[k].ne - self._f[k].ns
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
        cdef Py_ssize_t i
        for i in range(n):
            o[i] = T_LOWER[b[self._f[k].ns + i]]
        return out

    cdef bytes _value(self, int k):
        return PyBytes_FromStringAndSize(<const char*>(self._b() + self._f[k].vs),
                                         self._f[k].ve - self._f[k].vs)

    cdef bint _name_is(self, int k, const unsigned char* nm, Py_ssize_t nn):
        cdef const unsigned char* b = self._b()
        cdef Py_ssize_t i, s = self._f[k].ns
        if self._f[k].ne - s != nn:
            return False
        for i in range(nn):
            if T_LOWER[b[s + i]] != T_LOWER[nm[i]]:
                return False
        return True

    cdef int find(self, const char* name, Py_ssize_t nn):
        """Index of the first field named `name` (any case), or -1."""
        cdef int k
        for k in range(self._n):
            if self._name_is(k, <const unsigned char*>name, nn):
                return k
        return -1

    def get(self, name):
        cdef bytes nm = bytes(name)
        cdef int k = self.find(PyBytes_AS_STRING(nm), PyBytes_GET_SIZE(nm))
        return None if k < 0 else self._value(k)

    def count_prefix(self, prefix):
        """How many field names start with `prefix` (lowercase), e.g. b"x-envoy-": one pass in C,
        so the proxy can skip header-driven work that almost no request needs."""
        cdef bytes px = bytes(prefix)
        return self.count_prefix_c(PyBytes_AS_STRING(px), PyBytes_GET_SIZE(px))

    cdef int count_prefix_c(self, const char* prefix, Py_ssize_t pn):
        cdef const unsigned char* p = <const unsigned char*>prefix
        cdef const unsigned char* b = self._b()
        cdef int k, count = 0
        cdef Py_ssize_t i, s
        for k in range(self._n):
            s = self._f[k].ns
            if self._f[k].ne - s < pn:
                continue
            for i in range(pn):
                if T_LOWER[b[s + i]] != T_LOWER[p[i]]:
                    break
            else:
                count += 1
        return count

    def get_all(self, name):
        cdef bytes nm = bytes(name)
        cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(nm)
        cdef Py_ssize_t nn = PyBytes_GET_SIZE(nm)
        cdef int k
        cdef list out = []
        for k in range(self._n):
            if self._name_is(k, s, nn):
                out.append(self._value(k))
        return out

    def headers(self):
        cdef int k
        cdef list out = []
        for k in range(self._n):
            out.append((self._lname(k), self._value(k)))
        return out

    cdef object _nominated(self):
        """The set of lowercase tokens of the Connection fields (validated at parse time)."""
        cdef set out = set()
        cdef const unsigned char* b = self._b()
        cdef int k
        cdef Py_ssize_t i, e, s, t, u
        cdef bytes tok
        cdef unsigned char* o
        for k in range(self._n):
            if self._f[k].kind != K_CONNECTION:
                continue
            i = self._f[k].vs
            e = self._f[k].ve
            while True:
                t = i
                while i < e and b[i] != 0x2C:
                    i += 1
                u = i
                while t < u and _ows(b[t]):
                    t += 1
                while u > t and _ows(b[u - 1]):
                    u -= 1
                if u > t:
                    tok = PyBytes_FromStringAndSize(NULL, u - t)
                    o = <unsigned char*>PyBytes_AS_STRING(tok)
                    for s in range(u - t):
                        o[s] = T_LOWER[b[t + s]]
                    out.add(tok)
                if i >= e:
                    break
                i += 1
        return out

    cdef bytes _forward(self, bint resp, object drop):
        """The forwardable header block. Names to exclude (Connection nominations, `drop`) are
        compared in place as (pointer, length) pairs; the set-based path handles huge lists."""
        cdef unsigned char keep[C_MAX_HEADERS]
        cdef const unsigned char* xs[C_MAX_EXCLUDE]
        cdef Py_ssize_t xl[C_MAX_EXCLUDE]
        cdef int nnom = 0, ndrop = 0, j
        cdef const unsigned char* b = self._b()
        cdef list drop_keep = None
        cdef bytes d
        cdef int k, kind
        cdef Py_ssize_t total = 0, nl, i, e, t, u
        cdef Field* f
        cdef bint skip
        if drop:
            if len(drop) > C_MAX_EXCLUDE // 2:
                return self._forward_slow(resp, drop)
            for x in drop:
                # Lowercase bytes (the proxy's own constants) are used in place; anything else is
                # lowered into a copy kept alive by drop_keep.
                if PyBytes_CheckExact(x) and _is_lower(<bytes>x):
                    d = <bytes>x
                else:
                    d = bytes(x).lower()
                    if drop_keep is None:
                        drop_keep = []
                    drop_keep.append(d)
                xs[ndrop] = <const unsigned char*>PyBytes_AS_STRING(d)
                xl[ndrop] = PyBytes_GET_SIZE(d)
                ndrop += 1
        if self._has_conn:
            nnom = ndrop
            for k in range(self._n):
                if self._f[k].kind != K_CONNECTION:
                    continue
                i = self._f[k].vs
                e = self._f[k].ve
                while True:
                    t = i
                    while i < e and b[i] != 0x2C:
                        i += 1
                    u = i
                    while t < u and _ows(b[t]):
                        t += 1
                    while u > t and _ows(b[u - 1]):
                        u -= 1
                    if u > t:
                        if nnom == C_MAX_EXCLUDE:
                            return self._forward_slow(resp, drop)
                        xs[nnom] = b + t
                        xl[nnom] = u - t
                        nnom += 1
                    if i >= e:
                        break
                    i += 1
        else:
            nnom = ndrop
        for k in range(self._n):
            keep[k] = 0
            f = &self._f[k]
            kind = f.kind
            if kind == K_CONNECTION or kind == K_KEEPALIVE or kind == K_PROXYCONN \
                    or kind == K_TE or kind == K_CL or kind == K_UPGRADE:
                continue
            if resp:
                if kind == K_TEHDR:
                    continue
            elif kind == K_HOST or kind == K_EXPECT:
                continue
            nl = f.ne - f.ns
            skip = False
            for j in range(ndrop):
                if _same_name(b + f.ns, nl, xs[j], xl[j]):
                    skip = True
                    break
            if skip:
                continue
            if kind == K_TEHDR:
                if not (f.ve - f.vs == 8 and _eq_lower(b + f.vs, b"trailers", 8)):
                    continue
            else:
                for j in range(ndrop, nnom):
                    if _same_name(b + f.ns, nl, xs[j], xl[j]):
                        skip = True
                        break
                if skip:
                    continue
            keep[k] = 1
            total += nl + (f.ve - f.vs) + 4
        return self._emit(keep, total)

    cdef bytes _emit(self, unsigned char* keep, Py_ssize_t total):
        cdef const unsigned char* b = self._b()
        cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
        cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
        cdef Py_ssize_t pos = 0, nl, vl, i
        cdef int k
        cdef Field* f
        for k in range(self._n):
            if not keep[k]:
                continue
            f = &self._f[k]
            nl = f.ne - f.ns
            for i in range(nl):
                o[pos + i] = T_LOWER[b[f.ns + i]]
            pos += nl
            o[pos] = 0x3A
            o[pos + 1] = 0x20
            pos += 2
            vl = f.ve - f.vs
            memcpy(o + pos, b + f.vs, vl)
            pos += vl
            o[pos] = 13
            o[pos + 1] = 10
            pos += 2
        return out

    cdef bytes _forward_slow(self, bint resp, object drop):
        cdef unsigned char keep[C_MAX_HEADERS]
        cdef const unsigned char* b = self._b()
        cdef object dropset = None
        cdef object nominated = None
        cdef object lname = None
        cdef int k, kind
        cdef Py_ssize_t total = 0
        cdef Field* f
        if drop:
            dropset = frozenset([bytes(d).lower() for d in drop])
        if self._has_conn:
            nominated = self._nominated()
        for k in range(self._n):
            keep[k] = 0
            f = &self._f[k]
            kind = f.kind
            if kind == K_CONNECTION or kind == K_KEEPALIVE or kind == K_PROXYCONN \
                    or kind == K_TE or kind == K_CL or kind == K_UPGRADE:
                continue
            if resp:
                if kind == K_TEHDR:
                    continue
            elif kind == K_HOST or kind == K_EXPECT:
                continue
            lname = self._lname(k)
            if dropset is not None and lname in dropset:
                continue
            if kind == K_TEHDR:
                if not (f.ve - f.vs == 8 and _eq_lower(b + f.vs, b"trailers", 8)):
                    continue
            elif nominated is not None and lname in nominated:
                continue
            keep[k] = 1
            total += (f.ne - f.ns) + (f.ve - f.vs) + 4
        return self._emit(keep, total)


cdef class RequestHead(_Head):
    """A parsed request head. Read-only; the head bytes are copied out of the caller's buffer."""

    @property
    def method(self):
        if self._method_o is None:
            self._method_o = PyBytes_FromStringAndSize(<const char*>(self._b() + self._ms),
                                                       self._me - self._ms)
        return self._method_o

    @property
    def target(self):
        if self._target_o is None:
            self._target_o = PyBytes_FromStringAndSize(<const char*>(self._b() + self._ts),
                                                       self._te - self._ts)
        return self._target_o

    @property
    def path(self):
        cdef bytes p
        cdef char* o
        if self._path_o is None:
            if self._path_slash:
                p = PyBytes_FromStringAndSize(NULL, self._pe - self._ps + 1)
                o = PyBytes_AS_STRING(p)
                o[0] = 0x2F
                memcpy(o + 1, self._b() + self._ps, self._pe - self._ps)
                self._path_o = p
            else:
                self._path_o = PyBytes_FromStringAndSize(<const char*>(self._b() + self._ps),
                                                         self._pe - self._ps)
        return self._path_o

    @property
    def host(self):
        if self._hs < 0:
            return None
        if self._host_o is None:
            self._host_o = PyBytes_FromStringAndSize(<const char*>(self._b() + self._hs),
                                                     self._he - self._hs)
        return self._host_o

    @property
    def version(self):
        return self._version

    @property
    def expect_continue(self):
        return self._expect_continue

    @property
    def upgrade(self):
        return self._upgrade

    def forward_headers(self, drop=()):
        return self._forward(False, drop)

    def __repr__(self):
        return (f"RequestHead({self.method!r}, {self.target!r}, version={self._version}, "
                f"host={self.host!r}, n_headers={self._n}, end={self._end})")


cdef class ResponseHead(_Head):
    """A parsed response head. Read-only."""

    @property
    def status(self):
        return self._status

    @property
    def version(self):
        return self._version

    @property
    def reason(self):
        if self._reason_o is None:
            self._reason_o = PyBytes_FromStringAndSize(<const char*>(self._b() + self._rs),
                                                       self._re - self._rs)
        return self._reason_o

    def forward_headers(self, drop=()):
        return self._forward(True, drop)

    def __repr__(self):
        return (f"ResponseHead({self._status}, {self.reason!r}, version={self._version}, "
                f"n_headers={self._n}, end={self._end})")


# ---------------------------------------------------------------------------------------------
# request

cdef Py_ssize_t _skip_leading(const unsigned char* b, Py_ssize_t p, Py_ssize_t n) noexcept nogil:
    cdef int skipped = 0
    while skipped < C_MAX_LEADING_CRLF and p + 1 < n and b[p] == 13 and b[p + 1] == 10:
        p += 2
        skipped += 1
    return p


def parse_request(buf, Py_ssize_t start=0):
    """Parse the request head at buf[start:]; None until the empty line arrives."""
    cdef object keep = _buf_keep(buf)
    cdef Py_ssize_t n
    cdef const unsigned char* b = _buf_ptr(keep, &n)
    return parse_request_c(b, n, start)


cdef RequestHead parse_request_c(const unsigned char* b, Py_ssize_t n, Py_ssize_t start):
    """parse_request over a C buffer b[0:n] (the event loop's entry point); None if incomplete."""
    cdef Field f[C_MAX_HEADERS]
    cdef int nf = 0, k, version
    cdef Py_ssize_t limit, p, rl_limit, bound, j, q, i, t, ts, te, v, ms, me, end = 0
    cdef Py_ssize_t ps = 0, pe = 0, hs = -1, he = -1, a = 0
    cdef bint path_slash = False
    cdef const unsigned char* lf
    cdef int nhost = 0, ncl = 0, nte = 0, hi = -1, cli = -1, tei = -1
    cdef bint has_conn = False, has_expect = False, has_upgrade = False, chunked = False
    cdef long long cl = -1
    cdef Conn conn
    cdef RequestHead h

    if start < 0 or start > n:
        raise ValueError("start out of range")
    limit = start + C_MAX_REQUEST_HEAD
    p = _skip_leading(b, start, n)
    rl_limit = p + C_MAX_REQUEST_LINE + 2
    bound = rl_limit if rl_limit < n else n
    lf = NULL
    if p < bound:
        lf = <const unsigned char*>memchr(b + p, 10, <size_t>(bound - p))
    if lf == NULL:
        if n >= rl_limit:
            _raise(R_LINE_TOO_LONG, 414)
        if n >= limit:
            _raise(R_HEAD_TOO_LARGE, 431)
        return None
    j = lf - b
    if j == p or b[j - 1] != 13:
        _raise(R_BARE_LF, 400)
    q = j - 1

    # request line: method SP target SP HTTP/d.d
    i = p
    while i < q and T_TCHAR[b[i]]:
        i += 1
    if i == p:
        _raise(R_METHOD, 400)
    if i == q:
        _raise(R_NO_TARGET, 400)
    if b[i] != 32:
        _raise(R_METHOD, 400)
    ms = p
    me = i
    ts = i + 1
    i = ts
    while i < q and 0x21 <= b[i] <= 0x7E:
        i += 1
    if i == ts:
        _raise(R_TARGET, 400)
    if i == q:
        _raise(R_NO_VERSION, 400)
    if b[i] != 32:
        _raise(R_TARGET, 400)
    te = i
    v = i + 1
    if (q - v != 8 or memcmp(b + v, b"HTTP/", 5) != 0 or b[v + 5] < 0x30 or b[v + 5] > 0x39
            or b[v + 6] != 0x2E or b[v + 7] < 0x30 or b[v + 7] > 0x39):
        _raise(R_VERSION, 400)
    if b[v + 5] != 0x31:
        _raise(R_VERSION_UNSUPPORTED, 505)
    if b[v + 7] != 0x30 and b[v + 7] != 0x31:
        _raise(R_VERSION, 400)
    version = b[v + 7] - 0x30

    # target form; a fragment is never sent (RFC 9110 section 4.2.4): Envoy answers 400
    if memchr(b + ts, 0x23, te - ts) != NULL:
        _raise(R_FRAGMENT, 400)
    if me - ms == 7 and memcmp(b + ms, b"CONNECT", 7) == 0:
        if not _valid_authority(b, ts, te, True):
            _raise(R_CONNECT_TARGET, 400)
        ps = pe = ts
        hs = ts
        he = te
    elif b[ts] == 0x2F:
        ps = ts
        pe = te
    elif te - ts == 1 and b[ts] == 0x2A:
        if not (me - ms == 7 and memcmp(b + ms, b"OPTIONS", 7) == 0):
            _raise(R_ASTERISK, 400)
        ps = ts
        pe = te
    else:
        if te - ts >= 8 and _eq_lower(b + ts, b"https://", 8):
            a = ts + 8
        elif te - ts >= 7 and _eq_lower(b + ts, b"http://", 7):
            a = ts + 7
        else:
            _raise(R_TARGET_FORM, 400)
        i = a
        while i < te and b[i] != 0x2F and b[i] != 0x3F:
            i += 1
        if not _valid_authority(b, a, i, False):
            _raise(R_ABS_AUTHORITY, 400)
        hs = a
        he = i
        ps = i
        pe = te
        path_slash = i == te or b[i] != 0x2F

    if not _scan_fields(b, j + 1, n, limit, 400, 431, R_HEAD_TOO_LARGE, R_TOO_MANY_HEADERS,
                        f, &nf, &end):
        return None

    for k in range(nf):
        t = f[k].kind
        if t == K_OTHER:
            continue
        if t == K_HOST:
            nhost += 1
            if hi < 0:
                hi = k
        elif t == K_CL:
            ncl += 1
            if cli < 0:
                cli = k
        elif t == K_TE:
            nte += 1
            if tei < 0:
                tei = k
        elif t == K_CONNECTION:
            has_conn = True
        elif t == K_EXPECT:
            has_expect = True
        elif t == K_UPGRADE:
            has_upgrade = True

    if nhost > 1:
        _raise(R_HOST_MULTI, 400)
    if nhost == 0 and version == 1:
        _raise(R_HOST_MISSING, 400)
    if nhost and f[hi].ve > f[hi].vs and not _valid_authority(b, f[hi].vs, f[hi].ve, False):
        _raise(R_HOST, 400)
    if ncl > 1:
        _raise(R_CL_MULTI, 400)
    if ncl:
        cl = _content_length(b, f[cli].vs, f[cli].ve, 400)
    _connection_tokens(b, f, nf, 400, &conn)
    if nte:
        if version == 0:
            _raise(R_TE_HTTP10, 400)
        if nte > 1:
            _raise(R_TE_MULTI, 400)
        if ncl:
            _raise(R_CL_TE, 400)
        chunked = _transfer_coding(b, f[tei].vs, f[tei].ve, 501)
    if (chunked or cl > 0) and me - ms == 7 and memcmp(b + ms, b"CONNECT", 7) == 0:
        _raise(R_CONNECT_BODY, 400)
    if has_expect:
        for k in range(nf):
            if f[k].kind == K_EXPECT and not (f[k].ve - f[k].vs == 12
                                              and _eq_lower(b + f[k].vs, b"100-continue", 12)):
                _raise(R_EXPECT, 417)

    h = RequestHead.__new__(RequestHead)
    h._store(b, start, end, f, nf)
    h._cl = cl
    h._chunked = chunked
    if version == 1:
        h._keep_alive = not conn.close
    else:
        h._keep_alive = conn.keep_alive and not conn.close
    h._has_conn = has_conn
    h._ms = ms - start
    h._me = me - start
    h._ts = ts - start
    h._te = te - start
    h._ps = ps - start
    h._pe = pe - start
    h._path_slash = path_slash
    if hs < 0 and nhost:
        hs = f[hi].vs
        he = f[hi].ve
    if hs >= 0:
        h._hs = hs - start
        h._he = he - start
    else:
        h._hs = -1
        h._he = -1
    h._version = version
    h._expect_continue = has_expect and version == 1
    h._upgrade = has_upgrade and conn.upgrade and version == 1
    return h


def parse_response(buf, Py_ssize_t start=0):
    """Parse the upstream response head at buf[start:]; None until complete; errors are 502."""
    cdef object keep = _buf_keep(buf)
    cdef Py_ssize_t n
    cdef const unsigned char* b = _buf_ptr(keep, &n)
    return parse_response_c(b, n, start)


cdef ResponseHead parse_response_c(const unsigned char* b, Py_ssize_t n, Py_ssize_t start):
    """parse_response over a C buffer b[0:n]; None if incomplete."""
    cdef Field f[C_MAX_HEADERS]
    cdef int nf = 0, k, t, status, version
    cdef Py_ssize_t limit, p, bound, j, q, i, end = 0, rs
    cdef const unsigned char* lf
    cdef int ncl = 0, nte = 0, cli = -1, tei = -1
    cdef bint has_conn = False, chunked = False
    cdef long long cl = -1
    cdef Conn conn
    cdef ResponseHead h

    if start < 0 or start > n:
        raise ValueError("start out of range")
    limit = start + C_MAX_RESPONSE_HEAD
    p = _skip_leading(b, start, n)
    bound = limit if limit < n else n
    lf = NULL
    if p < bound:
        lf = <const unsigned char*>memchr(b + p, 10, <size_t>(bound - p))
    if lf == NULL:
        if n >= limit:
            _raise(R_RESP_TOO_LARGE, 502)
        return None
    j = lf - b
    if j == p or b[j - 1] != 13:
        _raise(R_BARE_LF, 502)
    q = j - 1
    # HTTP/1.x SP 3DIGIT [SP reason]
    if (q - p < 12 or memcmp(b + p, b"HTTP/1.", 7) != 0 or (b[p + 7] != 0x30 and b[p + 7] != 0x31)
            or b[p + 8] != 32):
        _raise(R_STATUS_LINE, 502)
    for k in range(9, 12):
        if b[p + k] < 0x30 or b[p + k] > 0x39:
            _raise(R_STATUS_LINE, 502)
    rs = q
    if q - p > 12:
        if b[p + 12] != 32:
            _raise(R_STATUS_LINE, 502)
        rs = p + 13
        for i in range(p + 13, q):
            if not T_FVAL[b[i]]:
                _raise(R_STATUS_LINE, 502)
    status = (b[p + 9] - 0x30) * 100 + (b[p + 10] - 0x30) * 10 + (b[p + 11] - 0x30)
    if status < 100 or status > 599:
        _raise(R_STATUS_CODE, 502)
    version = b[p + 7] - 0x30

    if not _scan_fields(b, j + 1, n, limit, 502, 502, R_RESP_TOO_LARGE, R_RESP_TOO_MANY,
                        f, &nf, &end):
        return None
    for k in range(nf):
        t = f[k].kind
        if t == K_CL:
            ncl += 1
            if cli < 0:
                cli = k
        elif t == K_TE:
            nte += 1
            if tei < 0:
                tei = k
        elif t == K_CONNECTION:
            has_conn = True
    if ncl > 1:
        _raise(R_CL_MULTI, 502)
    if ncl:
        cl = _content_length(b, f[cli].vs, f[cli].ve, 502)
    _connection_tokens(b, f, nf, 502, &conn)
    if nte:
        if version == 0:
            _raise(R_TE_HTTP10, 502)
        if nte > 1:
            _raise(R_TE_MULTI, 502)
        if ncl:
            _raise(R_CL_TE, 502)
        chunked = _transfer_coding(b, f[tei].vs, f[tei].ve, 502)

    h = ResponseHead.__new__(ResponseHead)
    h._store(b, start, end, f, nf)
    h._cl = cl
    h._chunked = chunked
    if version == 1:
        h._keep_alive = not conn.close
    else:
        h._keep_alive = conn.keep_alive and not conn.close
    h._has_conn = has_conn
    h._status = status
    h._version = version
    h._rs = rs - start
    h._re = q - start
    return h


def request_body_kind(head):
    """(BODY_CHUNKED, -1), (BODY_LENGTH, n) for n > 0, else (BODY_NONE, 0)."""
    cdef long long n
    if head.chunked:
        return BODY_CHUNKED, -1
    n = head.content_length
    if n > 0:
        return BODY_LENGTH, n
    return BODY_NONE, 0


def response_body_kind(head, request_was_head):
    """How the response body is framed (RFC 9112 §6.3). A 204 with CL > 0 or TE is a 502."""
    cdef int status
    cdef bint chunked
    cdef long long cl
    cdef ResponseHead rh
    if isinstance(head, ResponseHead):
        rh = <ResponseHead>head
        status = rh._status
        chunked = rh._chunked
        cl = rh._cl
    else:
        status = head.status
        chunked = head.chunked
        cl = head.content_length
    if status == 204 and (chunked or cl > 0):
        _raise(R_204_BODY, 502)
    if status < 200 or status == 204 or status == 304 or request_was_head:
        return BODY_NONE, 0
    if chunked:
        return BODY_CHUNKED, -1
    if cl >= 0:
        return BODY_LENGTH, cl
    return BODY_CLOSE, -1


# ---------------------------------------------------------------------------------------------
# chunked body

cdef uint64_t _chunk_size_line(const unsigned char* b, Py_ssize_t p, Py_ssize_t e) except? 0xFFFFFFFFFFFFFFFF:
    cdef Py_ssize_t i = p, j, n0, v0
    cdef uint64_t size = 0
    cdef int d
    cdef bint first = True
    cdef unsigned char c
    while i < e:
        d = T_HEX[b[i]]
        if d < 0:
            break
        if i - p < 16:
            size = size * 16 + <uint64_t>d
        i += 1
    if i == p:
        _raise(R_CHUNK_SIZE, 400)
    if i - p > 16:
        _raise(R_CHUNK_SIZE_LARGE, 400)
    while True:
        j = i
        while j < e and _ows(b[j]):
            j += 1
        if j == e:
            if j != i:
                _raise(R_CHUNK_WS, 400)
            return size
        if b[j] != 0x3B:
            _raise(R_CHUNK_SIZE if (first and j == i) else R_CHUNK_EXT, 400)
        first = False
        i = j + 1
        while i < e and _ows(b[i]):
            i += 1
        n0 = i
        while i < e and T_TCHAR[b[i]]:
            i += 1
        if i == n0:
            _raise(R_CHUNK_EXT_NAME, 400)
        j = i
        while j < e and _ows(b[j]):
            j += 1
        if j < e and b[j] == 0x3D:
            i = j + 1
            while i < e and _ows(b[i]):
                i += 1
            if i < e and b[i] == 0x22:
                i += 1
                while True:
                    if i >= e:
                        _raise(R_CHUNK_EXT_VALUE, 400)
                    c = b[i]
                    if c == 0x22:
                        i += 1
                        break
                    if c == 0x5C:
                        if i + 1 >= e or not T_QPAIR[b[i + 1]]:
                            _raise(R_CHUNK_EXT_VALUE, 400)
                        i += 2
                    elif T_QDTEXT[c]:
                        i += 1
                    else:
                        _raise(R_CHUNK_EXT_VALUE, 400)
            else:
                v0 = i
                while i < e and T_TCHAR[b[i]]:
                    i += 1
                if i == v0:
                    _raise(R_CHUNK_EXT_VALUE, 400)


cdef class ChunkedReader:
    """Sans-IO decoder of a chunked body: feed it with step(buf, pos, end)."""

    def __cinit__(self):
        self._state = S_SIZE
        self._remaining = 0
        self._total = 0
        self._trailer_bytes = 0
        self._trailers = 0

    @property
    def total(self):
        return self._total

    @property
    def done(self):
        return self._state == S_DONE

    cdef int _fail(self, object reason) except -1:
        self._state = S_ERROR
        raise ProtocolError(reason, 400)

    def step(self, buf, Py_ssize_t pos, Py_ssize_t end):
        cdef object keep = _buf_keep(buf)
        cdef Py_ssize_t n, a = 0, z = 0
        cdef const unsigned char* b = _buf_ptr(keep, &n)
        cdef int kind
        if pos < 0 or end < pos or end > n:
            raise ValueError("pos/end out of range")
        kind = self.step_c(b, pos, end, &a, &z)
        return kind, a, z

    cdef int step_c(self, const unsigned char* b, Py_ssize_t pos, Py_ssize_t end,
                    Py_ssize_t* out_a, Py_ssize_t* out_b) except -1:
        """`step` over a C buffer: returns NEED_DATA/DATA/DONE with the (a, b) pair in out_a/out_b."""
        cdef Py_ssize_t j, q, lim, bound, avail
        cdef const unsigned char* lf
        cdef uint64_t k, size
        while True:
            if self._state == S_DATA:
                avail = end - pos
                if avail <= 0:
                    out_a[0] = pos
                    out_b[0] = pos
                    return C_NEED_DATA
                k = self._remaining if self._remaining < <uint64_t>avail else <uint64_t>avail
                self._remaining -= k
                self._total += k
                if self._remaining == 0:
                    self._state = S_DATA_CRLF
                out_a[0] = pos
                out_b[0] = pos + <Py_ssize_t>k
                return C_DATA
            elif self._state == S_DATA_CRLF:
                if pos >= end:
                    out_a[0] = pos
                    out_b[0] = pos
                    return C_NEED_DATA
                if b[pos] != 13:
                    self._fail(R_CHUNK_DATA_CRLF)
                if pos + 1 >= end:
                    out_a[0] = pos
                    out_b[0] = pos
                    return C_NEED_DATA
                if b[pos + 1] != 10:
                    self._fail(R_CHUNK_DATA_CRLF)
                pos += 2
                self._state = S_SIZE
            elif self._state == S_SIZE:
                lim = pos + C_MAX_CHUNK_LINE + 2
                bound = lim if lim < end else end
                lf = NULL
                if pos < bound:
                    lf = <const unsigned char*>memchr(b + pos, 10, <size_t>(bound - pos))
                if lf == NULL:
                    if end >= lim:
                        self._fail(R_CHUNK_LINE_TOO_LONG)
                    out_a[0] = pos
                    out_b[0] = pos
                    return C_NEED_DATA
                j = lf - b
                if j == pos or b[j - 1] != 13:
                    self._fail(R_BARE_LF)
                try:
                    size = _chunk_size_line(b, pos, j - 1)
                except ProtocolError:
                    self._state = S_ERROR
                    raise
                pos = j + 1
                if size == 0:
                    self._state = S_TRAILER
                else:
                    self._remaining = size
                    self._state = S_DATA
            elif self._state == S_TRAILER:
                lim = pos + (C_MAX_REQUEST_HEAD - self._trailer_bytes)
                bound = lim if lim < end else end
                lf = NULL
                if pos < bound:
                    lf = <const unsigned char*>memchr(b + pos, 10, <size_t>(bound - pos))
                if lf == NULL:
                    if end >= lim:
                        self._fail(R_TRAILERS_TOO_LARGE)
                    out_a[0] = pos
                    out_b[0] = pos
                    return C_NEED_DATA
                j = lf - b
                if j == pos or b[j - 1] != 13:
                    self._fail(R_BARE_LF)
                q = j - 1
                if q == pos:
                    self._state = S_DONE
                    out_a[0] = j + 1
                    out_b[0] = j + 1
                    return C_DONE
                if self._trailers == C_MAX_HEADERS:
                    self._fail(R_TOO_MANY_TRAILERS)
                try:
                    _check_field(b, pos, q)
                except ProtocolError:
                    self._state = S_ERROR
                    raise
                self._trailers += 1
                self._trailer_bytes += j + 1 - pos
                pos = j + 1
            elif self._state == S_DONE:
                out_a[0] = pos
                out_b[0] = pos
                return C_DONE
            else:
                _raise(R_CHUNKED_FAILED, 400)


cdef int _check_field(const unsigned char* b, Py_ssize_t p, Py_ssize_t q) except -1:
    cdef Field f
    return _field_line(b, p, q, 400, &f)
