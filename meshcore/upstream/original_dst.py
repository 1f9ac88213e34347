"""Per-request cluster state for clusters whose endpoints come from the request.

`request_cluster_state(state, authority, rng, segment, worker)` returns a ClusterState over the
endpoints meshcore.config.discovery derives from the request (original destination, dynamic DNS,
every-port ServiceEntries), sharing the cluster's shared-memory row, so its circuit-breaker limits
and stats stay the cluster's. The state lives for one request: its connections are not pooled (a
pooled connection would be keyed by endpoint index, which differs per request). A host name is
resolved without blocking the event loop; a name that does not resolve gives no endpoints (503 UH).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import socket

import trio

from meshcore.config.discovery import request_endpoints, request_target
from meshcore.config.policy import PER_REQUEST_DISCOVERY
from meshcore.upstream.cluster import ClusterState

__all__ = ["request_cluster_state"]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def _addresses(host: str, port: int) -> list[str]:
    if _is_ip(host):
        return [host]
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    out: list[str] = []
    for fam, _, _, _, sa in infos:
        if fam in (socket.AF_INET, socket.AF_INET6) and sa[0] not in out:
            out.append(sa[0])
    return out


async def request_cluster_state(state: ClusterState, authority, rng, segment, worker: int) -> ClusterState:
    policy = state.policy
    addresses = None
    if policy.discovery in PER_REQUEST_DISCOVERY:
        target = request_target(policy, authority)
        addresses = await _addresses(*target) if target is not None else []
    endpoints = request_endpoints(policy, authority, addresses)
    derived = dataclasses.replace(policy, endpoints=endpoints, outlier=None)
    return ClusterState(derived, rng, segment, worker, (state.slots[0], ()))
