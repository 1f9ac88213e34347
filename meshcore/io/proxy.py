"""The per-connection loop and the one orchestrator where the sans-IO cores meet the sockets.

Flow of one request (architecture.md "Request flow"): parse head -> route -> pick cluster and
endpoint -> check out or open an upstream connection -> send the re-serialised head and stream the
body -> parse the response head -> stream the response back with framing recomputed -> check the
connection back in -> access log. Per request there is no task spawn and no nursery; a cancel scope
is opened only when the route has a timeout.

Error handling: a malformed request gets its status hint and the connection closes; an upstream
failure before response headers becomes Envoy's local reply (UF/UC/UPE/UT); a failure after the
response started aborts the downstream connection, because a partial response must never look
complete.
"""
from __future__ import annotations

import math
import random
import socket
import time

import trio

from meshcore import local_reply as lr
from meshcore.errors import ProtocolError
from meshcore.io.sockets import connect, is_stale, recv, send_all
from meshcore.proto.wire import (BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE, DATA, DONE,
                                 MAX_REQUEST_HEAD, MAX_REQUEST_LINE, ChunkedReader, parse_request,
                                 parse_response, request_body_kind, response_body_kind)
from meshcore.routing.table import find_route, pick_destination
from meshcore.upstream.cluster import rebuild

HEADER_TIMEOUT = 10.0  # whole header section; trickling bytes does not extend it (hardening.md §3.5)
IDLE_TIMEOUT = 3600.0  # downstream keep-alive idle timeout (Envoy's 1 h default)
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
_RESPONSE_DROP = (b"server",)  # Envoy overwrites it (server_header_transformation OVERWRITE)

_monotonic = time.monotonic
_wall = time.time


class UpstreamFailure(Exception):
    """An upstream attempt failed before any response byte went downstream."""

    def __init__(self, reply: lr.LocalReply, retry_safe: bool = False):
        self.reply = reply
        self.retry_safe = retry_safe  # stale reused connection, zero response bytes: safe for idempotent


class DownstreamGone(Exception):
    """The client went away; nothing more can be sent to it."""


class UpstreamConn:
    __slots__ = ("sock", "ep", "requests", "local")

    def __init__(self, sock: socket.socket, ep: int):
        self.sock = sock
        self.ep = ep
        self.requests = 0
        try:
            host, port = sock.getsockname()[:2]
            self.local = f"{host}:{port}"
        except OSError:
            self.local = None


class RequestRecord:
    """What the access log needs about one finished request."""

    __slots__ = ("head", "start", "status", "flags", "details", "bytes_received", "bytes_sent",
                 "duration_ms", "upstream_service_time", "request_id", "upstream_host", "cluster",
                 "upstream_local", "downstream_local", "downstream_remote", "route_name")

    def __init__(self, head, start, downstream_local, downstream_remote):
        self.head = head
        self.start = start
        self.status = 0
        self.flags = "-"
        self.details = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.duration_ms = 0
        self.upstream_service_time = None
        self.request_id = None
        self.upstream_host = None
        self.cluster = None
        self.upstream_local = None
        self.downstream_local = downstream_local
        self.downstream_remote = downstream_remote
        self.route_name = None


def _new_request_id() -> bytes:
    """A lowercase UUIDv4, as Envoy's UUID request-id extension makes them."""
    h = "%032x" % ((random.getrandbits(128) & ~(0xF << 76) & ~(0x3 << 62)) | (0x4 << 76) | (0x2 << 62))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()


class WorkerContext:
    """Everything one worker process shares between its connections."""

    def __init__(self, snapshot, access_log=None, use_remote_address=False):
        self.rng = random.Random()
        self.snapshot = None
        self.clusters = {}
        self.access_log = access_log
        self.use_remote_address = use_remote_address
        self.draining = False
        self.connections = 0
        self.idle_conns = 0
        self.install(snapshot)

    def install(self, snapshot) -> None:
        """Swap in a new snapshot by reference; unchanged clusters keep their warm connections."""
        states, to_close = rebuild(self.clusters, snapshot.clusters, self.rng)
        self.snapshot = snapshot
        self.clusters = states
        for conn in to_close:
            conn.sock.close()

    def close_idle(self) -> None:
        for state in self.clusters.values():
            for conn in state.book.drain_all():
                conn.sock.close()

    def sweep_idle(self) -> None:
        now = _monotonic()
        for state in self.clusters.values():
            for conn in state.book.sweep(now, state.idle_timeout):
                conn.sock.close()


# === downstream connection loop ===

async def serve_connection(ctx: WorkerContext, sock: socket.socket) -> None:
    """Serve one client connection: keep-alive, in-order pipelining, strict parsing."""
    ctx.connections += 1
    try:
        local = _addr(sock.getsockname())
        remote = _addr(sock.getpeername())
    except OSError:
        local = remote = None
    data = b""
    try:
        with trio.CancelScope() as scope:
            while True:
                head = None
                if data:
                    head = parse_request(data, 0)
                if head is None:
                    scope.deadline = trio.current_time() + (HEADER_TIMEOUT if data else IDLE_TIMEOUT)
                    while head is None:
                        if ctx.draining and not data:
                            return
                        chunk = await recv(sock)
                        if not chunk:
                            return
                        data = data + chunk if data else chunk
                        # The parser rescans from the start; parse again only when the answer can
                        # have changed (a new line end, or a size limit crossed), so a client
                        # trickling bytes costs linear, not quadratic, work.
                        if b"\n" in chunk or len(data) > MAX_REQUEST_HEAD or (
                                len(data) > MAX_REQUEST_LINE and b"\n" not in data):
                            head = parse_request(data, 0)
                    scope.deadline = math.inf
                keep, data = await handle_request(ctx, sock, head, data, local, remote)
                if not keep:
                    return
        if scope.cancelled_caught and data:
            await _send_quietly(sock, lr.render(lr.downstream_protocol_error(408), close=True))
    except ProtocolError as exc:
        reply = lr.downstream_protocol_error(exc.status)
        await _send_quietly(sock, lr.render(reply, close=True))
    except (DownstreamGone, OSError):
        pass
    finally:
        ctx.connections -= 1
        sock.close()


async def _send_quietly(sock, payload: bytes) -> None:
    try:
        with trio.move_on_after(1.0):
            await send_all(sock, payload)
    except OSError:
        pass


def _addr(sa) -> str:
    host, port = sa[0], sa[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def handle_request(ctx: WorkerContext, dsock, head, data, local, remote):
    """Proxy one request whose head is parsed. Returns (keep_alive, bytes after this request)."""
    rec = RequestRecord(head, _wall(), local, remote)
    t0 = _monotonic()
    try:
        keep, data = await _proxy(ctx, dsock, head, data, rec, t0)
    finally:
        rec.duration_ms = int((_monotonic() - t0) * 1000)
        if ctx.access_log is not None:
            ctx.access_log.log(rec)
    return keep and not ctx.draining, data


async def _local(dsock, rec, reply: lr.LocalReply, close: bool, extra: bytes = b""):
    rec.status = reply.status
    rec.flags = reply.flag
    rec.details = reply.details
    rec.bytes_sent = len(reply.body)
    try:
        await send_all(dsock, lr.render(reply, close=close, extra=extra))
    except OSError as exc:
        raise DownstreamGone() from exc


async def _proxy(ctx, dsock, head, data, rec, t0):
    body_kind, body_len = request_body_kind(head)
    # A local reply sent before the body was read leaves unread bytes: close, never guess framing.
    close_on_local = body_kind != BODY_NONE or not head.keep_alive
    if head.version == 0:
        await _local(dsock, rec, lr.HTTP10_REJECTED, True)
        return False, b""
    if head.method == b"CONNECT":  # no CONNECT routes (Envoy answers 404 without upgrade config)
        await _local(dsock, rec, lr.NO_ROUTE, True)
        return False, b""
    snap = ctx.snapshot
    route = find_route(snap, head.host, head)
    if route is None:
        await _local(dsock, rec, lr.NO_ROUTE, close_on_local)
        return not close_on_local, data[head.end:]
    rec.route_name = route.name
    cluster_name = pick_destination(route, ctx.rng.getrandbits(32))
    rec.cluster = cluster_name
    state = ctx.clusters.get(cluster_name)
    if state is None or state.balancer is None:
        await _local(dsock, rec, lr.NO_HEALTHY_UPSTREAM, close_on_local)
        return not close_on_local, data[head.end:]

    request_id = head.get(b"x-request-id")
    upstream_head = _upstream_head(ctx, head, body_kind, body_len, route, rec, request_id)
    if head.expect_continue:
        try:
            await send_all(dsock, CONTINUE_100)
        except OSError as exc:
            raise DownstreamGone() from exc

    if route.timeout > 0:
        with trio.CancelScope() as scope:
            scope.deadline = trio.current_time() + route.timeout
            result = await _attempt(ctx, dsock, head, data, rec, t0, state, upstream_head, body_kind, body_len)
        if scope.cancelled_caught:
            if rec.status:  # response already started: abort the client connection
                return False, b""
            await _local(dsock, rec, lr.ROUTE_TIMEOUT, True)
            return False, b""
        return result
    return await _attempt(ctx, dsock, head, data, rec, t0, state, upstream_head, body_kind, body_len)


def _upstream_head(ctx, head, body_kind, body_len, route, rec, request_id) -> bytes:
    parts = [head.method, b" ", head.path, b" HTTP/1.1\r\nhost: ", head.host or b"", b"\r\n",
             head.forward_headers()]
    if request_id is None:
        request_id = _new_request_id()
        parts.append(b"x-request-id: " + request_id + b"\r\n")
    rec.request_id = request_id
    if head.get(b"x-forwarded-proto") is None:
        parts.append(b"x-forwarded-proto: http\r\n")
    remote = rec.downstream_remote
    if ctx.use_remote_address and remote:
        # Gateway-style behaviour (use_remote_address: true): append the peer address.
        peer = remote.rsplit(":", 1)[0].strip("[]").encode()
        xff = head.get(b"x-forwarded-for")
        parts.append(b"x-forwarded-for: " + (xff + b"," + peer if xff else peer) + b"\r\n")
    if route.timeout > 0:
        parts.append(b"x-envoy-expected-rq-timeout-ms: %d\r\n" % int(route.timeout * 1000))
    if body_kind == BODY_LENGTH:
        parts.append(b"content-length: %d\r\n" % body_len)
    elif body_kind == BODY_CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length == 0:
        parts.append(b"content-length: 0\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


async def _checkout(state, ep: int):
    """An idle pooled connection of endpoint `ep`, or None."""
    book = state.book
    while True:
        conn = book.take_idle(ep, _monotonic(), state.idle_timeout)
        for dead in book.pop_to_close():  # already uncounted by the book
            dead.sock.close()
        if conn is None:
            return None
        if is_stale(conn.sock):
            book.on_close(ep)
            conn.sock.close()
            continue
        return conn


async def _open(state, ep: int) -> UpstreamConn:
    endpoint = state.endpoints[ep]
    try:
        sock = await connect(endpoint.address, endpoint.port, state.policy.connect_timeout)
    except TimeoutError:
        raise UpstreamFailure(lr.CONNECT_TIMEOUT) from None
    except OSError:
        raise UpstreamFailure(lr.CONNECT_FAILURE) from None
    state.book.on_open(ep)
    return UpstreamConn(sock, ep)


def _release(ctx, state, conn: UpstreamConn, reusable: bool) -> None:
    policy = state.policy
    if (reusable and not ctx.draining and ctx.clusters.get(policy.name) is state
            and (policy.max_requests_per_connection == 0
                 or conn.requests < policy.max_requests_per_connection)
            and state.book.put_idle(conn.ep, conn, _monotonic())):
        return
    state.book.on_close(conn.ep)
    conn.sock.close()


async def _attempt(ctx, dsock, head, data, rec, t0, state, upstream_head, body_kind, body_len):
    """Send the request to one endpoint and relay its response. Returns (keep_alive, leftover)."""
    ep = state.balancer.pick(state.book)
    rec.upstream_host = state.endpoints[ep].key
    book = state.book
    book.rq_start(ep)
    exchange = _Exchange(dsock, head, data, rec, upstream_head, body_kind, body_len)
    try:
        try:
            conn = await _checkout(state, ep)
            rhead, rdata = await exchange.run(ctx, state, ep, conn)
        except UpstreamFailure as failure:
            if failure.retry_safe and head.method in IDEMPOTENT and body_kind == BODY_NONE:
                # The stale keep-alive race: the request provably got no answer on a reused
                # connection; replay it once on a fresh one (hardening.md §5 rule 2).
                try:
                    rhead, rdata = await exchange.run(ctx, state, ep, None)
                    failure = None
                except UpstreamFailure as again:
                    failure = again
            if failure is not None:
                # Unread request body bytes leave the client connection in an unknown state.
                keep = head.keep_alive and exchange.body_done
                await _local(dsock, rec, failure.reply, not keep)
                return keep, exchange.leftover
        conn = exchange.conn
        exchange.conn = None
        service_ms = int((_monotonic() - t0) * 1000)
        rec.upstream_service_time = service_ms
        try:
            reusable, complete = await _relay_response(dsock, conn, head, rhead, rdata, rec, service_ms)
        except BaseException:
            _release(ctx, state, conn, False)
            raise
        _release(ctx, state, conn, reusable)
        return complete and head.keep_alive, exchange.leftover
    finally:
        book.rq_end(ep)
        if exchange.conn is not None:  # cancelled or the client vanished mid-flight
            _release(ctx, state, exchange.conn, False)
            exchange.conn = None


class _Exchange:
    """One request/response-head exchange on one upstream connection (reused or new)."""

    __slots__ = ("dsock", "head", "data", "rec", "upstream_head", "body_kind", "body_len", "conn",
                 "leftover", "body_done")

    def __init__(self, dsock, head, data, rec, upstream_head, body_kind, body_len):
        self.dsock = dsock
        self.head = head
        self.data = data
        self.rec = rec
        self.upstream_head = upstream_head
        self.body_kind = body_kind
        self.body_len = body_len
        self.conn = None
        self.leftover = data[head.end:] if body_kind == BODY_NONE else b""
        self.body_done = body_kind == BODY_NONE

    async def run(self, ctx, state, ep, conn):
        """Returns the response head and the bytes read with it; leaves the connection in self.conn."""
        reused = conn is not None
        if conn is None:
            conn = await _open(state, ep)
        self.conn = conn
        self.rec.upstream_local = conn.local
        conn.requests += 1
        try:
            if not self.body_done or self.body_kind == BODY_NONE:
                self.leftover = await _send_request(self.dsock, conn, self.head, self.data, self.rec,
                                                    self.upstream_head, self.body_kind, self.body_len,
                                                    reused)
                self.body_done = True
            return await _read_response_head(conn, self.head, reused)
        except UpstreamFailure:
            self.conn = None
            _release(ctx, state, conn, False)
            raise


async def _send_request(dsock, conn, head, data, rec, upstream_head, body_kind, body_len, reused):
    """Send head and body upstream, reading the body from the client as it comes.

    Returns the bytes received from the client after this request (a pipelined next request).
    """
    usock = conn.sock
    pos = head.end
    try:
        if body_kind == BODY_NONE:
            await send_all(usock, upstream_head)
            return data[pos:]
        if body_kind == BODY_LENGTH:
            remaining = body_len
            have = min(len(data) - pos, remaining)
            await send_all(usock, upstream_head + data[pos:pos + have] if have else upstream_head)
            rec.bytes_received = have
            remaining -= have
            leftover = data[pos + have:]
            while remaining:
                chunk = await _recv_downstream(dsock)
                if len(chunk) > remaining:
                    leftover = chunk[remaining:]
                    chunk = chunk[:remaining]
                remaining -= len(chunk)
                rec.bytes_received += len(chunk)
                await send_all(usock, chunk)
            return leftover
        # chunked: decode strictly, re-frame canonically
        reader = ChunkedReader()
        await send_all(usock, upstream_head)
        buf = data
        while True:
            out = []
            while True:
                kind, a, b = reader.step(buf, pos, len(buf))
                if kind == DATA:
                    out.append(b"%x\r\n" % (b - a))
                    out.append(buf[a:b])
                    out.append(b"\r\n")
                    rec.bytes_received += b - a
                    pos = b
                elif kind == DONE:
                    out.append(b"0\r\n\r\n")
                    await send_all(usock, b"".join(out))
                    return buf[a:]
                else:
                    pos = a
                    break
            if out:
                await send_all(usock, b"".join(out))
            chunk = await _recv_downstream(dsock)
            buf = buf[pos:] + chunk
            pos = 0
    except OSError:
        # Upstream vanished while we were sending. If it was a reused connection and nothing came
        # back, the request may never have reached the application.
        raise UpstreamFailure(lr.CONNECTION_TERMINATION, retry_safe=reused) from None


async def _recv_downstream(dsock) -> bytes:
    try:
        chunk = await recv(dsock)
    except OSError as exc:
        raise DownstreamGone() from exc
    if not chunk:
        raise DownstreamGone()
    return chunk


async def _read_response_head(conn, head, reused):
    """Read until a final (non-1xx) response head. 1xx are swallowed, as Envoy does by default."""
    usock = conn.sock
    data = b""
    while True:
        try:
            chunk = await recv(usock)
        except OSError:
            chunk = b""
        if not chunk:
            raise UpstreamFailure(lr.CONNECTION_TERMINATION, retry_safe=reused and not data)
        data = data + chunk if data else chunk
        try:
            rhead = parse_response(data, 0)
            while rhead is not None and rhead.status < 200:
                if rhead.status == 101:  # never asked for: an unsolicited upgrade
                    raise ProtocolError("unsolicited 101", 502)
                data = data[rhead.end:]
                rhead = parse_response(data, 0) if data else None
        except ProtocolError:
            raise UpstreamFailure(lr.UPSTREAM_PROTOCOL_ERROR) from None
        if rhead is not None:
            return rhead, data


async def _relay_response(dsock, conn, req, rhead, data, rec, service_ms):
    """Stream the response downstream. Returns (upstream reusable, response complete)."""
    try:
        kind, length = response_body_kind(rhead, req.method == b"HEAD")
    except ProtocolError:
        await _local(dsock, rec, lr.UPSTREAM_PROTOCOL_ERROR, False)
        return False, True
    status = rhead.status
    rec.status = status
    rec.details = "via_upstream"
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, rhead.reason), rhead.forward_headers(_RESPONSE_DROP),
             b"server: envoy\r\nx-envoy-upstream-service-time: %d\r\n" % service_ms]
    if kind == BODY_LENGTH:
        parts.append(b"content-length: %d\r\n" % length)
    elif kind == BODY_CHUNKED or kind == BODY_CLOSE:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif rhead.content_length >= 0 and status >= 200 and status != 204:
        parts.append(b"content-length: %d\r\n" % rhead.content_length)  # HEAD / 304 keep theirs
    if not req.keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    pos = rhead.end
    usock = conn.sock
    try:
        if kind == BODY_NONE:
            await send_all(dsock, b"".join(parts))
            return rhead.keep_alive and len(data) == pos, True
        if kind == BODY_LENGTH:
            have = min(len(data) - pos, length)
            parts.append(data[pos:pos + have])
            await send_all(dsock, b"".join(parts))
            sent = have
            stray = len(data) > pos + have
            while sent < length:
                chunk = await _recv_upstream(usock)
                if not chunk:
                    rec.flags = "UC"
                    rec.bytes_sent = sent
                    return False, False
                if len(chunk) > length - sent:
                    stray = True
                    chunk = chunk[:length - sent]
                sent += len(chunk)
                await send_all(dsock, chunk)
            rec.bytes_sent = sent
            return rhead.keep_alive and not stray, True
        if kind == BODY_CLOSE:
            body = data[pos:]
            if body:
                parts.append(b"%x\r\n" % len(body) + body + b"\r\n")
            await send_all(dsock, b"".join(parts))
            sent = len(body)
            while True:
                chunk = await _recv_upstream(usock)
                if not chunk:
                    await send_all(dsock, b"0\r\n\r\n")
                    rec.bytes_sent = sent
                    return False, True
                sent += len(chunk)
                await send_all(dsock, b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        # chunked
        await send_all(dsock, b"".join(parts))
        reader = ChunkedReader()
        buf = data
        sent = 0
        while True:
            out = []
            while True:
                try:
                    step, a, b = reader.step(buf, pos, len(buf))
                except ProtocolError:
                    rec.flags = "UPE"
                    rec.bytes_sent = sent
                    if out:
                        await send_all(dsock, b"".join(out))
                    return False, False
                if step == DATA:
                    out.append(b"%x\r\n" % (b - a))
                    out.append(buf[a:b])
                    out.append(b"\r\n")
                    sent += b - a
                    pos = b
                elif step == DONE:
                    out.append(b"0\r\n\r\n")
                    await send_all(dsock, b"".join(out))
                    rec.bytes_sent = sent
                    return rhead.keep_alive and a == len(buf), True
                else:
                    pos = a
                    break
            if out:
                await send_all(dsock, b"".join(out))
            chunk = await _recv_upstream(usock)
            if not chunk:
                rec.flags = "UC"
                rec.bytes_sent = sent
                return False, False
            buf = buf[pos:] + chunk
            pos = 0
    except OSError as exc:
        # The client went away mid-response (downstream connection termination).
        rec.flags = "DC"
        raise DownstreamGone() from exc


async def _recv_upstream(usock) -> bytes:
    try:
        return await recv(usock)
    except OSError:
        return b""


__all__ = ["WorkerContext", "serve_connection"]
