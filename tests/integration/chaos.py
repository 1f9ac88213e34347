"""Bounded chaos for meshcore (issue 9): backend pods SIGKILLed under load with retries on, a worker
SIGKILLed, then a drain; the shared pieces of test_chaos.py and test_chaos_drain.py.

* `Pods`: chaos_backend.py processes, one per pod, each logging every request it received to one
  shared file before answering; `kill_one()` SIGKILLs a live pod; a kubelet thread restarts dead
  pods after a short pause, as Kubernetes does.
* `Load`: client threads, each on its own keep-alive connection (a new one after an error), send
  GETs and POSTs with unique nonces for a bounded time; every request's outcome is recorded
  (status, nonce echoed, or the client-side error).
* `judge(outcomes, log, ...)`: the properties -- no lost request (every request got an HTTP answer,
  possibly cut short in its body when its origin died mid-response, which the client can tell;
  or, only where a worker was killed, a reset: never a hang), no cross-wired response (a 200
  carries its own nonce), and POSTs repeated at the origins only where the route's retryOn allows
  (a POST on a `connect-failure`-only route reaches the origins at most once; on a route that
  retries resets at most 1 + attempts times).
"""
from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ATTEMPTS = 3


def chaos_mesh(ports) -> str:
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {p}}}}}" for p in ports)
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: chaos}}
spec:
  hosts: [chaos-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: chaos}}
spec:
  hosts: [chaos-service]
  http:
  - match: [{{uri: {{prefix: /post-safe}}}}]
    route: [{{destination: {{host: chaos-service}}}}]
    timeout: 10s
    retries: {{attempts: {ATTEMPTS}, retryOn: connect-failure}}
  - route: [{{destination: {{host: chaos-service}}}}]
    timeout: 10s
    retries: {{attempts: {ATTEMPTS}, retryOn: "connect-failure,reset,503"}}
"""


class Pods:
    def __init__(self, n: int, log_path: str, free_port):
        self.log_path = log_path
        self.ports = [free_port() for _ in range(n)]
        self.procs = [self._start(i) for i in range(n)]
        self.lock = threading.Lock()
        self.kills = 0
        self.restarts = 0
        self._stop = threading.Event()
        for p in self.ports:
            _wait_port(p)
        self.kubelet = threading.Thread(target=self._kubelet, daemon=True)
        self.kubelet.start()

    def _start(self, i: int):
        return subprocess.Popen([sys.executable, os.path.join(HERE, "chaos_backend.py"),
                                 f"pod-{i}", str(self.ports[i]), self.log_path],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _kubelet(self):
        while not self._stop.wait(0.05):
            with self.lock:
                for i, p in enumerate(self.procs):
                    if p.poll() is not None:
                        time.sleep(0.1)  # a restart takes a moment, as a pod's does
                        self.procs[i] = self._start(i)
                        self.restarts += 1

    def kill_one(self, rng: random.Random) -> None:
        with self.lock:
            alive = [p for p in self.procs if p.poll() is None]
            if len(alive) > 1:  # keep one up: the properties are about retries, not outages
                victim = rng.choice(alive)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                self.kills += 1

    def stop(self):
        self._stop.set()
        self.kubelet.join(5)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def log(self) -> list[tuple]:
        with open(self.log_path) as f:
            return [tuple(line.split()) for line in f if line.strip()]


def _wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"backend on {port} did not start")


@dataclass
class Outcome:
    nonce: str
    method: str
    path: str
    status: int = 0           # 0: no HTTP answer
    echoed: str = ""          # the x-nonce of the answer
    body: bytes = b""
    error: str = ""           # the client-side failure when there was no answer
    close: bool = False       # the answer said Connection: close
    truncated: bool = False   # its head came, then the connection closed inside the body (an
                              # origin that died mid-response: relayed as such, as Envoy does)
    started: float = 0.0
    ended: float = 0.0
    on_connection: int = 0    # requests sent on its client connection before it
    previous: str = ""        # the status (or error) of the one before it on that connection


_nonces = itertools.count()


class Load:
    """`clients` threads sending requests for `seconds` (or until stop()); with `once`, each
    sends exactly one request."""

    def __init__(self, port: int, clients: int, seconds: float, seed: int = 1,
                 paths=("/get", "/post-safe", "/post-reset"), timeout: float = 10.0,
                 backend_ms: int = 0, once: bool = False):
        self.port = port
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + seconds
        self.timeout = timeout
        self.paths = paths
        self.backend_ms = backend_ms  # each request waits up to this long at the origin
        self.once = once
        self.threads = [threading.Thread(target=self._client, args=(random.Random(seed + i),),
                                         daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def stop(self):
        self.deadline = 0

    def join(self):
        for t in self.threads:
            t.join(self.timeout + 5)
            assert not t.is_alive(), "a client hung"

    def _client(self, rng):
        sock = None
        buf = b""
        sent = 0
        previous = ""
        while self.once or time.monotonic() < self.deadline:
            path = rng.choice(self.paths)
            method = "GET" if path.startswith("/get") else "POST"
            if self.backend_ms:
                path += f"?ms={rng.randrange(self.backend_ms)}"
            o = Outcome(f"n{next(_nonces)}-{os.getpid()}", method, path, started=time.monotonic())
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
                    buf = b""
                    sent = 0
                o.on_connection, o.previous = sent, previous
                sent += 1
                body = o.nonce.encode() * 3 if method == "POST" else b""
                sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: chaos-service\r\nx-nonce: "
                             f"{o.nonce}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
                o.status, headers, o.body, buf, o.truncated = _read_response(sock, buf)
                o.echoed = headers.get("x-nonce", "")
                o.close = "close" in headers.get("connection", "").lower()
                if o.close or o.truncated:
                    sock.close()
                    sock = None
            except (OSError, EOFError) as exc:
                o.error = type(exc).__name__
                if sock is not None:
                    sock.close()
                sock = None
            o.ended = time.monotonic()
            previous = str(o.status or o.error)
            with self.lock:
                self.outcomes.append(o)
            if self.once:
                break
        if sock is not None:
            sock.close()


def _read_response(sock, buf: bytes):
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("closed before an answer")
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            return status, headers, buf, b"", True
        buf += chunk
    return status, headers, buf[:n], buf[n:], False


@dataclass
class Verdict:
    requests: int
    ok: int
    refused: Counter          # non-200 statuses
    truncated: list           # answers whose body was cut short (their origin died mid-body)
    lost: list                # no answer where none may be lost
    resets: list              # no answer (reset/EOF) where allowed (a killed worker)
    cross_wired: list
    repeated_posts: list      # POSTs seen more often than their route's retryOn allows
    seen: Counter             # per nonce, how often the origins received it


def judge(outcomes, log, allow_resets=lambda o: False) -> Verdict:
    seen = Counter(entry[2] for entry in log)
    lost, resets, crossed, repeated, truncated = [], [], [], [], []
    refused = Counter()
    ok = 0
    for o in outcomes:
        if not o.status:
            (resets if allow_resets(o) and o.error != "TimeoutError" else lost).append(o)
            continue
        if o.truncated:
            truncated.append(o)
            if o.echoed != o.nonce or not o.nonce.encode().startswith(o.body):
                crossed.append(o)
        elif o.status == 200:
            ok += 1
            if o.echoed != o.nonce or o.body != o.nonce.encode():
                crossed.append(o)
        else:
            refused[o.status] += 1
        allowed = 1 if o.path.startswith("/post-safe") else 1 + ATTEMPTS
        if seen[o.nonce] > allowed:
            repeated.append((o, seen[o.nonce]))
    for o in outcomes:
        if not o.status and o.path.startswith("/post-safe") and seen[o.nonce] > 1:
            repeated.append((o, seen[o.nonce]))
    return Verdict(len(outcomes), ok, refused, truncated, lost, resets, crossed, repeated, seen)


@pytest.fixture
def cluster(tmp_path):
    """Three pods and a 2-worker proxy over them (the chaos tests' fixture)."""
    from harness import Proxy, free_port, write_config
    pods = Pods(3, str(tmp_path / "origin.log"), free_port)
    px = Proxy([write_config(str(tmp_path), chaos_mesh(pods.ports))], workers=2,
               extra=["--no-access-log"])
    yield pods, px
    px.stop()
    pods.stop()
