/* meshcore bench: a tiny single-threaded epoll HTTP/1.1 backend.
 *
 * Answers every request with "200 ok" (keep-alive, pipelining-safe). Listens on N ephemeral
 * loopback ports (or on the ports given) and prints "PORTS p1 p2 ..." on stdout once bound.
 * Compiled by bench/native.py at bench start; not part of the product.
 *
 * usage: backend [-a addr] [-n count] [port ...]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXL 256
#define BUFSZ 16384

static const char RESP[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
#define RESPLEN (sizeof(RESP) - 1)

typedef struct conn {
    int fd;
    size_t len;          /* bytes buffered */
    size_t body_left;    /* request body bytes still to skip */
    char *out;           /* pending output (only when the socket was full) */
    size_t out_len, out_off;
    int close_after;
    char buf[BUFSZ];
} conn_t;

static int lfds[MAXL];
static int nl;

static void die(const char *m) { perror(m); exit(1); }

/* case-insensitive search of a header name at line starts within [p, end) */
static const char *find_header(const char *p, const char *end, const char *name) {
    size_t n = strlen(name);
    while (p < end) {
        const char *eol = memmem(p, end - p, "\r\n", 2);
        if (!eol) return NULL;
        if ((size_t)(eol - p) > n && strncasecmp(p, name, n) == 0 && p[n] == ':') return p + n + 1;
        p = eol + 2;
    }
    return NULL;
}

static void conn_close(int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->out);
    free(c);
}

/* Returns -1 when the connection must be closed. */
static int conn_flush(int ep, conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                return 0;
            }
            if (errno == EINTR) continue;
            return -1;
        }
        c->out_off += (size_t)w;
    }
    free(c->out);
    c->out = NULL;
    c->out_len = c->out_off = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    return c->close_after ? -1 : 0;
}

static int queue_out(conn_t *c, const char *data, size_t len) {
    char *n = realloc(c->out, c->out_len + len);
    if (!n) return -1;
    memcpy(n + c->out_len, data, len);
    c->out = n;
    c->out_len += len;
    return 0;
}

/* Parse as many complete requests as buffered; answer them with one send. */
static int conn_input(int ep, conn_t *c) {
    char out[RESPLEN * 64];
    size_t olen = 0;
    size_t off = 0;
    for (;;) {
        if (c->body_left) {
            size_t take = c->len - off < c->body_left ? c->len - off : c->body_left;
            off += take;
            c->body_left -= take;
            if (c->body_left) break;
        }
        if (off >= c->len) break;
        char *start = c->buf + off;
        char *hend = memmem(start, c->len - off, "\r\n\r\n", 4);
        if (!hend) {
            if (c->len - off >= BUFSZ) return -1; /* head too large */
            break;
        }
        const char *he = hend + 2; /* header block end (after last header CRLF) */
        const char *first_eol = memmem(start, he - start, "\r\n", 2);
        const char *hdrs = first_eol + 2;
        const char *v;
        if ((v = find_header(hdrs, he, "transfer-encoding"))) return -1; /* not needed here */
        if ((v = find_header(hdrs, he, "content-length"))) c->body_left = strtoull(v, NULL, 10);
        if ((v = find_header(hdrs, he, "connection"))) {
            while (*v == ' ' || *v == '\t') v++;
            if (strncasecmp(v, "close", 5) == 0) c->close_after = 1;
        }
        off = (size_t)(hend + 4 - c->buf);
        if (olen + RESPLEN > sizeof(out)) {
            if (queue_out(c, out, olen)) return -1;
            olen = 0;
        }
        memcpy(out + olen, RESP, RESPLEN);
        olen += RESPLEN;
        if (c->close_after) { off = c->len; break; }
    }
    if (off) {
        memmove(c->buf, c->buf + off, c->len - off);
        c->len -= off;
    }
    if (olen) {
        if (c->out_len) {
            if (queue_out(c, out, olen)) return -1;
            return 0; /* EPOLLOUT will flush */
        }
        size_t sent = 0;
        while (sent < olen) {
            ssize_t w = send(c->fd, out + sent, olen - sent, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) {
                    if (queue_out(c, out + sent, olen - sent)) return -1;
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    return 0;
                }
                return -1;
            }
            sent += (size_t)w;
        }
        if (c->close_after) return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *addr = "127.0.0.1";
    int count = 1, nports = 0, ports[MAXL];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-a") && i + 1 < argc) addr = argv[++i];
        else if (!strcmp(argv[i], "-n") && i + 1 < argc) count = atoi(argv[++i]);
        else if (nports < MAXL) ports[nports++] = atoi(argv[i]);
    }
    if (!nports) {
        if (count < 1 || count > MAXL) { fprintf(stderr, "bad -n\n"); return 2; }
        for (int i = 0; i < count; i++) ports[nports++] = 0;
    }
    signal(SIGPIPE, SIG_IGN);
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    printf("PORTS");
    for (int i = 0; i < nports; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(ports[i])};
        inet_pton(AF_INET, addr, &sa.sin_addr);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa)) die("bind");
        if (listen(fd, 4096)) die("listen");
        socklen_t sl = sizeof sa;
        getsockname(fd, (struct sockaddr *)&sa, &sl);
        printf(" %d", ntohs(sa.sin_port));
        lfds[nl++] = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &lfds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    printf("\n");
    fflush(stdout);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p >= (void *)lfds && p < (void *)(lfds + MAXL)) {
                int lfd = *(int *)p;
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *c = calloc(1, sizeof *c);
                    if (!c) { close(fd); continue; }
                    c->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            conn_t *c = p;
            if (evs[i].events & EPOLLOUT) {
                if (conn_flush(ep, c)) { conn_close(ep, c); continue; }
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                ssize_t r = recv(c->fd, c->buf + c->len, BUFSZ - c->len, 0);
                if (r <= 0) {
                    if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                    conn_close(ep, c);
                    continue;
                }
                c->len += (size_t)r;
                if (conn_input(ep, c)) conn_close(ep, c);
            }
        }
    }
}
