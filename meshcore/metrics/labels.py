"""Istio metric label values: the proxy's own identity (source side) and the bounded table of
destination label sets (T1: no I/O; `source_identity` reads only the mapping it is given).

Rules of this module:

* Label names and order are Istio's (semantics.md §11.2); a value that is not known is the string
  "unknown", as Istio writes it.
* Source (reporter "source": meshcore is the client-side sidecar): `--workload-name`,
  `--namespace`, `--app`, `--version` flags win; else the environment a Kubernetes pod with an
  Istio sidecar has: ISTIO_META_WORKLOAD_NAME, POD_NAMESPACE, and the pod labels in
  ISTIO_METAJSON_LABELS (`app`/`version`, or `app.kubernetes.io/name`/`app.kubernetes.io/version`);
  the workload name falls back to POD_NAME without its ReplicaSet and pod suffixes.
* Destination labels come from config only, as istiod derives them for an endpoint
  (pilot serviceentry conversion): the service host from the cluster; workload name from the
  endpoint label `service.istio.io/workload-name` (WorkloadEntry objects are named there too),
  else "unknown" as Istio reports an inline ServiceEntry endpoint; app/version from the `app` /
  `version` labels (or their app.kubernetes.io forms); canonical service and revision from
  `service.istio.io/canonical-name` / `-revision`, else app / version, else the workload name /
  "latest" (Istio's labels.CanonicalService). Service name and namespace come from a Kubernetes
  FQDN `<name>.<namespace>.svc.<domain>`; any other host is its own name, namespace "unknown".
  The destination workload namespace comes from the label `service.istio.io/workload-namespace`
  when present, else the service namespace.
* `DestinationRegistry` interns destination label tuples into small ids, append-only for the
  supervisor's life (an id never changes meaning, so a counter never changes labels); id 0 is the
  all-"unknown" destination. At `MAX_DESTINATIONS` further tuples share id 0 and are counted in
  `overflowed`: the label space stays bounded whatever the config churn.
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple

__all__ = [
    "SourceIdentity", "source_identity", "Destination", "UNKNOWN_DESTINATION",
    "destination_for_cluster", "destination_for_endpoint", "DestinationRegistry",
    "MAX_DESTINATIONS", "service_name_namespace",
]

UNKNOWN = "unknown"
MAX_DESTINATIONS = 4096


class SourceIdentity(NamedTuple):
    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = "latest"


# Deployment pods are named <deployment>-<replicaset hash>-<5 chars>; StatefulSet pods
# <name>-<ordinal>. Istio's workload name for a Deployment pod is the Deployment's.
_POD_SUFFIX = re.compile(r"-[a-z0-9]{6,10}-[a-z0-9]{5}$")


def workload_from_pod_name(pod: str) -> str:
    return _POD_SUFFIX.sub("", pod) if pod else UNKNOWN


def source_identity(workload: str | None = None, namespace: str | None = None,
                    app: str | None = None, version: str | None = None,
                    environ=None) -> SourceIdentity:
    """The proxy's own labels: flags (non-empty arguments) over the pod environment `environ`."""
    env = environ or {}
    labels: dict = {}
    raw = env.get("ISTIO_METAJSON_LABELS")
    if raw:
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict):
                labels = {str(k): str(v) for k, v in parsed.items()}
        except ValueError:
            labels = {}
    wl = (workload or env.get("ISTIO_META_WORKLOAD_NAME")
          or workload_from_pod_name(env.get("POD_NAME", "")) or UNKNOWN)
    ns = namespace or env.get("POD_NAMESPACE") or UNKNOWN
    ap = app or labels.get("app") or labels.get("app.kubernetes.io/name") or UNKNOWN
    ver = version or labels.get("version") or labels.get("app.kubernetes.io/version") or UNKNOWN
    cs = labels.get("service.istio.io/canonical-name") or (ap if ap != UNKNOWN else wl)
    cr = labels.get("service.istio.io/canonical-revision") or (ver if ver != UNKNOWN else "latest")
    return SourceIdentity(wl, ns, ap, ver, cs, cr)


class Destination(NamedTuple):
    service: str = UNKNOWN            # destination_service (FQDN)
    service_name: str = UNKNOWN
    service_namespace: str = UNKNOWN
    workload: str = UNKNOWN
    workload_namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN


UNKNOWN_DESTINATION = Destination()


def service_name_namespace(host: str) -> tuple[str, str]:
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc" and parts[0] and parts[1]:
        return parts[0], parts[1]
    return host or UNKNOWN, UNKNOWN


def destination_for_cluster(policy) -> Destination:
    """Labels of a request routed to `policy` (a ClusterPolicy) that reached no endpoint."""
    name, ns = service_name_namespace(policy.service_host)
    return Destination(policy.service_host or UNKNOWN, name, ns)


def destination_for_endpoint(policy, endpoint) -> Destination:
    """Labels of a request sent to `endpoint` (its `labels`: sorted (key, value) pairs)."""
    labels = dict(endpoint.labels)
    name, ns = service_name_namespace(policy.service_host)
    workload = labels.get("service.istio.io/workload-name") or UNKNOWN
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or UNKNOWN
    version = labels.get("version") or labels.get("app.kubernetes.io/version") or UNKNOWN
    canonical = (labels.get("service.istio.io/canonical-name")
                 or labels.get("app.kubernetes.io/name") or labels.get("app") or workload)
    revision = (labels.get("service.istio.io/canonical-revision")
                or labels.get("app.kubernetes.io/version") or labels.get("version") or "latest")
    wns = labels.get("service.istio.io/workload-namespace") or ns
    return Destination(policy.service_host or UNKNOWN, name, ns, workload, wns, app, version,
                       canonical, revision)


class DestinationRegistry:
    """Destination label tuple <-> small id; append-only (see the module rules)."""

    def __init__(self, capacity: int = MAX_DESTINATIONS):
        self.capacity = capacity
        self.by_id: list[Destination] = [UNKNOWN_DESTINATION]
        self.ids: dict[Destination, int] = {UNKNOWN_DESTINATION: 0}
        self.overflowed = 0

    def intern(self, dest: Destination) -> int:
        i = self.ids.get(dest)
        if i is None:
            if len(self.by_id) >= self.capacity:
                self.overflowed += 1
                return 0
            i = len(self.by_id)
            self.by_id.append(dest)
            self.ids[dest] = i
        return i

    def get(self, dest_id: int) -> Destination:
        if 0 <= dest_id < len(self.by_id):
            return self.by_id[dest_id]
        return UNKNOWN_DESTINATION
