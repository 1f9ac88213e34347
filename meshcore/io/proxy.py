"""The per-connection loop and the one orchestrator where the sans-IO cores meet the sockets.

Flow of one request (architecture.md "Request flow"): parse head -> route -> pick cluster and
endpoint -> check out or open an upstream connection -> send the re-serialised head and stream the
body -> parse the response head -> stream the response back with framing recomputed -> check the
connection back in -> access log; around the attempt, the retry loop decides from the shared
outcome classifier. Per request there is no task spawn and no nursery; a cancel scope is opened
only when the route has a timeout or a per-try timeout.

Error handling: a malformed request gets its status hint and the connection closes; an upstream
failure before response headers becomes Envoy's local reply (UF/UC/UPE/UT/UO), after any retries
the policy allows; a failure after the
response started aborts the downstream connection, because a partial response must never look
complete.
"""
from __future__ import annotations

import math
import random
import socket
import sys
import time
import traceback

import trio

from meshcore import local_reply as lr
from meshcore.errors import ProtocolError
from meshcore.io.body import DownstreamGone, RequestBody
from meshcore.io.mirror import Mirror, MirrorTarget
from meshcore.io.sockets import recv, recv_later, send_all
from meshcore.io.upstream import (OVERFLOW, PER_TRY_TIMEOUT, Attempt, exchange, relay_response,
                                  release)
from meshcore.policy.classify import Kind
from meshcore.policy.fault import DELAY_FLAG, decide_fault
from meshcore.policy.mirror import should_mirror
from meshcore.upstream.hashkey import hash_source_address, request_hash
from meshcore.policy.retry import (RETRY_REQUEST_HEADERS, Reason, RetryState, final_flags,
                                   is_idempotent, merge_request_overrides)
from meshcore.policy.timeout import TIMEOUT_REQUEST_HEADERS, plan_deadlines, route_timeout_override
from meshcore.proto.wire import (BODY_CHUNKED, BODY_LENGTH, BODY_NONE, MAX_REQUEST_HEAD,
                                 MAX_REQUEST_LINE, parse_request, request_body_kind)
from meshcore.routing.actions import local_response, response_edits, upstream_request
from meshcore.routing.table import find_route, pick_weighted
from meshcore.shm.layout import (W_INDEX, W_UPSTREAM_RQ_PENDING_OVERFLOW, W_UPSTREAM_RQ_RETRY_SUCCESS,
                                 W_UPSTREAM_RQ_RX_RESET, W_UPSTREAM_RQ_TIMEOUT, W_UPSTREAM_RQ_TOTAL)
from meshcore.upstream.cluster import rebuild
from meshcore.upstream.original_dst import request_cluster_state

HEADER_TIMEOUT = 10.0  # whole header section; trickling bytes does not extend it (hardening.md §3.5)
IDLE_TIMEOUT = 3600.0  # downstream keep-alive idle timeout (Envoy's 1 h default)
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
# Envoy merges these client retry/timeout overrides into the route policy, then removes them.
STRIPPED_REQUEST_HEADERS = tuple(h.lower() for h in RETRY_REQUEST_HEADERS + TIMEOUT_REQUEST_HEADERS)

_monotonic = time.monotonic
_wall = time.time


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

    def __init__(self, snapshot, slots, segment, worker: int, access_log=None,
                 use_remote_address=False, header_timeout=HEADER_TIMEOUT):
        self.rng = random.Random()
        self.segment = segment
        self.worker = worker
        self.snapshot = None
        self.clusters = {}
        self.access_log = access_log
        self.use_remote_address = use_remote_address
        self.header_timeout = header_timeout
        self.draining = False
        self.connections = 0
        self.idle = {}  # cancel scope -> since when, of connections waiting for their next request
        self.mirror = Mirror(on_result=_mirror_result)
        self.install(snapshot, slots)

    def install(self, snapshot, slots) -> None:
        """Swap in a new snapshot by reference; unchanged clusters keep their warm connections."""
        states, to_close = rebuild(self.clusters, snapshot.clusters, slots, self.rng,
                                   self.segment, self.worker)
        self.snapshot = snapshot
        self.clusters = states
        for state, conn in to_close:
            conn.sock.close()
            state.on_close(conn.ep)

    def drain(self) -> None:
        """Stop keep-alive: close connections idle between requests, and pooled upstreams."""
        self.draining = True
        for scope in list(self.idle):
            scope.cancel()
        self.close_idle()

    def close_idle_downstream(self, now: float) -> None:
        """Envoy's downstream idle timeout: close connections without a request for too long."""
        for scope, since in list(self.idle.items()):
            if now - since > IDLE_TIMEOUT:
                scope.cancel()

    def close_idle(self) -> None:
        for state in self.clusters.values():
            for conn in state.book.drain_all():
                conn.sock.close()
                state.on_close(conn.ep)

    def sweep_idle(self) -> None:
        now = _monotonic()
        for state in self.clusters.values():
            for conn in state.book.sweep(now, state.idle_timeout):
                conn.sock.close()
                state.on_close(conn.ep)


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
    idle = ctx.idle
    try:
        with trio.CancelScope() as scope:
            while True:
                head = None
                if data:
                    head = parse_request(data, 0)
                if head is None:
                    while head is None:
                        if ctx.draining and not data:
                            return
                        if data:
                            # A head split over several reads: the header timeout covers the
                            # whole section, so trickling bytes cannot extend it.
                            if scope.deadline == math.inf:
                                scope.deadline = trio.current_time() + ctx.header_timeout
                            chunk = await recv(sock)
                        else:
                            # Between requests: no deadline to arm on this hot path; the worker's
                            # housekeeping closes connections idle too long, and a drain closes
                            # them all.
                            idle[scope] = _monotonic()
                            try:
                                chunk = await recv_later(sock)
                            finally:
                                del idle[scope]
                        if not chunk:
                            return
                        data = data + chunk if data else chunk
                        # The parser rescans from the start; parse again only when the answer can
                        # have changed (a new line end, or a size limit crossed), so a client
                        # trickling bytes costs linear, not quadratic, work.
                        if b"\n" in chunk or len(data) > MAX_REQUEST_HEAD or (
                                len(data) > MAX_REQUEST_LINE and b"\n" not in data):
                            head = parse_request(data, 0)
                    if scope.deadline != math.inf:
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
    except Exception:  # a bug must cost one connection, never the worker and its neighbours
        _report_bug()
        await _send_quietly(sock, lr.render(lr.INTERNAL_ERROR, close=True))
    finally:
        ctx.connections -= 1
        sock.close()


_bug_reports = [0.0, 0]


def _report_bug() -> None:
    """Print the traceback of an unexpected error, at most a few per minute."""
    now = _monotonic()
    if now - _bug_reports[0] > 60:
        _bug_reports[0], _bug_reports[1] = now, 0
    _bug_reports[1] += 1
    if _bug_reports[1] <= 5:
        traceback.print_exc(file=sys.stderr)


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


async def _local(dsock, rec, reply, close: bool, extra: bytes = b"", flags: str | None = None):
    rec.status = reply.status
    rec.flags = flags or reply.flag
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
    leftover = data[head.end:]
    if head.version == 0:
        await _local(dsock, rec, lr.HTTP10_REJECTED, True)
        return False, b""
    if head.method == b"CONNECT":  # no CONNECT routes (Envoy answers 404 without upgrade config)
        await _local(dsock, rec, lr.NO_ROUTE, True)
        return False, b""
    route = find_route(ctx.snapshot, head.host, head)
    if route is None:
        await _local(dsock, rec, lr.NO_ROUTE, close_on_local)
        return not close_on_local, leftover
    rec.route_name = route.name
    rng = ctx.rng
    if route.fault is not None:
        delay, abort = decide_fault(route.fault, rng.getrandbits(32), rng.getrandbits(32))
        if delay:
            rec.flags = DELAY_FLAG
            await trio.sleep(delay)
        if abort is not None:
            await _local(dsock, rec, route.fault.abort_reply, close_on_local)
            return not close_on_local, leftover
    if route.cors is not None or route.direct is not None:  # CORS preflight, redirect, directResponse
        answer = local_response(route, head)
        if answer is not None:
            await _local(dsock, rec, answer[0], close_on_local, extra=answer[1])
            return not close_on_local, leftover
    wc = pick_weighted(route, rng.getrandbits(32))
    cluster_name = wc.cluster if wc is not None else ""
    rec.cluster = cluster_name
    state = ctx.clusters.get(cluster_name)
    if state is not None and state.policy.per_request_endpoints:  # original destination, DYNAMIC_DNS
        state = await request_cluster_state(state, head.host, rng, ctx.segment, ctx.worker)
    if state is None or state.n == 0:
        await _local(dsock, rec, lr.NO_HEALTHY_UPSTREAM, close_on_local)
        return not close_on_local, leftover

    if head.count_prefix(b"x-envoy-"):  # rare: client overrides to merge, then strip
        retry = merge_request_overrides(route.retry, head.get)
        timeout = route_timeout_override(route.timeout, head.get)
        forwarded = head.forward_headers(STRIPPED_REQUEST_HEADERS)
    else:
        retry, timeout, forwarded = route.retry, route.timeout, head.forward_headers()
    upstream_head = _upstream_head(ctx, head, forwarded, body_kind, body_len, rec, wc)
    if head.expect_continue:
        try:
            await send_all(dsock, CONTINUE_100)
        except OSError as exc:
            raise DownstreamGone() from exc
    hashing = _NO_HASH
    if state.table is not None and route.hash_policies:
        remote = rec.downstream_remote or ""
        hashing = request_hash(route.hash_policies, head,
                               hash_source_address(remote, head.get(b"x-forwarded-for")),
                               remote, rec.downstream_local or "")
    mirrors = None
    if route.mirrors:  # one draw for all of the route's mirrors, as Envoy does
        rnd = rng.getrandbits(32)
        mirrors = [m for m in route.mirrors if should_mirror(m[0], rnd)] or None
    body = RequestBody(dsock, head, data, body_kind, body_len,
                       keep=(retry is not None and retry.num_retries > 0) or mirrors is not None)
    if mirrors is not None and body.done:
        _submit_mirrors(ctx, mirrors, upstream_head, body)
        mirrors = None
    # Envoy arms the route timer once the downstream request is complete; with a body still
    # streaming, meshcore arms it when the first attempt starts (documented deviation).
    deadlines = plan_deadlines(timeout, retry.per_try_timeout if retry is not None else 0.0,
                               trio.current_time())
    if deadlines.global_timeout_ms:
        with trio.move_on_at(deadlines.global_deadline) as scope:
            keep = await _forward(ctx, dsock, head, body, rec, t0, state, retry, deadlines,
                                  upstream_head, mirrors, hashing, response_edits(wc, route, head))
        if scope.cancelled_caught:
            state.stats.inc(W_UPSTREAM_RQ_TIMEOUT)
            if rec.status:  # the response already started: abort the client connection
                rec.flags = "UT"
                return False, b""
            await _local(dsock, rec, lr.ROUTE_TIMEOUT, True,
                         flags="URX,UT" if rec.flags == "URX" else "UT")
            return False, b""
    else:
        keep = await _forward(ctx, dsock, head, body, rec, t0, state, retry, deadlines, upstream_head,
                              mirrors, hashing, response_edits(wc, route, head))
    return keep, body.leftover


def _upstream_head(ctx, head, forwarded, body_kind, body_len, rec, wc=None) -> bytes:
    """The request line and headers shared by every attempt; per-attempt lines are appended."""
    parts = [head.method, b" ", head.path, b" HTTP/1.1\r\nhost: ", head.host or b"", b"\r\n",
             forwarded]
    request_id = head.get(b"x-request-id")
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
    if wc is not None and (wc.rewrite is not None or wc.request_headers is not None):
        path, host, block = upstream_request(wc, head, b"".join(parts[6:]))  # route actions
        parts[2], parts[4], parts[6:] = path, host, [block]
    if body_kind == BODY_LENGTH:
        parts.append(b"content-length: %d\r\n" % body_len)
    elif body_kind == BODY_CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length == 0:
        parts.append(b"content-length: 0\r\n")
    return b"".join(parts)


async def _forward(ctx, dsock, head, body, rec, t0, state, retry, deadlines, upstream_head,
                   mirrors, hashing, resp_edits=None) -> bool:
    """The attempt loop: pick, exchange, classify, decide; then relay or reply. Returns keep-alive.

    `mirrors`: copies still to send once the body is complete (after the first attempt read it).
    `hashing`: (consistent-hash value or None, Set-Cookie values to add) for ring/Maglev clusters.
    """
    rng = ctx.rng
    st = RetryState(retry, body_replayable=True, idempotent=is_idempotent(head.method),
                    try_acquire_retry=state.try_retry, release_retry=state.end_retry)
    hashed, cookies = hashing
    picks = 0
    stats = state.stats
    att = None
    retried = False
    current = True
    try:
        decision = None
        fresh = False
        ep = -1
        while True:
            if decision is None or not decision.fresh_connection:
                ep = state.pick(st.exclude, hashed)
                picks += 1
                if ep < 0:  # every host ejected and no panic: Envoy's fast 503
                    keep = head.keep_alive and body.done
                    await _local(dsock, rec, lr.NO_HEALTHY_UPSTREAM, not keep,
                                 flags="URX,UH" if retried else "UH")
                    return keep
            rec.upstream_host = state.endpoints[ep].key
            now = trio.current_time()
            head_bytes = upstream_head + b"x-envoy-attempt-count: %d\r\n" % st.attempt_count
            expected = deadlines.expected_timeout_ms(now)
            if expected:
                head_bytes += b"x-envoy-expected-rq-timeout-ms: %d\r\n" % expected
            head_bytes += b"\r\n"
            att = Attempt()
            if not state.try_request():  # over http2MaxRequests (active requests)
                att.outcome = OVERFLOW
            else:
                await _run_attempt(state, ep, att, body, head_bytes, st, deadlines, now, fresh)
            outcome = att.outcome
            if mirrors is not None and body.done:  # sent whatever the primary's fate
                _submit_mirrors(ctx, mirrors, upstream_head, body)
                mirrors = None
            if att.conn is not None:
                rec.upstream_local = att.conn.local
            state.on_result(ep, outcome)
            st.body_replayable = body.replayable and (body.done or body.keep)
            # `now` only matters for a retry's backoff, which is relative: the attempt start is
            # close enough and saves a clock read on every request.
            decision = st.on_outcome(outcome, False, now, rng.getrandbits(32),
                                     headers=att.rhead, host=ep)
            if decision.stat:
                idx = W_INDEX.get(decision.stat)
                if idx is not None:
                    stats.inc(idx)
            if not decision.retry:
                if st.retry_success:
                    stats.inc(W_UPSTREAM_RQ_RETRY_SUCCESS)
                break
            if decision.reason is Reason.RETRY:  # not the stale keep-alive replay
                retried = True
                rec.flags = "URX"  # provisional: the final flags come from final_flags below
            if att.conn is not None:  # a retriable response: its body is not wanted
                release(state, att.conn, False, False)
                att.conn = None
            fresh = decision.fresh_connection
            if decision.delay > 0:
                await trio.sleep(decision.delay)
        flags = final_flags(decision, outcome) or "-"
        if outcome.kind is not Kind.RESPONSE:
            reply = _FAILURE_REPLIES[outcome.kind]
            if retried:  # Envoy words a reset reply differently after policy retries
                reply = lr.retried(reply)
            keep = head.keep_alive and body.done
            await _local(dsock, rec, reply, not keep,
                         extra=lr.OVERLOADED_HEADER if outcome.kind is Kind.OVERFLOW else b"",
                         flags=flags)
            return keep
        service_ms = int((_monotonic() - t0) * 1000)
        rec.upstream_service_time = service_ms
        rec.flags = flags
        conn = att.conn
        att.conn = None
        try:
            # Envoy adds the invented cookie once per host selection, to upstream responses only
            extra = b"".join(b"set-cookie: " + c + b"\r\n" for c in cookies) * picks if cookies else b""
            reusable, complete = await relay_response(dsock, conn, head, att.rhead, att.rdata, rec,
                                                      service_ms, extra, resp_edits)
        except BaseException:
            release(state, conn, False, False)
            raise
        release(state, conn, reusable and not ctx.draining,
                ctx.clusters.get(state.policy.name) is state)
        return complete and head.keep_alive and body.done
    finally:
        st.release()
        if att is not None and att.conn is not None:  # cancelled or the client vanished mid-flight
            release(state, att.conn, False, False)


def _submit_mirrors(ctx, mirrors, upstream_head: bytes, body) -> None:
    """Hand copies of the request to the worker's Mirror: fire and forget, never awaited."""
    head = upstream_head + b"x-envoy-attempt-count: 1\r\n\r\n"
    pieces = body.kept if body.replayable else None  # over the replay cap: not mirrored
    submit = ctx.mirror.submit
    for policy, cluster in mirrors:
        target = state = None
        if cluster:
            state = ctx.clusters.get(cluster)
            if state is not None and state.n:
                ep = state.pick(None)
                if ep >= 0:
                    e = state.endpoints[ep]
                    target = MirrorTarget(e.address, e.port, state.policy.connect_timeout)
        dropped = ctx.mirror.dropped
        submit(policy, head, pieces, target, tag=state)
        if ctx.mirror.dropped != dropped and state is not None:
            state.stats.inc(W_UPSTREAM_RQ_PENDING_OVERFLOW)  # the mirror could not keep up


def _mirror_result(state, status: int) -> None:
    """A copy finished: count it on the mirror cluster, as Envoy's shadow stats do."""
    if state is None:
        return
    if status:
        state.stats.inc(W_UPSTREAM_RQ_TOTAL)
        state.stats.inc(W_INDEX.get(f"upstream_rq_{status // 100}xx", W_UPSTREAM_RQ_TOTAL))
    else:
        state.stats.inc(W_UPSTREAM_RQ_RX_RESET)


async def _run_attempt(state, ep, att, body, head_bytes, st, deadlines, now, fresh) -> None:
    """One exchange under the per-try timeout (when set), holding an active-request unit."""
    state.book.rq_start(ep)
    try:
        if deadlines.per_try_timeout_ms:
            with trio.move_on_at(deadlines.per_try_deadline(now)) as scope:
                await exchange(state, ep, att, body, head_bytes, st.attempt_count > 1, fresh)
            if scope.cancelled_caught:
                if att.conn is not None:
                    release(state, att.conn, False, False)
                    att.conn = None
                att.outcome = PER_TRY_TIMEOUT
        else:
            await exchange(state, ep, att, body, head_bytes, st.attempt_count > 1, fresh)
    finally:
        state.book.rq_end(ep)
        state.end_request()


_NO_HASH = (None, ())

_FAILURE_REPLIES = {
    Kind.CONNECT_FAILURE: lr.CONNECT_FAILURE,
    Kind.CONNECT_TIMEOUT: lr.CONNECT_TIMEOUT,
    Kind.RESET_BEFORE_RESPONSE: lr.CONNECTION_TERMINATION,
    Kind.PROTOCOL_ERROR: lr.UPSTREAM_PROTOCOL_ERROR,
    Kind.PER_TRY_TIMEOUT: lr.PER_TRY_TIMEOUT,
    Kind.OVERFLOW: lr.OVERFLOW,
}

__all__ = ["WorkerContext", "serve_connection"]
