"""A recording HTTP/1.1 upstream on 127.0.0.1 for route-action and discovery tests."""
import socket
from http import HTTPStatus
import threading


class Upstream:
    """Answers every request 200 `ok` with a few headers routes edit; records what it received:
    each request head (`seen`), and every connection and byte that reached it (`connections`,
    `bytes_received`), so a test can tell that nothing at all arrived. `raw_response`, when set,
    is sent as is instead of the 200 (a malformed response, say)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.seen = []
        self.status = 200  # what every response answers; a test may change it
        self.raw_response = None
        self.connections = 0
        self.bytes_received = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = c.recv(65536)
                    if not chunk:
                        return
                    with self.lock:
                        self.bytes_received += len(chunk)
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                headers = [(k.lower(), v.strip()) for k, _, v in (l.partition(":") for l in lines[1:])]
                with self.lock:
                    self.seen.append((lines[0], headers))
                if self.raw_response is not None:
                    c.sendall(self.raw_response)
                    continue
                body = b"ok"
                status = self.status
                c.sendall(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\nx-up-remove: 1\r\nx-w: up\r\n"
                          b"access-control-allow-origin: upstream\r\ncontent-length: %d\r\n\r\n" % (status, HTTPStatus(status).phrase.encode(), len(body))
                          + body)
        except OSError:
            pass
        finally:
            c.close()

    def last(self):
        with self.lock:
            return self.seen[-1] if self.seen else None

    def close(self):
        self.sock.close()
