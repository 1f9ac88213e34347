"""The backend and the targets under test: their generated configs, commands, start, readiness,
process trees and stop.

Every target forwards to the same backend. Configs are generated per run into <out>/configs/ so
the printed commands can be rerun as they are; target logs go to <out>/logs/.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from bench import native, procs

HOST = "bench-service"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U32_MAX = 2**32 - 1

_used_ports: set[int] = set()


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port")


def http_get(port: int, path: str = "/", host: str = HOST, timeout: float = 1.0) -> int | None:
    """Status code of one GET, or None when the target does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return int(data.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


def find_tool(name: str) -> str | None:
    """On PATH, in the running interpreter's bin (a venv), or in /usr/sbin."""
    venv_bin = os.path.dirname(sys.executable)
    for cand in (shutil.which(name), os.path.join(venv_bin, name), f"/usr/sbin/{name}",
                 f"/usr/local/sbin/{name}"):
        if cand and os.access(cand, os.X_OK) and os.path.isfile(cand):
            return cand
    return None


class Proc:
    """A child started in its own session, so the whole tree can be stopped."""

    def __init__(self, name: str, argv: list[str], logdir: str, stdout_path: str | None = None,
                 cpus: str | None = None, cwd: str | None = None, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.cpus = cpus
        full = (["taskset", "-c", cpus] if cpus else []) + argv
        self.command = " ".join(_q(a) for a in full)
        os.makedirs(logdir, exist_ok=True)
        self.log_path = os.path.join(logdir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        self._out = open(stdout_path, "wb") if stdout_path else self._log
        self.popen = subprocess.Popen(full, stdout=self._out, stderr=self._log,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      cwd=cwd or REPO,
                                      env=dict(os.environ, **env) if env else None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 8.0) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        # workers left behind by a supervisor that died first share its process group
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for f in {self._log, self._out}:
            f.close()


def _q(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./:=,@%+" for c in arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def _write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------- backend

class Backend:
    """The one fast upstream that every target forwards to: nginx (1 worker) or the built-in C
    server; the pure-Python server only when there is no C compiler."""

    def __init__(self, kind: str, ports: list[int], proc: Proc, note: str = ""):
        self.kind, self.ports, self.proc, self.note = kind, ports, proc, note

    @property
    def port(self) -> int:
        return self.ports[0]

    def pids(self) -> list[int]:
        return procs.tree(self.proc.pid)

    def describe(self) -> dict:
        return {"kind": self.kind, "ports": self.ports, "command": self.proc.command,
                "note": self.note}

    def stop(self) -> None:
        self.proc.stop()


def start_backend(choice: str, nports: int, cfgdir: str, logdir: str, cpus: str | None,
                  notes: list[str]) -> Backend:
    nginx = find_tool("nginx")
    if choice in ("auto", "nginx") and nginx:
        ports = [free_port() for _ in range(nports)]
        prefix = os.path.join(cfgdir, "nginx-backend")
        conf = _write(os.path.join(prefix, "nginx.conf"), _nginx_backend_conf(prefix, ports))
        proc = Proc("backend-nginx", [nginx, "-p", prefix, "-c", conf, "-e",
                                      os.path.join(prefix, "error.log")], logdir, cpus=cpus)
        be = Backend("nginx", ports, proc, "nginx, 1 worker, return 200 \"ok\"")
    else:
        if choice == "nginx":
            notes.append("backend: nginx not installed; using the built-in C backend")
        try:
            exe = native.build("backend")
            argv, kind, note = [exe, "-n", str(nports)], "builtin-c", "built-in C epoll server " \
                "(bench/native/backend.c), 1 thread"
        except native.BuildError as exc:
            notes.append(f"backend: C helper unavailable ({exc}); using the Python fallback")
            argv = [sys.executable, os.path.join(os.path.dirname(__file__), "pybackend.py"),
                    "-n", str(nports)]
            kind, note = "builtin-python", "pure-Python epoll server (bench/pybackend.py)"
        proc = Proc("backend", argv, logdir, stdout_path=os.path.join(logdir, "backend.out"),
                    cpus=cpus)
        ports = _wait_ports(proc, os.path.join(logdir, "backend.out"))
        be = Backend(kind, ports, proc, note)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(http_get(p) == 200 for p in be.ports):
            return be
        if not be.proc.alive():
            break
        time.sleep(0.05)
    be.stop()
    raise RuntimeError(f"backend {be.kind} did not start:\n{be.proc.log_tail()}")


def _wait_ports(proc: Proc, path: str) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                line = f.readline()
            if line.endswith("\n") and line.startswith("PORTS"):
                return [int(p) for p in line.split()[1:]]
        except OSError:
            pass
        if not proc.alive():
            break
        time.sleep(0.02)
    raise RuntimeError(f"backend did not report its ports:\n{proc.log_tail()}")


def _nginx_common(prefix: str) -> str:
    tmp = os.path.join(prefix, "tmp")
    os.makedirs(tmp, exist_ok=True)
    os.chmod(tmp, 0o777)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (f"{user}worker_processes 1;\ndaemon off;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log warn;\n"
            "events { worker_connections 16384; }\n")


def _nginx_temp(prefix: str) -> str:
    tmp = os.path.join(prefix, "tmp")
    return "".join(f"    {k}_temp_path {tmp}/{k};\n"
                   for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def _nginx_backend_conf(prefix: str, ports: list[int]) -> str:
    listens = "".join(f"        listen 127.0.0.1:{p};\n" for p in ports)
    return (_nginx_common(prefix) + "http {\n    access_log off;\n" + _nginx_temp(prefix) +
            "    keepalive_requests 1000000000;\n    keepalive_timeout 300s;\n"
            "    server {\n" + listens +
            "        location / { default_type text/plain; return 200 \"ok\"; }\n"
            "    }\n}\n")


# ---------------------------------------------------------------------------------- targets

class Target:
    """One thing the load is sent to. `kind` picks how it is configured and started."""

    kind = "?"

    def __init__(self, name: str, label: str):
        self.name = name          # id used in --targets and in the JSON
        self.label = label        # human description
        self.port = 0
        self.proc: Proc | None = None
        self.configs: dict[str, str] = {}
        self.ready_s: float | None = None

    @property
    def command(self) -> str | None:
        return self.proc.command if self.proc else None

    def pids(self) -> list[int]:
        return procs.tree(self.proc.pid) if self.proc else []

    def memory(self) -> dict | None:
        return procs.memory(self.proc.pid) if self.proc else None

    def start(self, backend: Backend, cfgdir: str, logdir: str, cpus: str | None) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc and not self.proc.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.popen.returncode}:\n"
                                   f"{self.proc.log_tail()}")
            if self._admin_ready() and http_get(self.port) == 200:
                self.ready_s = time.monotonic() - t0
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s (GET through it did not "
                           f"return 200):\n{self.proc.log_tail() if self.proc else ''}")

    def _admin_ready(self) -> bool:
        return True

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "port": self.port,
                "command": self.command, "configs": self.configs, "ready_s": self.ready_s}


class Direct(Target):
    kind = "direct"

    def __init__(self):
        super().__init__("direct", "direct to the backend (no proxy)")

    def start(self, backend, cfgdir, logdir, cpus):
        self.port = backend.port

    def pids(self):
        return []

    def memory(self):
        return None


def service_entry_yaml(ports: list[int], extra: str = "") -> str:
    """The Istio ServiceEntry meshcore is given (one endpoint per backend port), plus any extra
    YAML documents (DestinationRule, VirtualService... from a matrix variant)."""
    eps = "".join(f"  - address: 127.0.0.1\n    ports:\n      http: {p}\n" for p in ports)
    doc = ("apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata:\n"
           "  name: bench-service\n  namespace: default\nspec:\n  hosts:\n  - bench-service\n"
           "  ports:\n  - number: 80\n    name: http\n"
           "    protocol: HTTP\n  resolution: STATIC\n  endpoints:\n" + eps)
    if extra.strip():
        doc += "---\n" + extra.strip() + "\n"
    return doc


class Meshcore(Target):
    kind = "meshcore"

    def __init__(self, name: str, workers: int, endpoints: int = 1, access_log: bool = False,
                 extra_yaml: str = "", flags: list[str] | None = None, label: str | None = None,
                 loop_stats: bool = False, env: dict[str, str] | None = None):
        super().__init__(name, label or f"meshcore, {workers} worker{'s' if workers > 1 else ''}")
        self.env = dict(env or {})  # extra environment of `meshcore run` (a matrix variant's)
        self.workers = workers
        self.endpoints = endpoints
        self.access_log = access_log
        self.extra_yaml = extra_yaml
        self.flags = flags or []
        self.admin_port = 0
        # --breakdown: the workers time their policy calls and access log and write their loop
        # counters with their CPU times to <stats_prefix>.<pid> (meshcore.worker.housekeeping)
        self.stats_prefix = None
        self.loop_stats = loop_stats

    def start(self, backend, cfgdir, logdir, cpus):
        if self.endpoints > len(backend.ports):
            raise RuntimeError(f"{self.name}: needs {self.endpoints} backend ports")
        self.port, self.admin_port = free_port(), free_port()
        cfg = _write(os.path.join(cfgdir, f"{self.name}.yaml"),
                     service_entry_yaml(backend.ports[:self.endpoints], self.extra_yaml))
        self.configs = {"config": cfg}
        argv = [sys.executable, "-m", "meshcore", "run", "--config", cfg,
                "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}",
                "--workers", str(self.workers),
                # Istio's Prometheus port (15090 by default) is a fixed port: two meshcore
                # targets of one run would collide on it; the admin port serves the metrics
                "--prometheus", "off"]
        stdout = None
        if not self.access_log:
            argv.append("--no-access-log")
        else:  # the access log goes to stdout: a file in the log dir, removed after the run
            stdout = os.path.join(logdir, f"{self.name}.access.log")
        argv += self.flags
        env = dict(self.env) or None
        if self.loop_stats:
            self.stats_prefix = os.path.join(logdir, f"{self.name}.loopstats")
            env = dict(self.env, MESHCORE_LOOP_STATS=self.stats_prefix)
        self.proc = Proc(self.name, argv, logdir, stdout_path=stdout, cpus=cpus, env=env)

    def loop_stats_snapshot(self) -> dict[int, dict]:
        """The workers' latest loop counters and CPU times, by pid (--breakdown)."""
        import glob
        import json
        out = {}
        for path in glob.glob(f"{self.stats_prefix}.*"):
            if path.endswith(".tmp"):
                continue
            try:
                with open(path) as f:
                    out[int(path.rsplit(".", 1)[1])] = json.load(f)
            except (OSError, ValueError):
                pass
        return out

    def _admin_ready(self):
        return http_get(self.admin_port, "/ready", host="127.0.0.1") == 200

    def stop(self):
        super().stop()
        if self.access_log and self.proc:
            try:
                os.unlink(os.path.join(os.path.dirname(self.proc.log_path),
                                       f"{self.name}.access.log"))
            except OSError:
                pass


def envoy_bootstrap(port: int, admin_port: int, backend_ports: list[int], extra_yaml: str = "",
                    access_log: str | None = None) -> str:
    """The static bootstrap Istio's sidecar would program for the YAML meshcore is given
    (`service_entry_yaml(backend_ports, extra_yaml)`, a matrix variant's documents included),
    generated by meshcore.config.envoy_bootstrap: one listener with Istio's HCM, route timeout 0s
    and Istio's default retry policy unless a VirtualService says otherwise, circuit breakers at
    2^32-1 unless a DestinationRule sets them. `access_log`: None (off), a path, or "stdout"."""
    from meshcore.config.compile import compile_sources
    from meshcore.config.envoy_bootstrap import envoy_bootstrap as generate, to_yaml

    istio = service_entry_yaml(backend_ports, extra_yaml)
    snapshot = compile_sources({f"{HOST}.yaml": istio.encode()})
    return to_yaml(generate(snapshot, listen=("127.0.0.1", port), admin=("127.0.0.1", admin_port),
                            access_log=access_log))


def minimal_envoy_bootstrap(port: int, admin_port: int, backend_ports: list[int]) -> str:
    """The least Envoy can be asked to do: one listener, an HCM with the router filter only, one
    route to one STATIC cluster (round robin), route timeout 0s, no retries, Envoy's default
    breakers: the cheapest Envoy, not what Istio programs (`envoy_bootstrap` is that)."""
    eps = ", ".join("{endpoint: {address: {socket_address: {address: 127.0.0.1, "
                    f"port_value: {p}" + "}}}}" for p in backend_ports)
    hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
          "HttpConnectionManager"
    router = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    return f"""admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
static_resources:
  listeners:
  - name: minimal
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: minimal
          route_config: {{virtual_hosts: [{{name: b, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: b, timeout: 0s}}}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": {router}}}}}]
  clusters:
  - name: b
    type: STATIC
    connect_timeout: 10s
    load_assignment: {{cluster_name: b, endpoints: [{{lb_endpoints: [{eps}]}}]}}
"""


class Envoy(Target):
    """Envoy --concurrency 1 on the bootstrap generated from the same Istio YAML as meshcore's
    (`endpoints`, `access_log` and `extra_yaml` as for `Meshcore`)."""

    kind = "envoy"

    def __init__(self, binary: str, endpoints: int = 1, access_log: bool = False,
                 extra_yaml: str = "", name: str = "envoy", label: str | None = None,
                 minimal: bool = False):
        super().__init__(name, label or "Envoy --concurrency 1")
        self.binary = binary
        self.minimal = minimal  # minimal_envoy_bootstrap instead of what Istio programs
        self.endpoints = endpoints
        self.access_log = access_log
        self.extra_yaml = extra_yaml
        self.admin_port = 0

    def _access_log_path(self, logdir: str) -> str:
        return os.path.join(logdir, f"{self.name}.access.log")

    def start(self, backend, cfgdir, logdir, cpus):
        if self.endpoints > len(backend.ports):
            raise RuntimeError(f"{self.name}: needs {self.endpoints} backend ports")
        self.port, self.admin_port = free_port(), free_port()
        ports = backend.ports[:self.endpoints]
        istio = _write(os.path.join(cfgdir, f"{self.name}.istio.yaml"),
                       service_entry_yaml(ports, self.extra_yaml))
        log = self._access_log_path(logdir) if self.access_log else None
        if log:
            os.makedirs(logdir, exist_ok=True)
        cfg = _write(os.path.join(cfgdir, f"{self.name}.yaml"),
                     minimal_envoy_bootstrap(self.port, self.admin_port, ports) if self.minimal
                     else envoy_bootstrap(self.port, self.admin_port, ports, self.extra_yaml, log))
        self.configs = {"istio": istio, "bootstrap": cfg}
        self.proc = Proc(self.name, [self.binary, "-c", cfg, "--concurrency", "1",
                                     "--disable-hot-restart", "--log-level", "warning"],
                         logdir, cpus=cpus)

    def _admin_ready(self):
        return http_get(self.admin_port, "/ready", host="127.0.0.1") == 200

    def stop(self):
        super().stop()
        if self.access_log and self.proc:  # the log is only there to be paid for; drop it
            try:
                os.unlink(self._access_log_path(os.path.dirname(self.proc.log_path)))
            except OSError:
                pass


class NginxProxy(Target):
    kind = "nginx"

    def __init__(self, binary: str):
        super().__init__("nginx", "nginx proxy, 1 worker, upstream keepalive")
        self.binary = binary

    def start(self, backend, cfgdir, logdir, cpus):
        self.port = free_port()
        prefix = os.path.join(cfgdir, "nginx-proxy")
        conf = _write(os.path.join(prefix, "nginx.conf"), _nginx_common(prefix) + f"""\
http {{
    access_log off;
{_nginx_temp(prefix)}    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    upstream bench_service {{
        server 127.0.0.1:{backend.port};
        keepalive 128;
        keepalive_requests 1000000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://bench_service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
        self.configs = {"config": conf}
        self.proc = Proc("nginx", [self.binary, "-p", prefix, "-c", conf, "-e",
                                   os.path.join(prefix, "error.log")], logdir, cpus=cpus)


class HAProxy(Target):
    kind = "haproxy"

    def __init__(self, binary: str):
        super().__init__("haproxy", "HAProxy nbthread 1, http-reuse always")
        self.binary = binary

    def start(self, backend, cfgdir, logdir, cpus):
        self.port = free_port()
        cfg = _write(os.path.join(cfgdir, "haproxy.cfg"), f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s

frontend bench
    bind 127.0.0.1:{self.port}
    default_backend bench_service

backend bench_service
    server s1 127.0.0.1:{backend.port}
""")
        self.configs = {"config": cfg}
        self.proc = Proc("haproxy", [self.binary, "-f", cfg, "-db"], logdir, cpus=cpus)
