"""The demo's Kubernetes stand-in: one process per pod, restarted after a crash, logs collected.

* Ports: `PodSet.bind()` binds every pod's listening socket before any pod starts, so a demo whose
  ports are taken refuses to start instead of talking to whatever holds them. Each pod process
  inherits its socket (`--socket-fd`); the kubelet closes its own copy, so a dead pod's port refuses
  connections until the restart, as a crashed container's port does.
* Restarts: a pod whose process exits is restarted on the same port, at once the first time and
  after a short back-off (0.5 s doubling to 2 s) while it keeps crashing within 10 s — Kubernetes'
  CrashLoopBackOff, shortened for a laptop. `restarts()` counts them as `kubectl get pods` does.
* Logs: one `LogPump` thread reads every child's output. Each line is stored with its pod and the
  pod's process generation (`kubectl logs --previous` survives a crash) and passed to `on_line`.
  `sync()` returns once every line already written by any child has been read: pods write a
  request's log line before answering it, so after a response, `sync()` makes its lines visible.
"""
from __future__ import annotations

import errno
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from meshcore.demo.scenarios import PodSpec

RESTART_WINDOW_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 2.0
MAX_KEPT_LINES = 20000


@dataclass(frozen=True)
class LogLine:
    seq: int
    source: str       # pod name, or "sidecar"
    generation: int   # the pod's process generation (1 = first start), 0 for non-pods
    text: str
    event: bool = False  # written by the kubelet (a restart), not by the pod


class PortsTaken(Exception):
    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems  # [(address, what, reason)]
        super().__init__(format_ports_taken(problems))


def format_ports_taken(problems) -> str:
    where = ", ".join(f"{addr} ({what})" for addr, what, _ in problems)
    reasons = sorted({reason for _, _, reason in problems})
    return f"cannot listen on {where}: {'; '.join(reasons)}"


def bind_listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def probe_port(host: str, port: int) -> str | None:
    """None when (host, port) could be listened on now, else the reason it cannot."""
    try:
        bind_listener(host, port).close()
    except OSError as exc:
        return _reason(exc)
    return None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    return (exc.strerror or str(exc)).lower()


class LogPump:
    """One thread reading the output pipes of every child; see the module doc for `sync()`."""

    def __init__(self, on_line=None):
        self.on_line = on_line
        self.lines: list[LogLine] = []
        self.seq = 0
        self._cond = threading.Condition()
        self._empty_passes = 0
        self._pending: list = []
        self._closed = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="meshcore-demo-logs", daemon=True)
        self._thread.start()

    def add(self, pipe, source: str, generation: int = 0) -> threading.Event:
        """Read `pipe` (a binary file object) until EOF; the event is set once its last line is in."""
        done = threading.Event()
        with self._cond:
            self._pending.append((pipe, source, generation, done))
        os.write(self._wake_w, b"x")
        return done

    def event(self, source: str, generation: int, text: str) -> None:
        self._store(source, generation, text, event=True)

    def _store(self, source, generation, text, event=False) -> None:
        with self._cond:
            self.seq += 1
            line = LogLine(self.seq, source, generation, text, event)
            self.lines.append(line)
            if len(self.lines) > MAX_KEPT_LINES:
                del self.lines[: len(self.lines) - MAX_KEPT_LINES]
        if self.on_line is not None:
            self.on_line(line)

    def mark(self) -> int:
        return self.seq

    def since(self, mark: int, source: str | None = None) -> list[LogLine]:
        with self._cond:
            return [ln for ln in self.lines if ln.seq > mark and (source is None or ln.source == source)]

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until every line written before this call has been read (two empty passes)."""
        with self._cond:
            target = self._empty_passes + 2
            return self._cond.wait_for(lambda: self._empty_passes >= target or self._closed, timeout)

    def close(self) -> None:
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            if key.data is not None:
                key.data[4].close()
                key.data[3].set()
        with self._cond:
            for pipe, _, _, done in self._pending:
                pipe.close()
                done.set()
            self._pending = []
            self._cond.notify_all()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        while not self._closed:
            with self._cond:
                pending, self._pending = self._pending, []
            for pipe, source, generation, done in pending:
                os.set_blocking(pipe.fileno(), False)
                self._sel.register(pipe, selectors.EVENT_READ, [source, generation, b"", done, pipe])
            events = self._sel.select(timeout=0.05)
            data_seen = False
            for key, _ in events:
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                data_seen = True
                self._read(key)
            if not data_seen and not pending:
                with self._cond:
                    self._empty_passes += 1
                    self._cond.notify_all()

    def _read(self, key) -> None:
        source, generation, buf, done, pipe = key.data
        try:
            chunk = os.read(key.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            buf += chunk
            *complete, buf = buf.split(b"\n")
            key.data[2] = buf
            for raw in complete:
                self._store(source, generation, raw.decode("utf-8", "replace").rstrip("\r"))
            return
        if buf:
            self._store(source, generation, buf.decode("utf-8", "replace"))
        self._sel.unregister(pipe)
        pipe.close()
        done.set()


class PodProcess:
    """One pod: its listening socket, its current process and its restart count."""

    def __init__(self, spec: PodSpec, host: str, port: int, server_id: str):
        self.spec = spec
        self.host = host
        self.port = port
        self.server_id = server_id
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        self.restarts = 0
        self.ready = threading.Event()
        self.output_done = threading.Event()  # the current process's output has all been read
        self.thread: threading.Thread | None = None

    def bind(self) -> None:
        self.sock = bind_listener(self.host, self.port)
        self.port = self.sock.getsockname()[1]

    def command(self) -> list[str]:
        what = ["--sniffer", f"{self.spec.name}:{self.port}"] if self.spec.sniffer else \
               ["--pod", f"{self.spec.name}:{self.port}:{self.spec.text}"]
        return [sys.executable, "-m", "meshcore.demo", *what, "--socket-fd", str(self.sock.fileno()),
                "--server-id", self.server_id, "--parent-pid", str(os.getpid())]


class PodSet:
    """The scenario's pods; `bind()`, then `start()`, and `stop()` when done."""

    def __init__(self, specs, ports: dict[str, int], pump: LogPump, host: str = "127.0.0.1"):
        self.pump = pump
        self.host = host
        self.pods = {s.name: PodProcess(s, host, ports[s.name], str(uuid.uuid4())) for s in specs}
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    # --- ports

    def bind(self) -> list[tuple[str, str, str]]:
        """Bind every pod's port; returns the problems [(address, pod, reason)] (then none is held)."""
        problems = []
        for pod in self.pods.values():
            try:
                pod.bind()
            except OSError as exc:
                problems.append((f"{self.host}:{pod.port}", f"pod {pod.spec.name}", _reason(exc)))
        if problems:
            self.release()
        return problems

    def release(self) -> None:
        for pod in self.pods.values():
            if pod.sock is not None:
                pod.sock.close()
                pod.sock = None

    def ports(self) -> dict[str, int]:
        return {name: pod.port for name, pod in self.pods.items()}

    # --- processes

    def start(self) -> None:
        for pod in self.pods.values():
            self._spawn(pod)
            pod.thread = threading.Thread(target=self._kubelet, args=(pod,), daemon=True,
                                          name=f"meshcore-demo-{pod.spec.name}")
            pod.thread.start()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(p.ready.wait(max(0.0, deadline - time.monotonic())) for p in self.pods.values())

    def _spawn(self, pod: PodProcess) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self._lock:
            pod.generation += 1
            pod.ready.clear()
            pod.proc = subprocess.Popen(pod.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, pass_fds=(pod.sock.fileno(),),
                                        start_new_session=True, env=env)
            pod.sock.close()  # the pod holds it now: when the pod dies, its port refuses
            pod.sock = None
        pod.output_done = self.pump.add(pod.proc.stdout, pod.spec.name, pod.generation)

    def _kubelet(self, pod: PodProcess) -> None:
        quick_crashes = 0
        while True:
            started = time.monotonic()
            code = pod.proc.wait()
            pod.output_done.wait(5)  # its last lines come before the restart's
            if self._stopping.is_set():
                return
            quick_crashes = quick_crashes + 1 if time.monotonic() - started < RESTART_WINDOW_S else 1
            delay = 0.0 if quick_crashes <= 1 else min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (quick_crashes - 2))
            pod.restarts += 1
            self.pump.event(pod.spec.name, pod.generation,
                            f"(kubelet) container exited with code {code}; restarting"
                            + (f" in {delay:g} s (back-off)" if delay else "")
                            + f"; restarts: {pod.restarts}")
            if self._stopping.wait(delay):
                return
            while True:
                try:
                    pod.bind()
                    break
                except OSError as exc:
                    self.pump.event(pod.spec.name, pod.generation,
                                    f"(kubelet) cannot listen on {self.host}:{pod.port}: {_reason(exc)}; "
                                    "retrying in 1 s")
                    if self._stopping.wait(1.0):
                        return
            if self._stopping.is_set():
                pod.sock.close()
                return
            self._spawn(pod)

    def mark_ready_from(self, line: LogLine) -> None:
        """The first line of a pod process says it serves (see pod.started_line)."""
        pod = self.pods.get(line.source)
        if pod is not None and not line.event and line.generation == pod.generation:
            pod.ready.set()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            procs = [p.proc for p in self.pods.values() if p.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pod in self.pods.values():
            if pod.thread is not None:
                pod.thread.join(5)
        self.release()

    # --- what `kubectl get pods` shows

    def restarts(self, name: str) -> int:
        return self.pods[name].restarts

    def table(self, names=None) -> list[str]:
        rows = [("NAME", "VERSION", "PORT", "STATUS", "RESTARTS")]
        for pod in self.pods.values():
            if names is not None and pod.spec.name not in names:
                continue
            rows.append((pod.spec.name, pod.spec.version, str(pod.port), self._status(pod),
                         str(pod.restarts)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return ["   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    @staticmethod
    def _status(pod: PodProcess) -> str:
        if pod.proc is None:
            return "Pending"
        if pod.proc.poll() is not None:
            return "Restarting"
        return "Running" if pod.ready.is_set() else "Starting"

    def wait_exited(self, name: str, generation: int, timeout: float) -> bool:
        """Wait until the pod's process `generation` has exited and been replaced (or gave up)."""
        pod = self.pods[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pod.generation > generation and pod.ready.is_set():
                return True
            time.sleep(0.02)
        return False
