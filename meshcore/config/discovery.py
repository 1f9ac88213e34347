"""Endpoints that depend on the request: original destination, dynamic DNS, every-port services.

A cluster compiled from `resolution: NONE` (or unset), `DYNAMIC_DNS`, `loadBalancer.simple:
PASSTHROUGH` or a ServiceEntry without ports has no fixed endpoint list. In sidecar mode Envoy
forwards to the connection's original destination; in explicit mode (a client that talks to
meshcore as its HTTP proxy) the original destination is the authority the request names: the
host of its Host header (or absolute-form target), on the port given there or, without one, the
service port the request was routed by (80 for a bare host).

In sidecar mode a captured connection carries its original destination (SO_ORIGINAL_DST):
`connection_endpoints` gives an original-destination cluster (resolution NONE, loadBalancer
PASSTHROUGH, Istio's PassthroughCluster) that address, and an every-port service its endpoints on
the original port, without looking at the request.

Pure functions; the I/O shell resolves a host name (never here) before it connects.
"""
from __future__ import annotations

from meshcore.config.policy import (ANY_PORT, DISCOVERY_ORIGINAL_DST, PER_REQUEST_DISCOVERY,
                                    ClusterPolicy, Endpoint)
from meshcore.routing.table import split_authority

__all__ = ["needs_request_target", "request_target", "request_endpoints", "connection_endpoints",
           "DEFAULT_PORT"]

DEFAULT_PORT = 80  # a Host without a port is routed as port 80 (meshcore.routing.table)


def needs_request_target(policy: ClusterPolicy) -> bool:
    """True when the cluster's endpoints come from the request (see module doc); the compiler
    stores it as ClusterPolicy.per_request_endpoints."""
    return policy.discovery in PER_REQUEST_DISCOVERY or policy.port == ANY_PORT


def request_target(policy: ClusterPolicy, authority: bytes | None) -> tuple[str, int] | None:
    """(host, port) the request names, for an original-destination or dynamic-DNS cluster; None
    when the request has no usable authority. IPv6 literals come back without brackets."""
    if not authority:
        return None
    host, port = split_authority(authority)
    if host.startswith(b"[") and host.endswith(b"]"):
        host = host[1:-1]
    if not host:
        return None
    if port is not None:
        number = int(port)
        if not 0 < number < 65536:
            return None
    else:
        number = policy.port if policy.port != ANY_PORT else DEFAULT_PORT
    return host.decode("ascii", "replace").lower(), number


def _key(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def request_endpoints(policy: ClusterPolicy, authority: bytes | None,
                      addresses: list[str] | None = None) -> tuple[Endpoint, ...]:
    """The endpoints for this request.

    Original destination / dynamic DNS: one endpoint per address of the request's host
    (`addresses`, resolved by the caller; None = the host is an IP literal, used as is).
    Every-port services: the cluster's endpoints on the request's port.
    """
    if policy.discovery in PER_REQUEST_DISCOVERY:
        target = request_target(policy, authority)
        if target is None:
            return ()
        host, port = target
        return tuple(Endpoint(a, port, 1, (), _key(a, port)) for a in (addresses if addresses is not None else [host]))
    if policy.port == ANY_PORT:
        _, p = split_authority(authority or b"")
        port = int(p) if p is not None and 0 < int(p) < 65536 else DEFAULT_PORT
        return tuple(Endpoint(e.address, port, e.weight, e.labels, _key(e.address, port), e.locality)
                     for e in policy.endpoints)
    return policy.endpoints


def connection_endpoints(policy: ClusterPolicy, orig_ip: str, orig_port: int) -> tuple[Endpoint, ...]:
    """Sidecar mode: the endpoints for a connection captured to `orig_ip:orig_port`.

    Original destination (DISCOVERY_ORIGINAL_DST): that address itself. Every-port services: the
    cluster's endpoints on `orig_port`. Dynamic DNS: () (its endpoints come from the request's
    host: `request_endpoints`). Anything else: the cluster's own endpoints."""
    if policy.discovery == DISCOVERY_ORIGINAL_DST:
        return (Endpoint(orig_ip, orig_port, 1, (), _key(orig_ip, orig_port)),)
    if policy.discovery in PER_REQUEST_DISCOVERY:
        return ()
    if policy.port == ANY_PORT:
        return tuple(Endpoint(e.address, orig_port, e.weight, e.labels, _key(e.address, orig_port),
                              e.locality) for e in policy.endpoints)
    return policy.endpoints
