"""Strict HTTP/1.1 head and chunked-body parser, pure Python.

This is the fallback and the test oracle for the compiled twin ``ext/h1parse.pyx``
(``meshcore._ext.h1parse``): same names, same results, same ``ProtocolError`` status and reason.
Import the API from ``meshcore.proto.wire``, which picks the compiled module when it is built.

Rules (hardening.md §1): only CRLF line ends; exactly ``method SP target SP HTTP/d.d``; token field
names with no whitespace before the colon; no obs-fold; values are VCHAR/obs-text/SP/HTAB with OWS
trimmed; one decimal Content-Length (1-19 digits, at most 2**63-1); Transfer-Encoding exactly
``chunked`` and never together with Content-Length; one valid Host on HTTP/1.1.

How a result is decided, so that a split buffer never gives a different answer than the whole one:

* the size limits are positional: the request line must end (CRLF) within ``MAX_REQUEST_LINE`` + 2
  bytes (else 414), the head within ``MAX_REQUEST_HEAD`` bytes (else 431), and a 101st field line is
  refused (431) as soon as its first byte arrives;
* every other check runs on complete lines only, in order; the semantic checks (Host, framing,
  Expect) run once the empty line has arrived.

So a prefix of a buffer either returns None or raises exactly what the whole buffer raises.

Choices where the brief or the RFC left one open:

* ``HTTP/1.x`` with x other than 0 or 1 is refused with 400 (``HTTP/2.0`` and other majors: 505);
* ``chunked`` not last (``chunked, gzip``) or applied twice is 400 (RFC 9112 §6.3 MUST); any other
  coding list is 501; with Content-Length present the answer is always 400;
* a response status line without a reason (``HTTP/1.1 200\\r\\n``, no SP) is accepted; codes outside
  100-599 are refused;
* Host and authorities: reg-name limited to unreserved characters (ALPHA DIGIT ``-._~``), an IPv4
  address, or ``[IPv6]`` (hex digits, ``:`` and ``.``), with an optional ``:port`` of 1-5 digits
  up to 65535; an empty Host value is accepted on 1.1 (RFC 9112 §3.2);
* a request target containing ``#`` (a fragment, which a client never sends) is 400, as Envoy 1.40
  answers it (checked before the target's form);
* CONNECT needs authority-form with a port; ``host`` is then the target and ``path`` is ``b""``;
  a CONNECT with a non-zero Content-Length or chunked body is 400;
* ``upgrade``: an Upgrade header that Connection nominates (``connection: upgrade``), on HTTP/1.1
  only (RFC 9110 §7.8: an Upgrade header without the nomination is ignored);
  ``expect_continue`` is False on HTTP/1.0 requests (RFC 9110 §10.1.1);
  an unknown ``Expect`` value is 417 on either version;
* Connection elements must be tokens (400 otherwise); ``te: trailers`` is forwarded even when
  Connection nominates ``te`` (as Envoy does); nominations never affect framing;
* the parser is stateless: the caller re-parses from ``start`` when more bytes arrive. Results can
  only change when a new LF arrives or a size limit is crossed.
"""

import re

from meshcore.errors import ProtocolError

__all__ = [
    "MAX_REQUEST_HEAD", "MAX_HEADERS", "MAX_REQUEST_LINE", "MAX_RESPONSE_HEAD", "MAX_CHUNK_LINE",
    "BODY_NONE", "BODY_LENGTH", "BODY_CHUNKED", "BODY_CLOSE", "NEED_DATA", "DATA", "DONE",
    "RequestHead", "ResponseHead", "ChunkedReader", "parse_request", "parse_response",
    "request_body_kind", "response_body_kind", "R_FRAGMENT",
]

MAX_REQUEST_HEAD = 60 * 1024
MAX_HEADERS = 100
MAX_REQUEST_LINE = 8192
MAX_RESPONSE_HEAD = 80 * 1024
MAX_CHUNK_LINE = 4096
MAX_LEADING_CRLF = 4

BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2
BODY_CLOSE = 3

NEED_DATA = 0
DATA = 1
DONE = 2

_CL_MAX = (1 << 63) - 1

# Reasons: the same strings in the compiled twin (the differential tests compare them).
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

_TCHAR_CLASS = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset(b"0123456789")
_HEX = {c: i for i, c in enumerate(b"0123456789abcdef")}
_HEX.update({c: i + 10 for i, c in enumerate(b"ABCDEF")})
_REGNAME = frozenset(b"-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_IPV6 = frozenset(b"0123456789abcdefABCDEF:.")
_QDTEXT = frozenset([9, 32, 0x21] + list(range(0x23, 0x5C)) + list(range(0x5D, 0x7F))
                    + list(range(0x80, 0x100)))
_QPAIR = frozenset([9, 32] + list(range(0x21, 0x7F)) + list(range(0x80, 0x100)))

_RL_RE = re.compile(rb"([" + _TCHAR_CLASS + rb"]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_FIELD_RE = re.compile(rb"([" + _TCHAR_CLASS + rb"]+):[\t\x20-\x7e\x80-\xff]*")
_STATUS_RE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_TOKEN_RE = re.compile(rb"[" + _TCHAR_CLASS + rb"]+")
_CL_RE = re.compile(rb"[0-9]{1,19}")

_REQ_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"upgrade",
                      b"transfer-encoding", b"content-length", b"host", b"expect"])
_RESP_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                       b"content-length", b"upgrade", b"te"])


def _err(reason, status):
    raise ProtocolError(reason, status)


def _as_buffer(buf):
    if type(buf) is bytes or type(buf) is bytearray:
        return buf
    if isinstance(buf, (bytes, bytearray)):
        return buf
    return bytes(buf)


def _ows_end(b, i, e):
    while i < e and (b[i] == 32 or b[i] == 9):
        i += 1
    return i


def _trim(v):
    """Trim SP/HTAB (and nothing else) from both ends of a bytes value."""
    i = 0
    e = len(v)
    while i < e and (v[i] == 32 or v[i] == 9):
        i += 1
    while e > i and (v[e - 1] == 32 or v[e - 1] == 9):
        e -= 1
    return v[i:e]


def _lower(v):
    # bytes.lower() only maps ASCII A-Z, so obs-text stays byte-exact.
    return v.lower()


def _valid_authority(b, require_port):
    """host [":" port]; host = reg-name (unreserved) / IPv4 / "[" IPv6 "]"; port = 1*5DIGIT <= 65535."""
    e = len(b)
    if e == 0:
        return False
    if b[0] == 0x5B:  # '['
        i = 1
        colon = False
        while i < e and b[i] in _IPV6:
            if b[i] == 0x3A:
                colon = True
            i += 1
        if i >= e or b[i] != 0x5D or i == 1 or not colon:
            return False
        i += 1
    else:
        i = 0
        while i < e and b[i] in _REGNAME:
            i += 1
        if i == 0:
            return False
    if i == e:
        return not require_port
    if b[i] != 0x3A:
        return False
    i += 1
    if e - i < 1 or e - i > 5:
        return False
    port = 0
    while i < e:
        c = b[i]
        if c not in _DIGITS:
            return False
        port = port * 10 + (c - 48)
        i += 1
    return port <= 65535


def _field_error(b, p, q, status):
    """Say why the field line b[p:q] (no CRLF) is invalid, scanning left to right."""
    c = b[p]
    if c == 32 or c == 9:
        _err(R_OBS_FOLD, status)
    i = p
    while i < q and b[i] in _TCHAR:
        i += 1
    if i == q:
        _err(R_NO_COLON, status)
    c = b[i]
    if c != 0x3A:
        if c == 32 or c == 9:
            _err(R_WS_COLON, status)
        _err(R_NAME, status)
    if i == p:
        _err(R_EMPTY_NAME, status)
    _err(R_VALUE, status)


def _scan_fields(b, p, n, limit, status, r_large, r_many):
    """Scan field lines from p. Return (fields, end) or None when incomplete.

    fields: list of (lowercase name, value) with OWS trimmed; end: index just past the empty line.
    """
    fields = []
    nh = 0
    bound = limit if limit < n else n
    fullmatch = _FIELD_RE.fullmatch
    while True:
        if nh == MAX_HEADERS and p < n and b[p] != 13:
            _err(r_many, 431 if status == 400 else status)
        j = b.find(b"\n", p, bound)
        if j < 0:
            if n >= limit:
                _err(r_large, 431 if status == 400 else status)
            return None
        if j == p or b[j - 1] != 13:
            _err(R_BARE_LF, status)
        q = j - 1
        if q == p:
            return fields, j + 1
        m = fullmatch(b, p, q)
        if m is None:
            _field_error(b, p, q, status)
        c = m.end(1)
        vs = c + 1
        while vs < q and (b[vs] == 32 or b[vs] == 9):
            vs += 1
        ve = q
        while ve > vs and (b[ve - 1] == 32 or b[ve - 1] == 9):
            ve -= 1
        fields.append((bytes(b[p:c]).lower(), bytes(b[vs:ve])))
        nh += 1
        p = j + 1


def _connection_tokens(values, status):
    """Lowercase tokens of all Connection values; empty list elements are skipped."""
    out = []
    for v in values:
        for el in v.split(b","):
            el = _trim(el)
            if not el:
                continue
            if _TOKEN_RE.fullmatch(el) is None:
                _err(R_CONNECTION, status)
            out.append(el.lower())
    return out


def _transfer_coding(v, status):
    """Return True for exactly `chunked`; raise otherwise (400 for misuse of chunked, else `status`)."""
    if v.lower() == b"chunked":
        return True
    els = [el for el in (_trim(el).lower() for el in v.split(b",")) if el]  # empty elements ignored
    count = 0
    for el in els:
        if el == b"chunked":
            count += 1
    if count > 1:
        _err(R_TE_TWICE, 400 if status == 501 else status)
    if count == 1 and els[-1] != b"chunked":
        _err(R_TE_NOT_LAST, 400 if status == 501 else status)
    _err(R_TE_UNKNOWN, status)


def _content_length(v, status):
    if _CL_RE.fullmatch(v) is None:
        _err(R_CL, status)
    n = 0
    for c in v:
        n = n * 10 + (c - 48)
    if n > _CL_MAX:
        _err(R_CL, status)
    return n


class _Head:
    __slots__ = ("_fields", "_end", "_content_length", "_chunked", "_keep_alive", "_nominated")

    @property
    def end(self):
        return self._end

    @property
    def content_length(self):
        return self._content_length

    @property
    def chunked(self):
        return self._chunked

    @property
    def keep_alive(self):
        return self._keep_alive

    @property
    def n_headers(self):
        return len(self._fields)

    def get(self, name):
        name = name.lower()
        for k, v in self._fields:
            if k == name:
                return v
        return None

    def get_all(self, name):
        name = name.lower()
        return [v for k, v in self._fields if k == name]

    def count_prefix(self, prefix):
        """How many field names start with `prefix` (lowercase), e.g. b"x-envoy-"."""
        prefix = prefix.lower()
        return sum(1 for k, _ in self._fields if k.startswith(prefix))

    def headers(self):
        return list(self._fields)

    def _forward(self, hop, keep_te, drop):
        drop = frozenset(d.lower() for d in drop)
        out = []
        for k, v in self._fields:
            if k in hop or k in drop:
                continue
            if k == b"te":
                if not keep_te or v.lower() != b"trailers":
                    continue
            elif k in self._nominated:
                continue
            out.append(k + b": " + v + b"\r\n")
        return b"".join(out)


class RequestHead(_Head):
    """A parsed request head. Read-only; bytes are copied out of the caller's buffer."""

    __slots__ = ("_method", "_target", "_path", "_version", "_host", "_expect_continue",
                 "_upgrade")

    method = property(lambda self: self._method)
    target = property(lambda self: self._target)
    path = property(lambda self: self._path)
    version = property(lambda self: self._version)
    host = property(lambda self: self._host)
    expect_continue = property(lambda self: self._expect_continue)
    upgrade = property(lambda self: self._upgrade)

    def forward_headers(self, drop=()):
        return self._forward(_REQ_HOP, True, drop)

    def __repr__(self):
        return (f"RequestHead({self._method!r}, {self._target!r}, version={self._version}, "
                f"host={self._host!r}, n_headers={len(self._fields)}, end={self._end})")


class ResponseHead(_Head):
    """A parsed response head. Read-only."""

    __slots__ = ("_status", "_version", "_reason")

    status = property(lambda self: self._status)
    version = property(lambda self: self._version)
    reason = property(lambda self: self._reason)

    def forward_headers(self, drop=()):
        return self._forward(_RESP_HOP, False, drop)

    def __repr__(self):
        return (f"ResponseHead({self._status}, {self._reason!r}, version={self._version}, "
                f"n_headers={len(self._fields)}, end={self._end})")


def _request_line_error(b, p, q):
    i = p
    while i < q and b[i] in _TCHAR:
        i += 1
    if i == p:
        _err(R_METHOD, 400)
    if i == q:
        _err(R_NO_TARGET, 400)
    if b[i] != 32:
        _err(R_METHOD, 400)
    t = i = i + 1
    while i < q and 0x21 <= b[i] <= 0x7E:
        i += 1
    if i == t:
        _err(R_TARGET, 400)
    if i == q:
        _err(R_NO_VERSION, 400)
    if b[i] != 32:
        _err(R_TARGET, 400)
    _err(R_VERSION, 400)


def _split_target(method, target):
    """Return (path, authority or None) for the request target, or raise 400."""
    if b"#" in target:  # a fragment is never sent (RFC 9110 section 4.2.4): Envoy answers 400
        _err(R_FRAGMENT, 400)
    if method == b"CONNECT":
        if not _valid_authority(target, True):
            _err(R_CONNECT_TARGET, 400)
        return b"", target
    c = target[0]
    if c == 0x2F:  # '/'
        return target, None
    if target == b"*":
        if method != b"OPTIONS":
            _err(R_ASTERISK, 400)
        return target, None
    low = target[:8].lower()
    if low[:7] == b"http://":
        a = 7
    elif low == b"https://":
        a = 8
    else:
        _err(R_TARGET_FORM, 400)
    e = len(target)
    i = a
    while i < e and target[i] != 0x2F and target[i] != 0x3F:
        i += 1
    authority = target[a:i]
    if not _valid_authority(authority, False):
        _err(R_ABS_AUTHORITY, 400)
    if i == e:
        return b"/", authority
    if target[i] == 0x2F:
        return target[i:], authority
    return b"/" + target[i:], authority


def parse_request(buf, start=0):
    """Parse the request head at buf[start:]; None until the empty line arrives."""
    b = _as_buffer(buf)
    n = len(b)
    if start < 0 or start > n:
        raise ValueError("start out of range")
    limit = start + MAX_REQUEST_HEAD
    p = start
    skipped = 0
    while skipped < MAX_LEADING_CRLF and p + 1 < n and b[p] == 13 and b[p + 1] == 10:
        p += 2
        skipped += 1
    rl_limit = p + MAX_REQUEST_LINE + 2
    j = b.find(b"\n", p, rl_limit if rl_limit < limit else limit)
    if j < 0:
        if n >= rl_limit:
            _err(R_LINE_TOO_LONG, 414)
        if n >= limit:
            _err(R_HEAD_TOO_LARGE, 431)
        return None
    if j == p or b[j - 1] != 13:
        _err(R_BARE_LF, 400)
    q = j - 1
    m = _RL_RE.fullmatch(b, p, q)
    if m is None:
        _request_line_error(b, p, q)
    if b[m.start(3)] != 0x31:
        _err(R_VERSION_UNSUPPORTED, 505)
    minor = b[m.start(4)]
    if minor != 0x30 and minor != 0x31:
        _err(R_VERSION, 400)
    version = minor - 0x30
    method = bytes(b[p:m.end(1)])
    target = bytes(b[m.start(2):m.end(2)])
    path, authority = _split_target(method, target)

    r = _scan_fields(b, j + 1, n, limit, 400, R_HEAD_TOO_LARGE, R_TOO_MANY_HEADERS)
    if r is None:
        return None
    fields, end = r

    hosts = []
    cls = []
    tes = []
    conns = []
    expects = []
    upgrade = False
    for k, v in fields:
        if k == b"host":
            hosts.append(v)
        elif k == b"content-length":
            cls.append(v)
        elif k == b"transfer-encoding":
            tes.append(v)
        elif k == b"connection":
            conns.append(v)
        elif k == b"expect":
            expects.append(v)
        elif k == b"upgrade":
            upgrade = True

    if len(hosts) > 1:
        _err(R_HOST_MULTI, 400)
    if not hosts and version == 1:
        _err(R_HOST_MISSING, 400)
    if hosts and hosts[0] and not _valid_authority(hosts[0], False):
        _err(R_HOST, 400)
    if len(cls) > 1:
        _err(R_CL_MULTI, 400)
    content_length = _content_length(cls[0], 400) if cls else -1
    tokens = _connection_tokens(conns, 400)
    chunked = False
    if tes:
        if version == 0:
            _err(R_TE_HTTP10, 400)
        if len(tes) > 1:
            _err(R_TE_MULTI, 400)
        if cls:
            _err(R_CL_TE, 400)
        chunked = _transfer_coding(tes[0], 501)
    if method == b"CONNECT" and (chunked or content_length > 0):
        _err(R_CONNECT_BODY, 400)
    for v in expects:
        if v.lower() != b"100-continue":
            _err(R_EXPECT, 417)

    h = RequestHead()
    h._fields = fields
    h._end = end
    h._content_length = content_length
    h._chunked = chunked
    if version == 1:
        h._keep_alive = b"close" not in tokens
    else:
        h._keep_alive = b"keep-alive" in tokens and b"close" not in tokens
    h._nominated = frozenset(tokens)
    h._method = method
    h._target = target
    h._path = path
    h._version = version
    h._host = authority if authority is not None else (hosts[0] if hosts else None)
    h._expect_continue = bool(expects) and version == 1
    h._upgrade = upgrade and version == 1 and b"upgrade" in tokens
    return h


def parse_response(buf, start=0):
    """Parse the upstream response head at buf[start:]; None until complete; errors are 502."""
    b = _as_buffer(buf)
    n = len(b)
    if start < 0 or start > n:
        raise ValueError("start out of range")
    limit = start + MAX_RESPONSE_HEAD
    p = start
    skipped = 0
    while skipped < MAX_LEADING_CRLF and p + 1 < n and b[p] == 13 and b[p + 1] == 10:
        p += 2
        skipped += 1
    j = b.find(b"\n", p, limit if limit < n else n)
    if j < 0:
        if n >= limit:
            _err(R_RESP_TOO_LARGE, 502)
        return None
    if j == p or b[j - 1] != 13:
        _err(R_BARE_LF, 502)
    q = j - 1
    m = _STATUS_RE.fullmatch(b, p, q)
    if m is None:
        _err(R_STATUS_LINE, 502)
    s = m.start(2)
    status = (b[s] - 48) * 100 + (b[s + 1] - 48) * 10 + (b[s + 2] - 48)
    if status < 100 or status > 599:
        _err(R_STATUS_CODE, 502)
    version = b[m.start(1)] - 0x30
    reason = bytes(b[s + 4:q]) if q > s + 3 else b""

    r = _scan_fields(b, j + 1, n, limit, 502, R_RESP_TOO_LARGE, R_RESP_TOO_MANY)
    if r is None:
        return None
    fields, end = r
    cls = []
    tes = []
    conns = []
    for k, v in fields:
        if k == b"content-length":
            cls.append(v)
        elif k == b"transfer-encoding":
            tes.append(v)
        elif k == b"connection":
            conns.append(v)
    if len(cls) > 1:
        _err(R_CL_MULTI, 502)
    content_length = _content_length(cls[0], 502) if cls else -1
    tokens = _connection_tokens(conns, 502)
    chunked = False
    if tes:
        if version == 0:
            _err(R_TE_HTTP10, 502)
        if len(tes) > 1:
            _err(R_TE_MULTI, 502)
        if cls:
            _err(R_CL_TE, 502)
        chunked = _transfer_coding(tes[0], 502)

    h = ResponseHead()
    h._fields = fields
    h._end = end
    h._content_length = content_length
    h._chunked = chunked
    if version == 1:
        h._keep_alive = b"close" not in tokens
    else:
        h._keep_alive = b"keep-alive" in tokens and b"close" not in tokens
    h._nominated = frozenset(tokens)
    h._status = status
    h._version = version
    h._reason = reason
    return h


def request_body_kind(head):
    """(BODY_CHUNKED, -1), (BODY_LENGTH, n) for n > 0, else (BODY_NONE, 0)."""
    if head.chunked:
        return BODY_CHUNKED, -1
    n = head.content_length
    if n > 0:
        return BODY_LENGTH, n
    return BODY_NONE, 0


def response_body_kind(head, request_was_head):
    """How the response body is framed (RFC 9112 §6.3). A 204 with CL > 0 or TE is a 502."""
    status = head.status
    if status == 204 and (head.chunked or head.content_length > 0):
        _err(R_204_BODY, 502)
    if status < 200 or status == 204 or status == 304 or request_was_head:
        return BODY_NONE, 0
    if head.chunked:
        return BODY_CHUNKED, -1
    if head.content_length >= 0:
        return BODY_LENGTH, head.content_length
    return BODY_CLOSE, -1


_S_SIZE = 0
_S_DATA = 1
_S_DATA_CRLF = 2
_S_TRAILER = 3
_S_DONE = 4
_S_ERROR = 5


class ChunkedReader:
    """Sans-IO decoder of a chunked body: feed it with step(buf, pos, end)."""

    __slots__ = ("_state", "_remaining", "_total", "_trailer_bytes", "_trailers")

    def __init__(self):
        self._state = _S_SIZE
        self._remaining = 0
        self._total = 0
        self._trailer_bytes = 0
        self._trailers = 0

    @property
    def total(self):
        return self._total

    @property
    def done(self):
        return self._state == _S_DONE

    def step(self, buf, pos, end):
        b = _as_buffer(buf)
        if pos < 0 or end < pos or end > len(b):
            raise ValueError("pos/end out of range")
        try:
            return self._step(b, pos, end)
        except ProtocolError:
            self._state = _S_ERROR
            raise

    def _step(self, b, pos, end):
        while True:
            st = self._state
            if st == _S_DATA:
                avail = end - pos
                if avail <= 0:
                    return NEED_DATA, pos, pos
                k = self._remaining if self._remaining < avail else avail
                self._remaining -= k
                self._total += k
                if self._remaining == 0:
                    self._state = _S_DATA_CRLF
                return DATA, pos, pos + k
            if st == _S_DATA_CRLF:
                if pos >= end:
                    return NEED_DATA, pos, pos
                if b[pos] != 13:
                    _err(R_CHUNK_DATA_CRLF, 400)
                if pos + 1 >= end:
                    return NEED_DATA, pos, pos
                if b[pos + 1] != 10:
                    _err(R_CHUNK_DATA_CRLF, 400)
                pos += 2
                self._state = _S_SIZE
                continue
            if st == _S_SIZE:
                lim = pos + MAX_CHUNK_LINE + 2
                j = b.find(b"\n", pos, lim if lim < end else end)
                if j < 0:
                    if end >= lim:
                        _err(R_CHUNK_LINE_TOO_LONG, 400)
                    return NEED_DATA, pos, pos
                if j == pos or b[j - 1] != 13:
                    _err(R_BARE_LF, 400)
                size = _chunk_size_line(b, pos, j - 1)
                pos = j + 1
                if size == 0:
                    self._state = _S_TRAILER
                else:
                    self._remaining = size
                    self._state = _S_DATA
                continue
            if st == _S_TRAILER:
                budget = MAX_REQUEST_HEAD - self._trailer_bytes
                lim = pos + budget
                j = b.find(b"\n", pos, lim if lim < end else end)
                if j < 0:
                    if end >= lim:
                        _err(R_TRAILERS_TOO_LARGE, 400)
                    return NEED_DATA, pos, pos
                if j == pos or b[j - 1] != 13:
                    _err(R_BARE_LF, 400)
                q = j - 1
                if q == pos:
                    self._state = _S_DONE
                    return DONE, j + 1, j + 1
                if self._trailers == MAX_HEADERS:
                    _err(R_TOO_MANY_TRAILERS, 400)
                if _FIELD_RE.fullmatch(b, pos, q) is None:
                    _field_error(b, pos, q, 400)
                self._trailers += 1
                self._trailer_bytes += j + 1 - pos
                pos = j + 1
                continue
            if st == _S_DONE:
                return DONE, pos, pos
            _err(R_CHUNKED_FAILED, 400)


def _chunk_size_line(b, p, e):
    """Validate `1*HEXDIG *(BWS ";" BWS name [BWS "=" BWS value])` in b[p:e]; return the size."""
    i = p
    size = 0
    while i < e:
        d = _HEX.get(b[i])
        if d is None:
            break
        size = size * 16 + d
        i += 1
    if i == p:
        _err(R_CHUNK_SIZE, 400)
    if i - p > 16:
        _err(R_CHUNK_SIZE_LARGE, 400)
    first = True
    while True:
        j = _ows_end(b, i, e)
        if j == e:
            if j != i:
                _err(R_CHUNK_WS, 400)
            return size
        if b[j] != 0x3B:  # ';'
            _err(R_CHUNK_SIZE if (first and j == i) else R_CHUNK_EXT, 400)
        first = False
        i = _ows_end(b, j + 1, e)
        n0 = i
        while i < e and b[i] in _TCHAR:
            i += 1
        if i == n0:
            _err(R_CHUNK_EXT_NAME, 400)
        j = _ows_end(b, i, e)
        if j < e and b[j] == 0x3D:  # '='
            i = _ows_end(b, j + 1, e)
            if i < e and b[i] == 0x22:  # '"'
                i += 1
                while True:
                    if i >= e:
                        _err(R_CHUNK_EXT_VALUE, 400)
                    c = b[i]
                    if c == 0x22:
                        i += 1
                        break
                    if c == 0x5C:  # backslash
                        if i + 1 >= e or b[i + 1] not in _QPAIR:
                            _err(R_CHUNK_EXT_VALUE, 400)
                        i += 2
                    elif c in _QDTEXT:
                        i += 1
                    else:
                        _err(R_CHUNK_EXT_VALUE, 400)
            else:
                v0 = i
                while i < e and b[i] in _TCHAR:
                    i += 1
                if i == v0:
                    _err(R_CHUNK_EXT_VALUE, 400)
