# C-level interface of meshcore._ext.h1conn (ext/h1conn.pyx): the sans-IO HTTP/1.1 connection
# objects that the event loop (ext/loop.pyx) drives. Python-level API and rules: ext/h1conn.pyx.
from meshcore._ext.cbuf cimport Buf
from meshcore._ext.h1parse cimport RequestHead, ResponseHead, ChunkedReader

cdef enum:
    # events returned by next_event()
    EV_NEED_DATA = 0    # feed more bytes (or EOF)
    EV_HEAD = 1         # a request head (server) / final response head (client) is in .head
    EV_DATA = 2         # body bytes at ev_p[0:ev_n], valid until the next feed/retain
    EV_END = 3          # the message body is complete
    EV_PAUSED = 4       # server: request complete, next request waits for end_response()
    EV_EOF = 5          # the peer closed before a message (clean) or mid-message (see .state)
    EV_ERROR = 6        # protocol error: .error_status / .error_reason
    EV_INFORMATIONAL = 7  # client: a 1xx other than 101 arrived (.info_status); it is skipped
    EV_UPGRADE = 8      # client: 101 to an upgrade request; remaining bytes belong to the tunnel

    # receive states
    R_IDLE = 0          # client: no request outstanding
    R_HEAD = 1          # waiting for a head
    R_BODY = 2          # reading a body
    R_DONE = 3          # message complete
    R_ERROR = 4
    R_UPGRADED = 5      # client: switched protocols

    # send states
    W_IDLE = 0
    W_BODY = 1
    W_DONE = 2


cdef class _Side:
    cdef Buf inb                 # unconsumed received bytes (retained between feeds)
    cdef const char* ext         # zero-copy view of the caller's buffer (see feed/retain)
    cdef Py_ssize_t ext_len
    cdef bint eof
    cdef int rstate
    cdef int body_kind
    cdef long long body_left
    cdef long long body_received
    cdef bint body_complete
    cdef ChunkedReader chunks
    cdef const char* ev_p
    cdef Py_ssize_t ev_n
    cdef int error_status
    cdef object error_reason
    cdef Py_ssize_t scanned      # head bytes already scanned without a line end
    cdef int sstate
    cdef int out_kind
    cdef long long out_left
    cdef long long out_sent      # body bytes written (before framing)

    cdef void feed(self, const char* p, Py_ssize_t n)
    cdef int retain(self) except -1
    cdef const char* cur(self, Py_ssize_t* n)
    cdef const char* cur_ptr(self)
    cdef void consume(self, Py_ssize_t n)
    cdef Py_ssize_t buffered(self)
    cdef int fail(self, int status, object reason)
    cdef int body_event(self, int error_status) except -1
    cdef bint check_buffered_body(self, int error_status) except -1
    cdef int write_body(self, Buf* out, const char* p, Py_ssize_t n) except -1
    cdef int write_end(self, Buf* out) except -1
    cdef void release_buffers(self)


cdef class ServerConn(_Side):
    cdef RequestHead head
    cdef bint keep_alive         # this exchange may be followed by another on the connection
    cdef bint continue_sent
    cdef bint draining

    cdef int next_event(self) except -1
    cdef bint start_response(self, int body_kind, long long length) except -1
    cdef bint end_response(self, Buf* out) except -1
    cdef bint want_continue(self)


cdef class ClientConn(_Side):
    cdef ResponseHead head
    cdef bint head_request       # the request was HEAD: the response has no body
    cdef bint upgrade_requested
    cdef bint got_bytes          # any response byte arrived for the current request
    cdef int info_status

    cdef int next_event(self) except -1
    cdef int start_request(self, bint head_request, int body_kind, long long length,
                           bint upgrade) except -1
    cdef bint reusable(self)
    cdef void reset(self)
