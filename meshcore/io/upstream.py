"""One upstream attempt on one connection, and streaming its response back downstream.

`exchange()` turns every way an attempt can end into an `Outcome` from the shared classifier
(meshcore.policy.classify), so retries, outlier detection and stats see the same thing.
"""
from __future__ import annotations

import socket
import time

from meshcore import local_reply as lr
from meshcore.errors import ProtocolError
from meshcore.io.body import DownstreamGone
from meshcore.io.sockets import connect, is_stale, recv, recv_later, send_all, send_nowait
from meshcore.policy.classify import Kind, classify_failure, classify_response
from meshcore.proto.wire import (BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE, DATA, DONE,
                                 ChunkedReader, parse_response, response_body_kind)

_RESPONSE_DROP = (b"server",)  # Envoy overwrites it (server_header_transformation OVERWRITE)
_monotonic = time.monotonic

CONNECT_FAILED = classify_failure(Kind.CONNECT_FAILURE, False)
CONNECT_TIMED_OUT = classify_failure(Kind.CONNECT_TIMEOUT, False)
PROTOCOL_ERROR = classify_failure(Kind.PROTOCOL_ERROR)
PER_TRY_TIMEOUT = classify_failure(Kind.PER_TRY_TIMEOUT)
OVERFLOW = classify_failure(Kind.OVERFLOW, False)


# A connection idle for less than this is reused without the stale-peek syscall: an upstream's
# keep-alive timeout (seconds) cannot have closed it yet, and stray bytes that arrived with the
# previous response were already caught by the framing check.
STALE_CHECK_AFTER = 0.1


class UpstreamConn:
    __slots__ = ("sock", "ep", "requests", "local", "idle_since")

    def __init__(self, sock: socket.socket, ep: int):
        self.sock = sock
        self.ep = ep
        self.requests = 0
        self.idle_since = 0.0
        try:
            host, port = sock.getsockname()[:2]
            self.local = f"{host}:{port}"
        except OSError:
            self.local = None


def checkout(state, ep: int):
    """An idle pooled connection of endpoint `ep` that is still usable, or None."""
    book = state.book
    while True:
        now = _monotonic()
        conn = book.take_idle(ep, now, state.idle_timeout)
        for dead in book.pop_to_close():  # expired; already uncounted by the book
            dead.sock.close()
            state.on_close(dead.ep)
        if conn is None:
            return None
        if now - conn.idle_since < STALE_CHECK_AFTER or not is_stale(conn.sock):
            return conn
        close(state, conn)


def close(state, conn: UpstreamConn) -> None:
    """Close a connection the caller holds, and give back its unit of the connection limit."""
    state.book.on_close(conn.ep)
    conn.sock.close()
    state.on_close(conn.ep)


def release(state, conn: UpstreamConn, reusable: bool, current: bool) -> None:
    """Return a connection to the pool when it can carry another request; close it otherwise."""
    policy = state.policy
    if (reusable and current
            and (policy.max_requests_per_connection == 0
                 or conn.requests < policy.max_requests_per_connection)
            and not state.should_close_idle()):
        now = _monotonic()
        if state.book.put_idle(conn.ep, conn, now):
            conn.idle_since = now
            state.on_idle(conn.ep)
            return
    close(state, conn)


class Attempt:
    """State of one attempt: the connection in use and what the upstream sent so far."""

    __slots__ = ("conn", "reused", "rhead", "rdata", "outcome")

    def __init__(self):
        self.conn = None
        self.reused = False
        self.rhead = None
        self.rdata = b""
        self.outcome = None


async def exchange(state, ep: int, att: Attempt, body, head_bytes: bytes, replay: bool,
                   fresh: bool) -> None:
    """Connect (or reuse), send the request, read the final response head into `att`.

    Sets `att.outcome`; on failure the connection is closed and `att.conn` is None. Raises only
    DownstreamGone (client vanished) and ProtocolError (malformed client body).
    """
    conn = None if fresh else checkout(state, ep)
    att.reused = conn is not None
    if conn is None and not state.try_connection():
        # Over maxConnections: wait as a pending request (or overflow at once).
        got_one = await state.wait_pending(ep, checkout)
        if got_one is None:
            att.outcome = OVERFLOW
            return
        if got_one is not True:
            conn = got_one
            att.reused = True
    if conn is None:
        endpoint = state.endpoints[ep]
        try:
            sock = await connect(endpoint.address, endpoint.port, state.policy.connect_timeout)
        except TimeoutError:
            state.on_close(ep)
            att.outcome = CONNECT_TIMED_OUT
            return
        except OSError:
            state.on_close(ep)
            att.outcome = CONNECT_FAILED
            return
        except BaseException:  # cancelled while connecting
            state.on_close(ep)
            raise
        state.book.on_open(ep)
        state.on_open(ep)
        conn = UpstreamConn(sock, ep)
    att.conn = conn
    conn.requests += 1
    usock = conn.sock
    got = False
    try:
        # A ProtocolError here is the client's malformed body: it propagates (400 downstream).
        await body.send(usock, head_bytes, replay)
    except OSError:
        pass  # the upstream went away while we were sending
    else:
        try:
            data = b""
            chunk = await recv_later(usock)
            while True:
                if not chunk:
                    break
                got = True
                data = data + chunk if data else chunk
                rhead = parse_response(data, 0)
                while rhead is not None and rhead.status < 200:
                    if rhead.status == 101:  # never asked for: an unsolicited upgrade
                        raise ProtocolError("unsolicited 101", 502)
                    data = data[rhead.end:]  # 1xx are swallowed, as Envoy does by default
                    rhead = parse_response(data, 0) if data else None
                if rhead is not None:
                    att.rhead, att.rdata = rhead, data
                    att.outcome = classify_response(rhead.status)
                    return
                chunk = await recv(usock)
        except ProtocolError:
            att.outcome = PROTOCOL_ERROR
        except OSError:
            pass
    if att.outcome is None:  # EOF or reset before a complete response head
        att.outcome = classify_failure(Kind.RESET_BEFORE_RESPONSE, True, att.reused, got)
    att.conn = None
    close(state, conn)


async def relay_response(dsock, conn: UpstreamConn, req, rhead, data: bytes, rec,
                         service_ms: int, extra: bytes = b"", edits=None):
    """Stream the response downstream. Returns (upstream reusable, response complete).

    Error handling: an upstream failure mid-body aborts (the caller closes the client
    connection, so a truncated response never looks complete); a client failure raises
    DownstreamGone.
    """
    try:
        kind, length = response_body_kind(rhead, req.method == b"HEAD")
    except ProtocolError:
        rec.status, rec.flags, rec.details = 502, "UPE", lr.UPSTREAM_PROTOCOL_ERROR.details
        try:
            await send_all(dsock, lr.render(lr.UPSTREAM_PROTOCOL_ERROR))
        except OSError as exc:
            raise DownstreamGone() from exc
        return False, True
    status = rhead.status
    rec.status = status
    rec.details = "via_upstream"
    headers = rhead.forward_headers(_RESPONSE_DROP)
    if edits is not None:  # the route's response header edits and CORS (meshcore.routing.actions)
        headers = edits.apply(headers)
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, rhead.reason), headers,
             b"server: envoy\r\nx-envoy-upstream-service-time: %d\r\n" % service_ms, extra]
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
            out = b"".join(parts)
            n = send_nowait(dsock, out)
            if n != len(out):
                await send_all(dsock, memoryview(out)[n:])
            sent = have
            stray = len(data) > pos + have
            while sent < length:
                chunk = await _recv_upstream(usock)
                if not chunk:
                    rec.flags, rec.bytes_sent = "UC", sent
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
        # chunked: decode strictly, re-frame canonically
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
                    rec.flags, rec.bytes_sent = "UPE", sent
                    if out:
                        await send_all(dsock, b"".join(out))
                    return False, False
                if step == DATA:
                    out.append(b"%x\r\n" % (b - a) + buf[a:b] + b"\r\n")
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
                rec.flags, rec.bytes_sent = "UC", sent
                return False, False
            buf = buf[pos:] + chunk
            pos = 0
    except OSError as exc:
        rec.flags = "DC"  # the client went away mid-response
        raise DownstreamGone() from exc


async def _recv_upstream(usock) -> bytes:
    try:
        return await recv(usock)
    except OSError:
        return b""
