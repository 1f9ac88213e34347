"""`meshcore replay` (meshcore.replay): request rebuilding, and capture -> replay -> a recording
server receiving byte-for-byte the requests the mirror would have sent."""
from __future__ import annotations

import base64
import io
import socket
import threading
import time

import orjson
import pytest

from meshcore.capture import CaptureSink
from meshcore.policy.mirror import CaptureSettings, MirrorPolicy, mirror_head
from meshcore.proto.wire import DATA, DONE, BODY_CHUNKED, ChunkedReader, parse_request, request_body_kind
from meshcore.replay import build_request, main


def record(**kw):
    base = {"time": 1.0, "method": "POST", "target": "/a?b=1",
            "headers": [["host", "svc-shadow:80"], ["x-z", "1"], ["content-length", "3"],
                        ["x-a", "2"]],
            "body": "abc", "body_encoding": "utf8", "body_truncated": False, "body_size": 3}
    base.update(kw)
    return base


def test_build_request_keeps_header_order_and_body():
    req, cut = build_request(record())
    assert req == (b"POST /a?b=1 HTTP/1.1\r\nhost: svc-shadow:80\r\nx-z: 1\r\ncontent-length: 3\r\n"
                   b"x-a: 2\r\n\r\nabc")
    assert not cut


def test_build_request_truncated_body_fixes_content_length_in_place():
    req, cut = build_request(record(body="ab", body_truncated=True, body_size=3))
    assert b"\r\ncontent-length: 2\r\nx-a: 2\r\n\r\nab" in req and cut


def test_build_request_chunked_base64_and_host_override():
    body = b"\x00\xffbin"
    rec = record(headers=[["host", "a"], ["transfer-encoding", "chunked"]],
                 body=base64.b64encode(body).decode(), body_encoding="base64")
    req, _ = build_request(rec, host_override="staging:8080")
    assert req == (b"POST /a?b=1 HTTP/1.1\r\nhost: staging:8080\r\ntransfer-encoding: chunked\r\n\r\n"
                   b"5\r\n\x00\xffbin\r\n0\r\n\r\n")


def test_build_request_adds_missing_host_and_framing():
    req, _ = build_request(record(headers=[["x", "1"]]), default_host="127.0.0.1:9")
    assert req == b"POST /a?b=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\nx: 1\r\ncontent-length: 3\r\n\r\nabc"


def test_build_request_non_ascii_bytes_round_trip():
    req, _ = build_request(record(target="/\u00c3\u00a9", headers=[["host", "h"], ["x", "caf\u00e9"]],
                                  body=""))
    assert req == b"POST /\xc3\xa9 HTTP/1.1\r\nhost: h\r\nx: caf\xe9\r\n\r\n"


class RecordingServer:
    """Blocking loopback server in threads: records each request's raw bytes, answers 200
    (or the status in a `/status/NNN` target), keeps connections alive."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.raw: list[bytes] = []
        self.connections = 0
        self.threads = []
        self.stop = False
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def close(self):
        self.stop = True
        self.sock.close()

    def _accept(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()

    def _serve(self, conn):
        buf = b""
        with conn:
            while True:
                head = parse_request(buf, 0) if buf else None
                while head is None:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    head = parse_request(buf, 0)
                kind, length = request_body_kind(head)
                pos = head.end
                if kind == BODY_CHUNKED:
                    reader = ChunkedReader()
                    while True:
                        step, a, b = reader.step(buf, pos, len(buf))
                        if step == DATA:
                            pos = b
                        elif step == DONE:
                            pos = a
                            break
                        else:
                            buf += conn.recv(65536)
                else:
                    while len(buf) - pos < length:
                        buf += conn.recv(65536)
                    pos += length
                self.raw.append(buf[:pos])
                buf = buf[pos:]
                status = 200
                if head.path.startswith(b"/status/"):
                    status = int(head.path[8:11])
                conn.sendall(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\nok" % status)


@pytest.fixture
def server():
    s = RecordingServer()
    yield s
    s.close()


def capture_through_mirror(path, requests, **settings):
    """Capture as the data path does (meshcore.io.dataplane: the mirror's head into a
    CaptureSink); returns what a network mirror would get."""
    policy = MirrorPolicy(host="capture.meshcore.local",
                          capture=CaptureSettings(path=path, **settings))
    c = policy.capture
    sink = CaptureSink(c.path, c.max_bytes, c.body_limit, c.keep)
    expected = []
    for head, pieces in requests:
        assert sink.add(mirror_head(policy, head), pieces)
        expected.append(mirror_head(policy, head) + b"".join(pieces or ()))
    sink.close()  # flushes what is pending
    return expected


REQUESTS = [
    (b"GET /orders?id=1 HTTP/1.1\r\nhost: orders:8080\r\nuser-agent: curl/8\r\n"
     b"x-request-id: r1\r\nx-forwarded-proto: http\r\nx-envoy-attempt-count: 1\r\n\r\n", []),
    (b"POST /orders HTTP/1.1\r\nhost: orders:8080\r\ncontent-type: application/json\r\n"
     b"x-request-id: r2\r\ncontent-length: 12\r\nx-envoy-attempt-count: 1\r\n\r\n",
     [b'{"item":', b' 42}']),
    (b"PUT /blob HTTP/1.1\r\nhost: orders:8080\r\nx-request-id: r3\r\ncontent-length: 256\r\n"
     b"x-envoy-attempt-count: 1\r\n\r\n", [bytes(range(256))]),
    (b"DELETE /status/404 HTTP/1.1\r\nhost: orders:8080\r\nx-dup: a\r\nx-dup: b\r\n\r\n", []),
]


def test_capture_then_replay_is_byte_for_byte(tmp_path, server):
    path = str(tmp_path / "cap.jsonl")
    expected = capture_through_mirror(path, REQUESTS)
    out = io.StringIO()
    assert main([path, "--to", f"127.0.0.1:{server.port}"], out=out) == 0
    assert server.raw == expected
    assert server.connections == 1  # one keep-alive connection for all of them
    summary = out.getvalue()
    assert "sent 4" in summary and "200: 3" in summary and "404: 1" in summary
    assert "errors 0" in summary


def test_replay_chunked_capture_is_equivalent(tmp_path, server):
    path = str(tmp_path / "cap.jsonl")
    head = b"POST /c HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
    capture_through_mirror(path, [(head, [b"3\r\nabc\r\n", b"2\r\nde\r\n0\r\n\r\n"])])
    assert main([path, "--to", f"127.0.0.1:{server.port}"], out=io.StringIO()) == 0
    assert server.raw == [b"POST /c HTTP/1.1\r\nhost: h-shadow\r\ntransfer-encoding: chunked\r\n"
                          b"x-envoy-internal: true\r\n\r\n5\r\nabcde\r\n0\r\n\r\n"]


def test_replay_rotated_files_in_order_with_rate_and_host_override(tmp_path, server):
    path = str(tmp_path / "cap.jsonl")
    reqs = [(b"GET /n/%d HTTP/1.1\r\nhost: a\r\n\r\n" % i, []) for i in range(12)]
    capture_through_mirror(path, reqs, max_bytes=400, keep=50)
    t0 = time.monotonic()
    rc = main([path, "--rotated", "--rate", "100", "--host-override", "staging",
               "--to", f"127.0.0.1:{server.port}"], out=io.StringIO())
    assert rc == 0 and time.monotonic() - t0 >= 0.1  # 12 requests at 100/s: >= 110 ms
    assert [r.split(b" ")[1] for r in server.raw] == [b"/n/%d" % i for i in range(12)]
    assert all(b"\r\nhost: staging\r\n" in r for r in server.raw)


def test_replay_counts_errors_and_bad_lines(tmp_path):
    path = tmp_path / "cap.jsonl"
    good = orjson.dumps(record()).decode()
    path.write_text(good + "\nnot json\n" + '{"method": "GET"}\n')
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out = io.StringIO()
    assert main([str(path), "--to", f"127.0.0.1:{port}"], out=out) == 1
    assert "sent 1" in out.getvalue() and "errors 1" in out.getvalue()
    assert "bad lines 2" in out.getvalue()


def test_replay_usage_errors():
    assert main(["--to", "nohostport"]) == 2
