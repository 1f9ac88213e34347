"""The proxy as the demo runs it: `python -m meshcore run` in a child process, reached over HTTP only.

The walkthroughs talk to it as the article's client pod talks to its sidecar: requests on the
listen port, and the admin port's `/ready`, `/stats` and `/server_info`. Nothing here imports the
proxy's internals, so the walkthroughs keep working whatever the data path inside looks like.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

USER_AGENT = "curl/8 (meshcore demo walkthrough)"


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict          # lowercase name -> value (last one wins)
    elapsed: float

    @property
    def pod(self) -> str:
        return self.headers.get("x-pod", "")

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace").strip()


def http_get(address, path: str, host: str | None = None, headers: dict | None = None,
             conn: http.client.HTTPConnection | None = None, timeout: float = 30.0) -> Reply:
    """GET as curl sends it: a new connection unless `conn` is given (then kept alive)."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    hdrs = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    if host is not None:
        hdrs["Host"] = host
    hdrs.update(headers or {})
    started = time.monotonic()
    try:
        conn.request("GET", path, headers=hdrs)
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, body, {k.lower(): v for k, v in resp.getheaders()},
                     time.monotonic() - started)
    finally:
        if own:
            conn.close()


def parse_stats(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        name, sep, value = line.rpartition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


class Sidecar:
    """`meshcore run` on the scenario's config; output lines go to `pump` as source "sidecar"."""

    def __init__(self, config: str, listen, admin, workers: int, pump, access_log: bool = True):
        self.config = config
        self.listen = listen
        self.admin = admin
        self.workers = workers
        self.pump = pump
        self.access_log = access_log
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "meshcore", "run", "--config", self.config,
               "--listen", f"{self.listen[0]}:{self.listen[1]}",
               "--admin", f"{self.admin[0]}:{self.admin[1]}", "--workers", str(self.workers),
               "--drain-grace", "1",
               # Istio's fixed 0.0.0.0:15090 is for a real sidecar; the demo's admin port serves
               # /stats/prometheus, and a taken 15090 must not stop the demo
               "--prometheus", "off"]
        return cmd + ([] if self.access_log else ["--no-access-log"])

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, env=env)
        self.pump.add(self.proc.stdout, "sidecar")
        self.pump.add(self.proc.stderr, "sidecar")

    def wait_ready(self, timeout: float = 60.0) -> str | None:
        """None once /ready answers 200, else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"the proxy exited with code {self.proc.returncode}"
            try:
                if self.admin_get("/ready").status == 200:
                    return None
            except OSError:
                pass
            time.sleep(0.05)
        return f"the proxy was not ready after {timeout:g} s"

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    # --- over HTTP

    def get(self, path: str, host: str, headers: dict | None = None, conn=None) -> Reply:
        return http_get(self.listen, path, host, headers, conn)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.listen[0], self.listen[1], timeout=30)

    def admin_get(self, path: str) -> Reply:
        return http_get(self.admin, path, timeout=5)

    def stats(self) -> dict[str, int]:
        return parse_stats(self.admin_get("/stats").text)

    def workers_running(self) -> int:
        info = json.loads(self.admin_get("/server_info").body)
        return len(info.get("workers") or []) or self.workers
