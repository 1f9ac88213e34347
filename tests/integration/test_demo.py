"""`python -m meshcore demo` end to end: every walkthrough, the port checks, the pods' restarts and
the streamed logs. Every port is chosen by the test (free_port) or by the kernel (--pod-port-base 0)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from harness import REPO, free_port

from meshcore.demo.scenarios import SCENARIOS

DEMO = [sys.executable, "-m", "meshcore", "demo"]


def _addresses():
    return ["--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_walkthrough_matches_the_article(scenario):
    proc = subprocess.run(DEMO + [scenario, "--walkthrough", "--pod-port-base", "0", *_addresses()],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert "DIFFERS" not in out
    m = re.search(rf"^{re.escape(scenario)}: (\d+) of (\d+) steps match the article; meshcore matches",
                  out, re.M)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 1, out
    for part in SCENARIOS[scenario].parts:
        assert f"== {part} ({SCENARIOS[scenario].hosts[part]})" in out


def test_demo_without_a_scenario_lists_them():
    proc = subprocess.run(DEMO, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in SCENARIOS:
        assert re.search(rf"^  {re.escape(name)} +\S", proc.stdout, re.M), proc.stdout


def test_demo_refuses_a_taken_proxy_port_in_one_line():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        admin = free_port()
        proc = subprocess.run(DEMO + ["retry", "--listen", f"127.0.0.1:{port}", "--admin",
                                      f"127.0.0.1:{admin}", "--pod-port-base", "0"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == (f"meshcore demo: cannot listen on 127.0.0.1:{port} (proxy): "
                           "address already in use\n")
    assert proc.stdout == ""  # nothing was started


def test_demo_refuses_a_taken_pod_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        # retry-backend-a listens on base + 11
        proc = subprocess.run(DEMO + ["retry", "--pod-port-base", str(port - 11), *_addresses()],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout
    line, = proc.stderr.splitlines()
    assert line.startswith("meshcore demo: cannot listen on ")
    assert f"127.0.0.1:{port} (pod retry-backend-a)" in line and line.endswith("address already in use")


class Demo:
    """`demo SCENARIO` in the background, its output in a file."""

    def __init__(self, tmp_path, scenario):
        self.listen, self.admin = free_port(), free_port()
        self.log_path = tmp_path / "demo.out"
        self.out = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            DEMO + [scenario, "--pod-port-base", "0", "--listen", f"127.0.0.1:{self.listen}",
                    "--admin", f"127.0.0.1:{self.admin}"],
            cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.wait_for("ready. The article's commands", timeout=90)
        self.pod_ports = {m.group(1): int(m.group(2)) for m in re.finditer(
            r"^  (\S+)\s+v\d\s+(\d+)\s+\w+\s+\d+$", self.text(), re.M)}

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern, timeout=30.0, count=1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if len(re.findall(pattern, text, re.M)) >= count:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} x{count} not in the demo's output:\n{self.text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def _get(port, path, host=None, timeout=30):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _refused(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_demo_streams_pod_logs_and_restarts_a_crashed_pod_again_and_again(tmp_path):
    demo = Demo(tmp_path, "retry")
    try:
        assert set(demo.pod_ports) == {"retry-backend-a", "retry-backend-b", "retry-backend-c"}
        assert _get(demo.listen, "/?failRate=0&mode=busy", "retry-service") == (200, "{}")
        # kubectl logs -f --prefix: the pod's name and version, then the article's access-log line
        demo.wait_for(r'^\[retry-backend-[abc] v1\] 127\.0\.0\.1 - - \[[^\]]+\] '
                      r'"GET /\?failRate=0&mode=busy HTTP/1\.1" 200 2 "" "Python-urllib/[\d.]+"$')
        port = demo.pod_ports["retry-backend-b"]
        for restarts in (1, 2, 3):
            # the article's crash mode, straight at one pod: it hangs, then its process exits
            with pytest.raises(OSError):
                _get(port, "/?failRate=100&mode=crash", timeout=10)
            demo.wait_for(rf"^\[retry-backend-b v1\] \(kubelet\) container exited with code 1; "
                          rf"restarting.*; restarts: {restarts}$")
            demo.wait_for(r"^\[retry-backend-b v1\] \[[^\]]+\] ENGINE Serving on ", count=restarts + 1)
            assert _get(port, "/") == (200, "{}")  # the same port serves again
        # through the proxy the article's crash-mode call still answers {}
        assert _get(demo.listen, "/?failRate=50&mode=crash", "retry-service") == (200, "{}")
    finally:
        rc = demo.stop()
    assert rc == 0, demo.text()
    assert demo.text().rstrip().endswith("meshcore demo: stopping the proxy and the pods")
    assert all(_refused(p) for p in demo.pod_ports.values())
    assert _refused(demo.listen) and _refused(demo.admin)


def test_mirror_demo_starts_the_sniffer_pod(tmp_path):
    demo = Demo(tmp_path, "mirror")
    try:
        assert "sniffer" in demo.pod_ports
        assert _get(demo.listen, "/?failRate=0&mode=busy", "retry-service") == (200, "{}")
        demo.wait_for(r"^\[sniffer v1\] [\d:.]+ IP 127\.0\.0\.1\.\d+ > sniffer\.\d+: length \d+: "
                      r"HTTP: GET /\?failRate=0&mode=busy HTTP/1\.1 \(Host: retry-service-shadow\)$")
    finally:
        assert demo.stop() == 0
