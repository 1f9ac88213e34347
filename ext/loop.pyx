# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The worker's data path: one epoll event loop in C, driven by a single trio task.

What lives here (issue 8; architecture.md "Request flow"): accepting, reading, parsing (through
the sans-IO connection objects of ext/h1conn.pyx), the upstream pools (ext/pool.pyx PoolBook),
connecting, sending, relaying bodies with backpressure, timers, circuit breakers and counters in
shared memory, and the access log. What does not: routing and policy. Per request the loop calls
one Python function, `policy.decide(stream)`, which picks route, cluster and endpoint through the
sans-IO policy modules and hands back compiled handles (RouteHandle, ClusterHandle). An attempt
that ends in anything but a response the route could never retry goes back to Python once,
`policy.on_outcome(stream, kind, status)`, which runs the one retry/outlier/stats classifier
(meshcore.policy.classify) and answers RELAY, RETRY or REPLY.

Rules of this module:

* Level-triggered epoll, one registration per socket, interest changed only when it changes
  ("registered" is kept apart from "events wanted"). An idle pooled upstream connection stays
  registered for reading: if it becomes readable the peer closed or poisoned it, and it is
  dropped before anyone reuses it.
* The loop never blocks: `run_once` handles at most `max_events` ready sockets and the expired
  timers, then returns to trio; a timerfd in the epoll set wakes trio for the next deadline.
* Every object the kernel or a timer may call back is kept alive by a reference the loop holds
  while it is registered or armed (INCREF on register/arm, DECREF on unregister/disarm).
* An exception escaping the handling of one socket costs that connection (a 500 when nothing was
  answered yet), never the loop: it is caught in `run_once`, reported (a few per minute), and
  the connection is closed.
* Work that must not run inside another object's callback (the next pipelined request of a
  connection whose response just ended) is deferred to the end of the current pass.
* Counters: per-worker stats rows in shared memory are single-writer (this process), so a plain
  add suffices; breaker gauges shared by all workers use the same compare-and-swap rules as
  meshcore.upstream.breaker. Stat indexes come from meshcore.shm.layout at import.
"""

cimport cython
from cpython.bytes cimport (PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE,
                            PyBytes_Check)
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.ref cimport Py_INCREF, Py_DECREF, PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset, memcmp, strlen
from libc.errno cimport (errno, EAGAIN, EINTR, EINPROGRESS, EMFILE, ENFILE, ENOBUFS, ENOMEM,
                         ENOSYS)
from posix.unistd cimport close as c_close, read as c_read, write as c_write
from posix.time cimport timespec, clock_gettime, CLOCK_MONOTONIC, CLOCK_REALTIME

from meshcore._ext.cbuf cimport (Buf, buf_len, buf_ptr, buf_append, buf_consume, buf_clear,
                                 buf_free, buf_shrink, buf_append_hex, buf_append_dec, buf_reserve)
from meshcore._ext.h1parse cimport (RequestHead, ResponseHead, C_BODY_NONE, C_BODY_LENGTH,
                                    C_BODY_CHUNKED, C_BODY_CLOSE)
from meshcore._ext.h1conn cimport (ServerConn, ClientConn, EV_NEED_DATA, EV_HEAD, EV_DATA, EV_END,
                                   EV_PAUSED, EV_EOF, EV_ERROR, EV_INFORMATIONAL, EV_UPGRADE,
                                   R_DONE, R_BODY, R_HEAD, W_IDLE, W_DONE)
from meshcore._ext.pool cimport PoolBook

import os as _os
import sys as _sys
import socket as _socket
import traceback as _traceback

from meshcore import local_reply as _lr
from meshcore.metrics import istio as _istio
from meshcore.policy.classify import Kind as _Kind
from meshcore.shm import layout as _layout
from meshcore.sidecar.origdst import original_dst as _original_dst

# ------------------------------------------------------------------------------------------------
# C declarations

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* ev)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    int epoll_pwait2(int epfd, epoll_event* events, int maxevents, const timespec* timeout,
                     const void* sigmask)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "<sys/timerfd.h>" nogil:
    cdef struct itimerspec:
        timespec it_interval
        timespec it_value
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec* new_value, itimerspec* old_value)
    enum:
        TFD_NONBLOCK
        TFD_CLOEXEC
        TFD_TIMER_ABSTIME

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    cdef struct sockaddr:
        sa_family_t sa_family
    cdef struct sockaddr_storage:
        sa_family_t ss_family
    int c_socket "socket"(int domain, int type, int protocol)
    int c_connect "connect"(int fd, const sockaddr* addr, socklen_t len)
    int accept4(int fd, sockaddr* addr, socklen_t* len, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void* val, socklen_t len)
    int getsockopt(int fd, int level, int name, void* val, socklen_t* len)
    int getsockname(int fd, sockaddr* addr, socklen_t* len)
    int c_shutdown "shutdown"(int fd, int how)
    enum:
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_ERROR
        MSG_NOSIGNAL
        MSG_DONTWAIT
        MSG_PEEK
        SHUT_WR

cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        uint32_t s_addr
    cdef struct in6_addr:
        unsigned char s6_addr[16]
    cdef struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr
    unsigned short ntohs(unsigned short)
    unsigned short htons(unsigned short)
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "<strings.h>" nogil:
    int strncasecmp(const char* a, const char* b, size_t n)


cdef extern from "<time.h>" nogil:
    cdef struct tm:
        int tm_sec
        int tm_min
        int tm_hour
        int tm_mday
        int tm_mon
        int tm_year
    tm* gmtime_r(const long* timep, tm* result)

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint32_t mc_load32(const void* p) {
        return __atomic_load_n((const uint32_t*)p, __ATOMIC_SEQ_CST); }
    static inline uint32_t mc_add32(void* p, int32_t v) {
        return __atomic_fetch_add((uint32_t*)p, (uint32_t)v, __ATOMIC_SEQ_CST); }
    static inline int mc_cas32(void* p, uint32_t expect, uint32_t want) {
        return __atomic_compare_exchange_n((uint32_t*)p, &expect, want, 0, __ATOMIC_SEQ_CST,
                                           __ATOMIC_SEQ_CST); }
    static inline uint64_t mc_load64(const void* p) {
        return __atomic_load_n((const uint64_t*)p, __ATOMIC_SEQ_CST); }
    static inline void mc_store64(void* p, uint64_t v) {
        __atomic_store_n((uint64_t*)p, v, __ATOMIC_SEQ_CST); }
    static inline void mc_store32(void* p, uint32_t v) {
        __atomic_store_n((uint32_t*)p, v, __ATOMIC_SEQ_CST); }
    """
    uint32_t mc_load32(const void* p) nogil
    uint32_t mc_add32(void* p, int32_t v) nogil
    bint mc_cas32(void* p, uint32_t expect, uint32_t want) nogil
    uint64_t mc_load64(const void* p) nogil
    void mc_store64(void* p, uint64_t v) nogil
    void mc_store32(void* p, uint32_t v) nogil

# ------------------------------------------------------------------------------------------------
# constants

cdef enum:
    SCRATCH = 262144            # one recv's worth; what is left unconsumed is retained per conn
    MAX_ACCEPT = 64             # accepts per readiness event (fairness between listener and conns)
    HIGH_WATER = 262144         # pause the producer when a peer's unsent bytes pass this
    LOW_WATER = 65536           # ...and resume it below this
    BODY_BUFFER_LIMIT = 1048576  # request body held while no upstream can take it (and for replay)
    LOG_FLUSH_AT = 65536        # access log bytes buffered before a write
    PIPELINE_LIMIT = 65536      # bytes read ahead of the request in flight (pipelining, EOF)
    LINGER_LIMIT = 8388608      # bytes read and discarded in a delayed close before reading stops

cdef uint32_t UNLIMITED = 4294967295u
cdef double LINGER_BUDGET = 0.001  # most time run_once lingers for due answers in one call
cdef double DRAIN_QUIET = 1.0  # draining: an idle keep-alive connection is closed after this

# Stat indexes of a worker stats row, from the one declaration in meshcore.shm.layout.
cdef int W_CX_TOTAL = _layout.W_INDEX["upstream_cx_total"]
cdef int W_CX_CONNECT_FAIL = _layout.W_INDEX["upstream_cx_connect_fail"]
cdef int W_CX_CONNECT_TIMEOUT = _layout.W_INDEX["upstream_cx_connect_timeout"]
cdef int W_CX_OVERFLOW = _layout.W_INDEX["upstream_cx_overflow"]
cdef int W_CX_RX_BYTES = _layout.W_INDEX["upstream_cx_rx_bytes_total"]
cdef int W_CX_TX_BYTES = _layout.W_INDEX["upstream_cx_tx_bytes_total"]
cdef int W_RQ_TOTAL = _layout.W_INDEX["upstream_rq_total"]
cdef int W_RQ_COMPLETED = _layout.W_INDEX["upstream_rq_completed"]
cdef int W_RQ_1XX = _layout.W_INDEX["upstream_rq_1xx"]
cdef int W_RQ_TIMEOUT = _layout.W_INDEX["upstream_rq_timeout"]
cdef int W_RQ_PENDING_TOTAL = _layout.W_INDEX["upstream_rq_pending_total"]
cdef int W_RQ_PENDING_OVERFLOW = _layout.W_INDEX["upstream_rq_pending_overflow"]
cdef int W_RQ_ACTIVE_OVERFLOW = _layout.W_INDEX["upstream_rq_active_overflow"]
cdef int W_RQ_RX_RESET = _layout.W_INDEX["upstream_rq_rx_reset"]
cdef int W_RQ_CANCELLED = _layout.W_INDEX["upstream_rq_cancelled"]
# Cluster row (breaker gauges shared by all workers) and host row offsets.
cdef int C_CX_ACTIVE = _layout.C_CX_ACTIVE
cdef int C_RQ_PENDING = _layout.C_RQ_PENDING
cdef int C_RQ_ACTIVE = _layout.C_RQ_ACTIVE
cdef int C_EJECTIONS_ACTIVE = _layout.C_EJECTIONS_ACTIVE
cdef int H_PAIR = _layout.H_CONSECUTIVE_5XX  # the aligned (5xx, gateway) counter pair
cdef int H_LOCAL_ORIGIN = _layout.H_CONSECUTIVE_LOCAL_ORIGIN
cdef int H_DEST_ID = _layout.H_DEST_ID
cdef int C_DEST_ID = _layout.C_DEST_ID
cdef int W_RQ_RETRY_BACKOFF = _layout.W_INDEX["upstream_rq_retry_backoff_exponential"]
# Per-host counters of a worker (admin /clusters), meshcore.metrics.recorder.host_attempt's rules.
cdef int HS_CX_TOTAL = _layout.HS_CX_TOTAL
cdef int HS_CX_CONNECT_FAIL = _layout.HS_CX_CONNECT_FAIL
cdef int HS_RQ_TOTAL = _layout.HS_RQ_TOTAL
cdef int HS_RQ_SUCCESS = _layout.HS_RQ_SUCCESS
cdef int HS_RQ_ERROR = _layout.HS_RQ_ERROR
cdef int HS_RQ_TIMEOUT = _layout.HS_RQ_TIMEOUT
# Istio's standard metrics: one worker block of rows keyed by (destination, code, flags); the
# cell layout and the reference writer are meshcore.metrics.istio (record, hist_record).
cdef int IB_ROWS_USED = _istio.B_ROWS_USED
cdef int IB_OVERFLOW = _istio.B_OVERFLOW
cdef int IB_CX_TOTAL = _istio.B_DOWNSTREAM_CX_TOTAL
cdef int IB_CX_ACTIVE = _istio.B_DOWNSTREAM_CX_ACTIVE
cdef int IR_KEY = _istio.R_KEY
cdef int IR_REQUESTS = _istio.R_REQUESTS
cdef int IR_DURATION = _istio.R_DURATION
cdef int IR_DURATION_SUM = _istio.R_DURATION_SUM
cdef int IR_REQUEST_BYTES = _istio.R_REQUEST_BYTES
cdef int IR_REQUEST_BYTES_SUM = _istio.R_REQUEST_BYTES_SUM
cdef int IR_RESPONSE_BYTES = _istio.R_RESPONSE_BYTES
cdef int IR_RESPONSE_BYTES_SUM = _istio.R_RESPONSE_BYTES_SUM
cdef int IH_SUM = _istio.H_SUM
cdef int IH_COUNT = _istio.H_COUNT
cdef Py_ssize_t ISTIO_BLOCK_HEADER = _layout.ISTIO_BLOCK_HEADER
cdef Py_ssize_t ISTIO_ROW_SIZE = _layout.ISTIO_ROW_SIZE
cdef uint64_t OVERFLOW_KEY = _istio.OVERFLOW_KEY
cdef int NB = _istio.NB
cdef double BUCKETS[32]
for _i, _b in enumerate(_istio.BUCKETS):
    BUCKETS[_i] = _b
cdef object _flags_mask = _istio.flags_mask


cdef inline int bucket_of(double v) noexcept nogil:
    """bisect_left(BUCKETS, v): the first bucket whose bound is >= v (NB: above them all)."""
    cdef int lo = 0, hi = NB, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if BUCKETS[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline void inc64(char* p, uint64_t n) noexcept nogil:
    (<uint64_t*>p)[0] += n

# Outcome kinds, from the one classifier (meshcore.policy.classify.Kind).
cdef int K_RESPONSE = _Kind.RESPONSE
cdef int K_CONNECT_FAILURE = _Kind.CONNECT_FAILURE
cdef int K_CONNECT_TIMEOUT = _Kind.CONNECT_TIMEOUT
cdef int K_RESET = _Kind.RESET_BEFORE_RESPONSE
cdef int K_PER_TRY_TIMEOUT = _Kind.PER_TRY_TIMEOUT
cdef int K_OVERFLOW = _Kind.OVERFLOW
cdef int K_PROTOCOL_ERROR = _Kind.PROTOCOL_ERROR

# policy.on_outcome answers
RELAY = 0
RETRY = 1
REPLY = 2
cdef enum:
    A_RELAY = 0
    A_RETRY = 1
    A_REPLY = 2

cdef object _render = _lr.render
cdef object _NO_ROUTE = _lr.NO_ROUTE
cdef object _NO_HEALTHY = _lr.NO_HEALTHY_UPSTREAM
cdef object _ROUTE_TIMEOUT = _lr.ROUTE_TIMEOUT
cdef object _UPE = _lr.UPSTREAM_PROTOCOL_ERROR
cdef object _HTTP10 = _lr.HTTP10_REJECTED
cdef object _UPGRADE_FAILED = _lr.UPGRADE_FAILED
cdef object _INTERNAL = _lr.INTERNAL_ERROR
cdef object _STREAM_IDLE = _lr.STREAM_IDLE_TIMEOUT
cdef object _STREAM_IDLE_COMPLETE = _lr.STREAM_IDLE_TIMEOUT_COMPLETE
cdef object _REQUEST_TIMEOUT = _lr.REQUEST_TIMEOUT
cdef object _protocol_reply = _lr.downstream_protocol_error
cdef object _upstream_request = None  # meshcore.routing.actions.upstream_request, loaded lazily
cdef tuple DROP_SERVER = (b"server",)
cdef bytes CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# stream states
cdef enum:
    ST_NEW = 0
    ST_DELAY = 1        # fault delay before forwarding
    ST_PENDING = 2      # waiting for room under maxConnections
    ST_CONNECTING = 3
    ST_AWAIT = 4        # request sent (or streaming), waiting for the response head
    ST_BACKOFF = 5      # between attempts
    ST_RELAY = 6        # response streaming downstream
    ST_DONE = 7
    ST_PARKED = 8       # the policy is awaiting something (a name to resolve); resume() goes on

# listener kinds (run --sidecar): captured connections carry their original destination
cdef enum:
    LISTEN_EXPLICIT = 0
    LISTEN_OUTBOUND = 1
    LISTEN_INBOUND = 2

# stateless balancers the loop draws itself (meshcore.upstream.balancer.stateless_kind)
cdef enum:
    FAST_LEAST_REQUEST = 1
    FAST_RANDOM = 2

# timer kinds
cdef enum:
    T_ROUTE = 1
    T_TRY = 2
    T_WAIT = 3
    T_HEADER = 4
    T_CONNECT = 5
    T_RESUME_ACCEPT = 6
    T_LINGER = 7        # a downstream connection's delayed close is over
    T_DRAIN_IDLE = 8    # draining: an idle keep-alive connection's quiet period is over
    T_STREAM = 9        # a stream's idle timeout / request timeout check

# ------------------------------------------------------------------------------------------------
# clocks

cdef inline double mono() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double wall() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# ------------------------------------------------------------------------------------------------
# timers: a binary min-heap of Timer structs embedded in their owners

cdef struct Timer:
    double when
    Py_ssize_t idx      # position in the heap, -1 when not armed
    int kind
    PyObject* owner     # a Handle, INCREF'd while armed


cdef class Handle:
    """Anything the loop calls back: a socket's readiness or a timer."""
    cdef int fd
    cdef uint32_t interest
    cdef bint registered

    cdef int on_event(self, uint32_t events) except -1:
        return 0

    cdef int on_timer(self, int kind) except -1:
        return 0

    cdef int on_error(self) except -1:
        """An exception escaped this handle's callback: close it."""
        return 0


# ------------------------------------------------------------------------------------------------
# the loop

cdef class Loop:
    cdef int epfd
    cdef int tfd
    cdef double tfd_armed
    cdef Timer** heap
    cdef Py_ssize_t nheap, capheap
    cdef char* scratch
    cdef epoll_event* events
    cdef int max_events
    cdef list deferred
    cdef set conns              # downstream connections (for sweeps, drain)
    cdef set shadows            # mirror copies in flight
    cdef set tunnels            # byte tunnels (TCP proxying)
    cdef list listeners
    cdef public object policy
    cdef dict fast_routes                   # host -> FastRoute (set_fast_routes)
    cdef int fast_epoch                     # bumped by set_fast_routes: older tables are stale
    cdef public bint draining
    cdef public bint use_remote_address
    cdef public double header_timeout
    cdef public double idle_timeout
    cdef public double stream_idle_timeout  # HCM stream_idle_timeout (0: off)
    cdef public double request_timeout      # HCM request_timeout (0: off)
    cdef public double delayed_close        # HCM delayed_close_timeout (0: close at once)
    cdef public bint accepting
    cdef public int max_connections
    # shared memory
    cdef Py_buffer shm_view
    cdef bint shm_held
    cdef char* shm
    # access log
    cdef public int log_fd
    cdef public int log_mode      # 0 off, 1 Istio text in C, 2 Python formatter (policy.log)
    cdef Buf logbuf
    cdef long log_sec
    cdef char log_sec_text[24]
    cdef public uint64_t log_dropped
    # request ids
    cdef uint64_t rng0, rng1
    # accounting (the bench's per-request CPU breakdown; clock reads only when profiling)
    cdef public bint profile
    cdef public double t_policy
    cdef public double t_log
    cdef public uint64_t n_requests
    cdef public uint64_t n_policy_calls
    cdef public uint64_t n_accept_overflow
    cdef public uint64_t n_passes           # run_once calls
    cdef public uint64_t n_events           # socket events handled
    cdef public uint64_t n_fast             # requests decided in C (no policy call)
    cdef public uint64_t n_lingers          # waits in epoll for an answer due soon
    cdef public int inflight                # upstream attempts in progress
    cdef public double linger               # seconds to wait for a due answer (0: never)
    cdef int bug_reports
    cdef double bug_window
    cdef TimerFd timer_handle
    # metrics (meshcore.metrics): this worker's Istio block and its key -> row index
    cdef public bint metrics
    cdef char* istio
    cdef Py_ssize_t istio_rows
    cdef uint64_t* ikeys              # open addressing; OVERFLOW_KEY marks an empty slot
    cdef Py_ssize_t* ioffs
    cdef Py_ssize_t icap

    def __cinit__(self):
        self.epfd = -1
        self.tfd = -1
        self.heap = NULL
        self.scratch = NULL
        self.events = NULL
        self.shm_held = False

    def __init__(self, policy, *, int max_events=256, int log_fd=1, int log_mode=1,
                 bint use_remote_address=False, double header_timeout=10.0,
                 double idle_timeout=3600.0, int max_connections=0):
        cdef bytes seed
        self.policy = policy
        self.max_events = max_events
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if self.tfd < 0:
            raise OSError(errno, "timerfd_create failed")
        self.scratch = <char*>malloc(SCRATCH)
        self.events = <epoll_event*>malloc(max_events * sizeof(epoll_event))
        self.capheap = 256
        self.heap = <Timer**>malloc(self.capheap * sizeof(Timer*))
        if self.scratch == NULL or self.events == NULL or self.heap == NULL:
            raise MemoryError()
        self.nheap = 0
        self.deferred = []
        self.fast_routes = {}
        self.conns = set()
        self.shadows = set()
        self.tunnels = set()
        self.listeners = []
        self.log_fd = log_fd
        self.log_mode = log_mode
        self.use_remote_address = use_remote_address
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.stream_idle_timeout = 300.0  # Envoy's defaults
        self.request_timeout = 0.0
        self.delayed_close = 1.0
        self.accepting = True
        self.linger = 0.0002
        seed = _os.urandom(16)
        memcpy(&self.rng0, PyBytes_AS_STRING(seed), 8)
        memcpy(&self.rng1, PyBytes_AS_STRING(seed) + 8, 8)
        if self.rng0 == 0 and self.rng1 == 0:
            self.rng1 = 1
        self.timer_handle = TimerFd.__new__(TimerFd)
        self.timer_handle.fd = self.tfd
        self.timer_handle.loop = self
        self.register(self.timer_handle, EPOLLIN)

    def __dealloc__(self):
        buf_free(&self.logbuf)
        free(self.ikeys)
        free(self.ioffs)
        if self.shm_held:
            PyBuffer_Release(&self.shm_view)
        free(self.scratch)
        free(self.events)
        free(self.heap)
        if self.tfd >= 0:
            c_close(self.tfd)
        if self.epfd >= 0:
            c_close(self.epfd)

    # -- Python API -------------------------------------------------------------------------

    def fileno(self):
        return self.epfd

    def attach_shm(self, buf):
        """The shared-memory segment (a writable buffer) the stats and breaker rows live in."""
        if self.shm_held:
            PyBuffer_Release(&self.shm_view)
            self.shm_held = False
        PyObject_GetBuffer(buf, &self.shm_view, PyBUF_WRITABLE)
        self.shm_held = True
        self.shm = <char*>self.shm_view.buf

    def setup_metrics(self, Py_ssize_t istio_off, Py_ssize_t istio_rows):
        """Record Istio's metrics, per-host counters and final-response charges (off unless
        called): `istio_off` is this worker's Istio block in the shared memory. Rows a previous
        process of this worker wrote are adopted, so counters never go backwards."""
        cdef Py_ssize_t r, used, off
        if self.shm == NULL:
            raise ValueError("attach_shm() first")
        self.istio = self.shm + istio_off
        self.istio_rows = istio_rows
        self.icap = 16
        while self.icap < 2 * istio_rows:
            self.icap *= 2
        free(self.ikeys)
        free(self.ioffs)
        self.ikeys = <uint64_t*>malloc(self.icap * sizeof(uint64_t))
        self.ioffs = <Py_ssize_t*>malloc(self.icap * sizeof(Py_ssize_t))
        if self.ikeys == NULL or self.ioffs == NULL:
            raise MemoryError()
        for r in range(self.icap):
            self.ikeys[r] = OVERFLOW_KEY
        used = <Py_ssize_t>(<uint64_t*>(self.istio + 8 * IB_ROWS_USED))[0]
        if used > istio_rows - 1:
            used = istio_rows - 1
        for r in range(used):
            off = ISTIO_BLOCK_HEADER + r * ISTIO_ROW_SIZE
            self.index_put((<uint64_t*>(self.istio + off + 8 * IR_KEY))[0], off)
        self.metrics = True

    def record_istio(self, uint64_t dest, int code, uint32_t flags, long long duration_ms,
                     long long request_bytes, long long response_bytes):
        """One request into the Istio block, exactly as the loop records it (for tests that
        compare it with meshcore.metrics.istio.record)."""
        self.istio_record(dest, code, flags, duration_ms, request_bytes, response_bytes)

    cdef void index_put(self, uint64_t key, Py_ssize_t off) noexcept:
        cdef Py_ssize_t i = <Py_ssize_t>((key * 0x9E3779B97F4A7C15ULL) >> 40) & (self.icap - 1)
        while self.ikeys[i] != OVERFLOW_KEY and self.ikeys[i] != key:
            i = (i + 1) & (self.icap - 1)
        self.ikeys[i] = key
        self.ioffs[i] = off

    cdef Py_ssize_t index_get(self, uint64_t key) noexcept:
        cdef Py_ssize_t i = <Py_ssize_t>((key * 0x9E3779B97F4A7C15ULL) >> 40) & (self.icap - 1)
        while self.ikeys[i] != OVERFLOW_KEY:
            if self.ikeys[i] == key:
                return self.ioffs[i]
            i = (i + 1) & (self.icap - 1)
        return -1

    cdef void istio_record(self, uint64_t dest, int code, uint32_t flags, long long duration,
                           long long request_bytes, long long response_bytes) noexcept:
        """meshcore.metrics.istio.record, cell for cell, on this worker's block."""
        cdef uint64_t key
        cdef Py_ssize_t off, used
        cdef char* b = self.istio
        cdef char* row
        cdef int i
        if code < 0 or code > 999:
            code = 0
        key = (dest & 0x3FFFFF) << 42 | (<uint64_t>flags) << 10 | <uint64_t>code
        off = self.index_get(key)
        if off < 0:
            used = <Py_ssize_t>mc_load64(b + 8 * IB_ROWS_USED)
            if used >= self.istio_rows - 1:  # full: the last row takes the rest, counted
                inc64(b + 8 * IB_OVERFLOW, 1)
                off = ISTIO_BLOCK_HEADER + (self.istio_rows - 1) * ISTIO_ROW_SIZE
                if mc_load64(b + off + 8 * IR_KEY) != OVERFLOW_KEY:
                    mc_store64(b + off + 8 * IR_KEY, OVERFLOW_KEY)
            else:
                off = ISTIO_BLOCK_HEADER + used * ISTIO_ROW_SIZE
                mc_store64(b + off + 8 * IR_KEY, key)  # the key first, then publish the row
                mc_store64(b + 8 * IB_ROWS_USED, used + 1)
                self.index_put(key, off)
        row = b + off
        inc64(row + 8 * IR_REQUESTS, 1)
        if duration < 0:
            duration = 0
        i = bucket_of(<double>duration)
        if i < NB:
            inc64(row + 8 * (IR_DURATION + i), 1)
        if duration:
            inc64(row + 8 * IR_DURATION_SUM, duration)
        i = bucket_of(<double>request_bytes)
        if i < NB:
            inc64(row + 8 * (IR_REQUEST_BYTES + i), 1)
        if request_bytes:
            inc64(row + 8 * IR_REQUEST_BYTES_SUM, request_bytes)
        i = bucket_of(<double>response_bytes)
        if i < NB:
            inc64(row + 8 * (IR_RESPONSE_BYTES + i), 1)
        if response_bytes:
            inc64(row + 8 * IR_RESPONSE_BYTES_SUM, response_bytes)

    cdef void downstream_cx(self, int delta) noexcept:
        cdef char* b = self.istio
        if not self.metrics:
            return
        if delta > 0:
            inc64(b + 8 * IB_CX_TOTAL, 1)
            inc64(b + 8 * IB_CX_ACTIVE, 1)
        elif (<uint64_t*>(b + 8 * IB_CX_ACTIVE))[0]:
            (<uint64_t*>(b + 8 * IB_CX_ACTIVE))[0] -= 1

    def set_fast_routes(self, dict routes):
        """Hosts the loop routes without calling the policy (swapped by reference on reload):
        {lowercase host bytes (as the Host header carries it): FastRoute}. See FastRoute."""
        self.fast_routes = routes
        self.fast_epoch += 1

    def add_listener(self, sock, str kind="explicit"):
        """Serve a listening socket (its fd is duplicated; the caller may close its object).
        `kind`: "explicit" (route by the Host header), "outbound" or "inbound" (sidecar capture:
        each connection's original destination goes to policy.connection first)."""
        cdef Listener lst = Listener.__new__(Listener)
        lst.kind = {"explicit": LISTEN_EXPLICIT, "outbound": LISTEN_OUTBOUND,
                    "inbound": LISTEN_INBOUND}[kind]
        lst.fd = _os.dup(sock.fileno())
        lst.loop = self
        _os.set_blocking(lst.fd, False)
        self.listeners.append(lst)
        self.register(lst, EPOLLIN)
        return lst

    def run_once(self):
        """Handle what is ready (at most max_events socket events) and the expired timers.
        Returns the number of socket events handled.

        While upstream answers are due (attempts in flight) it lingers in epoll for up to
        `linger` seconds (200 µs) for them instead of returning to trio at once: an answer that
        arrives within the window costs no trio wake-up. The lingering stops when nothing came
        in the window, after max_events events, or after LINGER_BUDGET in all, so trio's other
        tasks wait at most about a millisecond."""
        cdef int n, i, total = 0
        cdef Handle h
        cdef timespec ts
        cdef double start = 0.0
        cdef bint first = True
        while True:
            if first:
                n = epoll_wait(self.epfd, self.events, self.max_events - total, 0)
                first = False
            else:
                if self.inflight <= 0 or self.linger <= 0 or total >= self.max_events:
                    break
                if start == 0.0:
                    start = mono()
                elif mono() - start > LINGER_BUDGET:
                    break
                ts.tv_sec = 0
                ts.tv_nsec = <long>(self.linger * 1e9)
                n = epoll_pwait2(self.epfd, self.events, self.max_events - total, &ts, NULL)
                self.n_lingers += 1
                if n < 0 and errno == ENOSYS:  # a kernel before 5.11: no lingering here
                    self.linger = 0.0
                    break
            if n < 0:
                if errno == EINTR:
                    break
                raise OSError(errno, "epoll_wait failed")
            if n == 0:
                break
            self.n_passes += 1
            self.n_events += n
            total += n
            for i in range(n):
                h = <Handle>self.events[i].data.ptr
                try:
                    h.on_event(self.events[i].events)
                except Exception:
                    self.contain(h)
                self.run_deferred()
            self.run_timers()
            self.run_deferred()
        self.run_timers()
        self.run_deferred()
        self.arm_timerfd()
        return total

    @property
    def connections(self):
        return len(self.conns)

    @property
    def timers(self):
        return self.nheap

    def make_request_id(self):
        """A new x-request-id, as the data path makes them (for tests and tools)."""
        cdef char rid[36]
        self.new_request_id(rid)
        return PyBytes_FromStringAndSize(rid, 36)

    @property
    def tunnels_open(self):
        return len(self.tunnels)

    def sweep_tunnels(self, double idle_timeout):
        """Close tunnels idle longer than `idle_timeout` seconds (Envoy tcp_proxy idle_timeout)."""
        cdef Tunnel t
        cdef double now = mono()
        for t in list(self.tunnels):
            if t.ds is not None and t.us is not None and \
                    now - max(t.ds.tun_active, t.us.tun_active) > idle_timeout:
                t.close_both()

    @property
    def shadows_in_flight(self):
        return len(self.shadows)

    def drain(self):
        """Stop accepting (connections already in the accept queue are taken first: closing
        the listener would reset them); every response started from now on carries
        `connection: close` and ends its connection; idle keep-alive connections are closed
        once quiet (DConn.drain_idle): between requests, never after a request was read.
        TCP tunnels go on until the worker exits."""
        cdef DConn d
        cdef Listener lst
        cdef int i
        self.draining = True
        for lst in list(self.listeners):
            for i in range(16):  # up to 16 * MAX_ACCEPT queued connections
                if lst.fd >= 0:
                    lst.on_event(EPOLLIN)
        self.stop_accepting()
        for d in list(self.conns):
            d.proto.draining = True
            if d.stream is None and not d.closing and not d.tunneling and \
                    d.proto.buffered() == 0 and buf_len(&d.out) == 0:
                d.drain_idle()
        self.arm_timerfd()

    def stop_accepting(self):
        cdef Listener lst
        self.accepting = False
        for lst in self.listeners:
            if lst.fd >= 0:
                self.unregister(lst)
                c_close(lst.fd)
                lst.fd = -1
        self.listeners = []

    def sweep(self):
        """Housekeeping (every few seconds): close downstream connections idle longer than
        idle_timeout and expired pooled upstream connections."""
        cdef double now = mono()
        cdef DConn d
        for d in list(self.conns):
            if d.stream is None and not d.tunneling and now - d.last_active > self.idle_timeout:
                d.close()

    def flush_log(self):
        self.write_log()

    def log_line(self, bytes line):
        """Append a finished access-log line (TCP connections) to the loop's log buffer."""
        if self.log_mode:
            buf_append(&self.logbuf, PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line))

    def statistics(self):
        return {"connections": len(self.conns), "timers": self.nheap,
                "shadows": len(self.shadows), "requests": self.n_requests,
                "policy_calls": self.n_policy_calls, "policy_seconds": self.t_policy,
                "log_seconds": self.t_log, "log_dropped": self.log_dropped,
                "accept_overflow": self.n_accept_overflow, "passes": self.n_passes,
                "events": self.n_events, "fast_decisions": self.n_fast,
                "lingers": self.n_lingers}

    def close(self):
        """Close every connection and flush the log. Then the shared-memory buffer is released
        (the segment may be unmapped): call this last, after the clusters' close_idle()."""
        cdef DConn d
        self.stop_accepting()
        for d in list(self.conns):
            d.close()
        self.write_log()
        if self.shm_held:
            PyBuffer_Release(&self.shm_view)
            self.shm_held = False

    def shadow(self, ClusterHandle cluster, int ep, bytes head, bytes body, double timeout,
               bint chunked=False):
        """Send a mirror copy (fire and forget). `head`: the request line and header lines up to
        the per-attempt ones (framing headers included; no empty line); `body`: the complete
        decoded body, framed as `chunked` says (else Content-Length, or none when empty). The
        response is read and discarded. Obeys the mirror cluster's breakers; a copy that cannot
        be admitted is dropped and counted."""
        cdef Stream s = Stream.__new__(Stream)
        s.loop = self
        s.ds = None
        s.shadow = True
        s.cluster = cluster
        s.ep = ep
        s.t_start = mono()
        s.route_timeout = timeout
        if chunked:
            s.body_kind = C_BODY_CHUNKED
            s.body_len = -1
        else:
            s.body_kind = C_BODY_LENGTH if len(body) else C_BODY_NONE
            s.body_len = len(body)
        buf_append(&s.head_base, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
        if len(body):
            buf_append(&s.body, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        s.body_done = True
        s.replayable = True
        s.keep_body = True
        s.head_request = head.startswith(b"HEAD ")
        self.shadows.add(s)
        s.arm_route_timer()
        s.start_attempt()

    # -- registration ---------------------------------------------------------------------

    cdef int register(self, Handle h, uint32_t events) except -1:
        cdef epoll_event ev
        ev.events = events
        ev.data.ptr = <void*>h
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, h.fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl ADD failed")
        Py_INCREF(h)
        h.registered = True
        h.interest = events
        return 0

    cdef int modify(self, Handle h, uint32_t events) except -1:
        cdef epoll_event ev
        if not h.registered or h.interest == events:
            return 0
        ev.events = events
        ev.data.ptr = <void*>h
        if epoll_ctl(self.epfd, EPOLL_CTL_MOD, h.fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl MOD failed")
        h.interest = events
        return 0

    cdef void unregister(self, Handle h):
        cdef epoll_event ev
        if not h.registered:
            return
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, h.fd, &ev)
        h.registered = False
        h.interest = 0
        Py_DECREF(h)

    # -- timers ---------------------------------------------------------------------------

    cdef int arm(self, Timer* t, Handle owner, int kind, double when) except -1:
        if t.idx >= 0:
            self.disarm(t)
        if self.nheap == self.capheap:
            self.capheap *= 2
            self.heap = <Timer**>realloc(self.heap, self.capheap * sizeof(Timer*))
            if self.heap == NULL:
                raise MemoryError()
        t.when = when
        t.kind = kind
        t.owner = <PyObject*>owner
        Py_INCREF(owner)
        t.idx = self.nheap
        self.heap[self.nheap] = t
        self.nheap += 1
        self.sift_up(t.idx)
        return 0

    cdef void disarm(self, Timer* t):
        cdef Py_ssize_t i = t.idx
        cdef Timer* last
        cdef PyObject* owner
        if i < 0:
            return
        self.nheap -= 1
        last = self.heap[self.nheap]
        t.idx = -1
        if i != self.nheap:
            self.heap[i] = last
            last.idx = i
            self.sift_down(i)
            self.sift_up(last.idx)
        owner = t.owner
        t.owner = NULL
        Py_DECREF(<object>owner)

    cdef void sift_up(self, Py_ssize_t i):
        cdef Timer* t = self.heap[i]
        cdef Py_ssize_t p
        while i > 0:
            p = (i - 1) >> 1
            if self.heap[p].when <= t.when:
                break
            self.heap[i] = self.heap[p]
            self.heap[i].idx = i
            i = p
        self.heap[i] = t
        t.idx = i

    cdef void sift_down(self, Py_ssize_t i):
        cdef Timer* t = self.heap[i]
        cdef Py_ssize_t c
        while True:
            c = 2 * i + 1
            if c >= self.nheap:
                break
            if c + 1 < self.nheap and self.heap[c + 1].when < self.heap[c].when:
                c += 1
            if self.heap[c].when >= t.when:
                break
            self.heap[i] = self.heap[c]
            self.heap[i].idx = i
            i = c
        self.heap[i] = t
        t.idx = i

    cdef int run_timers(self) except -1:
        cdef double now
        cdef Timer* t
        cdef Handle owner
        cdef int kind
        if self.nheap == 0:
            return 0
        now = mono()
        while self.nheap and self.heap[0].when <= now:
            t = self.heap[0]
            owner = <Handle>t.owner   # a new reference: keeps the owner alive past disarm
            kind = t.kind
            self.disarm(t)
            try:
                owner.on_timer(kind)
            except Exception:
                self.contain(owner)
            self.run_deferred()
        return 0

    cdef void arm_timerfd(self):
        """Point the timerfd at the earliest deadline (only when it moved earlier, or the armed
        one has passed: a stale, early wake-up costs one empty pass)."""
        cdef itimerspec spec
        cdef double when
        if self.nheap == 0:
            return
        when = self.heap[0].when
        if self.tfd_armed > 0 and when >= self.tfd_armed and self.tfd_armed > mono():
            return
        memset(&spec, 0, sizeof(spec))
        spec.it_value.tv_sec = <long>when
        spec.it_value.tv_nsec = <long>((when - <long>when) * 1e9)
        if spec.it_value.tv_sec == 0 and spec.it_value.tv_nsec == 0:
            spec.it_value.tv_nsec = 1
        timerfd_settime(self.tfd, TFD_TIMER_ABSTIME, &spec, NULL)
        self.tfd_armed = when

    cdef void after_callback(self):
        """Python called in from outside run_once (a parked request resumed): run what it
        deferred and point the timerfd at any deadline it armed."""
        try:
            self.run_deferred()
        except Exception:
            pass
        self.arm_timerfd()

    # -- deferred work --------------------------------------------------------------------

    cdef void defer(self, DConn d):
        if not d.deferred:
            d.deferred = True
            self.deferred.append(d)

    cdef int run_deferred(self) except -1:
        cdef list todo
        cdef DConn d
        while self.deferred:
            todo = self.deferred
            self.deferred = []
            for d in todo:
                d.deferred = False
                if d.fd < 0:
                    continue
                try:
                    d.process()
                except Exception:
                    self.contain(d)
        return 0

    # -- errors ---------------------------------------------------------------------------

    cdef void contain(self, Handle h):
        """A bug must cost one connection, never the worker and its neighbours."""
        cdef double now = mono()
        if now - self.bug_window > 60:
            self.bug_window = now
            self.bug_reports = 0
        self.bug_reports += 1
        if self.bug_reports <= 5:
            _traceback.print_exc(file=_sys.stderr)
        try:
            h.on_error()
        except Exception:
            if self.bug_reports <= 5:
                _traceback.print_exc(file=_sys.stderr)

    # -- request ids ----------------------------------------------------------------------

    cdef uint64_t rand64(self) noexcept nogil:
        """xorshift128+: fast, non-cryptographic (request ids, like Envoy's, need uniqueness)."""
        cdef uint64_t s1 = self.rng0
        cdef uint64_t s0 = self.rng1
        self.rng0 = s0
        s1 ^= s1 << 23
        self.rng1 = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26)
        return self.rng1 + s0

    cdef void new_request_id(self, char* out):
        """A lowercase UUIDv4 (36 characters), as Envoy's UUID request-id extension makes."""
        cdef uint64_t hi = self.rand64(), lo = self.rand64()
        cdef unsigned char raw[16]
        cdef int i, j = 0
        memcpy(raw, &hi, 8)
        memcpy(raw + 8, &lo, 8)
        raw[6] = (raw[6] & 0x0F) | 0x40
        raw[8] = (raw[8] & 0x3F) | 0x80
        for i in range(16):
            if i == 4 or i == 6 or i == 8 or i == 10:
                out[j] = 45
                j += 1
            out[j] = b"0123456789abcdef"[raw[i] >> 4]
            out[j + 1] = b"0123456789abcdef"[raw[i] & 15]
            j += 2

    # -- access log -----------------------------------------------------------------------

    cdef int write_log(self) except -1:
        cdef ssize_t n
        while buf_len(&self.logbuf):
            n = c_write(self.log_fd, buf_ptr(&self.logbuf), buf_len(&self.logbuf))
            if n < 0:
                if errno == EINTR:
                    continue
                # a stuck log reader must never stall the data path: drop, and count it
                self.log_dropped += buf_len(&self.logbuf)
                buf_clear(&self.logbuf)
                break
            buf_consume(&self.logbuf, n)
        buf_shrink(&self.logbuf)
        return 0

    cdef void log_time(self, double t):
        """%START_TIME% as Envoy prints it: 2026-11-26T06:33:23.139Z (seconds part cached)."""
        cdef long sec = <long>t
        cdef long ms = <long>((t - sec) * 1000 + 0.5)
        cdef tm parts
        cdef Buf* b = &self.logbuf
        cdef char msbuf[5]
        if ms >= 1000:
            sec += 1
            ms -= 1000
        if sec != self.log_sec:
            gmtime_r(&sec, &parts)
            _fmt_date(self.log_sec_text, parts.tm_year + 1900, parts.tm_mon + 1, parts.tm_mday,
                      parts.tm_hour, parts.tm_min, parts.tm_sec)
            self.log_sec = sec
        buf_append(b, self.log_sec_text, 19)
        msbuf[0] = 46
        msbuf[1] = <char>(48 + ms // 100)
        msbuf[2] = <char>(48 + (ms // 10) % 10)
        msbuf[3] = <char>(48 + ms % 10)
        msbuf[4] = 90
        buf_append(b, msbuf, 5)


cdef void _fmt_date(char* out, int y, int mo, int d, int h, int mi, int s) noexcept:
    """YYYY-MM-DDTHH:MM:SS into out[0:19]."""
    out[0] = <char>(48 + (y // 1000) % 10)
    out[1] = <char>(48 + (y // 100) % 10)
    out[2] = <char>(48 + (y // 10) % 10)
    out[3] = <char>(48 + y % 10)
    out[4] = 45
    out[5] = <char>(48 + mo // 10)
    out[6] = <char>(48 + mo % 10)
    out[7] = 45
    out[8] = <char>(48 + d // 10)
    out[9] = <char>(48 + d % 10)
    out[10] = 84
    out[11] = <char>(48 + h // 10)
    out[12] = <char>(48 + h % 10)
    out[13] = 58
    out[14] = <char>(48 + mi // 10)
    out[15] = <char>(48 + mi % 10)
    out[16] = 58
    out[17] = <char>(48 + s // 10)
    out[18] = <char>(48 + s % 10)


cdef class TimerFd(Handle):
    cdef Loop loop

    cdef int on_event(self, uint32_t events) except -1:
        cdef uint64_t expirations
        c_read(self.fd, &expirations, 8)
        self.loop.tfd_armed = 0
        return 0


# ------------------------------------------------------------------------------------------------
# addresses

cdef bytes _format_addr(sockaddr* sa):
    """"ip:port" ("[v6]:port") as Envoy prints addresses."""
    cdef char host[64]
    cdef char out[80]
    cdef int port
    cdef sockaddr_in* a4
    cdef sockaddr_in6* a6
    cdef Py_ssize_t n
    if sa.sa_family == AF_INET:
        a4 = <sockaddr_in*>sa
        inet_ntop(AF_INET, &a4.sin_addr, host, 64)
        port = ntohs(a4.sin_port)
        return (<bytes>host) + b":%d" % port
    if sa.sa_family == AF_INET6:
        a6 = <sockaddr_in6*>sa
        inet_ntop(AF_INET6, &a6.sin6_addr, host, 64)
        port = ntohs(a6.sin6_port)
        return b"[" + (<bytes>host) + b"]:%d" % port
    return b""


cdef bytes _local_addr(int fd):
    cdef sockaddr_storage ss
    cdef socklen_t n = sizeof(ss)
    if getsockname(fd, <sockaddr*>&ss, &n) < 0:
        return b""
    return _format_addr(<sockaddr*>&ss)


cdef inline void _nodelay(int fd) noexcept nogil:
    cdef int one = 1
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))


# ------------------------------------------------------------------------------------------------
# listener

cdef class Listener(Handle):
    cdef Loop loop
    cdef int kind
    cdef Timer t_resume

    def __cinit__(self):
        self.t_resume.idx = -1

    cdef int on_event(self, uint32_t events) except -1:
        cdef int i, fd, err
        cdef sockaddr_storage ss
        cdef socklen_t n
        cdef DConn d
        cdef Loop loop = self.loop
        for i in range(MAX_ACCEPT):
            n = sizeof(ss)
            fd = accept4(self.fd, <sockaddr*>&ss, &n, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if err == EAGAIN or err == EINTR:
                    return 0
                if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                    # Out of descriptors or memory: stop accepting for a moment, keep serving
                    # the connections already open, and try again (trio's serve_listeners rule).
                    loop.n_accept_overflow += 1
                    loop.modify(self, 0)
                    loop.arm(&self.t_resume, self, T_RESUME_ACCEPT, mono() + 0.1)
                    return 0
                return 0
            if loop.max_connections and len(loop.conns) >= loop.max_connections:
                loop.n_accept_overflow += 1
                c_close(fd)
                continue
            _nodelay(fd)
            d = DConn.__new__(DConn)
            d.fd = fd
            d.loop = loop
            d.remote = _format_addr(<sockaddr*>&ss)
            d.local = _local_addr(fd)
            d.last_active = mono()
            d.kind = self.kind
            loop.conns.add(d)
            loop.register(d, EPOLLIN)
            loop.downstream_cx(1)
            if self.kind != LISTEN_EXPLICIT:
                try:
                    d.orig = _original_dst(fd)  # None: addressed to the proxy itself
                    loop.policy.connection(d)
                except Exception:
                    loop.contain(d)
        return 0

    cdef int on_timer(self, int kind) except -1:
        if self.fd >= 0:
            self.loop.modify(self, EPOLLIN)
        return 0


# ------------------------------------------------------------------------------------------------
# a byte tunnel between two connections (TCP proxying, upgraded connections)

cdef class Conn(Handle):
    """What both sides of a proxy hop share: the loop, the bytes waiting to be sent, and the
    tunnel mode, where whatever one side reads is written to the other (Envoy's tcp_proxy):
    backpressure past HIGH_WATER, a half-close passed on once the other side's bytes are out,
    closed when both directions are done or either fails."""
    cdef Loop loop
    cdef Buf out
    cdef Conn peer
    cdef bint tunneling
    cdef bint eof_in            # read EOF: nothing more comes from this socket
    cdef bint shut_pending      # shut down writing once `out` is drained (the peer's EOF)
    cdef bint shut_out          # writing is shut down
    cdef long long tun_in       # bytes read from this socket while tunneling
    cdef double tun_active      # last tunnel activity (idle timeout sweep)
    cdef Tunnel tunnel

    def __dealloc__(self):
        buf_free(&self.out)

    cdef int tunnel_event(self, uint32_t events) except -1:
        cdef ssize_t n
        cdef Loop loop = self.loop
        cdef Conn peer = self.peer
        if events & EPOLLOUT:
            self.tunnel_flush()
            if self.fd < 0:
                return 0
        if events & (EPOLLIN | EPOLLHUP | EPOLLERR):
            if not (self.interest & EPOLLIN):
                if events & (EPOLLHUP | EPOLLERR):
                    return self.tunnel.close_both()
                return 0
            n = recv(self.fd, loop.scratch, SCRATCH, 0)
            if n < 0:
                if errno == EAGAIN or errno == EINTR:
                    return 0
                return self.tunnel.close_both()
            self.tun_active = mono()
            if n == 0:
                self.eof_in = True
                peer.shut_pending = True
            else:
                self.tun_in += n
                buf_append(&peer.out, loop.scratch, n)
            peer.tunnel_flush()
            if self.fd >= 0:
                self.tunnel_interest()
        return 0

    cdef int tunnel_flush(self) except -1:
        cdef ssize_t n
        if self.fd < 0:
            return 0
        while buf_len(&self.out):
            n = send(self.fd, buf_ptr(&self.out), buf_len(&self.out), MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                if errno == EAGAIN:
                    break
                if errno == EINTR:
                    continue
                return self.tunnel.close_both()
            buf_consume(&self.out, n)
        if buf_len(&self.out) == 0:
            buf_shrink(&self.out)
            if self.shut_pending and not self.shut_out:
                c_shutdown(self.fd, SHUT_WR)
                self.shut_out = True
        if self.shut_out and self.eof_in:
            return self.tunnel.side_done()
        self.tunnel_interest()
        if self.peer is not None and self.peer.fd >= 0:
            self.peer.tunnel_interest()
        return 0

    cdef int tunnel_interest(self) except -1:
        cdef uint32_t want = 0
        if self.fd < 0:
            return 0
        if not self.eof_in and (self.peer is None or buf_len(&self.peer.out) < HIGH_WATER):
            want = EPOLLIN
        if buf_len(&self.out):
            want |= EPOLLOUT
        self.loop.modify(self, want)
        return 0


cdef class Tunnel(Handle):
    """One tunnel: the downstream side, the upstream side, and what Envoy's tcp_proxy counts and
    logs. `start` once the upstream is connected; either side's failure closes both."""
    cdef Loop loop
    cdef DConn ds
    cdef UConn us
    cdef ClusterHandle cluster
    cdef double t_start
    cdef double t_wall
    cdef bint done
    cdef public object on_close          # Python callback(tunnel) for the access log, or None
    cdef public str flags                # Envoy's response flags: UO (overflow), UF (connect)
    cdef Stream stream                   # an upgraded request: logged when the tunnel closes

    @property
    def start_time(self):
        return self.t_wall

    @property
    def upstream_local(self):
        return self.us.local.decode() if self.us is not None and self.us.local else None

    @property
    def downstream_remote(self):
        return self.ds.remote.decode() if self.ds is not None else None

    @property
    def downstream_local(self):
        """Where the client connected: the original destination when captured."""
        if self.ds is None:
            return None
        if self.ds.orig is not None:
            ip, port = self.ds.orig
            return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        return self.ds.local.decode()

    @property
    def bytes_received(self):
        return self.ds.tun_in if self.ds is not None else 0

    @property
    def bytes_sent(self):
        return self.us.tun_in if self.us is not None else 0

    @property
    def cluster_name(self):
        return self.cluster.name if self.cluster is not None else None

    @property
    def upstream_host(self):
        if self.us is None or self.cluster is None:
            return None
        return self.cluster.keys[self.us.ep]

    @property
    def duration_ms(self):
        return int((mono() - self.t_start) * 1000)

    cdef int start(self) except -1:
        """The upstream is connected: both sides read and write."""
        cdef DConn d = self.ds
        cdef UConn u = self.us
        d.tunneling = True
        u.tunneling = True
        d.peer = u
        u.peer = d
        d.tunnel = self
        u.tunnel = self
        d.tun_active = u.tun_active = mono()
        d.proto.retain()
        if d.t_header.idx >= 0:
            self.loop.disarm(&d.t_header)
        if d.t_stream.idx >= 0:  # HTTP's stream timeouts end here (the idle sweep takes over)
            self.loop.disarm(&d.t_stream)
        if d.proto.buffered():  # bytes the client sent before the tunnel existed (sniffing)
            buf_append(&u.out, d.proto.cur_ptr(), d.proto.buffered())
            d.tun_in += d.proto.buffered()
            d.proto.release_buffers()
        if u.proto.buffered():  # bytes the upstream sent right after its 101
            buf_append(&d.out, u.proto.cur_ptr(), u.proto.buffered())
            u.tun_in += u.proto.buffered()
        u.proto.release_buffers()
        u.tunnel_flush()
        if d.fd >= 0:
            d.tunnel_flush()
        if u.fd >= 0:
            u.tunnel_interest()
        if d.fd >= 0:
            d.tunnel_interest()
        return 0

    cdef int side_done(self) except -1:
        """One side finished both ways; the tunnel ends when both have."""
        if (self.ds.fd < 0 or (self.ds.eof_in and self.ds.shut_out)) and \
                (self.us.fd < 0 or (self.us.eof_in and self.us.shut_out)):
            return self.close_both()
        return 0

    cdef int close_both(self) except -1:
        if self.done:
            return 0
        self.done = True
        if self.cluster is not None and self.us is not None:
            self.cluster.stat(W_CX_RX_BYTES, self.us.tun_in)
            self.cluster.stat(W_CX_TX_BYTES, self.ds.tun_in)
        if self.us is not None:
            self.us.tunneling = False
            self.us.close()
        if self.ds is not None:
            self.ds.tunneling = False
            self.ds.close()
        if self.on_close is not None:
            try:
                self.on_close(self)
            except Exception:
                self.loop.contain(self)
        if self.stream is not None:  # an upgraded request: its line, with the tunnel's bytes
            self.stream.body_received += self.ds.tun_in
            self.stream.bytes_sent += self.us.tun_in
            self.stream.log()
            self.stream = None
        self.loop.tunnels.discard(self)
        return 0

    cdef int on_error(self) except -1:
        self.on_close = None
        return self.close_both()


# ------------------------------------------------------------------------------------------------
# downstream connection

cdef class DConn(Conn):
    cdef ServerConn proto
    cdef Stream stream
    cdef bytes remote
    cdef bytes local
    cdef double last_active
    cdef bint closing           # close once `out` is flushed
    cdef bint answered          # ...after a whole answer: then a delayed close (finish_closing)
    cdef bint lingering         # delayed close: writing shut down, reading and discarding
    cdef long long linger_bytes
    cdef Timer t_close          # T_LINGER (delayed close) or T_DRAIN_IDLE (quiet while draining)
    cdef Timer t_stream         # T_STREAM: the current stream's idle / request timeout check
    cdef bint deferred
    cdef bint reading_paused    # backpressure: the upstream cannot take more body yet
    cdef Timer t_header
    cdef int kind               # the listener's: LISTEN_EXPLICIT, _OUTBOUND or _INBOUND
    cdef public object target   # sidecar mode: what the policy chose for this connection
    cdef object orig            # (ip, port) the connection was captured to, or None
    cdef bint sniffing          # AUTO protocol: the policy decides on the first bytes
    cdef dict fast              # sidecar mode: the port's FastRoute table (set_fast_routes)
    cdef int fast_epoch         # the loop's fast_epoch when `fast` was set

    def __cinit__(self):
        self.proto = ServerConn.__new__(ServerConn)
        self.t_header.idx = -1
        self.t_close.idx = -1
        self.t_stream.idx = -1

    # -- Python API (the policy's view of a captured connection) ----------------------------

    @property
    def original_destination(self):
        """(ip, port) the client connected to before capture (SO_ORIGINAL_DST), or None."""
        return self.orig

    @property
    def inbound(self):
        return self.kind == LISTEN_INBOUND

    @property
    def remote_address(self):
        return self.remote.decode()

    def sniff(self):
        """Wait for the first bytes; the policy's `sniffed(conn, data)` decides HTTP or TCP."""
        self.sniffing = True

    def tunnel_to(self, ClusterHandle cluster, int ep, on_close=None):
        """Proxy this connection's bytes to endpoint `ep` of `cluster` (Envoy's tcp_proxy):
        the cluster's connection limit, connect timeout and byte counters apply."""
        self.sniffing = False
        return self.start_tunnel(cluster, ep, on_close)

    def reject(self):
        """Close the connection now (BlackHoleCluster, over a limit)."""
        self.close()

    def set_fast_routes(self, dict routes):
        """The FastRoute table of this connection's port (None: every request asks decide);
        valid until the loop's own table is replaced (a new snapshot)."""
        self.fast = routes
        self.fast_epoch = self.loop.fast_epoch

    cdef int start_tunnel(self, ClusterHandle cluster, int ep, object on_close) except -1:
        cdef Tunnel t = Tunnel.__new__(Tunnel)
        cdef UConn u
        t.loop = self.loop
        t.ds = self
        t.cluster = cluster
        t.t_start = mono()
        t.t_wall = wall()
        t.on_close = on_close
        self.tunnel = t
        self.tunneling = True  # no HTTP parsing from now on
        self.loop.modify(self, 0)  # read once the upstream is there
        if not cluster.try_acquire(C_CX_ACTIVE, cluster.max_connections):
            cluster.stat(W_CX_OVERFLOW, 1)
            t.flags = "UO"
            self.close()
            return 0
        u = cluster.open(ep)
        if u.fd < 0 or (not u.connecting and u.connect_error):
            cluster.stat(W_CX_CONNECT_FAIL, 1)
            t.flags = "UF"
            u.close()
            self.close()
            return 0
        u.tunnel = t
        t.us = u
        self.loop.tunnels.add(t)
        return 0

    cdef int on_event(self, uint32_t events) except -1:
        cdef ssize_t n
        cdef Loop loop = self.loop
        if self.tunneling:
            if self.peer is None:  # the upstream side is still connecting
                if events & (EPOLLHUP | EPOLLERR):
                    self.tunnel.close_both()
                return 0
            return self.tunnel_event(events)
        if self.lingering:
            return self.linger_read()
        if events & EPOLLOUT:
            self.flush()
            if self.fd < 0:
                return 0
        if events & (EPOLLIN | EPOLLHUP | EPOLLERR):
            if not (self.interest & EPOLLIN):
                if events & (EPOLLHUP | EPOLLERR):
                    self.gone()  # both directions closed or reset: nothing can be delivered
                return 0
            n = recv(self.fd, loop.scratch, SCRATCH, 0)
            if n < 0:
                if errno == EAGAIN or errno == EINTR:
                    return 0
                self.gone()
                return 0
            if n == 0:
                self.proto.eof = True
            else:
                self.proto.feed(loop.scratch, n)
            self.last_active = mono()
            if self.sniffing:
                return self.sniff_bytes()
            self.process()
        return 0

    cdef int sniff_bytes(self) except -1:
        """AUTO protocol: hand the first bytes to the policy, which calls tunnel_to (TCP) or
        leaves the connection to HTTP; None from it means: read more first."""
        cdef Py_ssize_t n
        cdef const char* p
        cdef object verdict
        self.proto.retain()
        p = self.proto.cur_ptr()
        n = self.proto.buffered()
        if n == 0 and self.proto.eof:
            self.close()
            return 0
        verdict = self.loop.policy.sniffed(self, PyBytes_FromStringAndSize(p, n))
        if self.fd < 0 or self.tunneling:
            return 0
        if verdict is None and n < 8192 and not self.proto.eof:
            return 0  # not enough to tell yet
        self.sniffing = False
        return self.process()

    cdef int process(self) except -1:
        """Turn buffered bytes into request events until more input is needed."""
        cdef int ev
        cdef Stream s
        while self.fd >= 0 and not self.closing:
            s = self.stream
            if s is not None and s.body_blocked():
                self.reading_paused = True
                break
            ev = self.proto.next_event()
            if ev == EV_HEAD:
                if self.t_header.idx >= 0:
                    self.loop.disarm(&self.t_header)
                if self.proto.body_kind == C_BODY_CHUNKED and \
                        not self.proto.check_buffered_body(400):
                    self.on_protocol_error()  # a fault already here: the head goes nowhere
                    break
                self.start_stream()
            elif ev == EV_DATA:
                s.on_body(self.proto.ev_p, self.proto.ev_n)
            elif ev == EV_END:
                s.on_body_end()
            elif ev == EV_NEED_DATA:
                if self.proto.rstate == R_HEAD and self.proto.buffered():
                    self.arm_header_timer()
                break
            elif ev == EV_PAUSED:
                break
            elif ev == EV_EOF:
                self.on_eof()
                break
            elif ev == EV_ERROR:
                self.on_protocol_error()
                break
        if self.fd >= 0:
            self.proto.retain()
            self.update_interest()
        return 0

    cdef void arm_header_timer(self):
        # The header timeout covers the whole header section: trickling bytes cannot extend it.
        if self.t_header.idx < 0 and self.loop.header_timeout > 0:
            self.loop.arm(&self.t_header, self, T_HEADER, mono() + self.loop.header_timeout)

    cdef int update_interest(self) except -1:
        """Reading stays on while a request is in flight (no interest change per request, and a
        client that resets or half-closes is noticed at once); it pauses for backpressure on a
        request body, when pipelined bytes pile up, and after EOF (level-triggered EOF would
        wake the loop forever)."""
        cdef uint32_t want = 0
        cdef Stream s = self.stream
        if self.lingering:
            return 0  # delayed close: reading until the client's EOF (finish_closing)
        if not self.closing and not self.proto.eof:
            if s is None:
                want = EPOLLIN
            elif self.proto.rstate == R_BODY:
                if not s.body_blocked():
                    want = EPOLLIN
                    self.reading_paused = False
            elif self.proto.buffered() < PIPELINE_LIMIT:
                want = EPOLLIN
        if buf_len(&self.out):
            want |= EPOLLOUT
        self.loop.modify(self, want)
        return 0

    cdef int start_stream(self) except -1:
        cdef Stream s = Stream.__new__(Stream)
        s.loop = self.loop
        s.ds = self
        s.head = self.proto.head
        s.t_start = mono()
        s.t_wall = wall()
        self.stream = s
        self.loop.n_requests += 1
        s.begin()
        return 0

    cdef int send_bytes(self, bytes data) except -1:
        buf_append(&self.out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        return self.flush()

    cdef int flush(self) except -1:
        """Send what is buffered; wait for writability only when the kernel buffer is full."""
        cdef ssize_t n
        cdef Stream s
        while buf_len(&self.out):
            n = send(self.fd, buf_ptr(&self.out), buf_len(&self.out), MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                if errno == EAGAIN:
                    break
                if errno == EINTR:
                    continue
                self.gone()
                return 0
            buf_consume(&self.out, n)
        if buf_len(&self.out) == 0:
            buf_shrink(&self.out)
            if self.closing:
                self.finish_closing()
                return 0
            s = self.stream
            if s is not None and s.resp_paused:
                s.resume_response()
        if self.fd >= 0:
            self.update_interest()
        return 0

    cdef bint out_full(self):
        return buf_len(&self.out) > HIGH_WATER

    cdef int on_stream_done(self, bint keep) except -1:
        """The current exchange ended (response complete or local reply sent)."""
        self.stream = None
        if self.fd < 0:
            return 0
        if not keep:
            self.closing = True
            self.answered = self.proto.sstate == W_DONE  # (not an abort mid-response)
            if buf_len(&self.out) == 0:
                self.finish_closing()
            else:
                self.update_interest()
            return 0
        self.last_active = mono()
        if self.proto.buffered():
            self.loop.defer(self)  # a pipelined request: parsed after this pass's callbacks
        else:
            self.update_interest()
            if self.loop.draining:
                # This response's head went out before the drain began, so it could not say
                # `connection: close` and the client may be sending its next request already:
                # that one is answered (with the header); a quiet connection is closed.
                self.drain_idle()
        return 0

    cdef int drain_idle(self) except -1:
        """Draining: close this idle keep-alive connection once it has been quiet for
        DRAIN_QUIET (a request that comes first is answered, with `connection: close`)."""
        self.loop.arm(&self.t_close, self, T_DRAIN_IDLE, self.last_active + DRAIN_QUIET)
        return 0

    cdef int finish_closing(self) except -1:
        """`out` is flushed and the connection ends. After a whole answer this is Envoy's
        delayed close: writing is shut down (the client reads the answer, then EOF) and what
        the client still sends is read and discarded until its EOF, for at most
        loop.delayed_close seconds and LINGER_BYTES bytes. Closing with unread bytes would
        make the kernel send a reset, which can destroy the answer before the client reads it."""
        if self.fd < 0 or self.lingering:
            return 0
        if not self.answered or self.proto.eof or self.loop.delayed_close <= 0:
            self.close()
            return 0
        self.lingering = True
        if self.t_header.idx >= 0:
            self.loop.disarm(&self.t_header)
        c_shutdown(self.fd, SHUT_WR)
        self.loop.arm(&self.t_close, self, T_LINGER, mono() + self.loop.delayed_close)
        self.loop.modify(self, EPOLLIN)
        return 0

    cdef int linger_read(self) except -1:
        """Delayed close: read and discard; the client's EOF (or an error) ends it."""
        cdef ssize_t n = recv(self.fd, self.loop.scratch, SCRATCH, 0)
        if n > 0:
            self.linger_bytes += n
            if self.linger_bytes > LINGER_LIMIT:
                self.loop.modify(self, 0)  # enough read: the timer ends it
            return 0
        if n == 0 or (errno != EAGAIN and errno != EINTR):
            self.close()
        return 0

    cdef int on_eof(self) except -1:
        if self.stream is not None:
            self.stream.downstream_gone()
        self.close()
        return 0

    cdef int gone(self) except -1:
        """The client vanished (reset, broken pipe)."""
        if self.stream is not None:
            self.stream.downstream_gone()
        self.close()
        return 0

    cdef int on_protocol_error(self) except -1:
        """A malformed request: its status hint, then close (nothing was forwarded)."""
        cdef object reply = _protocol_reply(self.proto.error_status, self.proto.error_reason)
        cdef Stream s = self.stream
        if s is not None:
            if s.response_started:
                s.downstream_gone()
                self.close()
                return 0
            s.abort_upstream()
            s.finish_local(reply, True, b"", None)
            return 0
        self.proto.keep_alive = False
        self.send_bytes(_render(reply, True))
        self.closing = True
        self.answered = True
        if buf_len(&self.out) == 0:
            self.finish_closing()
        return 0

    cdef int on_timer(self, int kind) except -1:
        cdef object reply
        cdef char probe
        if kind == T_HEADER and self.stream is None and self.fd >= 0 and not self.closing:
            reply = _protocol_reply(408)
            self.send_bytes(_render(reply, True))
            self.closing = True
            self.answered = True
            if self.fd >= 0 and buf_len(&self.out) == 0:
                self.finish_closing()
        elif kind == T_STREAM:
            # the check of whichever stream is current (none: the timer rests until the next)
            if self.stream is not None and self.stream.state != ST_DONE:
                self.stream.on_stream_check()
        elif kind == T_LINGER:
            self.close()
        elif kind == T_DRAIN_IDLE:
            if self.fd >= 0 and self.stream is None and not self.closing and \
                    self.proto.buffered() == 0 and buf_len(&self.out) == 0:
                # Bytes already waiting are a request on its way: it is read and answered.
                if recv(self.fd, &probe, 1, MSG_PEEK | MSG_DONTWAIT) <= 0 or self.proto.eof:
                    self.close()
        return 0

    cdef int on_error(self) except -1:
        cdef Stream s = self.stream
        if s is not None and not s.response_started and self.fd >= 0:
            try:
                s.abort_upstream()
                s.finish_local(_INTERNAL, True, b"", None)
                return 0
            except Exception:
                pass
        if s is not None:
            s.downstream_gone()
        self.close()
        return 0

    cdef void close(self):
        if self.fd < 0:
            return
        if self.tunneling and self.tunnel is not None and not self.tunnel.done:
            self.tunnel.close_both()
            return
        if self.t_header.idx >= 0:
            self.loop.disarm(&self.t_header)
        if self.t_close.idx >= 0:
            self.loop.disarm(&self.t_close)
        if self.t_stream.idx >= 0:
            self.loop.disarm(&self.t_stream)
        self.loop.unregister(self)
        c_close(self.fd)
        self.fd = -1
        self.proto.release_buffers()
        buf_free(&self.out)
        self.stream = None
        self.loop.conns.discard(self)
        self.loop.downstream_cx(-1)


# ------------------------------------------------------------------------------------------------
# upstream connection

cdef class UConn(Conn):
    cdef ClusterHandle cluster
    cdef int ep
    cdef ClientConn proto
    cdef Stream stream          # the request using it; None while pooled
    cdef bint connecting
    cdef bint counted           # holds a unit of the shared connection gauge
    cdef bint in_book           # counted in the pool book's cx_active
    cdef int connect_error
    cdef int requests
    cdef bytes local
    cdef Timer t_connect

    def __cinit__(self):
        self.proto = ClientConn.__new__(ClientConn)
        self.t_connect.idx = -1

    cdef int on_event(self, uint32_t events) except -1:
        cdef ssize_t n
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        cdef Loop loop = self.loop
        cdef Stream s
        if self.tunnel is not None and not self.connecting:
            return self.tunnel_event(events)
        if self.connecting:
            if events & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &err, &elen)
                self.loop.disarm(&self.t_connect)
                self.connecting = False
                s = self.stream
                if err:
                    if self.tunnel is not None:
                        self.cluster.stat(W_CX_CONNECT_FAIL, 1)
                        self.tunnel.flags = "UF"
                        return self.tunnel.close_both()
                    self.close()
                    if s is not None:
                        s.on_attempt_failed(K_CONNECT_FAILURE)
                    return 0
                self.local = _local_addr(self.fd)
                if self.tunnel is not None:
                    return self.tunnel.start()
                if s is not None:
                    s.on_connected(self)
                else:
                    self.cluster.release(self, True)
            return 0
        if events & EPOLLOUT:
            self.flush()
            if self.fd < 0:
                return 0
        if events & (EPOLLIN | EPOLLHUP | EPOLLERR):
            if not (self.interest & EPOLLIN) and not (events & (EPOLLHUP | EPOLLERR)):
                return 0
            n = recv(self.fd, loop.scratch, SCRATCH, 0)
            if n < 0:
                if errno == EAGAIN or errno == EINTR:
                    return 0
                self.proto.eof = True
            elif n == 0:
                self.proto.eof = True
            else:
                self.cluster.stat(W_CX_RX_BYTES, n)
                self.proto.feed(loop.scratch, n)
            self.process()
        return 0

    cdef int process(self) except -1:
        cdef int ev
        cdef Stream s
        if self.stream is None:
            # Readable while pooled: the peer closed it or sent bytes nobody asked for.
            self.cluster.discard(self)
            return 0
        while self.fd >= 0:
            s = self.stream
            if s is None or s.resp_paused:
                break
            ev = self.proto.next_event()
            if ev == EV_HEAD:
                if self.proto.body_kind == C_BODY_CHUNKED and \
                        not self.proto.check_buffered_body(502):
                    s.on_upstream_closed(self, True)  # 502, never a relayed head cut short
                    break
                s.on_response_head(self)
            elif ev == EV_DATA:
                s.on_response_data(self.proto.ev_p, self.proto.ev_n)
            elif ev == EV_END:
                s.on_response_end(self)
                break
            elif ev == EV_INFORMATIONAL:
                continue
            elif ev == EV_NEED_DATA or ev == EV_PAUSED:
                break
            elif ev == EV_EOF:
                s.on_upstream_closed(self, False)
                break
            elif ev == EV_ERROR:
                s.on_upstream_closed(self, True)
                break
            elif ev == EV_UPGRADE:  # 101 to a websocket upgrade: a tunnel from now on
                self.proto.retain()
                return s.on_upgraded(self)
            if self.stream is not s:
                break
        if self.fd >= 0:
            self.proto.retain()
            self.update_interest()
        return 0

    cdef int update_interest(self) except -1:
        cdef uint32_t want = EPOLLIN
        if self.connecting:
            want = EPOLLOUT
        else:
            if self.stream is not None and self.stream.resp_paused:
                want = 0
            if buf_len(&self.out):
                want |= EPOLLOUT
        self.loop.modify(self, want)
        return 0

    cdef int flush(self) except -1:
        cdef ssize_t n
        cdef Stream s
        if self.connecting:
            return 0
        while buf_len(&self.out):
            n = send(self.fd, buf_ptr(&self.out), buf_len(&self.out), MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                if errno == EAGAIN:
                    break
                if errno == EINTR:
                    continue
                # The upstream went away while we were sending: what it answered (if anything)
                # is still readable; the read side reports the outcome.
                buf_clear(&self.out)
                break
            if self.stream is not None:
                self.stream.a_sent = True
            self.cluster.stat(W_CX_TX_BYTES, n)
            buf_consume(&self.out, n)
        if buf_len(&self.out) == 0:
            buf_shrink(&self.out)
            s = self.stream
            if s is not None and s.ds is not None and s.ds.reading_paused:
                self.loop.defer(s.ds)
        if self.fd >= 0:
            self.update_interest()
        return 0

    cdef bint out_full(self):
        return buf_len(&self.out) > HIGH_WATER

    cdef int on_timer(self, int kind) except -1:
        cdef Stream s = self.stream
        if kind == T_CONNECT and self.connecting:
            if self.tunnel is not None:
                self.cluster.stat(W_CX_CONNECT_TIMEOUT, 1)
                self.tunnel.flags = "UF"
                return self.tunnel.close_both()
            self.close()
            if s is not None:
                s.on_attempt_failed(K_CONNECT_TIMEOUT)
        return 0

    cdef int on_error(self) except -1:
        cdef Stream s = self.stream
        self.close()
        if s is not None and s.ds is not None:
            s.ds.on_error()
        return 0

    cdef void close_unbooked(self):
        """Close a connection the pool book already un-counted (expired, swept, drained)."""
        self.in_book = False
        self.close()

    cdef void close(self):
        """Close and give back the connection's unit of the shared limit."""
        if self.fd < 0:
            return
        if self.tunneling and self.tunnel is not None and not self.tunnel.done:
            self.tunnel.close_both()
            return
        if self.t_connect.idx >= 0:
            self.loop.disarm(&self.t_connect)
        self.loop.unregister(self)
        c_close(self.fd)
        self.fd = -1
        self.proto.release_buffers()
        buf_free(&self.out)
        self.stream = None
        self.cluster.on_closed(self)


# ------------------------------------------------------------------------------------------------
# cluster and route handles (compiled once per snapshot, per worker)

cdef class ClusterHandle:
    """One cluster's pools, addresses, limits and shared-memory rows, for this worker."""
    cdef Loop loop
    cdef public bytes name
    cdef public object state          # the Python ClusterState (balancer, outlier logic)
    cdef public PoolBook book
    cdef public bint retired          # replaced by a reload: connections close when released
    cdef int n
    cdef sockaddr_storage* addrs
    cdef socklen_t* addr_lens
    cdef list keys                    # endpoint "ip:port" as bytes (access log %UPSTREAM_HOST%)
    cdef char* stats                  # this worker's stats row
    cdef char* crow                   # the cluster's breaker row
    cdef char* hold                   # this worker's holdings of crow's gauges (or NULL)
    cdef char** hosts                 # host rows
    cdef char** host_stats            # this worker's per-host counter rows (NULL: not kept)
    cdef char* hist                   # this worker's upstream_rq_time histogram row (or NULL)
    cdef uint32_t max_connections, max_pending, max_requests
    cdef double connect_timeout
    cdef double idle_timeout
    cdef int max_requests_per_connection
    cdef bint outlier
    cdef bint outlier_split
    cdef object pending               # streams waiting for room under maxConnections (FIFO)

    def __cinit__(self):
        self.addrs = NULL
        self.addr_lens = NULL
        self.hosts = NULL
        self.host_stats = NULL
        self.hist = NULL
        self.hold = NULL

    def __init__(self, Loop loop, name, endpoints, *, Py_ssize_t stats_off, Py_ssize_t cluster_off,
                 host_offs, limits=(UNLIMITED, UNLIMITED, UNLIMITED), double connect_timeout=10.0,
                 double idle_timeout=3600.0, int max_requests_per_connection=0,
                 bint outlier=False, bint outlier_split=False, Py_ssize_t max_idle=64,
                 host_stat_offs=None, Py_ssize_t hist_off=-1, Py_ssize_t holdings_off=-1):
        """`endpoints`: (address, port, key) per endpoint; offsets are into the loop's shm
        (`host_stat_offs`/`hist_off`: this worker's per-host counters and upstream_rq_time
        histogram, kept when the loop records metrics; `holdings_off`: this worker's holdings
        row of the cluster's breaker gauges, which the supervisor returns if the worker dies)."""
        cdef Py_ssize_t i
        cdef object info
        import collections
        self.loop = loop
        self.name = name if isinstance(name, bytes) else name.encode()
        self.n = len(endpoints)
        self.book = PoolBook(self.n, max_idle)
        self.addrs = <sockaddr_storage*>malloc((self.n or 1) * sizeof(sockaddr_storage))
        self.addr_lens = <socklen_t*>malloc((self.n or 1) * sizeof(socklen_t))
        self.hosts = <char**>malloc((self.n or 1) * sizeof(char*))
        if self.addrs == NULL or self.addr_lens == NULL or self.hosts == NULL:
            raise MemoryError()
        if host_stat_offs is not None:
            self.host_stats = <char**>malloc((self.n or 1) * sizeof(char*))
            if self.host_stats == NULL:
                raise MemoryError()
            for i in range(self.n):
                self.host_stats[i] = loop.shm + <Py_ssize_t>host_stat_offs[i]
        if hist_off >= 0:
            self.hist = loop.shm + hist_off
        self.keys = []
        if loop.shm == NULL:
            raise ValueError("attach_shm() the loop before building cluster handles")
        for i in range(self.n):
            address, port, key = endpoints[i]
            info = _socket.getaddrinfo(address, port, type=_socket.SOCK_STREAM,
                                       flags=_socket.AI_NUMERICHOST)[0]
            self.addr_lens[i] = _pack_addr(info[0], info[4][0], info[4][1], &self.addrs[i])
            self.keys.append(key if isinstance(key, bytes) else key.encode())
            # endpoints of a per-request cluster have no host rows: they read the cluster's
            self.hosts[i] = loop.shm + <Py_ssize_t>(host_offs[i] if host_offs else cluster_off)
        self.stats = loop.shm + stats_off
        self.crow = loop.shm + cluster_off
        if holdings_off >= 0:
            self.hold = loop.shm + holdings_off
        self.max_connections, self.max_pending, self.max_requests = limits
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout if idle_timeout > 0 else 1e18
        self.max_requests_per_connection = max_requests_per_connection
        self.outlier = outlier
        self.outlier_split = outlier_split
        self.pending = collections.deque()

    def __dealloc__(self):
        free(self.addrs)
        free(self.addr_lens)
        free(self.hosts)
        free(self.host_stats)

    def rq_active(self, int ep):
        """Active requests of this worker on endpoint `ep` (the least-request balancer reads it)."""
        return self.book.rq_active(ep)

    def endpoint_key(self, int ep):
        return self.keys[ep]

    def add_stat(self, str name, uint64_t n=1):
        """Add to one of this worker's cluster counters by Envoy's name (rare events)."""
        self.stat(_layout.W_INDEX[name], n)

    def close_idle(self):
        """Close every pooled connection (drain, or the cluster left the config)."""
        cdef UConn u
        for u in self.book.drain_all():
            u.close_unbooked()

    def sweep(self):
        cdef UConn u
        for u in self.book.sweep(mono(), self.idle_timeout):
            u.close_unbooked()

    # -- counters -------------------------------------------------------------------------

    cdef inline void stat(self, int idx, uint64_t n) noexcept:
        (<uint64_t*>(self.stats + idx * 8))[0] += n

    cdef bint try_acquire(self, int off, uint32_t limit) noexcept:
        """meshcore.upstream.breaker.try_acquire on a cluster-row gauge: exact across workers.
        The unit is counted in this worker's holdings row first (single writer), so a kill at
        any point never leaves the gauge holding more than the row says (breaker's rules)."""
        cdef void* p = self.crow + off
        cdef uint32_t v
        if self.hold != NULL:  # a plain add: the seq_cst atomics below keep it before them
            (<uint32_t*>(self.hold + off))[0] += 1
        if limit >= UNLIMITED:
            mc_add32(p, 1)
            return True
        v = mc_load32(p)
        while v < limit:
            if mc_cas32(p, v, v + 1):
                return True
            v = mc_load32(p)
        if self.hold != NULL:
            (<uint32_t*>(self.hold + off))[0] -= 1
        return False

    cdef void release_unit(self, int off) noexcept:
        cdef void* p = self.crow + off
        cdef uint32_t* h
        if mc_add32(p, -1) == 0:
            mc_add32(p, 1)  # never wrap below zero
        if self.hold != NULL:  # uncounted after the gauge gave it back (breaker's rules)
            h = <uint32_t*>(self.hold + off)
            if h[0]:
                h[0] -= 1

    cdef void host_attempt(self, int ep, int kind, int status, bint reused) noexcept:
        """meshcore.metrics.recorder.host_attempt: one attempt in the host's counters."""
        cdef char* h
        if self.host_stats == NULL or ep < 0 or kind == K_OVERFLOW:
            return
        h = self.host_stats[ep]
        if not reused:
            inc64(h + 8 * HS_CX_TOTAL, 1)
        if kind == K_RESPONSE:
            inc64(h + 8 * HS_RQ_TOTAL, 1)
            inc64(h + 8 * (HS_RQ_ERROR if status >= 500 else HS_RQ_SUCCESS), 1)
        elif kind == K_CONNECT_FAILURE or kind == K_CONNECT_TIMEOUT:
            inc64(h + 8 * HS_CX_CONNECT_FAIL, 1)
        elif kind == K_PER_TRY_TIMEOUT:
            inc64(h + 8 * HS_RQ_TOTAL, 1)
            inc64(h + 8 * HS_RQ_TIMEOUT, 1)
        else:  # reset before a response, protocol error
            inc64(h + 8 * HS_RQ_TOTAL, 1)
            inc64(h + 8 * HS_RQ_ERROR, 1)

    cdef void charge_final(self, int status) noexcept:
        """Envoy's chargeUpstreamCode: the final response of a routed request (an upstream's or
        the router's own local reply) counts once in upstream_rq_completed and _<N>xx."""
        if 100 <= status <= 599:
            self.stat(W_RQ_COMPLETED, 1)
            self.stat(W_RQ_1XX + status // 100 - 1, 1)

    cdef void hist_record(self, long long value) noexcept:
        """meshcore.metrics.istio.hist_record: one upstream_rq_time value (ms)."""
        cdef char* h = self.hist
        cdef int i
        if h == NULL:
            return
        i = bucket_of(<double>value)
        if i < NB:
            inc64(h + 8 * i, 1)
        if value > 0:
            inc64(h + 8 * IH_SUM, value)
        inc64(h + 8 * IH_COUNT, 1)

    cdef int fast_pick(self, int lb) noexcept:
        """meshcore.upstream.balancer's LEAST_REQUEST (equal weights, two choices with
        replacement, the first kept unless the second has strictly fewer active requests) or
        RANDOM; -1 when a host is ejected (the policy then picks over the healthy set)."""
        cdef int n = self.n, i, j
        cdef Py_ssize_t* rq
        if mc_load32(self.crow + C_EJECTIONS_ACTIVE):
            return -1
        i = <int>(self.loop.rand64() % <uint64_t>n)
        if lb == FAST_LEAST_REQUEST:
            j = <int>(self.loop.rand64() % <uint64_t>n)
            rq = self.book._rq
            if j != i and rq[j] < rq[i]:
                i = j
        return i

    cdef void outlier_success(self, int ep) noexcept:
        """meshcore.upstream.outlier.on_result for a success, the hot half in C."""
        cdef char* h = self.hosts[ep]
        if mc_load64(h + H_PAIR):
            mc_store64(h + H_PAIR, 0)
        if self.outlier_split and mc_load32(h + H_LOCAL_ORIGIN):
            mc_store32(h + H_LOCAL_ORIGIN, 0)

    # -- connections ----------------------------------------------------------------------

    cdef UConn checkout(self, int ep):
        """A pooled connection to `ep`, or None."""
        cdef UConn u
        cdef object got
        got = self.book.take_idle(ep, mono(), self.idle_timeout)
        for u in self.book.pop_to_close():
            u.close_unbooked()
        if got is None:
            return None
        u = <UConn>got
        return u

    cdef UConn open(self, int ep):
        """A new, connecting connection (the caller holds a connection unit)."""
        cdef UConn u = UConn.__new__(UConn)
        cdef int fd, rc
        u.loop = self.loop
        u.cluster = self
        u.ep = ep
        u.counted = True
        u.in_book = True
        fd = c_socket(self.addrs[ep].ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            u.fd = -1
            return u
        _nodelay(fd)
        u.fd = fd
        self.book.on_open(ep)
        self.stat(W_CX_TOTAL, 1)
        rc = c_connect(fd, <sockaddr*>&self.addrs[ep], self.addr_lens[ep])
        if rc < 0 and errno != EINPROGRESS:
            u.connect_error = errno
            u.connecting = False
            return u
        u.connecting = True
        self.loop.register(u, EPOLLOUT)
        self.loop.arm(&u.t_connect, u, T_CONNECT, mono() + self.connect_timeout)
        return u

    cdef int release(self, UConn u, bint reusable) except -1:
        """A request is done with `u`: pool it if it can carry another, else close it."""
        u.stream = None
        if (reusable and not self.retired and not self.loop.draining and u.fd >= 0
                and (self.max_requests_per_connection == 0
                     or u.requests < self.max_requests_per_connection)):
            u.proto.reset()
            if self.pending:
                return self.hand_to_pending(u)
            # With requests pending in another worker and the connection limit reached, an idle
            # connection here would starve them: close it to free its unit.
            if not (self.max_connections < UNLIMITED and mc_load32(self.crow + C_RQ_PENDING)):
                if self.book.put_idle(u.ep, u, mono()):
                    u.update_interest()
                    return 0
        u.close()
        return 0

    cdef int discard(self, UConn u) except -1:
        """A pooled connection turned unusable: take it out of the pool and close it."""
        if self.book.remove_idle(u.ep, u):
            u.in_book = False
        u.close()
        return 0

    cdef int on_closed(self, UConn u) except -1:
        """`u` closed while it held a connection unit (book already updated or not)."""
        if u.in_book:
            u.in_book = False
            self.book.on_close(u.ep)
        if u.counted:
            u.counted = False
            self.release_unit(C_CX_ACTIVE)
            if self.pending:
                self.wake_pending()
        return 0

    cdef int hand_to_pending(self, UConn u) except -1:
        cdef Stream s
        while self.pending:
            s = self.pending.popleft()
            if s.state == ST_PENDING:
                s.leave_pending()
                s.attach(u, True)
                return 0
        if not self.book.put_idle(u.ep, u, mono()):
            u.close()
        else:
            u.update_interest()
        return 0

    cdef int wake_pending(self) except -1:
        cdef Stream s
        while self.pending:
            s = self.pending[0]
            if s.state != ST_PENDING:
                self.pending.popleft()
                continue
            if not self.try_acquire(C_CX_ACTIVE, self.max_connections):
                return 0
            self.pending.popleft()
            s.leave_pending()
            s.connect_new()
            return 0
        return 0

    def statistics(self):
        s = self.book.statistics()
        s["pending_here"] = len(self.pending)
        return s


cdef socklen_t _pack_addr(int family, str host, int port, sockaddr_storage* out) except 0:
    cdef sockaddr_in* a4
    cdef sockaddr_in6* a6
    cdef bytes h = host.split("%")[0].encode()
    memset(out, 0, sizeof(sockaddr_storage))
    if family == AF_INET:
        a4 = <sockaddr_in*>out
        a4.sin_family = AF_INET
        a4.sin_port = htons(port)
        if inet_pton(AF_INET, h, &a4.sin_addr) != 1:
            raise ValueError(f"bad IPv4 address {host!r}")
        return sizeof(sockaddr_in)
    a6 = <sockaddr_in6*>out
    a6.sin6_family = AF_INET6
    a6.sin6_port = htons(port)
    if inet_pton(AF_INET6, h, &a6.sin6_addr) != 1:
        raise ValueError(f"bad IPv6 address {host!r}")
    return sizeof(sockaddr_in6)


cdef class FastRoute:
    """A decision that depends only on the Host header, cached per snapshot (issue 8: "decisions
    that depend only on host, path and method may be cached in C"). The Dataplane registers a
    host when its virtual host's first route matches every path starting with "/" (the loop
    checks the path), has one destination and no
    per-request policy (fault, mirror, hashing, route actions), and the cluster's balancer is
    stateless (equal-weight LEAST_REQUEST or RANDOM). Such a request goes to the policy only if
    it carries x-envoy-* overrides or a host is ejected (then the pick needs the healthy set)."""
    cdef RouteHandle route
    cdef ClusterHandle cluster
    cdef int lb

    def __init__(self, RouteHandle route, ClusterHandle cluster, str lb):
        self.route = route
        self.cluster = cluster
        if lb == "LEAST_REQUEST":
            self.lb = FAST_LEAST_REQUEST
        elif lb == "RANDOM":
            self.lb = FAST_RANDOM
        else:
            raise ValueError(f"not a stateless balancer kind: {lb!r}")
        if cluster.n == 0:
            raise ValueError("a cluster without endpoints cannot be picked from")

    def pick(self):
        """One pick as the loop makes it (-1: a host is ejected, ask the policy)."""
        return self.cluster.fast_pick(self.lb)


cdef class RouteHandle:
    """What the loop needs of a route per request, compiled once per snapshot."""
    cdef public bytes name
    cdef public double timeout            # route timeout, seconds (0 = none)
    cdef public double per_try_timeout    # seconds (0 = none)
    cdef public bint keep_body            # retries possible: keep the body for replay
    cdef bytes status_map                 # 1000 bytes: 1 where a status may be retried
    cdef public bint check_grpc
    cdef public bint check_ratelimited
    cdef public bint check_headers        # retriable-headers: always ask the policy
    cdef public bytes request_headers     # extra request header lines (ready bytes)
    cdef public bytes response_headers    # extra response header lines
    cdef public object policy             # the RoutePolicy it was compiled from

    def __init__(self, name, double timeout=0.0, double per_try_timeout=0.0, bint keep_body=False,
                 status_map=None, bint check_grpc=False, bint check_ratelimited=False,
                 bint check_headers=False, bytes request_headers=b"", bytes response_headers=b""):
        self.name = name if isinstance(name, bytes) else name.encode()
        self.timeout = timeout
        self.per_try_timeout = per_try_timeout
        self.keep_body = keep_body
        self.status_map = bytes(status_map) if status_map is not None else bytes(1000)
        if len(self.status_map) != 1000:
            raise ValueError("status_map must have 1000 entries")
        self.check_grpc = check_grpc
        self.check_ratelimited = check_ratelimited
        self.check_headers = check_headers
        self.request_headers = request_headers
        self.response_headers = response_headers


# ------------------------------------------------------------------------------------------------
# the exchange: one request and its attempts

cdef class Stream(Handle):
    """One request: its policy handles, body, attempts, timers and access-log fields."""
    cdef Loop loop
    cdef DConn ds                     # None for a mirror copy
    cdef public RequestHead head
    cdef public bint shadow
    cdef public int state
    # policy (set by policy.decide / on_outcome)
    cdef public RouteHandle route
    cdef public ClusterHandle cluster
    cdef public int ep
    cdef public int next_ep
    cdef public double delay          # fault delay (decide) or retry backoff (on_outcome)
    cdef public bint fresh            # the next attempt must use a new connection
    cdef public object ctx            # Python-side per-request state (retry state, ...)
    cdef public object drop           # request header names to strip (x-envoy overrides)
    cdef public double route_timeout
    cdef public double per_try_timeout
    cdef public bint always_policy    # ask the policy about every attempt's outcome
    cdef public bint mirror           # call policy.mirror(stream) once the body is complete
    cdef public object abort_reply    # fault abort to answer after the fault delay
    cdef public str abort_flags
    cdef public object request_edits  # a route destination with a rewrite or request header edits
    cdef public object response_edits  # HeaderEdits for the upstream response's headers
    cdef public bytes response_extra  # header lines added to the upstream response
    cdef bytes upgrade_value          # a websocket upgrade: the request's Upgrade value
    cdef public str flags
    cdef public str details
    cdef public int status
    # request
    cdef int body_kind
    cdef long long body_len
    cdef Buf body                     # decoded body bytes kept (replay) or not yet sent
    cdef long long body_received
    cdef long long body_dropped       # bytes streamed and no longer kept
    cdef public bint keep_body
    cdef public bint replayable
    cdef bint body_done
    cdef bint head_request
    cdef Buf head_base                # upstream request head without per-attempt lines
    cdef char rid[36]
    cdef const char* rid_p
    cdef Py_ssize_t rid_n
    # attempt
    cdef public UConn uc
    cdef public int attempt
    cdef public bint a_sent
    cdef public bint a_reused
    cdef public bint a_got
    cdef bint a_counted               # holds an rq_active unit and a book rq_start
    cdef bint p_held                  # holds an rq_pending unit: waiting for a connection
    cdef public bint retried
    cdef double t_start
    cdef double t_wall
    cdef double t_route_start
    cdef public ResponseHead response_head
    cdef public bint response_started
    cdef public bint resp_paused
    cdef long long bytes_sent
    cdef long long service_ms
    cdef bytes upstream_local
    cdef Timer t_route
    cdef Timer t_try
    cdef Timer t_wait
    cdef double progress_at           # when bytes were last seen moving (see on_stream_check)
    cdef long long progress_mark
    cdef double request_deadline      # request timeout: the whole request by then (0: none)

    def __cinit__(self):
        self.t_route.idx = -1
        self.t_try.idx = -1
        self.t_wait.idx = -1
        self.ep = -1
        self.next_ep = -1
        self.attempt = 0
        self.replayable = True
        self.flags = "-"
        self.details = None

    def __dealloc__(self):
        buf_free(&self.body)
        buf_free(&self.head_base)

    # -- Python API (the policy's view) -----------------------------------------------------

    @property
    def connection_target(self):
        """Sidecar mode: what the policy chose for this request's connection (or None)."""
        return self.ds.target if self.ds is not None else None

    @property
    def connection(self):
        """The downstream connection (None for a mirror copy)."""
        return self.ds

    @property
    def original_destination(self):
        return self.ds.orig if self.ds is not None else None

    @property
    def downstream_remote(self):
        return self.ds.remote.decode() if self.ds is not None else ""

    @property
    def downstream_local(self):
        return self.ds.local.decode() if self.ds is not None else ""

    @property
    def upstream_head(self):
        """The upstream request head shared by every attempt (without x-envoy-attempt-count)."""
        return PyBytes_FromStringAndSize(buf_ptr(&self.head_base), buf_len(&self.head_base))

    @property
    def body_bytes(self):
        """The kept request body (complete when `replayable` and the body is done)."""
        return PyBytes_FromStringAndSize(buf_ptr(&self.body), buf_len(&self.body))

    @property
    def body_complete(self):
        return self.body_done

    @property
    def body_chunked(self):
        return self.body_kind == C_BODY_CHUNKED

    @property
    def request_id(self):
        return PyBytes_FromStringAndSize(self.rid_p, self.rid_n) if self.rid_n else None

    @property
    def upstream_host(self):
        if self.cluster is None or self.ep < 0:
            return None
        return self.cluster.keys[self.ep]

    @property
    def upstream_local_address(self):
        return self.upstream_local

    @property
    def bytes_received(self):
        return self.body_received

    @property
    def bytes_sent(self):
        return self.bytes_sent

    @property
    def duration_ms(self):
        return int((mono() - self.t_start) * 1000)

    @property
    def start_time(self):
        return self.t_wall

    @property
    def upstream_service_time(self):
        return self.service_ms if self.service_ms >= 0 else None

    def forward(self, RouteHandle route, ClusterHandle cluster, int ep):
        """decide(): forward to `ep` of `cluster` under `route`'s compiled policy."""
        self.route = route
        self.cluster = cluster
        self.ep = ep
        self.route_timeout = route.timeout
        self.per_try_timeout = route.per_try_timeout
        self.keep_body = route.keep_body

    def reply(self, reply, flags=None, bytes extra=b"", bint close=False):
        """Answer locally with a meshcore.local_reply.LocalReply (from decide or on_outcome)."""
        cdef bint parked = self.state == ST_PARKED
        if self.state == ST_DONE:
            return
        self.finish_local(reply, close, extra, flags)
        if parked:  # called from outside the loop's own pass
            self.loop.after_callback()

    def park(self):
        """decide(): the decision needs to await something (a name to resolve). The request
        waits; the policy calls forward() or reply() later, then resume()."""
        self.state = ST_PARKED

    def resume(self):
        """Go on with a parked request after forward() (or nothing, after reply()). A request
        whose client left meanwhile is over: nothing happens."""
        if self.state != ST_PARKED:
            return
        self.state = ST_NEW
        try:
            if self.cluster is None:
                self.finish_local(_NO_ROUTE, False, b"", None)
            else:
                self.proceed()
        except Exception:
            self.loop.contain(self)
        self.loop.after_callback()

    @property
    def parked(self):
        return self.state == ST_PARKED

    # -- lifecycle --------------------------------------------------------------------------

    cdef int begin(self) except -1:
        """A request head arrived: decide, then forward or answer."""
        cdef RequestHead h = self.head
        cdef Loop loop = self.loop
        cdef double t0
        self.service_ms = -1
        if h._chunked:
            self.body_kind = C_BODY_CHUNKED
            self.body_len = -1
        elif h._cl > 0:
            self.body_kind = C_BODY_LENGTH
            self.body_len = h._cl
        else:
            self.body_kind = C_BODY_NONE
            self.body_done = True
        cdef const char* raw = PyBytes_AS_STRING(h._raw)
        self.head_request = h._me - h._ms == 4 and memcmp(raw + h._ms, "HEAD", 4) == 0
        if h._version == 0:
            return self.finish_local(_HTTP10, True, b"", None)
        if h._me - h._ms == 7 and memcmp(raw + h._ms, "CONNECT", 7) == 0:
            return self.finish_local(_NO_ROUTE, True, b"", None)
        self.progress_at = self.t_start
        if loop.request_timeout > 0 and not self.body_done:
            self.request_deadline = self.t_start + loop.request_timeout
            if self.ds.t_stream.idx < 0 or self.request_deadline < self.ds.t_stream.when:
                self.arm_stream_check(self.t_start)
        elif self.ds.t_stream.idx < 0 and loop.stream_idle_timeout > 0:
            self.arm_stream_check(self.t_start)
        if h._upgrade and self.classify_upgrade(h, raw) < 0:
            return self.finish_local(_UPGRADE_FAILED, True, b"", None)
        if h._hs >= 0 and self.fast_decide(h, raw):
            return self.proceed()
        loop.n_policy_calls += 1
        if loop.profile:
            t0 = mono()
            loop.policy.decide(self)
            loop.t_policy += mono() - t0
        else:
            loop.policy.decide(self)
        if self.state == ST_DONE or self.state == ST_PARKED:
            return 0
        if self.delay > 0 and self.abort_reply is not None:
            return self.arm_delay()  # a fault delay, then a fault abort
        if self.cluster is None:
            return self.finish_local(_NO_ROUTE, False, b"", None)
        return self.proceed()

    cdef int classify_upgrade(self, RequestHead h, const char* raw) except -2:
        """An upgrade request, as Istio configures Envoy (upgrade_configs: websocket only):
        `websocket` is forwarded (1); `h2c` is dropped and the request goes on as plain HTTP/1.1
        (0), as Envoy's HTTP/1 codec does; any other protocol is refused (-1: 403)."""
        cdef int k = h.find("upgrade", 7)
        cdef Py_ssize_t n
        if k < 0:
            return 0
        n = h._f[k].ve - h._f[k].vs
        if n == 9 and strncasecmp(raw + h._f[k].vs, "websocket", 9) == 0:
            self.upgrade_value = PyBytes_FromStringAndSize(raw + h._f[k].vs, n)
            return 1
        if n == 3 and strncasecmp(raw + h._f[k].vs, "h2c", 3) == 0:
            return 0
        return -1

    cdef int proceed(self) except -1:
        """The policy chose where the request goes: build its head and start forwarding."""
        self.build_head()
        if self.ds.proto.want_continue():
            self.ds.proto.continue_sent = True
            buf_append(&self.ds.out, PyBytes_AS_STRING(CONTINUE_100), 25)
            self.ds.flush()
        if self.delay > 0:
            return self.arm_delay()
        if self.mirror and self.body_done:
            self.run_mirror()
        self.arm_route_timer()
        return self.start_attempt()

    cdef bint fast_decide(self, RequestHead h, const char* raw) except -1:
        """Route and pick in C when the host's decision is cached (FastRoute)."""
        cdef FastRoute fr
        cdef object got
        cdef int ep
        cdef dict table = self.loop.fast_routes
        if self.ds.target is not None:  # a captured connection: its port's table, if current
            if self.ds.fast is None or self.ds.fast_epoch != self.loop.fast_epoch:
                return False
            table = self.ds.fast
        if not table:
            return False
        if h.count_prefix_c("x-envoy-", 8):
            return False  # client overrides: the policy merges them
        if not h._path_slash and (h._pe == h._ps or raw[h._ps] != 47):
            return False  # a path not starting with "/" (OPTIONS *): the routes decide
        got = table.get(PyBytes_FromStringAndSize(raw + h._hs, h._he - h._hs))
        if got is None:
            return False
        fr = <FastRoute>got
        ep = fr.cluster.fast_pick(fr.lb)
        if ep < 0:
            return False
        self.route = fr.route
        self.cluster = fr.cluster
        self.ep = ep
        self.route_timeout = fr.route.timeout
        self.per_try_timeout = fr.route.per_try_timeout
        self.keep_body = fr.route.keep_body
        self.loop.n_fast += 1
        return True

    cdef int arm_delay(self) except -1:
        self.state = ST_DELAY
        self.loop.arm(&self.t_wait, self, T_WAIT, mono() + self.delay)
        self.delay = 0
        return 0

    cdef int build_head(self) except -1:
        """The upstream request head shared by all attempts (Envoy's header handling)."""
        cdef RequestHead h = self.head
        cdef Buf* b = &self.head_base
        cdef const char* raw = PyBytes_AS_STRING(h._raw)
        cdef bytes fwd
        cdef int k
        cdef bytes path
        buf_clear(b)
        if self.request_edits is not None:
            return self.build_head_edited()
        buf_reserve(b, PyBytes_GET_SIZE(h._raw) + 256)
        buf_append(b, raw + h._ms, h._me - h._ms)
        buf_append(b, " ", 1)
        path = h.path
        buf_append(b, PyBytes_AS_STRING(path), PyBytes_GET_SIZE(path))
        buf_append(b, " HTTP/1.1\r\nhost: ", 17)
        if h._hs >= 0:
            buf_append(b, raw + h._hs, h._he - h._hs)
        buf_append(b, "\r\n", 2)
        fwd = h._forward(False, self.drop)
        buf_append(b, PyBytes_AS_STRING(fwd), PyBytes_GET_SIZE(fwd))
        self.append_generated()
        return self.append_framing()

    cdef int build_head_edited(self) except -1:
        """build_head for a destination with a rewrite or request header edits: the route
        actions (meshcore.routing.actions.upstream_request) rewrite path, host and lines."""
        global _upstream_request
        cdef RequestHead h = self.head
        cdef Buf* b = &self.head_base
        cdef const char* raw = PyBytes_AS_STRING(h._raw)
        cdef bytes block, path, host
        if _upstream_request is None:
            from meshcore.routing.actions import upstream_request
            _upstream_request = upstream_request
        buf_append(b, "x", 1)  # the generated lines go after a placeholder first line
        self.append_generated()
        block = h._forward(False, self.drop) + PyBytes_FromStringAndSize(buf_ptr(b) + 1,
                                                                           buf_len(b) - 1)
        path, host, block = _upstream_request(self.request_edits, h, block)
        buf_clear(b)
        buf_append(b, raw + h._ms, h._me - h._ms)
        buf_append(b, " ", 1)
        buf_append(b, PyBytes_AS_STRING(path), PyBytes_GET_SIZE(path))
        buf_append(b, " HTTP/1.1\r\nhost: ", 17)
        buf_append(b, PyBytes_AS_STRING(host), PyBytes_GET_SIZE(host))
        buf_append(b, "\r\n", 2)
        buf_append(b, PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block))
        return self.append_framing()

    cdef int append_generated(self) except -1:
        """x-request-id (kept or made), x-forwarded-proto, and x-forwarded-for when asked."""
        cdef RequestHead h = self.head
        cdef Buf* b = &self.head_base
        cdef const char* raw = PyBytes_AS_STRING(h._raw)
        cdef int k
        k = h.find("x-request-id", 12)
        if k >= 0:
            self.rid_p = raw + h._f[k].vs
            self.rid_n = h._f[k].ve - h._f[k].vs
        else:
            self.loop.new_request_id(self.rid)
            self.rid_p = self.rid
            self.rid_n = 36
            buf_append(b, "x-request-id: ", 14)
            buf_append(b, self.rid, 36)
            buf_append(b, "\r\n", 2)
        if h.find("x-forwarded-proto", 17) < 0:
            buf_append(b, "x-forwarded-proto: http\r\n", 25)
        if self.loop.use_remote_address and self.ds is not None:
            self.append_xff()
        if self.upgrade_value is not None:  # hop-by-hop, so dropped above: an allowed upgrade
            buf_append(b, "connection: upgrade\r\nupgrade: ", 30)
            buf_append(b, PyBytes_AS_STRING(self.upgrade_value), PyBytes_GET_SIZE(self.upgrade_value))
            buf_append(b, "\r\n", 2)
        return 0

    cdef int append_framing(self) except -1:
        cdef RequestHead h = self.head
        cdef Buf* b = &self.head_base
        if self.body_kind == C_BODY_LENGTH:
            buf_append(b, "content-length: ", 16)
            buf_append_dec(b, self.body_len)
            buf_append(b, "\r\n", 2)
        elif self.body_kind == C_BODY_CHUNKED:
            buf_append(b, "transfer-encoding: chunked\r\n", 28)
        elif h._cl == 0:
            buf_append(b, "content-length: 0\r\n", 19)
        if self.route is not None and PyBytes_GET_SIZE(self.route.request_headers):
            buf_append(b, PyBytes_AS_STRING(self.route.request_headers),
                       PyBytes_GET_SIZE(self.route.request_headers))
        return 0

    cdef int append_xff(self) except -1:
        # Gateway-style behaviour (use_remote_address: true): append the peer address.
        cdef RequestHead h = self.head
        cdef bytes remote = self.ds.remote
        cdef bytes peer = remote.rsplit(b":", 1)[0].strip(b"[]")
        cdef object xff = h.get(b"x-forwarded-for")
        cdef bytes line
        if xff is not None:
            line = b"x-forwarded-for: " + xff + b"," + peer + b"\r\n"
        else:
            line = b"x-forwarded-for: " + peer + b"\r\n"
        buf_append(&self.head_base, PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line))
        return 0

    cdef int arm_route_timer(self) except -1:
        # Envoy arms the route timer when the downstream request is complete; meshcore arms it
        # when the first attempt starts (documented deviation for streamed bodies).
        self.t_route_start = mono()
        if self.route_timeout > 0:
            self.loop.arm(&self.t_route, self, T_ROUTE, self.t_route_start + self.route_timeout)
        return 0

    cdef long long expected_timeout_ms(self, double now):
        """x-envoy-expected-rq-timeout-ms (meshcore.policy.timeout.Deadlines, same rules)."""
        cdef long long g = <long long>(self.route_timeout * 1000 + 0.5) if self.route_timeout > 0 else 0
        cdef long long p = <long long>(self.per_try_timeout * 1000 + 0.5) if self.per_try_timeout > 0 else 0
        cdef long long expected, elapsed
        if g and p >= g:
            p = 0
        expected = p if p else g
        if expected and g:
            elapsed = <long long>((now - self.t_route_start) * 1000) if now > self.t_route_start else 0
            if elapsed >= g:
                return 1
            if g - elapsed < expected:
                expected = g - elapsed
        return expected

    # -- attempts ---------------------------------------------------------------------------

    cdef int start_attempt(self) except -1:
        """Pick up a connection for the next attempt on self.ep (or wait for one)."""
        cdef ClusterHandle c = self.cluster
        cdef UConn u = None
        self.attempt += 1
        self.a_sent = False
        self.a_reused = False
        self.a_got = False
        if not c.try_acquire(C_RQ_ACTIVE, c.max_requests):
            c.stat(W_RQ_ACTIVE_OVERFLOW, 1)
            return self.on_attempt_failed(K_OVERFLOW)
        self.a_counted = True
        self.loop.inflight += 1
        c.book.rq_start(self.ep)
        if not self.fresh:
            u = c.checkout(self.ep)
        self.fresh = False
        if u is not None:
            return self.attach(u, True)
        # No ready connection: the request is pending until it has one, whether a new
        # connection is being opened for it or the connection limit makes it wait (Envoy's pool
        # counts both against http1MaxPendingRequests), or it overflows at once.
        if not c.try_acquire(C_RQ_PENDING, c.max_pending):
            c.stat(W_RQ_PENDING_OVERFLOW, 1)
            return self.on_attempt_failed(K_OVERFLOW)
        self.p_held = True
        c.stat(W_RQ_PENDING_TOTAL, 1)
        if c.try_acquire(C_CX_ACTIVE, c.max_connections):
            return self.connect_new()
        # Over maxConnections: Envoy counts upstream_cx_overflow for a request that then waits.
        c.stat(W_CX_OVERFLOW, 1)
        self.state = ST_PENDING
        c.pending.append(self)
        # Another worker may free a unit: re-check the shared gauge now and then.
        self.loop.arm(&self.t_wait, self, T_WAIT, mono() + 0.02)
        return 0

    cdef void leave_pending(self):
        """Out of the cluster's wait queue (the pending unit is kept until a connection is
        ready: release_pending)."""
        if self.t_wait.idx >= 0:
            self.loop.disarm(&self.t_wait)
        self.state = ST_NEW

    cdef void release_pending(self):
        if self.p_held:
            self.p_held = False
            self.cluster.release_unit(C_RQ_PENDING)

    cdef int connect_new(self) except -1:
        cdef UConn u = self.cluster.open(self.ep)
        if u.fd < 0 or not u.connecting:
            u.close()
            return self.on_attempt_failed(K_CONNECT_FAILURE)
        u.stream = self
        self.uc = u
        self.state = ST_CONNECTING
        return 0

    cdef int on_connected(self, UConn u) except -1:
        return self.attach(u, False)

    cdef int attach(self, UConn u, bint reused) except -1:
        """Send the request on a ready connection."""
        cdef Buf* o = &u.out
        cdef double now = mono()
        cdef long long expected
        self.release_pending()
        u.stream = self
        u.requests += 1
        self.uc = u
        self.a_reused = reused and u.requests > 1
        self.state = ST_AWAIT
        self.upstream_local = u.local
        u.proto.start_request(self.head_request, self.body_kind, self.body_len,
                              self.upgrade_value is not None)
        buf_append(o, buf_ptr(&self.head_base), buf_len(&self.head_base))
        buf_append(o, "x-envoy-attempt-count: ", 23)
        buf_append_dec(o, self.attempt)
        buf_append(o, "\r\n", 2)
        expected = 0 if self.shadow else self.expected_timeout_ms(now)
        if expected:
            buf_append(o, "x-envoy-expected-rq-timeout-ms: ", 32)
            buf_append_dec(o, expected)
            buf_append(o, "\r\n", 2)
        buf_append(o, "\r\n", 2)
        if self.body_kind != C_BODY_NONE:
            if buf_len(&self.body):
                u.proto.write_body(o, buf_ptr(&self.body), buf_len(&self.body))
                if not self.keep_body:
                    self.body_dropped += buf_len(&self.body)
                    buf_clear(&self.body)
            if self.body_done:
                u.proto.write_end(o)
        if self.per_try_timeout > 0 and not (self.route_timeout > 0
                                             and self.per_try_timeout >= self.route_timeout):
            self.loop.arm(&self.t_try, self, T_TRY, now + self.per_try_timeout)
        u.flush()
        if u.fd >= 0:
            u.update_interest()
            if u.proto.buffered() or u.proto.eof:
                u.process()
        return 0

    cdef int end_attempt(self) except -1:
        """Give back the attempt's rq_active unit and per-endpoint count."""
        self.release_pending()
        if self.a_counted:
            self.a_counted = False
            self.loop.inflight -= 1
            self.cluster.release_unit(C_RQ_ACTIVE)
            self.cluster.book.rq_end(self.ep)
        if self.t_try.idx >= 0:
            self.loop.disarm(&self.t_try)
        return 0

    cdef int drop_upstream(self) except -1:
        """Close the attempt's connection (its exchange cannot be finished)."""
        cdef UConn u = self.uc
        self.uc = None
        if u is not None:
            u.stream = None
            u.close()
        return 0

    cdef int on_attempt_failed(self, int kind) except -1:
        """The attempt ended without a response head."""
        self.drop_upstream()
        self.end_attempt()
        if self.loop.metrics and not self.shadow:
            self.cluster.host_attempt(self.ep, kind, 0, self.a_reused)
        if self.shadow:
            if kind == K_RESET and self.a_reused and not self.a_got and self.attempt == 1:
                # a pooled connection the peer had closed: once more on a fresh one
                self.fresh = True
                return self.start_attempt()
            if kind != K_OVERFLOW:  # (overflow was counted where the breaker refused)
                self.loop.policy.shadow_failed(self, kind)
            return self.finish_shadow()
        return self.ask_policy(kind, 0)

    cdef int ask_policy(self, int kind, int status) except -1:
        cdef Loop loop = self.loop
        cdef int action
        cdef double t0
        loop.n_policy_calls += 1
        if loop.profile:
            t0 = mono()
            action = loop.policy.on_outcome(self, kind, status)
            loop.t_policy += mono() - t0
        else:
            action = loop.policy.on_outcome(self, kind, status)
        if self.state == ST_DONE:
            return A_REPLY
        if action == A_RETRY:
            self.retried = True
            if self.uc is not None:  # a retriable response: its body is not wanted
                self.drop_upstream()
                self.end_attempt()
            self.ep = self.next_ep
            self.state = ST_BACKOFF
            if self.delay > 0:
                self.loop.arm(&self.t_wait, self, T_WAIT, mono() + self.delay)
                self.delay = 0
            else:
                self.start_attempt()
        return action

    cdef int on_timer(self, int kind) except -1:
        cdef ClusterHandle c
        if self.state == ST_DONE:
            return 0
        if kind == T_ROUTE:
            return self.on_route_timeout()
        if kind == T_TRY:
            if self.state == ST_AWAIT or self.state == ST_CONNECTING:
                return self.on_attempt_failed(K_PER_TRY_TIMEOUT)
            return 0
        if kind == T_WAIT:
            if self.state == ST_DELAY:
                self.state = ST_NEW
                if self.abort_reply is not None:
                    return self.finish_local(self.abort_reply, False, b"", self.abort_flags)
                if self.mirror and self.body_done:
                    self.run_mirror()
                self.arm_route_timer()
                return self.start_attempt()
            if self.state == ST_BACKOFF:
                return self.start_attempt()
            if self.state == ST_PENDING:
                c = self.cluster
                if c.try_acquire(C_CX_ACTIVE, c.max_connections):
                    c.pending.remove(self)
                    self.leave_pending()
                    return self.connect_new()
                self.loop.arm(&self.t_wait, self, T_WAIT, mono() + 0.02)
        return 0

    # -- stream idle timeout, request timeout ------------------------------------------------

    cdef int arm_stream_check(self, double now) except -1:
        """One timer serves Envoy's stream_idle_timeout and request_timeout, and it belongs to
        the downstream connection (DConn.t_stream): a busy keep-alive connection keeps it armed
        across its requests, so a request costs a branch, not a timer. Bytes moving cost nothing
        per event: the check compares the stream's byte counters with what it saw the last
        time, every quarter of the idle timeout, so a stream is ended between the idle timeout
        and a quarter more after its last progress."""
        cdef Loop loop = self.loop
        cdef double due = 1e300
        if loop.stream_idle_timeout > 0:
            due = now + loop.stream_idle_timeout * 0.25
            if self.progress_at + loop.stream_idle_timeout < due:
                due = self.progress_at + loop.stream_idle_timeout
        if self.request_deadline > 0 and not self.body_done and not self.response_started \
                and self.request_deadline < due:
            due = self.request_deadline
        if due < 1e300:
            loop.arm(&self.ds.t_stream, self.ds, T_STREAM, due)
        return 0

    cdef int on_stream_check(self) except -1:
        """Progress is request body bytes received, the response head and response bytes
        relayed (what passes through Envoy's filter chain and resets its idle timer: a client
        that trickles its body keeps the stream alive, as in Envoy; the request timeout is what
        bounds that). A stream idle for the timeout ends as Envoy ends it: before the response,
        408 `stream timeout` while the request is still arriving, 504 once it is complete (flag
        SI); after the response started, the client connection is reset."""
        cdef Loop loop = self.loop
        cdef double now = mono()
        cdef long long progress = self.body_received + self.bytes_sent + self.response_started
        if progress != self.progress_mark:
            self.progress_mark = progress
            self.progress_at = now
        if self.request_deadline > 0 and not self.body_done and not self.response_started \
                and now >= self.request_deadline:
            return self.finish_local(_REQUEST_TIMEOUT, True, b"", None)
        if loop.stream_idle_timeout > 0 and now - self.progress_at >= loop.stream_idle_timeout:
            if self.response_started:
                self.flags = "SI"
                self.drop_upstream()
                self.end_attempt()
                return self.finish(False)
            if self.body_done:
                return self.finish_local(_STREAM_IDLE_COMPLETE, False, b"", None)
            return self.finish_local(_STREAM_IDLE, True, b"", None)
        return self.arm_stream_check(now)

    cdef int on_route_timeout(self) except -1:
        self.cluster.stat(W_RQ_TIMEOUT, 1)
        if self.state == ST_PENDING:
            self.cluster.pending.remove(self)
            self.leave_pending()
        self.drop_upstream()
        self.end_attempt()
        if self.shadow:
            return self.finish_shadow()
        if self.response_started:  # the response already started: abort the client connection
            self.flags = "UT"
            return self.finish(False)
        return self.finish_local(_ROUTE_TIMEOUT, True, b"",
                                 "URX,UT" if self.flags == "URX" else "UT")

    # -- request body -----------------------------------------------------------------------

    cdef bint body_blocked(self):
        """Backpressure on the request body: stop reading the client."""
        cdef UConn u = self.uc
        if self.state == ST_AWAIT and u is not None:
            return u.out_full()
        return buf_len(&self.body) > BODY_BUFFER_LIMIT

    cdef int on_body(self, const char* p, Py_ssize_t n) except -1:
        cdef UConn u = self.uc
        self.body_received += n
        if (self.state == ST_AWAIT or self.state == ST_RELAY) and u is not None \
                and u.proto.sstate != W_DONE:
            u.proto.write_body(&u.out, p, n)
            if self.keep_body and self.replayable:
                self.keep(p, n)
            u.flush()
        elif self.state != ST_DONE and self.state != ST_RELAY:
            # No upstream can take it yet (connecting, pending, backoff, delay): hold it.
            buf_append(&self.body, p, n)
            if self.keep_body and buf_len(&self.body) > BODY_BUFFER_LIMIT:
                self.replayable = False
        elif self.keep_body and self.replayable:
            self.keep(p, n)
        return 0

    cdef void keep(self, const char* p, Py_ssize_t n):
        if buf_len(&self.body) + n > BODY_BUFFER_LIMIT:
            self.replayable = False
            self.body_dropped += buf_len(&self.body)
            buf_free(&self.body)
        else:
            buf_append(&self.body, p, n)

    cdef int on_body_end(self) except -1:
        cdef UConn u = self.uc
        self.body_done = True
        if (self.state == ST_AWAIT or self.state == ST_RELAY) and u is not None \
                and u.proto.sstate != W_DONE:
            u.proto.write_end(&u.out)
            u.flush()
        if self.mirror and self.state != ST_DELAY:
            self.run_mirror()
        return 0

    cdef int run_mirror(self) except -1:
        self.mirror = False
        self.loop.policy.mirror(self)
        return 0

    # -- response ---------------------------------------------------------------------------

    cdef bint needs_policy(self, ResponseHead rh):
        """Could the policy do anything but relay this response? (retries, outlier 5xx)."""
        cdef int status = rh._status
        cdef RouteHandle r = self.route
        if status >= 500 or self.always_policy or self.retried:
            return True
        if (<const char*>PyBytes_AS_STRING(r.status_map))[status]:
            return True
        if r.check_headers:
            return True
        if r.check_grpc and rh.find("grpc-status", 11) >= 0:
            return True
        if r.check_ratelimited and rh.find("x-envoy-ratelimited", 19) >= 0:
            return True
        return False

    cdef int on_response_head(self, UConn u) except -1:
        cdef ResponseHead rh = u.proto.head
        cdef ClusterHandle c = self.cluster
        cdef int status = rh._status
        self.a_got = True
        self.response_head = rh
        if self.t_try.idx >= 0:
            self.loop.disarm(&self.t_try)
        if self.shadow:
            self.status = status
            self.state = ST_RELAY
            return 0
        if self.loop.metrics:
            c.host_attempt(self.ep, K_RESPONSE, status, self.a_reused)
        if self.needs_policy(rh):
            if self.ask_policy(K_RESPONSE, status) != A_RELAY:
                return 0
        else:
            c.stat(W_RQ_TOTAL, 1)
            if c.outlier:
                c.outlier_success(self.ep)
        return self.relay_head(u)

    cdef int relay_head(self, UConn u) except -1:
        cdef ResponseHead rh = u.proto.head
        cdef DConn d = self.ds
        cdef Buf* o = &d.out
        cdef int kind = u.proto.body_kind
        cdef long long length = 0
        cdef bint keep
        cdef bytes fwd = rh._forward(True, DROP_SERVER)
        cdef bytes reason
        if self.response_edits is not None:  # route/destination header edits, CORS
            fwd = self.response_edits.apply(fwd)
        cdef const char* raw = PyBytes_AS_STRING(rh._raw)
        self.state = ST_RELAY
        self.status = rh._status
        self.details = "via_upstream"
        self.service_ms = <long long>((mono() - self.t_start) * 1000)
        if kind == C_BODY_LENGTH:
            length = rh._cl
        elif kind == C_BODY_CLOSE:
            kind = C_BODY_CHUNKED
        keep = d.proto.start_response(kind, length)
        buf_reserve(o, PyBytes_GET_SIZE(fwd) + 256)
        buf_append(o, "HTTP/1.1 ", 9)
        buf_append_dec(o, rh._status)
        buf_append(o, " ", 1)
        buf_append(o, raw + rh._rs, rh._re - rh._rs)
        buf_append(o, "\r\n", 2)
        buf_append(o, PyBytes_AS_STRING(fwd), PyBytes_GET_SIZE(fwd))
        buf_append(o, "server: envoy\r\nx-envoy-upstream-service-time: ", 46)
        buf_append_dec(o, self.service_ms)
        buf_append(o, "\r\n", 2)
        if self.response_extra is not None and PyBytes_GET_SIZE(self.response_extra):
            buf_append(o, PyBytes_AS_STRING(self.response_extra),
                       PyBytes_GET_SIZE(self.response_extra))
        if self.route is not None and PyBytes_GET_SIZE(self.route.response_headers):
            buf_append(o, PyBytes_AS_STRING(self.route.response_headers),
                       PyBytes_GET_SIZE(self.route.response_headers))
        if kind == C_BODY_LENGTH:
            buf_append(o, "content-length: ", 16)
            buf_append_dec(o, length)
            buf_append(o, "\r\n", 2)
        elif kind == C_BODY_CHUNKED:
            buf_append(o, "transfer-encoding: chunked\r\n", 28)
        elif rh._cl >= 0 and rh._status >= 200 and rh._status != 204:
            buf_append(o, "content-length: ", 16)  # HEAD / 304 keep theirs
            buf_append_dec(o, rh._cl)
            buf_append(o, "\r\n", 2)
        if not keep:
            buf_append(o, "connection: close\r\n", 19)
        buf_append(o, "\r\n", 2)
        self.response_started = True
        return 0

    cdef int on_response_data(self, const char* p, Py_ssize_t n) except -1:
        cdef DConn d = self.ds
        if self.shadow or d is None or d.fd < 0:
            return 0
        d.proto.write_body(&d.out, p, n)
        self.bytes_sent += n
        if d.out_full():
            d.flush()
            if d.fd >= 0 and d.out_full():
                self.resp_paused = True
        return 0

    cdef int resume_response(self) except -1:
        cdef UConn u = self.uc
        self.resp_paused = False
        if u is not None and u.fd >= 0:
            u.process()
        return 0

    cdef int on_response_end(self, UConn u) except -1:
        cdef bint reusable = u.proto.reusable() and self.body_done
        cdef DConn d = self.ds
        cdef bint keep
        self.uc = None
        self.end_attempt()
        self.cluster.release(u, reusable)
        if self.shadow:
            return self.finish_shadow()
        if d is None or d.fd < 0:
            return self.finish(False)
        keep = d.proto.end_response(&d.out)
        return self.finish(keep)

    cdef int on_upstream_closed(self, UConn u, bint protocol_error) except -1:
        """The upstream connection failed: before the response head it is an attempt outcome;
        after it, the response is cut short and the client connection is aborted."""
        cdef int kind
        if self.state == ST_RELAY and not self.shadow:
            self.flags = "UPE" if protocol_error else "UC"
            self.drop_upstream()
            self.end_attempt()
            return self.finish(False)
        self.a_got = self.a_got or u.proto.got_bytes
        if protocol_error:
            kind = K_PROTOCOL_ERROR
        else:
            kind = K_RESET
        return self.on_attempt_failed(kind)

    cdef int on_upgraded(self, UConn u) except -1:
        """101 to a websocket upgrade: relay the head, then both connections become a byte
        tunnel (Envoy's upgrade); the request's access-log line is written when it closes."""
        cdef ResponseHead rh = u.proto.head
        cdef DConn d = self.ds
        cdef ClusterHandle c = self.cluster
        cdef Buf* o
        cdef bytes fwd
        cdef const char* raw = PyBytes_AS_STRING(rh._raw)
        cdef int k
        cdef Tunnel t
        if self.t_try.idx >= 0:
            self.loop.disarm(&self.t_try)
        if self.shadow or d is None or d.fd < 0:  # a mirror copy, or the client left
            self.drop_upstream()
            self.end_attempt()
            if self.shadow:
                self.status = 101
                return self.finish_shadow()
            return self.finish(False)
        self.a_got = True
        self.response_head = rh
        if self.loop.metrics:
            c.host_attempt(self.ep, K_RESPONSE, 101, self.a_reused)
        c.stat(W_RQ_TOTAL, 1)
        if c.outlier:
            c.outlier_success(self.ep)
        self.status = 101
        self.details = "via_upstream"
        self.service_ms = <long long>((mono() - self.t_start) * 1000)
        o = &d.out
        fwd = rh._forward(True, DROP_SERVER)
        buf_append(o, "HTTP/1.1 101 ", 13)
        buf_append(o, raw + rh._rs, rh._re - rh._rs)
        buf_append(o, "\r\n", 2)
        buf_append(o, PyBytes_AS_STRING(fwd), PyBytes_GET_SIZE(fwd))
        buf_append(o, "connection: upgrade\r\nupgrade: ", 30)
        k = rh.find("upgrade", 7)
        if k >= 0:
            buf_append(o, raw + rh._f[k].vs, rh._f[k].ve - rh._f[k].vs)
        else:
            buf_append(o, PyBytes_AS_STRING(self.upgrade_value), PyBytes_GET_SIZE(self.upgrade_value))
        buf_append(o, "\r\nserver: envoy\r\n\r\n", 19)
        self.response_started = True
        # the exchange is over for HTTP; its connection unit stays with the tunnel
        self.uc = None
        u.stream = None
        self.end_attempt()
        self.state = ST_DONE
        self.cancel_timers()
        if self.ctx is not None:
            self.loop.policy.finished(self)
        if self.loop.metrics:
            self.record_metrics()
        buf_free(&self.body)
        buf_free(&self.head_base)
        d.stream = None
        t = Tunnel.__new__(Tunnel)
        t.loop = self.loop
        t.ds = d
        t.us = u
        t.cluster = c
        t.t_start = mono()
        t.t_wall = wall()
        t.stream = self
        d.tunnel = t
        u.tunnel = t
        self.loop.tunnels.add(t)
        return t.start()

    # -- endings ----------------------------------------------------------------------------

    cdef int finish_local(self, object reply, bint close, bytes extra, object flags) except -1:
        """Answer the client with a local reply and end the exchange."""
        cdef DConn d = self.ds
        cdef bytes data
        cdef bint keep
        cdef Py_ssize_t blen
        self.abort_upstream()
        if self.shadow:
            return self.finish_shadow()
        self.status = reply.status
        self.flags = flags if flags is not None else reply.flag
        self.details = reply.details
        if d is None or d.fd < 0:
            return self.finish(False)
        blen = len(reply.body)
        keep = d.proto.start_response(C_BODY_LENGTH, blen) and not close
        data = _render(reply, not keep, extra)
        buf_append(&d.out, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        self.bytes_sent = blen
        d.proto.out_left = 0
        keep = d.proto.end_response(&d.out) and keep
        return self.finish(keep)

    cdef int finish(self, bint keep) except -1:
        """The exchange is over: timers off, access log, hand the connection back."""
        cdef DConn d = self.ds
        if self.state == ST_DONE:
            return 0
        self.abort_upstream()
        self.state = ST_DONE
        self.cancel_timers()
        if self.ctx is not None:
            self.loop.policy.finished(self)
        if self.loop.metrics:
            self.record_metrics()
        self.log()
        buf_free(&self.body)
        buf_free(&self.head_base)
        if d is not None:
            if d.fd >= 0:
                d.flush()
            d.on_stream_done(keep)
        return 0

    cdef int finish_shadow(self) except -1:
        cdef ClusterHandle c = self.cluster
        if self.state == ST_DONE:
            return 0
        self.abort_upstream()
        self.state = ST_DONE
        self.cancel_timers()
        if self.status:
            c.stat(W_RQ_TOTAL, 1)
            c.charge_final(self.status)
        buf_free(&self.body)
        buf_free(&self.head_base)
        self.loop.shadows.discard(self)
        return 0

    cdef void cancel_timers(self):
        if self.t_route.idx >= 0:
            self.loop.disarm(&self.t_route)
        if self.t_try.idx >= 0:
            self.loop.disarm(&self.t_try)
        if self.t_wait.idx >= 0:
            self.loop.disarm(&self.t_wait)

    cdef int abort_upstream(self) except -1:
        if self.state == ST_PENDING:
            self.cluster.pending.remove(self)
            self.leave_pending()
        self.drop_upstream()
        self.end_attempt()
        return 0

    cdef int downstream_gone(self) except -1:
        """The client went away mid-exchange: cancel the upstream side, log DC."""
        if self.state == ST_DONE:
            return 0
        if self.cluster is not None and self.uc is not None:
            self.cluster.stat(W_RQ_CANCELLED, 1)
        if self.flags == "-" or self.flags is None:
            self.flags = "DC"
        self.state_done_without_reply()
        return 0

    cdef int state_done_without_reply(self) except -1:
        self.abort_upstream()
        self.state = ST_DONE
        self.cancel_timers()
        if self.ctx is not None:
            self.loop.policy.finished(self)
        if self.loop.metrics:
            self.record_metrics()
        self.log()
        buf_free(&self.body)
        buf_free(&self.head_base)
        return 0

    cdef int on_error(self) except -1:
        if self.ds is not None:
            return self.ds.on_error()
        return self.finish_shadow()

    # -- metrics ----------------------------------------------------------------------------

    cdef int record_metrics(self) except -1:
        """meshcore.metrics.recorder.request_done: the cluster's final-response charge, its
        upstream_rq_time, and the request in Istio's metrics."""
        cdef ClusterHandle c = self.cluster
        cdef uint64_t dest = 0
        cdef uint32_t mask = 0
        cdef str flags = self.flags
        if c is not None:
            c.charge_final(self.status)
            if self.service_ms >= 0:
                c.hist_record(self.service_ms)
            if self.ep >= 0:
                dest = mc_load32(c.hosts[self.ep] + H_DEST_ID)
            else:
                dest = mc_load32(c.crow + C_DEST_ID)
        if flags is not None and not (len(flags) == 1 and flags[0] == "-"):
            mask = _flags_mask(flags)
        self.loop.istio_record(dest, self.status, mask, <long long>((mono() - self.t_start) * 1000),
                               self.head._end + self.body_received, self.bytes_sent)
        return 0

    # -- access log -------------------------------------------------------------------------

    cdef int log(self) except -1:
        cdef Loop loop = self.loop
        cdef double t0 = 0
        if loop.log_mode == 0 or self.shadow or self.head is None:
            return 0
        if loop.profile:
            t0 = mono()
        if loop.log_mode == 1:
            self.log_text()
        else:
            loop.policy.log(self)
        if buf_len(&loop.logbuf) >= LOG_FLUSH_AT:
            loop.write_log()
        if loop.profile:
            loop.t_log += mono() - t0
        return 0

    cdef int log_text(self) except -1:
        """Istio's default text format (semantics.md §10.2), formatted in C."""
        cdef Loop loop = self.loop
        cdef Buf* b = &loop.logbuf
        cdef RequestHead h = self.head
        cdef const char* raw = PyBytes_AS_STRING(h._raw)
        cdef bytes path = h.path
        cdef int k
        cdef ClusterHandle c = self.cluster
        buf_reserve(b, 512 + PyBytes_GET_SIZE(path))
        buf_append(b, "[", 1)
        loop.log_time(self.t_wall)
        buf_append(b, "] \"", 3)
        buf_append(b, raw + h._ms, h._me - h._ms)
        buf_append(b, " ", 1)
        buf_append(b, PyBytes_AS_STRING(path), PyBytes_GET_SIZE(path))
        buf_append(b, " HTTP/1.1\" ", 11)
        buf_append_dec(b, self.status)
        buf_append(b, " ", 1)
        _log_str(b, self.flags)
        buf_append(b, " ", 1)
        _log_str(b, self.details)
        buf_append(b, " - \"-\" ", 7)
        buf_append_dec(b, self.body_received)
        buf_append(b, " ", 1)
        buf_append_dec(b, self.bytes_sent)
        buf_append(b, " ", 1)
        buf_append_dec(b, <long long>((mono() - self.t_start) * 1000))
        buf_append(b, " ", 1)
        if self.service_ms >= 0:
            buf_append_dec(b, self.service_ms)
        else:
            buf_append(b, "-", 1)
        buf_append(b, " \"", 2)
        _log_header(b, h, "x-forwarded-for", 15)
        buf_append(b, "\" \"", 3)
        _log_header(b, h, "user-agent", 10)
        buf_append(b, "\" \"", 3)
        if self.rid_n:
            buf_append(b, self.rid_p, self.rid_n)
        else:
            buf_append(b, "-", 1)
        buf_append(b, "\" \"", 3)
        if h._hs >= 0 and h._he > h._hs:
            buf_append(b, raw + h._hs, h._he - h._hs)
        else:
            buf_append(b, "-", 1)
        buf_append(b, "\" \"", 3)
        if c is not None and self.ep >= 0:
            _log_bytes(b, c.keys[self.ep])
        else:
            buf_append(b, "-", 1)
        buf_append(b, "\" ", 2)
        if c is not None:
            _log_bytes(b, c.name)
        else:
            buf_append(b, "-", 1)
        buf_append(b, " ", 1)
        _log_bytes(b, self.upstream_local)
        buf_append(b, " ", 1)
        _log_bytes(b, self.ds.local if self.ds is not None else None)
        buf_append(b, " ", 1)
        _log_bytes(b, self.ds.remote if self.ds is not None else None)
        buf_append(b, " - ", 3)
        _log_bytes(b, self.route.name if self.route is not None else None)
        buf_append(b, "\n", 1)
        return 0


cdef inline void _log_bytes(Buf* b, object v):
    if v is None or PyBytes_GET_SIZE(v) == 0:
        buf_append(b, "-", 1)
    else:
        buf_append(b, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v))


cdef inline void _log_str(Buf* b, object v):
    cdef Py_ssize_t n
    cdef const char* p
    if v is None:
        buf_append(b, "-", 1)
        return
    p = PyUnicode_AsUTF8AndSize(v, &n)
    if n == 0:
        buf_append(b, "-", 1)
    else:
        buf_append(b, p, n)


cdef inline void _log_header(Buf* b, RequestHead h, const char* name, Py_ssize_t nn):
    cdef int k = h.find(name, nn)
    cdef const char* raw
    if k < 0 or h._f[k].ve == h._f[k].vs:
        buf_append(b, "-", 1)
        return
    raw = PyBytes_AS_STRING(h._raw)
    buf_append(b, raw + h._f[k].vs, h._f[k].ve - h._f[k].vs)
