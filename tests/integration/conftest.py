import os

import pytest

from harness import Pods, Proxy, free_port, write_config

os.environ.setdefault("PYTHONUNBUFFERED", "1")


def mesh_yaml(ports: dict, dead_port: int) -> str:
    """The test mesh: the seed's 6 myweb pods (v1/v2), an 80/20 split, one echo pod, failures."""
    web = "\n".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {ports[n]}}}, labels: {{version: {n[6:8]}}}}}"
        for n in ("myweb-v1-a", "myweb-v1-b", "myweb-v1-c", "myweb-v2-a", "myweb-v2-b", "myweb-v2-c"))
    return f"""
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: myweb}}
spec:
  hosts: [myweb-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{web}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: split}}
spec:
  hosts: [split-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{web}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: istio-lb}}
spec:
  host: myweb-service
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
    trafficPolicy:
      loadBalancer: {{simple: RANDOM}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: split}}
spec:
  host: split-service
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: istio-lb}}
spec:
  hosts: [myweb-service]
  http:
  - name: canary-header
    match:
    - headers: {{x-canary: {{exact: "yes"}}}}
    - uri: {{prefix: /v2only}}
    route:
    - destination: {{host: myweb-service, subset: v2}}
  - match:
    - uri: {{regex: "/re+x"}}
      method: {{exact: POST}}
    route:
    - destination: {{host: myweb-service, subset: v2}}
  - match:
    - queryParams: {{pick: {{exact: "v2"}}}}
    route:
    - destination: {{host: myweb-service, subset: v2}}
  - match:
    - uri: {{exact: /nowhere}}
    route:
    - destination: {{host: nowhere-service}}
  - match:
    - uri: {{prefix: /}}
      withoutHeaders: {{x-block: {{}}}}
    route:
    - destination: {{host: myweb-service, subset: v1}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: split}}
spec:
  hosts: [split-service]
  http:
  - route:
    - destination: {{host: split-service, subset: v1}}
      weight: 80
    - destination: {{host: split-service, subset: v2}}
      weight: 20
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: echo}}
spec:
  hosts: [echo-service]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {ports["echo"]}}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: dead}}
spec:
  hosts: [dead-service]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {dead_port}}}}}
"""


POD_TEXT = {"myweb-v1-a": "Version 1", "myweb-v1-b": "Version 1", "myweb-v1-c": "Version 1",
            "myweb-v2-a": "Version 2", "myweb-v2-b": "Version 2", "myweb-v2-c": "Version 2",
            "echo": "echo"}


@pytest.fixture(scope="session")
def pods():
    specs = [(name, free_port(), text) for name, text in POD_TEXT.items()]
    p = Pods(specs)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def mesh_ports(pods):
    ports = {n: pods.port(n) for n in POD_TEXT}
    ports["dead"] = free_port()  # nothing listens there: connection refused
    return ports


@pytest.fixture(scope="session")
def mesh_dir(tmp_path_factory, mesh_ports):
    d = tmp_path_factory.mktemp("mesh")
    write_config(str(d), mesh_yaml(mesh_ports, mesh_ports["dead"]))
    return str(d)


@pytest.fixture(scope="session")
def proxy(mesh_dir, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("log") / "access.log")
    px = Proxy([mesh_dir], workers=2, log_path=log_path)
    yield px
    px.stop()
