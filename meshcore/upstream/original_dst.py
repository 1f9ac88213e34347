"""Resolving the host a request names, for clusters whose endpoints come from the request
(original destination, dynamic DNS): without blocking the event loop (trio runs the lookup in a
thread). A name that does not resolve gives no addresses (the caller answers 503 UH).
"""
from __future__ import annotations

import ipaddress
import socket

import trio

__all__ = ["is_ip", "resolve"]


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def resolve(host: str, port: int) -> list[str]:
    """The addresses of `host` (IPv4 and IPv6, in the resolver's order, no duplicates)."""
    if is_ip(host):
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
