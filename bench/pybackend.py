"""Fallback backend when no C compiler is available: a raw-epoll Python HTTP/1.1 server that
answers every request with "200 ok". Prints "PORTS p1 p2 ..." once bound, like native/backend.c.

usage: python bench/pybackend.py [-n COUNT]
"""
from __future__ import annotations

import select
import socket
import sys

RESP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def main(argv: list[str]) -> int:
    count = int(argv[argv.index("-n") + 1]) if "-n" in argv else 1
    ep = select.epoll()
    listeners, conns, bufs = {}, {}, {}
    ports = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(4096)
        s.setblocking(False)
        listeners[s.fileno()] = s
        ports.append(s.getsockname()[1])
        ep.register(s.fileno(), select.EPOLLIN)
    print("PORTS " + " ".join(map(str, ports)), flush=True)
    while True:
        for fd, _ in ep.poll():
            if fd in listeners:
                try:
                    while True:
                        c, _ = listeners[fd].accept()
                        c.setblocking(False)
                        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        conns[c.fileno()] = c
                        bufs[c.fileno()] = b""
                        ep.register(c.fileno(), select.EPOLLIN)
                except BlockingIOError:
                    pass
                continue
            c = conns[fd]
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                c.close()
                del conns[fd], bufs[fd]
                continue
            buf = bufs[fd] + data
            n = buf.count(b"\r\n\r\n")  # GET requests without bodies
            if n:
                buf = buf[buf.rindex(b"\r\n\r\n") + 4:]
                try:
                    c.sendall(RESP * n)
                except OSError:
                    pass
            bufs[fd] = buf


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
