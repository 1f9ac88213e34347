"""The original destination of a connection the kernel redirected (iptables REDIRECT, see
meshcore.sidecar.iptables): what the application asked to connect to before the nat table sent
it to the sidecar's 15001 (outbound) or 15006 (inbound).

The kernel keeps it in the connection's conntrack entry and answers it to
`getsockopt(fd, SOL_IP, SO_ORIGINAL_DST)` (IPv4, a `struct sockaddr_in`) or
`getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST)` (IPv6, a `struct sockaddr_in6`) on the accepted
socket, the call Envoy's original_dst listener filter makes. Both option numbers are 80.

`parse_sockaddr` is pure (bytes in, (ip, port) out); `original_dst` is the one syscall. A C loop
makes the same getsockopt on the accepted fd with a `struct sockaddr_storage` buffer.
"""
from __future__ import annotations

import errno
import socket
import struct
import sys

__all__ = ["SO_ORIGINAL_DST", "IP6T_SO_ORIGINAL_DST", "SOL_IP", "SOL_IPV6", "parse_sockaddr",
           "original_dst"]

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>
IP6T_SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv6/ip6_tables.h>
SOL_IP = socket.IPPROTO_IP  # 0
SOL_IPV6 = socket.IPPROTO_IPV6  # 41
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28
# errors meaning "this connection has no NAT entry": not redirected, or conntrack not in use
_NO_ENTRY = (errno.ENOENT, errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP)


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """(ip, port) of a `struct sockaddr_in` or `sockaddr_in6` as the kernel writes it: family in
    host byte order, port and address in network order. Raises ValueError on anything else."""
    if len(raw) < 2:
        raise ValueError(f"sockaddr too short ({len(raw)} bytes)")
    family = int.from_bytes(raw[:2], sys.byteorder)
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]
    raise ValueError(f"not an IPv4/IPv6 sockaddr (family {family}, {len(raw)} bytes)")


def _local(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return name[0], name[1]


def original_dst(sock) -> tuple[str, int] | None:
    """The destination the client connected to, for an accepted socket (a socket object or an fd).

    None when the connection was not redirected: no NAT entry, or the original destination is the
    socket's own local address (a client that addressed the proxy directly, explicit mode).
    IPv6 addresses come back compressed (`inet_ntop`), IPv4-mapped connections as IPv4.
    """
    if isinstance(sock, int):
        s = socket.socket(fileno=sock)
        try:
            return original_dst(s)
        finally:
            s.detach()
    try:
        if sock.family == socket.AF_INET6:
            try:
                raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
            except OSError as exc:
                if exc.errno not in _NO_ENTRY:
                    raise
                # an IPv4 client on a dual-stack socket: its NAT entry is IPv4
                raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
        else:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
    except OSError as exc:
        if exc.errno in _NO_ENTRY:
            return None
        raise
    ip, port = parse_sockaddr(raw)
    local_ip, local_port = _local(sock)
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    if local_ip.startswith("::ffff:") and "." in local_ip:
        local_ip = local_ip[7:]
    if (ip, port) == (local_ip, local_port):
        return None
    return ip, port
