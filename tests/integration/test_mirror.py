"""The seed's traffic-copy demo against real pods and the real proxy (2 workers): mirroring,
fire-and-forget, and the capture sink with replay."""
import json
import socket
import threading
import time

import pytest

from harness import Client, Pods, Proxy, free_port, get, write_config


def mesh(primary, mirror_port, mirror_extra="", annotations=""):
    return f"""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: retry-service}}
spec:
  hosts: [retry-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {primary}}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: sniffer}}
spec:
  hosts: [sniffer]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {mirror_port}}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: retry-vs
{annotations}
spec:
  hosts: [retry-service]
  http:
  - route:
    - destination: {{host: retry-service}}
    mirror: {{host: sniffer}}
{mirror_extra}"""


@pytest.fixture(scope="module")
def two_pods():
    p = Pods([("primary", free_port(), "{}"), ("sniffer", free_port(), "sniffer")])
    yield p
    p.stop()


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_every_request_is_copied_with_shadow_host_same_target_and_body(tmp_path, two_pods):
    px = Proxy([write_config(str(tmp_path), mesh(two_pods.port("primary"), two_pods.port("sniffer")))],
               workers=2, extra=["--no-access-log"])
    try:
        two_pods.clear()
        c = Client(px.port)
        for i in range(20):
            r = c.request(path=f"/?failRate=1&mode=busy&i={i}", host="retry-service")
            assert r.header("x-pod") == "primary"  # the client sees the primary only
        r = c.request("POST", "/upload?x=1", host="retry-service", body=b"payload-bytes")
        assert r.header("x-pod") == "primary"
        c.close()
        assert _wait(lambda: len(two_pods.log("sniffer")) == 21)
        primary, copies = two_pods.log("primary"), two_pods.log("sniffer")
        assert sorted(e["path"] for e in copies) == sorted(e["path"] for e in primary)
        for e in copies:
            headers = dict(e["headers"])
            assert headers["host"] == "retry-service-shadow"
            assert headers["x-envoy-internal"] == "true"
        post = [e for e in copies if e["method"] == "POST"]
        assert post[0]["body_sha256"] == [e for e in primary if e["method"] == "POST"][0]["body_sha256"]
        assert post[0]["body_len"] == len(b"payload-bytes")
    finally:
        px.stop()


class SlowServer:
    """Answers every request after `delay` seconds; records when it finished each answer."""

    def __init__(self, delay):
        self.delay = delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.finished = []
        self.stop = threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        with conn:
            conn.settimeout(10)
            try:
                while conn.recv(65536):
                    time.sleep(self.delay)
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                    self.finished.append(time.monotonic())
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.sock.close()


def test_slow_mirror_does_not_hold_the_primary(tmp_path, two_pods):
    slow = SlowServer(2.0)
    px = Proxy([write_config(str(tmp_path), mesh(two_pods.port("primary"), slow.port))],
               workers=2, extra=["--no-access-log"])
    try:
        c = Client(px.port)
        for _ in range(5):
            assert c.request(host="retry-service").status == 200
        done = time.monotonic()
        c.close()
        # all five primary answers came back before the mirror host had answered even one copy
        assert _wait(lambda: slow.finished)
        assert done < min(slow.finished)
    finally:
        px.stop()
        slow.close()


def test_dead_mirror_changes_no_primary_status(tmp_path, two_pods):
    px = Proxy([write_config(str(tmp_path), mesh(two_pods.port("primary"), free_port()))],
               workers=2, extra=["--no-access-log"])
    try:
        c = Client(px.port)
        assert [c.request(host="retry-service").status for _ in range(10)] == [200] * 10
        c.close()
    finally:
        px.stop()


def test_capture_sink_then_replay_round_trip(tmp_path, two_pods):
    capture = tmp_path / "capture.jsonl"
    annotations = (f"  annotations:\n    meshcore.io/capture-file: {capture}\n")
    cfg = mesh(two_pods.port("primary"), two_pods.port("sniffer"), annotations=annotations).replace(
        "mirror: {host: sniffer}", "mirror: {host: capture.meshcore.local}")
    px = Proxy([write_config(str(tmp_path), cfg)], workers=2, extra=["--no-access-log"])
    try:
        two_pods.clear()
        c = Client(px.port)
        c.request(path="/a?x=1", host="retry-service", headers=[("X-Test", "1")])
        c.request("POST", "/b", host="retry-service", body=b"\x00\x01binary\xff")
        c.close()
        assert _wait(lambda: capture.exists() and len(capture.read_text().splitlines()) == 2)
        lines = [json.loads(l) for l in capture.read_text().splitlines()]
        assert sorted(l["target"] for l in lines) == ["/a?x=1", "/b"]
        assert two_pods.log("sniffer") == []  # the capture sink is not a network mirror
        primary = two_pods.log("primary", clear=True)
    finally:
        px.stop()
    from meshcore.replay import main as replay
    import io
    out = io.StringIO()
    assert replay([str(capture), "--to", f"127.0.0.1:{two_pods.port('sniffer')}"], out=out) == 0
    replayed = two_pods.log("sniffer")
    assert sorted((e["method"], e["path"], e["body_sha256"]) for e in replayed) == \
        sorted((e["method"], e["path"], e["body_sha256"]) for e in primary)
    test_header = [dict(e["headers"]).get("x-test") for e in replayed if e["path"] == "/a?x=1"]
    assert test_header == ["1"]
