"""Workers are kept small (issue 8's RSS target): they start as `python -OO` (no docstrings;
the supervisor keeps its own flags and environment) and return the heap that start-up freed to
the kernel. What a worker imports is pinned by tests/unit/test_worker_imports.py."""
import os
import socket

from harness import Proxy, one_service_mesh, write_config


def _environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)


def test_workers_run_optimized_and_serve(tmp_path):
    origin = socket.socket()
    origin.bind(("127.0.0.1", 0))
    origin.listen(1)
    px = Proxy([write_config(str(tmp_path), one_service_mesh(origin.getsockname()[1]))],
               workers=2)
    try:
        workers = [w["pid"] for w in px.info()["workers"]]
        assert len(workers) == 2
        for pid in workers:
            assert _environ(pid).get(b"PYTHONOPTIMIZE") == b"2"
        assert b"PYTHONOPTIMIZE" not in _environ(px.proc.pid) or \
            os.environ.get("PYTHONOPTIMIZE")  # the supervisor's is what it was given
        c = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        c.sendall(b"GET / HTTP/1.1\r\nHost: up\r\n\r\n")
        peer, _ = origin.accept()
        peer.settimeout(5)
        assert peer.recv(4096).startswith(b"GET / HTTP/1.1\r\n")
        peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert c.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
        c.close()
        peer.close()
    finally:
        px.stop()
        origin.close()
