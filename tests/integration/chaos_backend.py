"""A backend pod for the chaos tests: `python chaos_backend.py NAME PORT LOG`.

HTTP/1.1 with keep-alive (http.server). Every request is appended to LOG as one line
`NAME METHOD NONCE` *before* it is answered (O_APPEND, one write: the line survives a SIGKILL
that comes before the answer), then answered 200 with the nonce (`x-nonce` header and body) and
`x-pod: NAME`. `?ms=N` waits N ms first.
"""
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        nonce = self.headers.get("x-nonce", "-")
        os.write(LOG_FD, f"{NAME} {self.command} {nonce} {len(body)}\n".encode())
        ms = parse_qs(urlsplit(self.path).query).get("ms")
        if ms:
            time.sleep(int(ms[0]) / 1000)
        out = nonce.encode()
        self.send_response(200)
        self.send_header("x-nonce", nonce)
        self.send_header("x-pod", NAME)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = _serve

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    NAME, PORT, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    LOG_FD = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
