"""A config mounted from a Kubernetes ConfigMap: the kubelet swaps the `..data` symlink and the
running proxy reloads (the supervisor's file watcher), whether --config names the directory or a
file in it."""
from __future__ import annotations

import json
import time

from configmap import write_configmap
from harness import Proxy
from meshcore.supervisor import _fingerprint

SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
"""


def test_fingerprint_sees_a_swap_that_keeps_names_sizes_and_mtimes(tmp_path):
    d = str(tmp_path / "cm")
    stamp = 1_700_000_000_000_000_000
    write_configmap(d, {"mesh.yaml": SE.format(name="aaa", port=18001)}, mtime_ns=stamp)
    before_dir = _fingerprint([d])
    before_file = _fingerprint([f"{d}/mesh.yaml"])
    # same size (same-length name and port), same mtime: only the inode tells
    write_configmap(d, {"mesh.yaml": SE.format(name="bbb", port=18002)}, mtime_ns=stamp)
    assert _fingerprint([f"{d}/mesh.yaml"]) != before_file
    assert _fingerprint([d]) != before_dir
    # and nothing changes while nothing is written
    assert _fingerprint([d]) == _fingerprint([d])


def wait_generation(proxy, generation, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.info()["generation"] >= generation:
            return
        time.sleep(0.1)
    raise AssertionError(f"no reload to generation {generation}: {proxy.stderr_text()}")


def hosts(proxy) -> set:
    dump = json.loads(proxy.admin_get("/config_dump")[1])
    return {c["service_host"] for c in dump["clusters"]}


def run_swaps(tmp_path, config_arg):
    d = str(tmp_path / "cm")
    write_configmap(d, {"mesh.yaml": SE.format(name="aaa", port=18001)})
    proxy = Proxy([config_arg(d)], workers=1)
    try:
        generation = proxy.info()["generation"]
        assert hosts(proxy) == {"aaa.example.com"}
        write_configmap(d, {"mesh.yaml": SE.format(name="bbb", port=18002)})
        wait_generation(proxy, generation + 1)
        assert hosts(proxy) == {"bbb.example.com"}
        # an invalid update is rejected and the running config stays
        write_configmap(d, {"mesh.yaml": "kind: [\n"})
        deadline = time.monotonic() + 10
        while "config rejected" not in proxy.stderr_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "config rejected" in proxy.stderr_text()
        assert hosts(proxy) == {"bbb.example.com"}
        write_configmap(d, {"mesh.yaml": SE.format(name="ccc", port=18003)})
        wait_generation(proxy, generation + 2)
        assert hosts(proxy) == {"ccc.example.com"}
    finally:
        proxy.stop()


def test_reload_on_a_configmap_swap_of_the_directory(tmp_path):
    run_swaps(tmp_path, lambda d: d)


def test_reload_on_a_configmap_swap_of_a_file_in_it(tmp_path):
    run_swaps(tmp_path, lambda d: f"{d}/mesh.yaml")
