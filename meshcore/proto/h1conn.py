"""Sans-IO HTTP/1.1 connection objects, pure Python.

The twin of the compiled ``meshcore._ext.h1conn`` (ext/h1conn.pyx): the same Python API, the
same events, states and rules. The event loop always drives the compiled one through its C
methods; this one is the test oracle and the version a reader can follow. Both are built on the
strict head and chunk parser (this one on its pure twin, ``meshcore.proto.h1_parse``).

Bytes go in (``receive_data``, ``receive_eof``), events come out (``event()``), and the bytes to
send for a body come back from ``send_body`` / ``finish_*``. Nothing here touches a socket or a
clock. Events are tuples:

    ("need_data",)             feed more bytes (or EOF)
    ("head",)                  a request head (server) / final response head (client): see .head
    ("data", bytes)            decoded body bytes (framing removed)
    ("end",)                   the message body is complete
    ("paused",)                server: request complete, the next one waits for finish_response();
                               client: response complete (or upgraded), nothing more to parse
    ("eof",)                   the peer closed: before a message (buffered_bytes == 0) or in the
                               middle of a head (buffered_bytes > 0)
    ("error", status, reason)  protocol error; status is the local reply it implies
    ("informational", status)  client: a 1xx other than 101 arrived; it is skipped
    ("upgrade",)               client: 101 to an upgrade request; what follows is the tunnel's

Rules (h11's, narrowed to what a proxy hop needs):

* One exchange at a time per connection. A server connection parses a request head, then its
  body; bytes after the request (pipelining) stay buffered, unparsed, until ``finish_response()``
  says the connection continues (``paused`` until then). A request without a body goes from
  ``head`` straight to ``paused`` (no ``end``); a response always ends with ``end``.
* Body framing is decoded strictly (Content-Length, chunked with the parser's chunk rules,
  close-delimited responses) and re-encoded canonically on the other side: ``send_body`` frames
  bytes for the message being sent (Content-Length as is, chunked as lowercase-hex size CRLF data
  CRLF, ended by ``0\\r\\n\\r\\n``). Chunk extensions and trailers are dropped.
* Keep-alive is decided when the response starts (``begin_response``): the request asked for it,
  the connection is not draining, the request has been read whole (state R_DONE) and the client
  has not closed. Otherwise the response must carry ``connection: close`` and the connection ends
  after it.
* A client connection is reusable after a response only if the response allowed keep-alive, was
  not close-delimited, the request was sent whole, the upstream did not close, and no byte
  arrived beyond the response.
* Errors carry the status they imply: 400/414/431/501/505 (and the parser's 417) downstream,
  502 for anything malformed from upstream.
* Nothing half-forwarded: when a head arrives with chunked body bytes behind it, the proxy
  calls `validate_buffered()` before forwarding the head; a fault in those bytes is the
  next event, so neither the head nor any of the body goes on.
"""

from meshcore.errors import ProtocolError
from meshcore.proto.h1_parse import (BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE,
                                     MAX_REQUEST_LINE, ChunkedReader, parse_request,
                                     parse_response)
from meshcore.proto.h1_parse import DATA as _STEP_DATA, DONE as _STEP_DONE  # ChunkedReader.step

__all__ = [
    "NEED_DATA", "HEAD", "DATA", "END", "PAUSED", "EOF", "ERROR", "INFORMATIONAL", "UPGRADE",
    "R_IDLE", "R_HEAD", "R_BODY", "R_DONE", "R_ERROR", "R_UPGRADED", "W_IDLE", "W_BODY", "W_DONE",
    "R_BODY_TRUNCATED", "R_UNSOLICITED_101", "R_STRAY", "R_BODY_OVERRUN", "R_204_BODY",
    "ServerConn", "ClientConn",
]

# Event codes: the compiled module's EV_* numbers (ext/meshcore/_ext/h1conn.pxd), exported by both
# twins under these names. The Python API returns the tuples above; the codes name them.
NEED_DATA = 0
HEAD = 1
DATA = 2
END = 3
PAUSED = 4
EOF = 5
ERROR = 6
INFORMATIONAL = 7
UPGRADE = 8

# Receive states (the .state property): the compiled module's R_* numbers.
R_IDLE = 0       # client: no request outstanding
R_HEAD = 1       # waiting for a head
R_BODY = 2       # reading a body
R_DONE = 3       # message complete
R_ERROR = 4      # a protocol error happened (error_status, error_reason)
R_UPGRADED = 5   # client: switched protocols

# Send states (the .send_state property).
W_IDLE = 0
W_BODY = 1
W_DONE = 2

# Reasons of the connection's own errors (the parser's errors keep the parser's reasons). The
# compiled module names them R_* too: strings, unlike the integer receive states above.
R_BODY_TRUNCATED = "connection closed before the body was complete"
R_UNSOLICITED_101 = "unsolicited 101 Switching Protocols"
R_STRAY = "bytes before any request"
R_BODY_OVERRUN = "body longer than its Content-Length"
R_204_BODY = "a 204 response must not have a body"
_R_NO_BODY = "body bytes for a message without a body"

_NEED_DATA = ("need_data",)
_HEAD = ("head",)
_END = ("end",)
_PAUSED = ("paused",)
_EOF = ("eof",)
_UPGRADE = ("upgrade",)


class _Side:
    """What both directions share: the receive buffer, body decoding and body encoding."""

    __slots__ = ("_in", "_eof", "_rstate", "_sstate", "_body_kind", "_body_left",
                 "_body_received", "_body_complete", "_chunks", "_error_status",
                 "_error_reason", "_out_kind", "_out_left", "_out_sent")

    def __init__(self):
        self._in = bytearray()      # received, not yet consumed (front deletes are cheap)
        self._eof = False           # the peer closed its sending side
        self._rstate = R_IDLE
        self._sstate = W_IDLE
        self._body_kind = BODY_NONE  # framing of the message being received
        self._body_left = 0         # Content-Length bytes still to come
        self._body_received = 0     # decoded body bytes handed out so far
        self._body_complete = False  # the last body byte was handed out; `end` comes next
        self._chunks = None         # ChunkedReader of a chunked body being received
        self._error_status = 0
        self._error_reason = None
        self._out_kind = BODY_NONE  # framing of the message being sent
        self._out_left = 0          # Content-Length bytes still to send
        self._out_sent = 0          # body bytes sent (before framing)

    # -- receiving --------------------------------------------------------------------------

    def receive_data(self, data):
        """Feed bytes received from the peer (copied)."""
        self._in += data

    def receive_eof(self):
        """The peer closed its sending side."""
        self._eof = True

    def _fail(self, status, reason):
        self._rstate = R_ERROR
        self._error_status = status
        self._error_reason = reason
        return ("error", status, reason)

    def _body_event(self, error_status):
        """The next event of the body being received (state R_BODY). Malformed or truncated
        bodies fail with `error_status` (400 downstream, 502 upstream)."""
        if self._body_complete:
            self._rstate = R_DONE
            return _END
        buf = self._in
        n = len(buf)
        kind = self._body_kind

        if kind == BODY_LENGTH:
            if n == 0:
                return self._fail(error_status, R_BODY_TRUNCATED) if self._eof else _NEED_DATA
            k = min(n, self._body_left)
            data = bytes(buf[:k])
            del buf[:k]
            self._body_left -= k
            self._body_received += k
            if self._body_left == 0:
                self._body_complete = True  # `end` on the next call
            return ("data", data)

        if kind == BODY_CHUNKED:
            if n == 0:
                return self._fail(error_status, R_BODY_TRUNCATED) if self._eof else _NEED_DATA
            try:
                step, a, z = self._chunks.step(buf, 0, n)
            except ProtocolError as exc:
                return self._fail(error_status, exc.reason)
            if step == _STEP_DATA:
                # buf[:a] is framing (CRLF, size line), buf[a:z] one chunk's data (or part of it)
                data = bytes(buf[a:z])
                del buf[:z]
                self._body_received += z - a
                return ("data", data)
            del buf[:a]  # framing consumed so far: NEED_DATA or DONE (a = past the last CRLF)
            if step == _STEP_DONE:
                self._rstate = R_DONE
                return _END
            return self._fail(error_status, R_BODY_TRUNCATED) if self._eof else _NEED_DATA

        if kind == BODY_CLOSE:  # responses only: the body runs until the upstream closes
            if n == 0:
                if self._eof:
                    self._rstate = R_DONE
                    return _END
                return _NEED_DATA
            data = bytes(buf)
            del buf[:]
            self._body_received += n
            return ("data", data)

        self._rstate = R_DONE  # BODY_NONE
        return _END

    def _check_buffered_body(self, error_status):
        """Check the chunked framing of the body bytes already buffered, without consuming them
        (a copy of the chunk decoder reads ahead). The proxy calls it when a head arrives: a
        fault in bytes that came with the head is answered before the head goes anywhere.
        False: the fault is found, this side is in error (`error_status`) and the next event is
        the error. Body bytes that arrive later are checked as they are decoded."""
        chunks = self._chunks
        if self._rstate != R_BODY or self._body_kind != BODY_CHUNKED or chunks is None:
            return True
        buf = self._in
        n = len(buf)
        if n == 0:
            return True
        probe = ChunkedReader()
        for name in ChunkedReader.__slots__:
            setattr(probe, name, getattr(chunks, name))
        pos = 0
        try:
            while pos < n:
                step, _, z = probe.step(buf, pos, n)
                if step != _STEP_DATA:
                    break  # more is needed, or the body ends here (what follows is not its)
                pos = z
        except ProtocolError as exc:
            self._fail(error_status, exc.reason)
            return False
        return True

    # -- sending ----------------------------------------------------------------------------

    def _start_body(self, body_kind, length):
        self._out_kind = body_kind
        self._out_left = length if body_kind == BODY_LENGTH else 0
        self._out_sent = 0

    def send_body(self, data):
        """The framed bytes to send for `data`, a piece of the outgoing message's body.

        Content-Length bytes go as they are (more than the length left raises ProtocolError,
        status 502); chunked bytes become one chunk; an empty piece sends nothing."""
        data = bytes(data)
        n = len(data)
        if n == 0:
            return b""
        kind = self._out_kind
        if kind == BODY_LENGTH:
            if n > self._out_left:
                raise ProtocolError(R_BODY_OVERRUN, 502)
            self._out_left -= n
            out = data
        elif kind == BODY_CHUNKED:
            out = b"%x\r\n" % n + data + b"\r\n"
        else:
            raise ProtocolError(_R_NO_BODY, 502)
        self._out_sent += n
        return out

    def _write_end(self):
        """Finish the outgoing body: the last chunk for chunked framing, nothing otherwise."""
        self._sstate = W_DONE
        return b"0\r\n\r\n" if self._out_kind == BODY_CHUNKED else b""

    # -- state ------------------------------------------------------------------------------

    @property
    def state(self):
        """Receive state: R_IDLE, R_HEAD, R_BODY, R_DONE, R_ERROR or R_UPGRADED."""
        return self._rstate

    @property
    def send_state(self):
        """Send state: W_IDLE, W_BODY or W_DONE."""
        return self._sstate

    @property
    def error_status(self):
        return self._error_status

    @property
    def error_reason(self):
        return self._error_reason

    @property
    def body_kind(self):
        """Framing of the message being received: BODY_NONE, _LENGTH, _CHUNKED or _CLOSE."""
        return self._body_kind

    @property
    def body_received(self):
        return self._body_received

    @property
    def buffered_bytes(self):
        """Received bytes not consumed yet (a pipelined request, stray bytes, a partial head)."""
        return len(self._in)

    def validate_buffered(self):
        """Check the chunked framing of body bytes already buffered, before the head they came
        with is forwarded (see _check_buffered_body; 400 for a server, 502 for a client).
        True: nothing wrong so far; False: the next event is the error."""
        return self._check_buffered_body(502 if isinstance(self, ClientConn) else 400)


class ServerConn(_Side):
    """The downstream side of a proxy hop: parses requests, frames responses."""

    __slots__ = ("_head", "_keep_alive", "_continue_sent", "_draining", "_scanned")

    def __init__(self):
        super().__init__()
        self._rstate = R_HEAD
        self._head = None
        self._keep_alive = False    # this exchange may be followed by another on the connection
        self._continue_sent = False
        self._draining = False
        # Head bytes already parsed without a result. The parser's answer can change only when a
        # line end arrives, a size limit is crossed, or a line starts (the 101st field line is
        # refused at its first byte), so a head trickled byte by byte costs linear work.
        self._scanned = 0

    def event(self):
        """The next event (see the module docstring)."""
        st = self._rstate
        if st == R_HEAD:
            return self._head_event()
        if st == R_BODY:
            return self._body_event(400)
        if st == R_DONE:
            return _PAUSED
        return ("error", self._error_status, self._error_reason)

    def _head_event(self):
        buf = self._in
        n = len(buf)
        if n == 0:
            return _EOF if self._eof else _NEED_DATA
        if (n > self._scanned and buf.find(b"\n", self._scanned) < 0
                and n <= MAX_REQUEST_LINE):
            self._scanned = n
            return _EOF if self._eof else _NEED_DATA
        try:
            head = parse_request(buf, 0)
        except ProtocolError as exc:
            return self._fail(exc.status, exc.reason)
        if head is None:
            # Rescan from the last byte when it ends a line: the next byte starts a field line.
            self._scanned = n - 1 if buf[n - 1] == 10 else n
            return _EOF if self._eof else _NEED_DATA
        self._scanned = 0
        del buf[:head.end]
        self._head = head
        self._body_received = 0
        self._body_complete = False
        self._continue_sent = False
        self._keep_alive = head.keep_alive
        self._sstate = W_IDLE
        if head.chunked:
            self._body_kind = BODY_CHUNKED
            self._chunks = ChunkedReader()
            self._rstate = R_BODY
        elif head.content_length > 0:
            self._body_kind = BODY_LENGTH
            self._body_left = head.content_length
            self._rstate = R_BODY
        else:
            self._body_kind = BODY_NONE
            self._rstate = R_DONE
        return _HEAD

    def wants_continue(self):
        """Send ``100 Continue`` now? The request asked for it, its body is wanted and nothing
        has been answered yet (Envoy answers 100-continue itself and drops Expect upstream):
        no byte of the body has arrived, no 100 and no response has been sent."""
        h = self._head
        return (h is not None and h.expect_continue and not self._continue_sent
                and self._sstate == W_IDLE and self._rstate == R_BODY
                and self._body_received == 0 and len(self._in) == 0)

    def mark_continue_sent(self):
        self._continue_sent = True

    def set_draining(self, value=True):
        """While draining, responses started from now on end their connection."""
        self._draining = bool(value)

    def begin_response(self, body_kind, length=0):
        """The response head is about to be sent with this body framing (BODY_NONE, _LENGTH with
        `length`, or _CHUNKED). Returns keep-alive: False means the head must carry
        ``connection: close`` and the connection ends after this response."""
        self._start_body(body_kind, length)
        self._sstate = W_BODY
        if (not self._keep_alive or self._draining or self._rstate != R_DONE or self._eof):
            self._keep_alive = False
        return self._keep_alive

    def finish_response(self):
        """The response body is complete. Returns (bytes to send, carries_on): carries_on is
        True when the connection goes on to the next request (possibly already buffered),
        False when it must close after the bytes are sent."""
        out = self._write_end()
        if self._keep_alive and self._rstate == R_DONE:
            self._rstate = R_HEAD
            self._head = None
            self._chunks = None
            self._body_kind = BODY_NONE
            return out, True
        return out, False

    @property
    def head(self):
        """The current request's RequestHead (None between requests)."""
        return self._head

    @property
    def keep_alive(self):
        return self._keep_alive


class ClientConn(_Side):
    """The upstream side of a proxy hop: frames requests, parses responses."""

    __slots__ = ("_head", "_head_request", "_upgrade_requested", "_got_bytes")

    def __init__(self):
        super().__init__()
        self._rstate = R_IDLE
        self._head = None
        self._head_request = False     # the request was HEAD: the response has no body
        self._upgrade_requested = False
        self._got_bytes = False        # any response byte arrived for the current request

    def begin_request(self, head_request, body_kind, length=0, upgrade=False):
        """A request head is about to be sent with this body framing (BODY_NONE, _LENGTH with
        `length`, or _CHUNKED). `head_request`: it is a HEAD request (the response has no
        body); `upgrade`: it asks for an upgrade (a 101 is then accepted)."""
        self._head = None
        self._head_request = bool(head_request)
        self._upgrade_requested = bool(upgrade)
        self._start_body(body_kind, length)
        self._sstate = W_DONE if body_kind == BODY_NONE else W_BODY
        self._rstate = R_HEAD
        self._got_bytes = len(self._in) > 0
        self._body_received = 0
        self._body_complete = False

    def finish_request(self):
        """The request body is complete: the bytes that end it (the last chunk, or nothing)."""
        return self._write_end()

    def event(self):
        """The next event (see the module docstring)."""
        st = self._rstate
        if st == R_HEAD:
            return self._head_event()
        if st == R_BODY:
            return self._body_event(502)
        if st == R_DONE or st == R_UPGRADED:
            return _PAUSED
        if st == R_IDLE:
            # No request outstanding: a byte now is not an answer to anything.
            if self._in:
                return self._fail(502, R_STRAY)
            return _EOF if self._eof else _NEED_DATA
        return ("error", self._error_status, self._error_reason)

    def _head_event(self):
        buf = self._in
        if not buf:
            return _EOF if self._eof else _NEED_DATA
        self._got_bytes = True
        try:
            head = parse_response(buf, 0)
        except ProtocolError as exc:
            return self._fail(502, exc.reason)
        if head is None:
            return _EOF if self._eof else _NEED_DATA
        del buf[:head.end]
        status = head.status
        if status == 101:
            if not self._upgrade_requested:
                return self._fail(502, R_UNSOLICITED_101)
            self._head = head
            self._rstate = R_UPGRADED
            return _UPGRADE
        if status < 200:  # 100, 102, 103: skipped, as Envoy does by default
            return ("informational", status)
        if status == 204 and (head.chunked or head.content_length > 0):
            return self._fail(502, R_204_BODY)
        self._head = head
        if status == 204 or status == 304 or self._head_request:
            self._body_kind = BODY_NONE
        elif head.chunked:
            self._body_kind = BODY_CHUNKED
            self._chunks = ChunkedReader()
        elif head.content_length >= 0:
            self._body_kind = BODY_LENGTH
            self._body_left = head.content_length
        else:
            self._body_kind = BODY_CLOSE
        if self._body_kind == BODY_NONE or (self._body_kind == BODY_LENGTH
                                            and self._body_left == 0):
            self._body_complete = True
        self._rstate = R_BODY
        return _HEAD

    def can_reuse(self):
        """May another request use this connection? (After ``end``.)"""
        h = self._head
        return (self._rstate == R_DONE and h is not None and h.keep_alive
                and self._sstate == W_DONE and not self._in and not self._eof
                and self._body_kind != BODY_CLOSE)

    def recycle(self):
        """Back to idle for the next request on a reused connection."""
        self._rstate = R_IDLE
        self._sstate = W_IDLE
        self._head = None
        self._chunks = None
        self._body_kind = BODY_NONE
        self._got_bytes = False

    @property
    def head(self):
        """The final (or 101) ResponseHead of the current request, None before it."""
        return self._head

    @property
    def got_bytes(self):
        """Whether any response byte arrived for the current request (also set by
        begin_request when bytes were already buffered)."""
        return self._got_bytes
