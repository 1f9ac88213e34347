"""Fire-and-forget request copies (Envoy shadowing, semantics.md §7), one `Mirror` per worker.

How the proxy uses it (per request, after the route is chosen):

    rnd = ctx.rng.getrandbits(32)                  # one draw for all the route's policies,
    for policy in route.mirrors:                   # as Envoy uses the stream id (§7.5)
        if should_mirror(policy, rnd):
            target = None if policy.is_capture else MirrorTarget(ep.address, ep.port, timeout)
            ctx.mirror.submit(policy, head_bytes, body_pieces, target)

`submit` is synchronous and O(1): it never awaits, never raises, and only queues the copy; the
long-lived `run()` task (started by the worker in its nursery) sends it. So the primary request's
result and latency never depend on the mirror host being slow, dead, refusing or erroring.

* Overload: at most `max_concurrent` copies are queued or in flight; beyond that a copy is
  dropped and counted in `dropped`.
* A copy: `shadow_head` (host `-shadow` suffix unless the policy turns it off, plus
  `x-envoy-internal: true`), then the same re-framed body pieces the primary got, over a
  connection from a tiny per-target keep-alive pool (`max_idle_per_target`). The response is read
  exactly to its end (Content-Length, chunked, or EOF) and discarded; a keep-alive response
  returns the connection to the pool. A pooled connection that fails before any response byte is
  retried once on a fresh connection (stale keep-alive). The whole copy is bounded by `timeout`
  (Envoy uses the route timeout, which may be infinite; meshcore always bounds it).
* A body the proxy could not keep (`body_pieces` None while the head announces a body) is not
  mirrored and is counted in `skipped` (Envoy <= 1.32 behaviour for bodies over its buffer limit).
* Capture sink policies (`policy.capture`): the copy goes to a `CaptureSink` (one per distinct
  `CaptureSettings`, its flusher started in this nursery) instead of the network.
* `on_result(tag, status)` (optional) is called when a network copy ends: the response status, or
  0 for a failure (connect error, reset, protocol error, timeout). It lets the worker count mirror
  cluster stats; exceptions from it are swallowed. `on_connect(tag)` (optional) is called for
  each connection a copy opens (the mirror cluster's upstream_cx_total); `on_bytes(tag, sent,
  received)` (optional) after each exchange that got a whole response (its byte counters).
"""
from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Optional

import trio

from meshcore.capture import CaptureSink
from meshcore.errors import ProtocolError
from meshcore.io.sockets import connect, is_stale, recv, recv_later, send_all
from meshcore.policy.mirror import shadow_authority
from meshcore.proto.wire import (BODY_CHUNKED, BODY_LENGTH, BODY_NONE, DATA, DONE,
                                 ChunkedReader, parse_response, response_body_kind)

__all__ = ["Mirror", "MirrorTarget", "shadow_head", "head_authority", "mirror_head"]

_monotonic = time.monotonic
INTERNAL_LINE = b"x-envoy-internal: true\r\n"


class MirrorTarget(NamedTuple):
    """Where a network copy goes: one endpoint of the mirror cluster."""

    address: str
    port: int
    connect_timeout: float = 1.0


def _find_header_line(head: bytes, name: bytes, start: int):
    """(line start, line end excl. CRLF) of the first `name:` field line after `start`, or None.
    Header names in heads the proxy builds are lowercase; compared case-insensitively anyway."""
    pos = start
    n = len(head)
    lname = len(name)
    while pos < n:
        end = head.find(b"\r\n", pos)
        if end < 0:
            end = n
        if end == pos:  # the empty line: end of the head
            return None
        if head[pos + lname:pos + lname + 1] == b":" and head[pos:pos + lname].lower() == name:
            return pos, end
        pos = end + 2
    return None


def head_authority(head: bytes) -> Optional[bytes]:
    """The `host` value of a serialised request head (the proxy writes it as the second line)."""
    first = head.find(b"\r\n")
    if first < 0:
        return None
    found = _find_header_line(head, b"host", first + 2)
    if found is None:
        return None
    a, b = found
    return head[a + 5:b].strip(b" \t")


def shadow_head(upstream_head: bytes, authority: bytes) -> bytes:
    """The mirror's copy of an upstream request head: `host: <authority>` and
    `x-envoy-internal: true` (replacing any such line).

    Accepts the header block `_upstream_head` builds (no empty line; the result has none either)
    or a complete head ending in CRLF CRLF (the result is complete too). The host line is
    expected second, as the proxy writes it; elsewhere it is found and replaced, and added after
    the request line when absent.
    """
    first = upstream_head.find(b"\r\n")
    if first < 0:
        raise ValueError("not a request head")
    start = first + 2
    head = upstream_head
    if head.startswith(b"host: ", start):
        end = head.find(b"\r\n", start)
        head = head[:start] + b"host: " + authority + head[end:]
    else:
        found = _find_header_line(head, b"host", start)
        if found is None:
            head = head[:start] + b"host: " + authority + b"\r\n" + head[start:]
        else:
            a, b = found
            head = head[:a] + b"host: " + authority + head[b:]
    while True:  # Envoy sets (overwrites) it; the app's own value must not survive
        found = _find_header_line(head, b"x-envoy-internal", start)
        if found is None:
            break
        a, b = found
        head = head[:a] + head[b + 2:]
    if head.endswith(b"\r\n\r\n"):
        return head[:-2] + INTERNAL_LINE + b"\r\n"
    return head + INTERNAL_LINE


def mirror_head(policy, head: bytes) -> bytes:
    """The head a mirror (or the capture sink) gets for `policy`: `shadow_head` with the head's
    own host, `-shadow`-suffixed when `policy.shadow_suffix`."""
    authority = head_authority(head) or b""
    if policy.shadow_suffix:
        authority = shadow_authority(authority)
    return shadow_head(head, authority)


def _announces_body(head: bytes) -> bool:
    first = head.find(b"\r\n")
    found = _find_header_line(head, b"content-length", first + 2)
    if found is not None:
        a, b = found
        return head[a + 15:b].strip(b" \t") not in (b"0", b"")
    return _find_header_line(head, b"transfer-encoding", first + 2) is not None


class _CopyFailed(Exception):
    pass


class Mirror:
    """The per-worker shadow sender. See the module docstring."""

    def __init__(self, max_concurrent: int = 64, timeout: float = 5.0,
                 max_idle_per_target: int = 4, idle_timeout: float = 30.0,
                 on_result: Optional[Callable[[object, int], None]] = None,
                 on_connect: Optional[Callable[[object], None]] = None,
                 on_bytes: Optional[Callable[[object, int, int], None]] = None):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.max_concurrent = max_concurrent
        self.timeout = timeout
        self.max_idle_per_target = max_idle_per_target
        self.idle_timeout = idle_timeout
        self.on_result = on_result
        self.on_connect = on_connect
        self.on_bytes = on_bytes
        # counters (read by the worker's stats)
        self.submitted = 0  # network copies accepted
        self.dropped = 0  # refused: max_concurrent copies already queued or in flight
        self.skipped = 0  # body not available, or no endpoint to send to
        self.completed = 0  # a whole response was read
        self.failed = 0  # connect/send/read error or protocol error
        self.timeouts = 0  # `timeout` elapsed
        self.captured = 0  # handed to a capture sink
        self.capture_dropped = 0  # capture sink buffer full
        self.in_flight = 0
        self.sinks: dict = {}  # CaptureSettings -> CaptureSink
        self._idle: dict = {}  # (address, port) -> [(sock, since)]
        self._send_ch, self._recv_ch = trio.open_memory_channel(math.inf)
        self._nursery = None
        self._closed = False

    # --- request path ------------------------------------------------------------------------

    def submit(self, policy, upstream_request_head: bytes, body_pieces, connect_info,
               tag: object = None) -> bool:
        """Queue one copy; returns at once (True: accepted). Never raises into the caller.

        `upstream_request_head`: the head as sent to the primary (with or without its final empty
        line); `body_pieces`: the re-framed body pieces the primary was sent (matching the head's
        framing), `[]`/None for no body, None also when the body could not be kept;
        `connect_info`: `MirrorTarget` / `(address, port[, connect_timeout])`, ignored (may be
        None) for capture policies.
        """
        try:
            capture = policy.capture
            if capture is not None:
                sink = self.sinks.get(capture)
                if sink is None:
                    sink = self._new_sink(capture)
                if sink.add(mirror_head(policy, upstream_request_head), body_pieces):
                    self.captured += 1
                    return True
                self.capture_dropped += 1
                return False
            if self.in_flight >= self.max_concurrent or self._closed:
                self.dropped += 1
                return False
            if connect_info is None or (body_pieces is None
                                        and _announces_body(upstream_request_head)):
                self.skipped += 1
                return False
            self.in_flight += 1
            self.submitted += 1
            self._send_ch.send_nowait((policy, upstream_request_head, body_pieces, connect_info,
                                       tag))
            return True
        except Exception:
            self.skipped += 1
            return False

    def _new_sink(self, settings) -> CaptureSink:
        sink = CaptureSink(settings.path, settings.max_bytes, settings.body_limit, settings.keep)
        self.sinks[settings] = sink
        if self._nursery is not None:
            self._nursery.start_soon(sink.run)
        return sink

    # --- background ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The long-lived task: sends queued copies, sweeps idle connections, runs the capture
        sinks' flushers. Cancel it (the worker's nursery) to stop; idle sockets are closed."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for sink in self.sinks.values():
                    nursery.start_soon(sink.run)
                nursery.start_soon(self._sweeper)
                async for job in self._recv_ch:
                    nursery.start_soon(self._copy, *job)
        finally:
            self._nursery = None
            self.close_idle()

    def close(self) -> None:
        """Stop accepting copies and close pooled connections and capture files."""
        self._closed = True
        self.close_idle()
        for sink in self.sinks.values():
            sink.close()

    def close_idle(self) -> None:
        for conns in self._idle.values():
            for sock, _ in conns:
                sock.close()
        self._idle.clear()

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(min(5.0, self.idle_timeout))
            now = _monotonic()
            for key in list(self._idle):
                keep = []
                for sock, since in self._idle[key]:
                    if now - since > self.idle_timeout:
                        sock.close()
                    else:
                        keep.append((sock, since))
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]

    async def _copy(self, policy, head, pieces, connect_info, tag) -> None:
        status = 0
        try:
            with trio.move_on_after(self.timeout) as scope:
                status = await self._exchange(policy, head, pieces, connect_info, tag)
            if scope.cancelled_caught:
                self.timeouts += 1
        except (OSError, ProtocolError, _CopyFailed, ValueError):
            self.failed += 1
        except Exception:  # never let a copy take the worker down
            self.failed += 1
        else:
            if status:
                self.completed += 1
        finally:
            self.in_flight -= 1
            if self.on_result is not None:
                try:
                    self.on_result(tag, status)
                except Exception:
                    pass

    def _checkout(self, key):
        conns = self._idle.get(key)
        while conns:
            sock, _ = conns.pop()
            if not is_stale(sock):
                return sock
            sock.close()
        return None

    def _checkin(self, key, sock) -> None:
        if self._closed:
            sock.close()
            return
        conns = self._idle.setdefault(key, [])
        if len(conns) < self.max_idle_per_target:
            conns.append((sock, _monotonic()))
        else:
            sock.close()

    async def _exchange(self, policy, head: bytes, pieces, connect_info, tag=None) -> int:
        address, port = connect_info[0], connect_info[1]
        connect_timeout = connect_info[2] if len(connect_info) > 2 else self.timeout
        head = mirror_head(policy, head)
        if not head.endswith(b"\r\n\r\n"):
            head += b"\r\n"
        payload = head + b"".join(pieces) if pieces else head
        is_head = head.startswith(b"HEAD ")
        key = (address, port)
        for attempt in (0, 1):
            sock = self._checkout(key) if attempt == 0 else None
            reused = sock is not None
            if sock is None:
                if self.on_connect is not None:
                    try:
                        self.on_connect(tag)
                    except Exception:
                        pass
                try:
                    sock = await connect(address, port, connect_timeout)
                except TimeoutError as exc:
                    raise _CopyFailed("connect timeout") from exc
            keep = False
            try:
                try:
                    await send_all(sock, payload)
                    status, keep, received = await _read_response(sock, is_head)
                    if self.on_bytes is not None:
                        try:
                            self.on_bytes(tag, len(payload), received)
                        except Exception:
                            pass
                except _NoResponse:
                    if reused:
                        continue  # a stale pooled connection: once more on a fresh one
                    raise _CopyFailed("closed before a response")
                except OSError:
                    if reused:
                        continue
                    raise
                return status
            finally:
                if keep:
                    self._checkin(key, sock)
                else:
                    sock.close()
        raise _CopyFailed("no response")


class _NoResponse(Exception):
    """EOF or reset before any response byte."""


async def _read_response(sock, is_head: bool):
    """Read one response to its end and discard it. Returns (status, reusable, bytes read)."""
    data = b""
    got = 0
    try:
        chunk = await recv_later(sock)
    except OSError as exc:
        raise _NoResponse() from exc
    if not chunk:
        raise _NoResponse()
    while True:
        got += len(chunk)
        data = data + chunk if data else chunk
        rhead = parse_response(data, 0)  # ProtocolError: a broken mirror host
        while rhead is not None and rhead.status < 200:
            if rhead.status == 101:
                raise ProtocolError("unsolicited 101", 502)
            data = data[rhead.end:]
            rhead = parse_response(data, 0) if data else None
        if rhead is not None:
            break
        chunk = await recv(sock)
        if not chunk:
            raise _CopyFailed("closed inside the response head")
    status = rhead.status
    kind, length = response_body_kind(rhead, is_head)
    pos = rhead.end
    if kind == BODY_NONE:
        return status, rhead.keep_alive and len(data) == pos, got
    if kind == BODY_LENGTH:
        left = length - (len(data) - pos)
        while left > 0:
            chunk = await recv(sock)
            if not chunk:
                raise _CopyFailed("closed inside the response body")
            left -= len(chunk)
            got += len(chunk)
        return status, rhead.keep_alive and left == 0, got
    if kind == BODY_CHUNKED:
        reader = ChunkedReader()
        buf = data
        while True:
            step, a, b = reader.step(buf, pos, len(buf))
            if step == DATA:
                pos = b
                continue
            if step == DONE:
                return status, rhead.keep_alive and a == len(buf), got
            chunk = await recv(sock)
            if not chunk:
                raise _CopyFailed("closed inside the chunked body")
            got += len(chunk)
            buf, pos = buf[a:] + chunk, 0
    # BODY_CLOSE: the body ends when the mirror host closes
    while True:
        chunk = await recv(sock)
        if not chunk:
            return status, False, got
        got += len(chunk)
