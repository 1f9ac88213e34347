"""Tiny TCP programs the network-namespace tests run inside pods (`python netns_tools.py CMD`).

Each prints `ready` on stdout once listening, then serves until killed. Plain sockets and
threads: independent of meshcore's data path (only meshcore.sidecar.origdst is used, the helper
under test).

  origdst PORT [--relay] [--dual]
                           accept on 0.0.0.0:PORT (--dual: [::]:PORT, IPv4 too); per connection answer one JSON line
                           {"orig": [ip, port] | null, "peer": [ip, port], "uid": N} where orig is
                           SO_ORIGINAL_DST; with --relay, instead connect to the original
                           destination (as this process's uid) and relay its answer, prefixed by
                           the JSON line
  whoami PORT NAME [--dual]
                           accept on 0.0.0.0:PORT (--dual: [::]:PORT, IPv4 too); answer "NAME <port> <peer ip>\\n" and close
  connect HOST PORT        connect, print what the server sends until it closes (exit 1 on error)
  echo PORT NAME           accept on 0.0.0.0:PORT; read until the client half-closes, answer
                           "NAME <what it sent>" and close (a TCP service)
  send HOST PORT TEXT      connect, send TEXT, half-close, print what comes back until the
                           server closes (exit 1 on error)
  http-server PORT NAME    HTTP/1.1 on 0.0.0.0:PORT: 200, body "NAME <Host header>\n"
  get URL [NAME:VALUE ...] one GET (urllib); print "<status> <body>" (exit 0 on any HTTP status,
                           1 when no response came)
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from meshcore.sidecar.origdst import original_dst  # noqa: E402

TIMEOUT = 5.0


def _listen(port: int, dual: bool = False) -> socket.socket:
    """0.0.0.0:PORT, or with `dual` [::]:PORT taking IPv4 too (as IPv4-mapped addresses)."""
    s = socket.socket(socket.AF_INET6 if dual else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if dual:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::" if dual else "0.0.0.0", port))
    s.listen(64)
    print("ready", flush=True)
    return s


def _serve(listener: socket.socket, handle) -> None:
    while True:
        conn, peer = listener.accept()
        conn.settimeout(TIMEOUT)
        threading.Thread(target=_guard, args=(handle, conn, peer), daemon=True).start()


def _guard(handle, conn, peer) -> None:
    try:
        with conn:
            handle(conn, peer)
    except OSError as exc:
        print(f"error {exc}", file=sys.stderr, flush=True)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def cmd_origdst(port: int, relay: bool, dual: bool = False) -> None:
    def handle(conn, peer):
        orig = original_dst(conn)
        line = json.dumps({"orig": list(orig) if orig else None, "peer": list(peer[:2]),
                           "uid": os.getuid()}) + "\n"
        print(line.strip(), flush=True)
        conn.sendall(line.encode())
        if relay and orig is not None:
            with socket.create_connection(orig, timeout=TIMEOUT) as up:
                conn.sendall(_read_all(up))
    _serve(_listen(port, dual), handle)


def cmd_whoami(port: int, name: str, dual: bool = False) -> None:
    def handle(conn, peer):
        conn.sendall(f"{name} {conn.getsockname()[1]} {peer[0]}\n".encode())
    _serve(_listen(port, dual), handle)


def cmd_connect(host: str, port: int) -> int:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            sys.stdout.write(_read_all(s).decode())
    except OSError as exc:
        print(f"connect {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_echo(port: int, name: str) -> None:
    def handle(conn, peer):
        conn.sendall(f"{name} ".encode() + _read_all(conn))
    _serve(_listen(port), handle)


def cmd_send(host: str, port: int, text: str) -> int:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(text.encode())
            s.shutdown(socket.SHUT_WR)
            sys.stdout.write(_read_all(s).decode())
    except OSError as exc:
        print(f"send {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_http_server(port: int, name: str) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = f"{name} {self.headers.get('Host', '')}\n".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


def cmd_get(url: str, headers: list[str]) -> int:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, headers=dict(h.split(":", 1) for h in headers))
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            status, body = e.code, e.read()
    except OSError as exc:
        print(f"get {url}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(f"{status} {body.decode(errors='replace')}")
    return 0


def main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "origdst":
        cmd_origdst(int(argv[1]), "--relay" in argv[2:], "--dual" in argv[2:])
    elif cmd == "whoami":
        cmd_whoami(int(argv[1]), argv[2], "--dual" in argv[3:])
    elif cmd == "connect":
        return cmd_connect(argv[1], int(argv[2]))
    elif cmd == "echo":
        cmd_echo(int(argv[1]), argv[2])
    elif cmd == "send":
        return cmd_send(argv[1], int(argv[2]), argv[3])
    elif cmd == "http-server":
        cmd_http_server(int(argv[1]), argv[2])
    elif cmd == "get":
        return cmd_get(argv[1], argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
