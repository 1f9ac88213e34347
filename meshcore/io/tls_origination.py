"""Upstream TLS origination (DestinationRule `tls`: SIMPLE, MUTUAL) for the C event loop.

The loop speaks plaintext on raw sockets. For a cluster with a TLS policy, each endpoint gets a
relay in its worker: a listening socket on 127.0.0.1 (ephemeral port) that the loop's cluster
handle connects to instead of the endpoint. Every connection the loop opens there is paired with
one TLS connection to the endpoint (SNI, CA, subjectAltNames, client certificate as
meshcore.config.tls.ClientTlsPolicy describes), and bytes are relayed both ways by trio tasks.
The loop keeps doing everything else (pooling, keep-alive, breakers, retries, stats): a pooled
plaintext connection to the relay is a pooled TLS connection to the endpoint.

Differences from Envoy, written down: the SNI is fixed per cluster (`sni`, else the service's
host name), where Envoy's auto SNI follows each request's authority; a failed TCP connect or
handshake reaches the loop as a reset of the connection it already opened (flag UC), not as a
connect failure (UF).
"""
from __future__ import annotations

import socket
import sys

import trio

RELAY_CHUNK = 65536
MAX_RELAYS = 512  # relays kept per worker; the oldest unused one is closed beyond this


class Relay:
    """One endpoint reached over TLS: a local listener and its accept loop."""

    def __init__(self, policy, host: str, port: int, server_name: str, connect_timeout: float):
        self.policy = policy
        self.host, self.port = host, port
        self.server_name = server_name
        self.connect_timeout = connect_timeout or 10.0
        self.context = policy.ssl_context()  # reads the certificate files once
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.local_port = self.sock.getsockname()[1]
        self.cancel = trio.CancelScope()
        self.failures = 0  # handshakes or connects that failed (their local side was reset)

    async def serve(self) -> None:
        with self.cancel:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
            async with trio.open_nursery() as nursery:
                while True:
                    local = await listener.accept()
                    nursery.start_soon(self.relay, local)

    def close(self) -> None:
        self.cancel.cancel()  # connections already relayed keep going until either side ends
        try:
            self.sock.close()
        except OSError:
            pass

    async def open_tls(self) -> trio.SSLStream:
        with trio.fail_after(self.connect_timeout):
            tcp = await trio.open_tcp_stream(self.host, self.port)
            try:
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = trio.SSLStream(tcp, self.context, server_hostname=self.server_name)
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
        if not self.policy.peer_allowed(tls.getpeercert() or {}):
            await trio.aclose_forcefully(tls)
            raise OSError(f"{self.host}:{self.port}: no subjectAltName of the server certificate "
                          f"is one of {list(self.policy.subject_alt_names)}")
        return tls

    async def relay(self, local: trio.SocketStream) -> None:
        try:
            upstream = await self.open_tls()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.failures += 1
            if self.failures <= 5:  # the first few say why; the stats say how many
                print(f"meshcore: TLS to {self.host}:{self.port} (SNI {self.server_name}) failed: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr)
            # a reset, not a FIN: the loop must not read this as a clean, empty answer
            local.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
            await trio.aclose_forcefully(local)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, local, upstream, nursery.cancel_scope)
            nursery.start_soon(_pump, upstream, local, nursery.cancel_scope)
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(local)


async def _pump(src, dst, scope: trio.CancelScope) -> None:
    """Copy until either side ends; then end both (TLS has no half-close worth keeping here:
    an HTTP/1.1 connection is done when either side is)."""
    try:
        while True:
            data = await src.receive_some(RELAY_CHUNK)
            if not data:
                break
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        scope.cancel()


class TlsOrigination:
    """A worker's relays, by (policy, endpoint, SNI). Created while a config is installed (before
    trio runs at start-up): their accept loops start once `start(spawn)` is called."""

    def __init__(self):
        self.relays: dict[tuple, Relay] = {}
        self.spawn = None
        self.waiting: list[Relay] = []

    def address(self, policy, host: str, port: int, service_host: str,
                connect_timeout: float) -> tuple[str, int]:
        """Where the loop connects to reach `host:port` over TLS as `policy` says."""
        server_name = policy.server_name(service_host)
        key = (policy, host, port, server_name)
        relay = self.relays.pop(key, None)
        if relay is None:
            relay = Relay(policy, host, port, server_name, connect_timeout)
            if len(self.relays) >= MAX_RELAYS:
                self.relays.pop(next(iter(self.relays))).close()
            if self.spawn is None:
                self.waiting.append(relay)
            else:
                self.spawn(relay.serve)
        self.relays[key] = relay  # most recently used last
        return "127.0.0.1", relay.local_port

    def start(self, spawn) -> None:
        self.spawn = spawn
        for relay in self.waiting:
            spawn(relay.serve)
        self.waiting.clear()

    def close(self) -> None:
        for relay in self.relays.values():
            relay.close()
        self.relays.clear()
