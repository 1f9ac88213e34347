# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Sans-IO HTTP/1.1 connection objects, compiled (``meshcore._ext.h1conn``).

The twin of ``meshcore/proto/h1conn.py`` (same Python API, same events, same rules; the pure twin
is the test oracle). Bytes go in, events and bytes to send come out; nothing here touches a
socket or a clock. The event loop (ext/loop.pyx) drives these objects through their C methods
(declared in ext/meshcore/_ext/h1conn.pxd); tests drive them through the Python methods below,
which wrap the C ones: event() = next_event(), begin_/finish_response() = start_/end_response(),
begin_/finish_request() = start_request()/write_end(), can_reuse() = reusable(),
recycle() = reset(), wants_continue() = want_continue(),
validate_buffered() = check_buffered_body().

Rules (h11's, narrowed to what a proxy hop needs):

* One exchange at a time per connection. A server connection parses a request head, then its
  body; bytes after the request (pipelining) stay buffered, unparsed, until `end_response()`
  says the connection continues (EV_PAUSED until then).
* Body framing is decoded strictly (Content-Length, chunked with the parser's chunk rules;
  close-delimited responses) and re-encoded canonically on the other side: bytes are never
  relayed with their original framing. Chunk extensions and trailers are dropped.
* Keep-alive is decided when the response starts: the request asked for it, the connection is
  not draining, and the request body has been read whole. Otherwise the response carries
  `connection: close` (the caller adds the header from `start_response`'s answer) and the
  connection ends after it.
* A client connection is reusable after a response only if the response allowed keep-alive, the
  request was sent whole, and no byte arrived beyond the response.
* Errors carry the status they imply (400/408/413/414/431/501/505 downstream, 502 upstream).
* Nothing half-forwarded: when a head arrives with chunked body bytes behind it, the proxy
  calls `validate_buffered()` before forwarding the head; a fault in those bytes is the
  next event, so neither the head nor any of the body goes on.
* `feed(p, n)` does not copy when nothing is retained: events point into the caller's buffer
  until `retain()` copies what is left. The loop calls `retain()` before reusing its buffer.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memchr

from meshcore._ext.cbuf cimport (Buf, buf_len, buf_ptr, buf_append, buf_consume, buf_clear,
                                 buf_free, buf_shrink, buf_append_hex, buf_reserve)
from meshcore._ext.h1parse cimport (RequestHead, ResponseHead, ChunkedReader, parse_request_c,
                                    parse_response_c, C_BODY_NONE, C_BODY_LENGTH, C_BODY_CHUNKED,
                                    C_BODY_CLOSE, C_NEED_DATA, C_DATA, C_DONE, C_MAX_REQUEST_HEAD,
                                    C_MAX_REQUEST_LINE)

from meshcore.errors import ProtocolError

NEED_DATA = EV_NEED_DATA
HEAD = EV_HEAD
DATA = EV_DATA
END = EV_END
PAUSED = EV_PAUSED
EOF = EV_EOF
ERROR = EV_ERROR
INFORMATIONAL = EV_INFORMATIONAL
UPGRADE = EV_UPGRADE

_EVENT_NAMES = {EV_NEED_DATA: "need_data", EV_HEAD: "head", EV_DATA: "data", EV_END: "end",
                EV_PAUSED: "paused", EV_EOF: "eof", EV_ERROR: "error",
                EV_INFORMATIONAL: "informational", EV_UPGRADE: "upgrade"}

R_BODY_TRUNCATED = "connection closed before the body was complete"
R_UNSOLICITED_101 = "unsolicited 101 Switching Protocols"
R_STRAY = "bytes before any request"
R_BODY_OVERRUN = "body longer than its Content-Length"
R_204_BODY = "a 204 response must not have a body"


cdef class _Side:
    """What both directions share: the receive buffer, body decoding and body encoding."""

    def __cinit__(self):
        self.ext = NULL
        self.ext_len = 0
        self.error_status = 0
        self.error_reason = None

    def __dealloc__(self):
        buf_free(&self.inb)

    # -- receive buffer ---------------------------------------------------------------------

    cdef void feed(self, const char* p, Py_ssize_t n):
        """Bytes from the peer. Zero-copy when nothing is retained; else appended."""
        if n <= 0:
            return
        if self.ext != NULL:
            self.retain()
        if buf_len(&self.inb) == 0:
            self.ext = p
            self.ext_len = n
        else:
            buf_append(&self.inb, p, n)

    cdef int retain(self) except -1:
        """Copy the unconsumed part of the caller's buffer (the loop reuses its buffer next)."""
        if self.ext != NULL:
            if self.ext_len:
                buf_append(&self.inb, self.ext, self.ext_len)
            self.ext = NULL
            self.ext_len = 0
        buf_shrink(&self.inb)
        return 0

    cdef const char* cur(self, Py_ssize_t* n):
        if self.ext != NULL:
            n[0] = self.ext_len
            return self.ext
        n[0] = buf_len(&self.inb)
        return buf_ptr(&self.inb)

    cdef const char* cur_ptr(self):
        cdef Py_ssize_t n
        return self.cur(&n)

    cdef void consume(self, Py_ssize_t n):
        if self.ext != NULL:
            self.ext += n
            self.ext_len -= n
            if self.ext_len <= 0:
                self.ext = NULL
                self.ext_len = 0
        else:
            buf_consume(&self.inb, n)

    cdef Py_ssize_t buffered(self):
        return (self.ext_len if self.ext != NULL else 0) + buf_len(&self.inb)

    cdef void release_buffers(self):
        self.ext = NULL
        self.ext_len = 0
        buf_free(&self.inb)

    cdef int fail(self, int status, object reason):
        self.rstate = R_ERROR
        self.error_status = status
        self.error_reason = reason
        return EV_ERROR

    # -- body decoding ----------------------------------------------------------------------

    cdef int body_event(self, int error_status) except -1:
        """The next body event of the message being received (R_BODY)."""
        cdef Py_ssize_t n, k, a = 0, z = 0
        cdef const char* p
        cdef int kind
        if self.body_complete:
            self.rstate = R_DONE
            return EV_END
        p = self.cur(&n)
        if self.body_kind == C_BODY_LENGTH:
            if n == 0:
                if self.eof:
                    return self.fail(error_status, R_BODY_TRUNCATED)
                return EV_NEED_DATA
            k = n if n < self.body_left else <Py_ssize_t>self.body_left
            self.ev_p = p
            self.ev_n = k
            self.consume(k)
            self.body_left -= k
            self.body_received += k
            if self.body_left == 0:
                self.body_complete = True
            return EV_DATA
        if self.body_kind == C_BODY_CHUNKED:
            if n == 0:
                if self.eof:
                    return self.fail(error_status, R_BODY_TRUNCATED)
                return EV_NEED_DATA
            try:
                kind = self.chunks.step_c(<const unsigned char*>p, 0, n, &a, &z)
            except ProtocolError as exc:
                return self.fail(error_status, exc.reason)
            if kind == C_DATA:
                self.ev_p = p + a
                self.ev_n = z - a
                self.consume(z)
                self.body_received += z - a
                return EV_DATA
            if kind == C_DONE:
                self.consume(a)
                self.rstate = R_DONE
                return EV_END
            self.consume(a)
            if self.eof:
                return self.fail(error_status, R_BODY_TRUNCATED)
            return EV_NEED_DATA
        if self.body_kind == C_BODY_CLOSE:
            if n == 0:
                if self.eof:
                    self.rstate = R_DONE
                    return EV_END
                return EV_NEED_DATA
            self.ev_p = p
            self.ev_n = n
            self.consume(n)
            self.body_received += n
            return EV_DATA
        self.rstate = R_DONE
        return EV_END

    cdef bint check_buffered_body(self, int error_status) except -1:
        """Check the chunked framing of the body bytes already buffered, without consuming them
        (a copy of the chunk decoder reads ahead). The loop calls it when a head arrives: a
        fault in bytes that came with the head is answered before the head goes anywhere.
        False: the fault is found, this side is in error (`error_status`) and the next event is
        the error. Body bytes that arrive later are checked as they are decoded."""
        cdef Py_ssize_t n, pos = 0, a = 0, z = 0
        cdef const char* p
        cdef ChunkedReader probe
        cdef ChunkedReader chunks = self.chunks
        if self.rstate != R_BODY or self.body_kind != C_BODY_CHUNKED or chunks is None:
            return True
        p = self.cur(&n)
        if n == 0:
            return True
        probe = ChunkedReader.__new__(ChunkedReader)
        probe._state = chunks._state
        probe._remaining = chunks._remaining
        probe._total = chunks._total
        probe._trailer_bytes = chunks._trailer_bytes
        probe._trailers = chunks._trailers
        try:
            while pos < n:
                if probe.step_c(<const unsigned char*>p, pos, n, &a, &z) != C_DATA:
                    break  # more is needed, or the body ends here (what follows is not its)
                pos = z
        except ProtocolError as exc:
            self.fail(error_status, exc.reason)
            return False
        return True

    # -- body encoding ----------------------------------------------------------------------

    cdef int write_body(self, Buf* out, const char* p, Py_ssize_t n) except -1:
        """Frame `n` body bytes for the peer into `out` (the message's outgoing framing)."""
        if n <= 0:
            return 0
        if self.out_kind == C_BODY_LENGTH:
            if n > self.out_left:
                raise ProtocolError(R_BODY_OVERRUN, 502)
            buf_append(out, p, n)
            self.out_left -= n
        elif self.out_kind == C_BODY_CHUNKED:
            buf_reserve(out, n + 20)
            buf_append_hex(out, <unsigned long long>n)
            buf_append(out, "\r\n", 2)
            buf_append(out, p, n)
            buf_append(out, "\r\n", 2)
        else:
            raise ProtocolError("body bytes for a message without a body", 502)
        self.out_sent += n
        return 0

    cdef int write_end(self, Buf* out) except -1:
        """Finish the outgoing body (the last chunk for chunked framing)."""
        if self.out_kind == C_BODY_CHUNKED:
            buf_append(out, "0\r\n\r\n", 5)
        self.sstate = W_DONE
        return 0

    # -- Python API shared by both sides (tests, tools) -------------------------------------

    def receive_data(self, data):
        """Feed bytes (copied)."""
        cdef bytes b = bytes(data)
        if self.ext != NULL:
            self.retain()
        buf_append(&self.inb, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

    def receive_eof(self):
        self.eof = True

    @property
    def state(self):
        return self.rstate

    @property
    def send_state(self):
        return self.sstate

    @property
    def error_status(self):
        return self.error_status

    @property
    def error_reason(self):
        return self.error_reason

    @property
    def body_kind(self):
        return self.body_kind

    @property
    def body_received(self):
        return self.body_received

    @property
    def buffered_bytes(self):
        return self.buffered()

    def validate_buffered(self):
        """check_buffered_body with this side's status (400 server, 502 client)."""
        return self.check_buffered_body(502 if isinstance(self, ClientConn) else 400)

    def _event_tuple(self, int ev):
        if ev == EV_DATA:
            return ("data", PyBytes_FromStringAndSize(self.ev_p, self.ev_n))
        if ev == EV_ERROR:
            return ("error", self.error_status, self.error_reason)
        return (_EVENT_NAMES[ev],)

    def send_body(self, data):
        """Python API: the framed bytes for `data`."""
        cdef Buf out
        cdef bytes b = bytes(data)
        out.data = NULL
        out.start = out.end = out.cap = 0
        try:
            self.write_body(&out, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
            return PyBytes_FromStringAndSize(buf_ptr(&out), buf_len(&out))
        finally:
            buf_free(&out)


cdef class ServerConn(_Side):
    """The downstream side of a proxy hop: parses requests, frames responses."""

    def __cinit__(self):
        self.rstate = R_HEAD
        self.sstate = W_IDLE

    cdef int next_event(self) except -1:
        cdef Py_ssize_t n
        cdef const char* p
        cdef RequestHead head
        if self.rstate == R_HEAD:
            p = self.cur(&n)
            if n == 0:
                return EV_EOF if self.eof else EV_NEED_DATA
            # Parse again only when the answer can have changed: a new line end, or a size limit
            # crossed. A client trickling a head byte by byte costs linear, not quadratic, work.
            if (n > self.scanned and memchr(p + self.scanned, 10, n - self.scanned) == NULL
                    and n <= C_MAX_REQUEST_LINE):
                self.scanned = n
                return EV_EOF if self.eof else EV_NEED_DATA
            try:
                head = parse_request_c(<const unsigned char*>p, n, 0)
            except ProtocolError as exc:
                return self.fail(exc.status, exc.reason)
            if head is None:
                # Rescan from a final line end: the next byte starts a field line, and the parser
                # refuses a 101st one at its first byte (431), before any line end.
                self.scanned = n - 1 if p[n - 1] == 10 else n
                return EV_EOF if self.eof else EV_NEED_DATA
            self.scanned = 0
            self.consume(head._end)
            self.head = head
            self.body_received = 0
            self.body_complete = False
            self.continue_sent = False
            self.keep_alive = head._keep_alive
            self.sstate = W_IDLE
            if head._chunked:
                self.body_kind = C_BODY_CHUNKED
                self.chunks = ChunkedReader.__new__(ChunkedReader)
                self.rstate = R_BODY
            elif head._cl > 0:
                self.body_kind = C_BODY_LENGTH
                self.body_left = head._cl
                self.rstate = R_BODY
            else:
                self.body_kind = C_BODY_NONE
                self.rstate = R_DONE
            return EV_HEAD
        if self.rstate == R_BODY:
            return self.body_event(400)
        if self.rstate == R_DONE:
            return EV_PAUSED
        return EV_ERROR

    cdef bint want_continue(self):
        """Send `100 Continue` now? The request asked for it, its body is wanted and nothing
        has been answered yet (Envoy answers 100-continue itself and drops Expect upstream)."""
        return (self.head is not None and self.head._expect_continue and not self.continue_sent
                and self.sstate == W_IDLE and self.rstate == R_BODY
                and self.body_received == 0 and self.buffered() == 0)

    cdef bint start_response(self, int body_kind, long long length) except -1:
        """The response head is about to be sent with this body framing (NONE, LENGTH or
        CHUNKED). Returns keep-alive: False means the head must carry `connection: close`."""
        self.out_kind = body_kind
        self.out_left = length if body_kind == C_BODY_LENGTH else 0
        self.out_sent = 0
        self.sstate = W_BODY
        if not self.keep_alive or self.draining or self.rstate != R_DONE or self.eof:
            self.keep_alive = False
        return self.keep_alive

    cdef bint end_response(self, Buf* out) except -1:
        """The response is complete. Returns True when the connection carries on (the next
        request, possibly already buffered, can be parsed), False when it must close."""
        self.write_end(out)
        if self.keep_alive and self.rstate == R_DONE:
            self.rstate = R_HEAD
            self.head = None
            self.chunks = None
            self.body_kind = C_BODY_NONE
            return True
        return False

    # -- Python API -------------------------------------------------------------------------

    def event(self):
        return self._event_tuple(self.next_event())

    @property
    def head(self):
        return self.head

    @property
    def keep_alive(self):
        return self.keep_alive

    def set_draining(self, bint value=True):
        self.draining = value

    def wants_continue(self):
        return self.want_continue()

    def mark_continue_sent(self):
        self.continue_sent = True

    def begin_response(self, int body_kind, long long length=0):
        return self.start_response(body_kind, length)

    def finish_response(self):
        cdef Buf out
        cdef bint keep
        out.data = NULL
        out.start = out.end = out.cap = 0
        try:
            keep = self.end_response(&out)
            return PyBytes_FromStringAndSize(buf_ptr(&out), buf_len(&out)), keep
        finally:
            buf_free(&out)


cdef class ClientConn(_Side):
    """The upstream side of a proxy hop: frames requests, parses responses."""

    def __cinit__(self):
        self.rstate = R_IDLE
        self.sstate = W_IDLE

    cdef int start_request(self, bint head_request, int body_kind, long long length,
                           bint upgrade) except -1:
        """A request head is about to be sent with this body framing (NONE, LENGTH, CHUNKED)."""
        self.head = None
        self.head_request = head_request
        self.upgrade_requested = upgrade
        self.out_kind = body_kind
        self.out_left = length if body_kind == C_BODY_LENGTH else 0
        self.out_sent = 0
        self.sstate = W_DONE if body_kind == C_BODY_NONE else W_BODY
        self.rstate = R_HEAD
        self.got_bytes = self.buffered() > 0
        self.body_received = 0
        self.body_complete = False
        self.info_status = 0
        return 0

    cdef int next_event(self) except -1:
        cdef Py_ssize_t n
        cdef const char* p
        cdef ResponseHead head
        cdef int status
        if self.rstate == R_HEAD:
            p = self.cur(&n)
            if n == 0:
                return EV_EOF if self.eof else EV_NEED_DATA
            self.got_bytes = True
            try:
                head = parse_response_c(<const unsigned char*>p, n, 0)
            except ProtocolError as exc:
                return self.fail(502, exc.reason)
            if head is None:
                return EV_EOF if self.eof else EV_NEED_DATA
            self.consume(head._end)
            status = head._status
            if status == 101:
                if not self.upgrade_requested:
                    return self.fail(502, R_UNSOLICITED_101)
                self.head = head
                self.rstate = R_UPGRADED
                return EV_UPGRADE
            if status < 200:  # 100, 102, 103: skipped, as Envoy does by default
                self.info_status = status
                return EV_INFORMATIONAL
            if status == 204 and (head._chunked or head._cl > 0):
                return self.fail(502, R_204_BODY)
            self.head = head
            if status == 204 or status == 304 or self.head_request:
                self.body_kind = C_BODY_NONE
            elif head._chunked:
                self.body_kind = C_BODY_CHUNKED
                self.chunks = ChunkedReader.__new__(ChunkedReader)
            elif head._cl >= 0:
                self.body_kind = C_BODY_LENGTH
                self.body_left = head._cl
            else:
                self.body_kind = C_BODY_CLOSE
            if self.body_kind == C_BODY_NONE or (self.body_kind == C_BODY_LENGTH
                                                 and self.body_left == 0):
                self.body_complete = True
            self.rstate = R_BODY
            return EV_HEAD
        if self.rstate == R_BODY:
            return self.body_event(502)
        if self.rstate == R_DONE:
            return EV_PAUSED
        if self.rstate == R_IDLE:
            if self.buffered():
                return self.fail(502, R_STRAY)
            return EV_EOF if self.eof else EV_NEED_DATA
        if self.rstate == R_UPGRADED:
            return EV_PAUSED
        return EV_ERROR

    cdef bint reusable(self):
        """May another request use this connection? (After EV_END.)"""
        return (self.rstate == R_DONE and self.head is not None and self.head._keep_alive
                and self.sstate == W_DONE and self.buffered() == 0 and not self.eof
                and self.body_kind != C_BODY_CLOSE)

    cdef void reset(self):
        """Back to idle for the next request on a reused connection."""
        self.rstate = R_IDLE
        self.sstate = W_IDLE
        self.head = None
        self.chunks = None
        self.body_kind = C_BODY_NONE
        self.got_bytes = False

    # -- Python API -------------------------------------------------------------------------

    def begin_request(self, bint head_request, int body_kind, long long length=0,
                         bint upgrade=False):
        self.start_request(head_request, body_kind, length, upgrade)

    def finish_request(self):
        cdef Buf out
        out.data = NULL
        out.start = out.end = out.cap = 0
        try:
            self.write_end(&out)
            return PyBytes_FromStringAndSize(buf_ptr(&out), buf_len(&out))
        finally:
            buf_free(&out)

    def event(self):
        cdef int ev = self.next_event()
        if ev == EV_INFORMATIONAL:
            return ("informational", self.info_status)
        return self._event_tuple(ev)

    @property
    def head(self):
        return self.head

    @property
    def got_bytes(self):
        return self.got_bytes

    def can_reuse(self):
        return self.reusable()

    def recycle(self):
        self.reset()
