/* meshcore bench: built-in HTTP/1.1 load generator ("cgen").
 *
 * Two modes over C keep-alive connections, spread over T threads (one epoll loop each):
 *   closed loop (no -r): every connection sends its next request as soon as the previous
 *     response is complete; answers "what is the maximum rps at C connections".
 *   open loop (-r RATE): requests are scheduled at fixed, uniformly spaced times (request k at
 *     start + k/RATE, round-robin over the connections, like wrk2 or fortio -uniform). A request
 *     whose connection is still busy waits in that connection's backlog, and its latency is
 *     measured from its SCHEDULED send time, so a slow target cannot hide its queueing
 *     (no coordinated omission).
 * Latencies go into a log-linear histogram (64 sub-buckets per power of two, < 0.8 % error).
 * The result is one JSON object on stdout. Compiled by bench/native.py at bench start; not part
 * of the product.
 *
 * usage: loadgen -p PORT [-a ADDR] [-c CONNS] [-t THREADS] [-d SECONDS] [-w WARMUP_SECONDS]
 *                [-r RATE] [-g DRAIN_SECONDS] [-s SPIN_US] [-S SPIN_FRACTION] [-u PATH]
 *                [-H "Name: value"]...
 *   -g: open loop: after the window, wait this long for late responses (the rest are timeouts)
 *   -s: open loop: stop sleeping SPIN_US before each scheduled send and poll until it is due
 *       (wakeups from a sleep are late by tens of us on a VM; that lateness would count as
 *       latency, and a generator that sleeps between sends is also slow to see responses)
 *   -S: cap that polling at this fraction of the send interval (default 0.1, so that at high
 *       rates the generator still sleeps and leaves the CPU to the target; 1 = poll all the time)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NB 2560    /* histogram buckets, up to ~2^40 ns */
#define RBUF 65536 /* per-connection response buffer */
#define QCAP 4096  /* per-connection backlog of scheduled, not yet sent requests */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline int hidx(uint64_t v) {
    if (v < 128) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 6;
    int i = (shift + 1) * 64 + (int)((v >> shift) - 64);
    return i < NB ? i : NB - 1;
}

static inline double hval(int i) { /* bucket midpoint in ns */
    if (i < 128) return i;
    int shift = i / 64 - 1;
    uint64_t m = (uint64_t)(i % 64 + 64);
    return (double)(m << shift) + (double)((1ull << shift) - 1) / 2.0;
}

/* ---- configuration shared by all threads ---- */
static struct sockaddr_in g_addr;
static char g_req[8192];
static size_t g_reqlen;
static int g_conns = 1, g_threads = 1;
static double g_rate = 0, g_dur = 5, g_warm = 1, g_drain = 2;
static int64_t g_spin_ns = 0; /* open loop: busy-poll this long before each due time */
static double g_spin_frac = 0.1; /* ... but at most this fraction of the send interval */
static uint64_t g_start;

typedef struct conn {
    int fd;
    int busy;         /* a request is outstanding */
    int must_close;   /* the response said "Connection: close" */
    uint64_t t_start; /* scheduled (open loop) or actual (closed loop) start */
    size_t len;
    uint64_t q[QCAP]; /* open-loop backlog: scheduled times */
    unsigned qh, qt;
    char buf[RBUF];
} conn_t;

typedef struct worker {
    int id, nconns;
    conn_t *conns;
    double rate; /* this thread's share of the rate */
    uint64_t phase_ns;
    pthread_t th;
    uint64_t hist[NB];
    uint64_t done, errors, non2xx, reconnects, timeouts, dropped, sent;
    uint64_t lat_sum_ns, lag_sum_ns, lag_max_ns, lag_n;
} worker_t;

static int set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL, 0);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static int conn_open(conn_t *c) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&g_addr, sizeof g_addr) < 0) {
        close(fd);
        return -1;
    }
    set_nonblock(fd);
    c->fd = fd;
    c->len = 0;
    c->busy = 0;
    c->must_close = 0;
    return 0;
}

static void conn_reopen(worker_t *w, int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    w->reconnects++;
    for (int tries = 0; tries < 50; tries++) {
        if (conn_open(c) == 0) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
            return;
        }
        usleep(2000);
    }
    fprintf(stderr, "loadgen: cannot reconnect: %s\n", strerror(errno));
    exit(3);
}

/* Write the request; returns 0 or -1 (connection broken). */
static int conn_send(worker_t *w, conn_t *c, uint64_t t_start) {
    size_t off = 0;
    c->t_start = t_start;
    c->busy = 1;
    w->sent++;
    while (off < g_reqlen) {
        ssize_t n = send(c->fd, g_req + off, g_reqlen - off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { /* cannot happen with one tiny request in flight; be safe */
                struct timespec ts = {0, 20000};
                nanosleep(&ts, NULL);
                continue;
            }
            return -1;
        }
        off += (size_t)n;
    }
    return 0;
}

static const char *find_header(const char *p, const char *end, const char *name) {
    size_t n = strlen(name);
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (!eol) return NULL;
        if ((size_t)(eol - p) > n && strncasecmp(p, name, n) == 0 && p[n] == ':') return p + n + 1;
        p = eol + 2;
    }
    return NULL;
}

/* Length of the complete response at the start of buf, 0 when incomplete, -1 when malformed. */
static long parse_response(conn_t *c, int *status) {
    const char *b = c->buf, *end = c->buf + c->len;
    const char *hend = memmem(b, c->len, "\r\n\r\n", 4);
    if (!hend) return c->len >= RBUF ? -1 : 0;
    if (c->len < 12 || memcmp(b, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(b + 9);
    const char *hdrs = memmem(b, (size_t)(hend + 2 - b), "\r\n", 2) + 2;
    const char *he = hend + 2;
    const char *body = hend + 4;
    const char *v;
    if ((v = find_header(hdrs, he, "connection"))) {
        while (*v == ' ' || *v == '\t') v++;
        if (strncasecmp(v, "close", 5) == 0) c->must_close = 1;
    }
    if (*status == 204 || *status == 304 || (*status >= 100 && *status < 200))
        return (long)(body - b);
    if ((v = find_header(hdrs, he, "content-length"))) {
        long cl = strtol(v, NULL, 10);
        if (cl < 0) return -1;
        if (body + cl > end) return (body - b) + cl > RBUF ? -1 : 0;
        return (long)(body - b) + cl;
    }
    if ((v = find_header(hdrs, he, "transfer-encoding"))) {
        const char *p = body;
        for (;;) {
            const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
            if (!eol) return c->len >= RBUF ? -1 : 0;
            long sz = strtol(p, NULL, 16);
            if (sz < 0) return -1;
            p = eol + 2;
            if (sz == 0) { /* optional trailers, then an empty line */
                for (;;) {
                    const char *e2 = memmem(p, (size_t)(end - p), "\r\n", 2);
                    if (!e2) return c->len >= RBUF ? -1 : 0;
                    if (e2 == p) return (long)(e2 + 2 - b);
                    p = e2 + 2;
                }
            }
            if (p + sz + 2 > end) return c->len >= RBUF ? -1 : 0;
            p += sz + 2;
        }
    }
    return -1; /* read-until-close framing is not supported */
}

typedef struct {
    uint64_t ws, we; /* measured window */
    int open;
} phase_t;

static void after_response(worker_t *w, int ep, conn_t *c, const phase_t *ph, uint64_t now) {
    if (c->must_close) conn_reopen(w, ep, c);
    if (ph->open) {
        while (c->qh != c->qt) {
            uint64_t due = c->q[c->qh++ % QCAP];
            if (conn_send(w, c, due) == 0) return;
            w->errors++;
            c->busy = 0;
            conn_reopen(w, ep, c);
        }
    } else if (now < ph->we) {
        if (conn_send(w, c, now) != 0) {
            w->errors++;
            c->busy = 0;
            conn_reopen(w, ep, c);
            conn_send(w, c, now_ns());
        }
    }
}

static void on_readable(worker_t *w, int ep, conn_t *c, const phase_t *ph) {
    for (;;) {
        ssize_t r = recv(c->fd, c->buf + c->len, RBUF - c->len, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) return;
        uint64_t now = now_ns();
        if (r <= 0) { /* closed or broken */
            if (c->busy) w->errors++;
            c->busy = 0;
            conn_reopen(w, ep, c);
            after_response(w, ep, c, ph, now);
            return;
        }
        c->len += (size_t)r;
        while (c->busy && c->len) {
            int status = 0;
            long n = parse_response(c, &status);
            if (n == 0) break;
            if (n < 0) {
                w->errors++;
                c->busy = 0;
                conn_reopen(w, ep, c);
                after_response(w, ep, c, ph, now);
                return;
            }
            memmove(c->buf, c->buf + n, c->len - (size_t)n);
            c->len -= (size_t)n;
            if (status >= 100 && status < 200) continue; /* interim response */
            c->busy = 0;
            int in_window = ph->open ? (c->t_start >= ph->ws && c->t_start < ph->we)
                                     : (now >= ph->ws && now < ph->we);
            if (in_window) {
                if (status >= 200 && status < 300) {
                    uint64_t lat = now - c->t_start;
                    w->hist[hidx(lat)]++;
                    w->lat_sum_ns += lat;
                    w->done++;
                } else {
                    w->non2xx++;
                }
            }
            after_response(w, ep, c, ph, now);
            if (c->must_close || c->len == 0) return;
        }
        if ((size_t)r < RBUF) return;
    }
}

static int wait_events(int ep, struct epoll_event *evs, int max, int64_t timeout_ns) {
    if (timeout_ns < 0) timeout_ns = 0;
#ifdef SYS_epoll_pwait2
    static int have_pwait2 = 1;
    if (have_pwait2) {
        struct timespec ts = {(time_t)(timeout_ns / 1000000000), (long)(timeout_ns % 1000000000)};
        int n = (int)syscall(SYS_epoll_pwait2, ep, evs, max, &ts, NULL, (size_t)8);
        if (n >= 0 || errno != ENOSYS) return n;
        have_pwait2 = 0;
    }
#endif
    return epoll_wait(ep, evs, max, (int)((timeout_ns + 999999) / 1000000));
}

static void *worker_run(void *arg) {
    worker_t *w = arg;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    int ep = epoll_create1(0);
    for (int i = 0; i < w->nconns; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &w->conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, w->conns[i].fd, &ev);
    }
    phase_t ph;
    ph.open = g_rate > 0;
    ph.ws = g_start + (uint64_t)(g_warm * 1e9);
    ph.we = ph.ws + (uint64_t)(g_dur * 1e9);
    uint64_t drain_end = ph.we + (uint64_t)(g_drain * 1e9);
    struct timespec st = {(time_t)(g_start / 1000000000), (long)(g_start % 1000000000)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &st, NULL) == EINTR) {}

    double interval = ph.open ? 1e9 / w->rate : 0;
    int64_t spin = g_spin_ns;
    if (ph.open && spin > (int64_t)(interval * g_spin_frac)) spin = (int64_t)(interval * g_spin_frac);
    uint64_t k = 0, next_due = g_start + w->phase_ns;
    int scheduling = ph.open;
    if (!ph.open)
        for (int i = 0; i < w->nconns; i++)
            if (conn_send(w, &w->conns[i], now_ns())) w->errors++;

    struct epoll_event evs[256];
    for (;;) {
        uint64_t now = now_ns();
        int64_t timeout;
        if (ph.open) {
            while (scheduling && next_due <= now) {
                if (next_due >= ph.we) { scheduling = 0; break; }
                conn_t *c = &w->conns[k % (uint64_t)w->nconns];
                if (!c->busy && c->qh == c->qt) {
                    uint64_t lag = now - next_due;
                    w->lag_sum_ns += lag;
                    w->lag_n++;
                    if (lag > w->lag_max_ns) w->lag_max_ns = lag;
                    if (conn_send(w, c, next_due)) {
                        w->errors++;
                        c->busy = 0;
                        conn_reopen(w, ep, c);
                    }
                } else if (c->qt - c->qh < QCAP) {
                    c->q[c->qt++ % QCAP] = next_due;
                } else {
                    w->dropped++;
                }
                k++;
                next_due = g_start + w->phase_ns + (uint64_t)((double)k * interval);
            }
            if (!scheduling) {
                int idle = 1;
                for (int i = 0; i < w->nconns && idle; i++)
                    if (w->conns[i].busy || w->conns[i].qh != w->conns[i].qt) idle = 0;
                if (idle) break;
                if (now >= drain_end) {
                    for (int i = 0; i < w->nconns; i++) {
                        conn_t *c = &w->conns[i];
                        /* count only what was scheduled inside the measured window */
                        if (c->busy && c->t_start >= ph.ws) w->timeouts++;
                        for (unsigned j = c->qh; j != c->qt; j++)
                            if (c->q[j % QCAP] >= ph.ws) w->timeouts++;
                    }
                    break;
                }
                timeout = (int64_t)(drain_end - now);
            } else {
                timeout = (int64_t)(next_due - now) - spin;
            }
        } else if (now < ph.we) {
            timeout = (int64_t)(ph.we - now);
        } else { /* window over: no new requests; let the ones in flight finish (<= 1 s) */
            int busy = 0;
            for (int i = 0; i < w->nconns && !busy; i++) busy = w->conns[i].busy;
            if (!busy || now >= ph.we + 1000000000ull) break;
            timeout = (int64_t)(ph.we + 1000000000ull - now);
        }
        int n = wait_events(ep, evs, 256, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll");
            exit(3);
        }
        for (int i = 0; i < n; i++) on_readable(w, ep, evs[i].data.ptr, &ph);
    }
    close(ep);
    return NULL;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen -p PORT [-a ADDR] [-c CONNS] [-t THREADS] [-d SECONDS] "
                    "[-w WARMUP] [-r RATE] [-g DRAIN] [-u PATH] [-H 'Name: value']...\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *addr = "127.0.0.1", *path = "/";
    int port = 0, have_host = 0;
    char hdrs[4096] = "";
    size_t hl = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc || a[0] != '-' || strlen(a) != 2) usage();
        const char *v = argv[++i];
        switch (a[1]) {
        case 'a': addr = v; break;
        case 'p': port = atoi(v); break;
        case 'c': g_conns = atoi(v); break;
        case 't': g_threads = atoi(v); break;
        case 'd': g_dur = atof(v); break;
        case 'w': g_warm = atof(v); break;
        case 'r': g_rate = atof(v); break;
        case 'g': g_drain = atof(v); break;
        case 'u': path = v; break;
        case 's': g_spin_ns = (int64_t)(atof(v) * 1000); break;
        case 'S': g_spin_frac = atof(v); break;
        case 'H':
            if (strncasecmp(v, "host:", 5) == 0) have_host = 1;
            hl += (size_t)snprintf(hdrs + hl, sizeof hdrs - hl, "%s\r\n", v);
            if (hl >= sizeof hdrs) usage();
            break;
        default: usage();
        }
    }
    if (port <= 0 || g_conns < 1 || g_threads < 1 || g_dur <= 0 || g_rate < 0) usage();
    if (g_threads > g_conns) g_threads = g_conns;
    signal(SIGPIPE, SIG_IGN);
    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, addr, &g_addr.sin_addr) != 1) usage();
    g_reqlen = (size_t)snprintf(g_req, sizeof g_req, "GET %s HTTP/1.1\r\n%s%s\r\n", path,
                                have_host ? "" : "Host: localhost\r\n", hdrs);

    conn_t *conns = calloc((size_t)g_conns, sizeof(conn_t));
    worker_t *ws = calloc((size_t)g_threads, sizeof(worker_t));
    if (!conns || !ws) { perror("calloc"); return 3; }
    for (int i = 0; i < g_conns; i++) {
        if (conn_open(&conns[i])) {
            fprintf(stderr, "loadgen: connect to %s:%d: %s\n", addr, port, strerror(errno));
            return 3;
        }
    }
    int base = 0;
    for (int t = 0; t < g_threads; t++) {
        worker_t *w = &ws[t];
        w->id = t;
        w->nconns = g_conns / g_threads + (t < g_conns % g_threads ? 1 : 0);
        w->conns = conns + base;
        base += w->nconns;
        w->rate = g_rate * w->nconns / g_conns;
        w->phase_ns = g_rate > 0 ? (uint64_t)(1e9 / g_rate * t) : 0;
    }
    uint64_t t0 = now_ns();
    g_start = t0 + 2000000; /* 2 ms to get every thread parked */
    for (int t = 0; t < g_threads; t++) pthread_create(&ws[t].th, NULL, worker_run, &ws[t]);
    for (int t = 0; t < g_threads; t++) pthread_join(ws[t].th, NULL);
    uint64_t t1 = now_ns();

    static uint64_t hist[NB];
    uint64_t done = 0, errors = 0, non2xx = 0, reconnects = 0, timeouts = 0, dropped = 0;
    uint64_t sent = 0, lat_sum = 0, lag_sum = 0, lag_max = 0, lag_n = 0;
    for (int t = 0; t < g_threads; t++) {
        worker_t *w = &ws[t];
        for (int i = 0; i < NB; i++) hist[i] += w->hist[i];
        done += w->done; errors += w->errors; non2xx += w->non2xx; reconnects += w->reconnects;
        timeouts += w->timeouts; dropped += w->dropped; sent += w->sent;
        lat_sum += w->lat_sum_ns; lag_sum += w->lag_sum_ns; lag_n += w->lag_n;
        if (w->lag_max_ns > lag_max) lag_max = w->lag_max_ns;
    }
    static const double ps[] = {50, 75, 90, 99, 99.9, 99.99};
    static const char *pn[] = {"p50", "p75", "p90", "p99", "p99.9", "p99.99"};
    double pv[6] = {0};
    double maxv = 0;
    int last = -1;
    for (int i = 0; i < NB; i++)
        if (hist[i]) last = i;
    if (last >= 0) maxv = hval(last);
    for (int j = 0; j < 6; j++) {
        uint64_t want = (uint64_t)((double)done * ps[j] / 100.0 + 0.999999);
        if (want < 1) want = 1;
        uint64_t cum = 0;
        for (int i = 0; i < NB; i++) {
            cum += hist[i];
            if (cum >= want) { pv[j] = hval(i); break; }
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
                 (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;

    printf("{\"generator\": \"cgen\", \"mode\": \"%s\", \"rate\": %.3f, \"conns\": %d, "
           "\"threads\": %d, \"duration_s\": %.3f, \"warmup_s\": %.3f, \"requests\": %llu, "
           "\"sent\": %llu, \"errors\": %llu, \"non2xx\": %llu, \"timeouts\": %llu, "
           "\"dropped\": %llu, \"reconnects\": %llu, \"rps\": %.1f, \"cpu_s\": %.4f, "
           "\"wall_s\": %.4f, \"latency_us\": {",
           g_rate > 0 ? "open" : "closed", g_rate, g_conns, g_threads, g_dur, g_warm,
           (unsigned long long)done, (unsigned long long)sent, (unsigned long long)errors,
           (unsigned long long)non2xx, (unsigned long long)timeouts,
           (unsigned long long)dropped, (unsigned long long)reconnects, done / g_dur, cpu,
           (t1 - t0) / 1e9);
    printf("\"mean\": %.2f", done ? lat_sum / (double)done / 1e3 : 0.0);
    for (int j = 0; j < 6; j++) printf(", \"%s\": %.2f", pn[j], pv[j] / 1e3);
    printf(", \"max\": %.2f}, \"sched_lag_us\": {\"mean\": %.2f, \"max\": %.2f}, \"hist_us\": [",
           maxv / 1e3, lag_n ? lag_sum / (double)lag_n / 1e3 : 0.0, lag_max / 1e3);
    int first = 1;
    for (int i = 0; i < NB; i++) {
        if (!hist[i]) continue;
        printf("%s[%.3f, %llu]", first ? "" : ", ", hval(i) / 1e3, (unsigned long long)hist[i]);
        first = 0;
    }
    printf("]}\n");
    return 0;
}
