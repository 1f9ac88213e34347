"""The Python half of a worker's data path: the policy the C event loop (ext/loop.pyx) calls.

Per request the loop calls `decide(stream)` once: route (meshcore.routing), fault injection,
destination and endpoint (meshcore.upstream.cluster.ClusterState: balancers, hash tables,
ejections), client x-envoy-* overrides, consistent-hash cookies and mirroring. It answers by
calling `stream.forward(route_handle, cluster_handle, endpoint)` or `stream.reply(local_reply)`.

An attempt that ends in anything but a response the route could never retry comes back once:
`on_outcome(stream, kind, status)` classifies it with the one classifier
(meshcore.policy.classify), records it (stats, outlier detection), asks the request's RetryState
and answers RELAY (forward the response), RETRY (`stream.next_ep`, `stream.delay`) or REPLY
(after calling `stream.reply`). The success path never comes here: the loop counts it and resets
the host's outlier counters itself.

`install(snapshot, slots)` compiles a snapshot into the handles the loop reads (one
ClusterHandle per cluster with its pool; one RouteHandle per route) and swaps them in by
reference. A cluster whose policy and slots did not change keeps its handle and its warm
connections.
"""
from __future__ import annotations

import dataclasses
import random
import time
import traceback

from meshcore import local_reply as lr
from meshcore.accesslog import ISTIO_TEXT, AccessLog, compile_format, open_log_fd
from meshcore._ext.loop import RELAY, REPLY, RETRY, ClusterHandle, FastRoute, Loop, RouteHandle
from meshcore.policy.classify import Kind, classify_failure, classify_response
from meshcore.policy.fault import DELAY_FLAG, decide_fault
from meshcore.policy.mirror import (head_authority, mirror_head, shadow_authority, shadow_head,
                                    should_mirror)
from meshcore.policy.retry import (RETRY_ON_5XX, RETRY_ON_ENVOY_RATE_LIMITED, RETRY_ON_GRPC_ANY,
                                   RETRY_ON_RETRIABLE_4XX, RETRY_ON_RETRIABLE_HEADERS,
                                   RETRY_ON_RETRIABLE_STATUS_CODES, RETRY_ON_GATEWAY_ERROR,
                                   RETRY_REQUEST_HEADERS, DONE_BODY_NOT_REPLAYABLE,
                                   DONE_EXHAUSTED, DONE_OVERFLOW, Reason, RetryState, final_flags,
                                   is_idempotent, merge_request_overrides)
from meshcore.policy.timeout import TIMEOUT_REQUEST_HEADERS, route_timeout_override
from meshcore.config.discovery import request_endpoints, request_target
from meshcore.config.policy import PER_REQUEST_DISCOVERY
from meshcore.routing.matchers import matches_every_slash_path
from meshcore.routing.table import RouteTable, find_route, pick_weighted
from meshcore.shm.layout import (W_INDEX, W_UPSTREAM_RQ_PENDING_OVERFLOW,
                                 W_UPSTREAM_RQ_RETRY_BACKOFF_EXPONENTIAL,
                                 W_UPSTREAM_RQ_RETRY_SUCCESS)
from meshcore.upstream.balancer import stateless_kind
from meshcore.upstream.cluster import MAX_IDLE_PER_ENDPOINT, ClusterState
from meshcore.upstream.original_dst import is_ip, resolve

# Envoy merges these client retry/timeout overrides into the route policy, then removes them.
STRIPPED_REQUEST_HEADERS = tuple(h.lower() for h in RETRY_REQUEST_HEADERS + TIMEOUT_REQUEST_HEADERS)
# Counters a retry decision names, resolved once (an unknown name fails here, at import).
_DECISION_STATS = {d.stat: W_INDEX[d.stat]
                   for d in (DONE_EXHAUSTED, DONE_OVERFLOW, DONE_BODY_NOT_REPLAYABLE)}
_DECISION_STATS["upstream_rq_retry"] = W_INDEX["upstream_rq_retry"]
MIRROR_TIMEOUT = 5.0  # a copy without a route timeout is still bounded (Envoy: unbounded)
# Clusters whose endpoints come from the request (original destination, dynamic DNS, every-port
# services) get one ClusterHandle (and pool) per distinct endpoint set, kept for reuse up to this.
MAX_REQUEST_CLUSTERS = 256
# Envoy tcp_proxy's default idle_timeout (1 h), as Istio leaves it; websocket tunnels get the same
TUNNEL_IDLE_TIMEOUT = 3600.0
MAX_SHADOWS = 64  # copies in flight per worker; beyond, a copy is dropped and counted
_RESPONSE = int(Kind.RESPONSE)
_OVERFLOW = int(Kind.OVERFLOW)


class RequestPlan:
    """Per-request policy state, made only when a request needs more than its route's defaults."""

    __slots__ = ("retry", "retry_state", "hashed", "cookies", "picks", "mirrors", "fault_flag",
                 "retried")

    def __init__(self, retry):
        self.retry = retry
        self.retry_state = None
        self.hashed = None
        self.cookies = ()
        self.picks = 1
        self.mirrors = None
        self.fault_flag = ""
        self.retried = False


def route_handle(route) -> RouteHandle:
    """Compile what the loop needs of a RoutePolicy per request."""
    retry = route.retry
    status_map = bytearray(1000)
    grpc = ratelimited = headers = False
    keep = False
    per_try = 0.0
    if retry is not None:
        bits = retry.retry_on
        keep = retry.num_retries > 0
        per_try = retry.per_try_timeout
        if bits & RETRY_ON_RETRIABLE_4XX:
            status_map[409] = 1
        if bits & RETRY_ON_RETRIABLE_STATUS_CODES:
            for code in retry.retriable_status_codes:
                if 0 <= code < 1000:
                    status_map[code] = 1
        if bits & (RETRY_ON_5XX | RETRY_ON_GATEWAY_ERROR):
            for code in range(500, 600):
                status_map[code] = 1
        grpc = bool(bits & RETRY_ON_GRPC_ANY)
        ratelimited = bool(bits & RETRY_ON_ENVOY_RATE_LIMITED)
        headers = bool(bits & RETRY_ON_RETRIABLE_HEADERS)
    # a stale pooled connection is replayed once when the body can be: keep it when mirroring too
    keep = keep or bool(route.mirrors)
    handle = RouteHandle(route.name, timeout=route.timeout, per_try_timeout=per_try,
                         keep_body=keep, status_map=bytes(status_map), check_grpc=grpc,
                         check_ratelimited=ratelimited, check_headers=headers)
    handle.policy = route
    return handle


class Dataplane:
    """One worker's data path: the C loop plus the Python policy it calls."""

    def __init__(self, snapshot, slots, segment, worker: int, *, access_log: bool = True,
                 access_log_file=None, access_log_encoding: str = "text",
                 access_log_format=None, use_remote_address: bool = False,
                 header_timeout: float = 10.0, idle_timeout: float = 3600.0,
                 max_connections: int = 0, stream_idle_timeout: float = 300.0,
                 request_timeout: float = 300.0, max_events: int = 256, metrics: bool = True,
                 spawn=None, sidecar: bool = False, inbound_listen=None,
                 outbound_traffic_policy: str = "ALLOW_ANY"):
        # run --sidecar (meshcore.config.sidecar): connections on the outbound listener are routed
        # by their original destination (outbound_target), `inbound_listen` (host, port) is where
        # captured inbound connections arrive (inbound_target), and the snapshot was compiled
        # under `outbound_traffic_policy` (ALLOW_ANY or REGISTRY_ONLY).
        self.sidecar = sidecar
        self.inbound_listen = inbound_listen
        self.outbound_traffic_policy = outbound_traffic_policy
        self.captured = None
        if sidecar:  # imported only here: explicit-mode workers stay small
            from meshcore.io.captured import CapturedConnections
            self.captured = CapturedConnections(self)
        self.logs_tcp = False  # TCP connections get an access-log line (Istio's text format)
        self.rng = random.Random()
        self.segment = segment
        self.worker = worker
        self.spawn = spawn  # starts a background task (capture sink flushers); set by the worker
        self.tls = None  # meshcore.io.tls_origination.TlsOrigination, once a cluster needs it
        # The access log: Istio's default text format is formatted by the loop in C; JSON and
        # custom formats go through meshcore.accesslog's compiled formatter (one Python call per
        # request).
        self.access_log = None
        log_mode = 0
        log_fd = 1
        if access_log:
            log_fd = open_log_fd(access_log_file)
            if access_log_encoding == "text" and access_log_format in (None, "", ISTIO_TEXT):
                log_mode = 1
            else:
                log_mode = 2
                self.access_log = AccessLog(log_fd, compile_format(access_log_format,
                                                                   access_log_encoding))
            self.logs_tcp = log_mode == 1
        self.loop = Loop(self, max_events=max_events, log_fd=log_fd, log_mode=log_mode,
                         use_remote_address=use_remote_address, header_timeout=header_timeout,
                         idle_timeout=idle_timeout, max_connections=max_connections)
        self.loop.stream_idle_timeout = stream_idle_timeout
        self.loop.request_timeout = request_timeout
        self.loop.attach_shm(segment.buf)
        self.metrics = metrics  # Istio metrics, per-host counters, final charges (meshcore.metrics)
        if metrics:
            self.loop.setup_metrics(segment.layout.istio_off(worker), segment.layout.istio_rows)
        self.snapshot = None
        self.clusters: dict[str, ClusterState] = {}
        self.routes: dict[int, RouteHandle] = {}
        self.sinks = {}
        self.mirror_dropped = 0
        self.request_clusters: dict = {}  # (cluster, endpoint keys) -> ClusterState, LRU order
        self.install(snapshot, slots)

    # === config ===

    def install(self, snapshot, slots) -> None:
        """Swap in a new snapshot by reference; unchanged clusters keep their warm connections."""
        layout = self.segment.layout
        old = self.clusters
        states: dict[str, ClusterState] = {}
        for name, policy in snapshot.clusters.items():
            prev = old.get(name)
            if prev is not None and prev.policy == policy and prev.slots == slots[name]:
                states[name] = prev
                continue
            states[name] = self._cluster(name, policy, slots[name])
        routes: dict[int, RouteHandle] = {}
        seen = set()
        for vhost in snapshot.vhosts.values():
            if id(vhost) in seen:
                continue
            seen.add(id(vhost))
            for route in vhost.routes:
                routes[id(route)] = route_handle(route)
        if snapshot.sidecar is not None:
            from meshcore.config.sidecar import sidecar_routes
            for route in sidecar_routes(snapshot.sidecar):
                routes[id(route)] = route_handle(route)
        self.snapshot = snapshot
        self.clusters = states
        self.routes = routes
        self.loop.set_fast_routes(fast_routes(snapshot, states, routes))
        if self.captured is not None:
            self.captured.install(snapshot, states, routes)
        for name, prev in old.items():
            if states.get(name) is not prev:
                prev.handle.retired = True
                prev.handle.close_idle()
        for key in [k for k in self.request_clusters if states.get(k[0]) is not old.get(k[0])]:
            self._drop_request_cluster(key)

    def _cluster(self, name: str, policy, slots) -> ClusterState:
        """A cluster's policy state and its loop handle (pool, addresses, shared-memory rows)."""
        layout = self.segment.layout
        cslot, hslots = slots
        limits = policy.limits
        handle = ClusterHandle(
            self.loop, name, self._connect_addresses(policy),
            stats_off=layout.worker_row_off(self.worker, cslot),
            cluster_off=layout.cluster_off(cslot),
            host_offs=[layout.host_off(s) for s in hslots] if hslots else None,
            limits=(limits.max_connections, limits.max_pending_requests,
                    limits.max_requests) if limits is not None else (
                0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
            connect_timeout=policy.connect_timeout, idle_timeout=policy.idle_timeout,
            max_requests_per_connection=policy.max_requests_per_connection,
            outlier=policy.outlier is not None and policy.outlier.enabled,
            outlier_split=bool(policy.outlier is not None
                               and policy.outlier.split_external_local_origin_errors),
            max_idle=MAX_IDLE_PER_ENDPOINT,
            host_stat_offs=[layout.host_stats_off(self.worker, s) for s in hslots]
            if self.metrics and hslots else None,
            hist_off=layout.cluster_hist_off(self.worker, cslot) if self.metrics else -1,
            holdings_off=layout.holdings_off(self.worker, cslot))
        state = ClusterState(policy, self.rng, self.segment, self.worker, slots, book=handle.book)
        state.handle = handle
        handle.state = state
        return state

    def _connect_addresses(self, policy) -> list:
        """(address, port, key) the loop connects to per endpoint: the endpoint itself, or for a
        cluster that originates TLS the worker's relay to it (meshcore.io.tls_origination)."""
        if policy.tls is None:
            return [(e.address, e.port, e.key) for e in policy.endpoints]
        if self.tls is None:  # imported only here: plaintext-only workers stay small
            from meshcore.io.tls_origination import TlsOrigination
            self.tls = TlsOrigination()
            if self.spawn is not None:
                self.tls.start(self.spawn)
        out = []
        for e in policy.endpoints:
            # SNI: the rule's `sni`, else the service's name (a wildcard host has none: then the
            # endpoint's own name, as the request gave it)
            name = policy.service_host if not policy.service_host.startswith("*") else e.address
            host, port = self.tls.address(policy.tls, e.address, e.port, name,
                                          policy.connect_timeout)
            out.append((host, port, e.key))
        return out

    def start_background(self, spawn) -> None:
        """trio runs: background tasks may start (capture flushers, TLS relays)."""
        self.spawn = spawn
        if self.tls is not None:
            self.tls.start(spawn)

    def _request_cluster(self, state: ClusterState, endpoints) -> ClusterState:
        """The per-request cluster for this endpoint set: the cluster's rows (stats, breakers),
        endpoints from the request, no outlier detection (Envoy's ORIGINAL_DST has none)."""
        key = (state.policy.name, tuple(e.key for e in endpoints))
        got = self.request_clusters.pop(key, None)
        if got is None:
            policy = dataclasses.replace(state.policy, endpoints=endpoints, outlier=None)
            got = self._cluster(state.policy.name, policy, (state.slots[0], ()))
            if len(self.request_clusters) >= MAX_REQUEST_CLUSTERS:
                self._drop_request_cluster(next(iter(self.request_clusters)))
        self.request_clusters[key] = got  # most recently used last
        return got

    def _drop_request_cluster(self, key) -> None:
        state = self.request_clusters.pop(key)
        state.handle.retired = True
        state.handle.close_idle()

    # === housekeeping (the worker calls these now and then) ===

    def sweep(self) -> None:
        self.loop.sweep()
        if self.loop.tunnels_open:  # TCP connections, upgraded (websocket) requests
            self.loop.sweep_tunnels(TUNNEL_IDLE_TIMEOUT)
        for state in self.clusters.values():
            state.handle.sweep()

    def flush_log(self) -> None:
        self.loop.flush_log()
        if self.access_log is not None:
            self.access_log.flush()

    def drain(self) -> None:
        self.loop.drain()
        for state in self.clusters.values():
            state.handle.close_idle()

    # === called by the loop ===

    def connection(self, conn) -> None:
        """A connection on a sidecar listener (meshcore.io.captured)."""
        self.captured.connection(conn)

    def sniffed(self, conn, data: bytes):
        return self.captured.sniffed(conn, data)

    def decide(self, stream) -> None:
        head = stream.head
        captured = stream.connection_target
        if captured is None:
            route = find_route(self.snapshot, head.host, head)
        else:  # run --sidecar: the table of the port the client connected to
            if captured[2] is not self.snapshot:  # a connection older than the config
                captured = self.captured.refresh(stream.connection)
            route = self.captured.route(captured, head)
        if route is None:
            stream.reply(lr.NO_ROUTE)
            return
        rh = self.routes[id(route)]
        rng = self.rng
        plan = None
        if route.fault is not None:
            delay, abort = decide_fault(route.fault, rng.getrandbits(32), rng.getrandbits(32))
            if delay:
                plan = stream.ctx = RequestPlan(route.retry)
                plan.fault_flag = DELAY_FLAG
                stream.flags = DELAY_FLAG
                stream.delay = delay
            if abort is not None:
                if delay:
                    stream.route = rh
                    stream.abort_reply = route.fault.abort_reply
                    stream.abort_flags = DELAY_FLAG + "," + route.fault.abort_reply.flag
                    return
                stream.reply(route.fault.abort_reply)
                return
        if route.cors is not None or route.direct is not None:
            from meshcore.routing.actions import local_response  # only routes that have them
            answer = local_response(route, head)  # CORS preflight, redirect, directResponse
            if answer is not None:
                stream.reply(answer[0], extra=answer[1])
                return
        wc = pick_weighted(route, rng.getrandbits(32))
        state = self.clusters.get(wc.cluster) if wc is not None else None
        if state is None:
            stream.reply(lr.NO_HEALTHY_UPSTREAM)
            return
        if state.policy.per_request_endpoints:  # original destination, dynamic DNS, every port
            self._request_endpoints(stream, route, rh, wc, state, plan)
            return
        self._choose(stream, route, rh, wc, state, plan)

    def _request_endpoints(self, stream, route, rh, wc, state, plan) -> None:
        """The endpoints come from the request: an address is used at once, a name is resolved
        first (the request waits, parked, while trio looks it up)."""
        policy = state.policy
        head = stream.head
        captured = stream.connection_target
        if captured is not None:  # the connection's own destination (dynamic DNS: none)
            endpoints = self.captured.endpoints(policy, captured)
            if endpoints:
                self._choose(stream, route, rh, wc, self._request_cluster(state, endpoints), plan)
                return
        if policy.discovery in PER_REQUEST_DISCOVERY:
            target = request_target(policy, head.host)
            if target is not None and not is_ip(target[0]):
                if self.spawn is None:
                    stream.reply(lr.NO_HEALTHY_UPSTREAM)
                    return
                stream.park()
                self.spawn(self._resolve_then_choose, stream, route, rh, wc, state, plan, target)
                return
        endpoints = request_endpoints(policy, head.host, None)
        self._choose(stream, route, rh, wc, self._request_cluster(state, endpoints), plan)

    async def _resolve_then_choose(self, stream, route, rh, wc, state, plan, target) -> None:
        try:
            addresses = await resolve(*target)
            if stream.parked:  # the client may have left meanwhile
                endpoints = request_endpoints(state.policy, stream.head.host, addresses)
                self._choose(stream, route, rh, wc, self._request_cluster(state, endpoints), plan)
        except Exception:  # a bug costs this request, never the worker
            traceback.print_exc()
            stream.reply(lr.INTERNAL_ERROR)
        finally:
            stream.resume()

    def _choose(self, stream, route, rh, wc, state, plan) -> None:
        """Endpoint and per-request extras once the cluster is known."""
        head = stream.head
        # The router's own replies from here on are charged to the cluster, as Envoy does.
        stream.route = rh
        stream.cluster = state.handle
        if state.n == 0:
            stream.reply(lr.NO_HEALTHY_UPSTREAM)
            return
        hashed = None
        cookies = ()
        if state.table is not None and route.hash_policies:
            remote = stream.downstream_remote
            from meshcore.upstream.hashkey import hash_source_address, request_hash
            hashed, cookies = request_hash(
                route.hash_policies, head, hash_source_address(remote, head.get(b"x-forwarded-for")),
                remote, stream.downstream_local)
        ep = state.pick(None, hashed)
        if ep < 0:  # every host ejected and no panic: Envoy's fast 503
            stream.reply(lr.NO_HEALTHY_UPSTREAM, flags="UH")
            return
        stream.forward(rh, state.handle, ep)
        if wc.rewrite is not None or wc.request_headers is not None:
            stream.request_edits = wc
        if wc.response_headers is not None or route.cors is not None:
            from meshcore.routing.actions import response_edits
            stream.response_edits = response_edits(wc, route, head)
        if head.count_prefix(b"x-envoy-"):  # rare: client overrides to merge, then strip
            retry = merge_request_overrides(route.retry, head.get)
            timeout = route_timeout_override(route.timeout, head.get)
            stream.drop = STRIPPED_REQUEST_HEADERS
            if retry is not route.retry or timeout != route.timeout:
                if plan is None:
                    plan = stream.ctx = RequestPlan(retry)
                plan.retry = retry
                stream.route_timeout = timeout
                stream.per_try_timeout = retry.per_try_timeout if retry is not None else 0.0
                stream.keep_body = stream.keep_body or (retry is not None and retry.num_retries > 0)
                stream.always_policy = True
        if hashed is not None or cookies:
            if plan is None:
                plan = stream.ctx = RequestPlan(route.retry)
            plan.hashed = hashed
            if cookies:
                plan.cookies = cookies
                stream.response_extra = _cookie_lines(cookies, 1)
        if route.mirrors:  # one draw for all of the route's mirrors, as Envoy does
            rnd = self.rng.getrandbits(32)
            mirrors = [m for m in route.mirrors if should_mirror(m[0], rnd)]
            if mirrors:
                if plan is None:
                    plan = stream.ctx = RequestPlan(route.retry)
                plan.mirrors = mirrors
                stream.mirror = True

    def on_outcome(self, stream, kind: int, status: int) -> int:
        state = stream.cluster.state
        ep = stream.ep
        if kind == _RESPONSE:
            outcome = classify_response(status)
        else:
            outcome = classify_failure(Kind(kind), stream.a_sent, stream.a_reused, stream.a_got)
        state.on_result(ep, outcome)
        plan = stream.ctx
        if plan is None:
            plan = stream.ctx = RequestPlan(stream.route.policy.retry)
        st = plan.retry_state
        if st is None:
            st = plan.retry_state = RetryState(
                plan.retry, body_replayable=True, idempotent=is_idempotent(stream.head.method),
                try_acquire_retry=state.try_retry, release_retry=state.end_retry)
        st.body_replayable = stream.replayable and (stream.body_complete or stream.keep_body)
        decision = st.on_outcome(outcome, stream.response_started, time.monotonic(),
                                 self.rng.getrandbits(32),
                                 headers=stream.response_head if kind == _RESPONSE else None,
                                 host=ep)
        if decision.stat:
            state.stats.inc(_DECISION_STATS[decision.stat])
        if decision.retry:
            if decision.reason is Reason.RETRY:  # not the stale keep-alive replay
                plan.retried = True
                stream.flags = "URX"  # provisional: the final flags come from final_flags
                if not (kind == _RESPONSE and status == 425):
                    # Envoy counts every retry it schedules on its backoff timer (425 goes at once)
                    state.stats.inc(W_UPSTREAM_RQ_RETRY_BACKOFF_EXPONENTIAL)
            if decision.fresh_connection:
                stream.next_ep = ep
                stream.fresh = True
            else:
                nep = state.pick(st.exclude, plan.hashed, st.host_selection_retry_max_attempts)
                if nep < 0:  # every host ejected and no panic: Envoy's fast 503
                    st.release()
                    stream.reply(lr.NO_HEALTHY_UPSTREAM, flags="URX,UH" if plan.retried else "UH")
                    return REPLY
                plan.picks += 1
                if plan.cookies:  # Envoy adds the invented cookie once per host selection
                    stream.response_extra = _cookie_lines(plan.cookies, plan.picks)
                stream.next_ep = nep
            stream.delay = decision.delay
            return RETRY
        if st.retry_success:
            state.stats.inc(W_UPSTREAM_RQ_RETRY_SUCCESS)
        st.release()
        flags = final_flags(decision, outcome) or "-"
        if plan.fault_flag:
            flags = plan.fault_flag if flags == "-" else plan.fault_flag + "," + flags
        if kind == _RESPONSE:
            stream.flags = flags
            return RELAY
        reply = outcome.reply
        if plan.retried:  # Envoy words a reset reply differently after policy retries
            reply = lr.retried(reply)
        stream.reply(reply, flags=flags,
                     extra=lr.OVERLOADED_HEADER if kind == _OVERFLOW else b"")
        return REPLY

    def shadow_failed(self, stream, kind: int) -> None:
        """A mirror copy failed before its response: count it as the classifier says."""
        outcome = classify_failure(Kind(kind))
        if outcome.stat >= 0:
            stream.cluster.state.stats.inc(outcome.stat)

    def finished(self, stream) -> None:
        """The request ended (however): give back a retry budget token still held."""
        plan = stream.ctx
        if plan is not None and plan.retry_state is not None:
            plan.retry_state.release()

    def log(self, stream) -> None:
        """A finished request, for an access log in JSON or a custom format."""
        self.access_log.log(LogRecord(stream))

    def mirror(self, stream) -> None:
        """The request body is complete: send the route's copies (fire and forget)."""
        plan = stream.ctx
        if plan is None or not plan.mirrors:
            return
        mirrors, plan.mirrors = plan.mirrors, None
        if not stream.replayable:
            return  # over the buffer limit: not mirrored (Envoy <= 1.32 behaviour)
        head = stream.upstream_head
        body = stream.body_bytes
        loop = self.loop
        for policy, cluster in mirrors:
            if policy.capture is not None:
                self._capture(policy, head, body)
                continue
            state = self.clusters.get(cluster) if cluster else None
            if state is None or not state.n:
                continue
            if loop.shadows_in_flight >= MAX_SHADOWS:
                state.stats.inc(W_UPSTREAM_RQ_PENDING_OVERFLOW)  # the mirror could not keep up
                self.mirror_dropped += 1
                continue
            ep = state.pick(None)
            if ep < 0:
                continue
            authority = head_authority(head) or b""
            if policy.shadow_suffix:
                authority = shadow_authority(authority)
            timeout = stream.route_timeout or MIRROR_TIMEOUT
            loop.shadow(state.handle, ep, shadow_head(head, authority), body, timeout,
                        stream.body_chunked)

    def _capture(self, policy, head: bytes, body: bytes) -> None:
        from meshcore.capture import CaptureSink
        settings = policy.capture
        sink = self.sinks.get(settings)
        if sink is None:
            sink = CaptureSink(settings.path, settings.max_bytes, settings.body_limit, settings.keep)
            self.sinks[settings] = sink
            if self.spawn is not None:
                self.spawn(sink.run)
        full = mirror_head(policy, head + b"x-envoy-attempt-count: 1\r\n\r\n")
        if b"transfer-encoding: chunked\r\n" in head:
            pieces = [(b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"]
        else:
            pieces = [body] if body else None
        sink.add(full, pieces)

    def close(self) -> None:
        for state in self.clusters.values():
            state.handle.close_idle()
        if self.tls is not None:
            self.tls.close()
        self.loop.close()
        for sink in self.sinks.values():
            sink.close()
        if self.access_log is not None:
            self.access_log.flush()


def fast_routes(snapshot, states: dict, routes: dict) -> dict:
    """The hosts whose decision the loop may make in C (see ext/loop.pyx FastRoute): the virtual
    host's first route matches every path starting with "/" (the loop checks that) and needs
    nothing per request that decide() would
    do (one destination; no fault, mirror, hashing, CORS, redirect, direct response, rewrite or
    header edits), and its cluster's endpoints are fixed and its balancer stateless."""
    return fast_routes_of(snapshot.route_table or RouteTable.from_vhosts(snapshot.vhosts),
                          states, routes)


def fast_routes_of(table, states: dict, routes: dict, port: int = 0) -> dict:
    """fast_routes for one RouteTable; with `port` (a sidecar port's table, where the Host
    header's port is ignored), each name also as `name:port`."""
    out = {}
    suffix = b":%d" % port if port else None
    for key, vhost in table.exact.items():
        if not vhost.routes:
            continue
        route = vhost.routes[0]
        if (not matches_every_slash_path(route.matches) or len(route.destinations) != 1
                or route.fault is not None
                or route.mirrors or route.hash_policies or route.cors is not None
                or route.direct is not None):
            continue
        wc = route.destinations[0]
        if wc.rewrite is not None or wc.request_headers is not None \
                or wc.response_headers is not None:
            continue
        state = states.get(wc.cluster)
        if state is None or state.n == 0 or state.policy.per_request_endpoints \
                or state.table is not None:
            continue
        kind = stateless_kind(state.balancer)
        if kind is not None:
            out[key] = fast = FastRoute(routes[id(route)], state.handle, kind)
            if suffix is not None and b":" not in key:
                out.setdefault(key + suffix, fast)
    return out


class LogRecord:
    """A finished request as meshcore.accesslog's formatters read it."""

    __slots__ = ("head", "start", "status", "flags", "details", "bytes_received", "bytes_sent",
                 "duration_ms", "upstream_service_time", "request_id", "upstream_host", "cluster",
                 "upstream_local", "downstream_local", "downstream_remote", "route_name")

    def __init__(self, stream):
        self.head = stream.head
        self.start = stream.start_time
        self.status = stream.status
        self.flags = stream.flags or "-"
        self.details = stream.details
        self.bytes_received = stream.bytes_received
        self.bytes_sent = stream.bytes_sent
        self.duration_ms = stream.duration_ms
        self.upstream_service_time = stream.upstream_service_time
        self.request_id = stream.request_id
        self.upstream_host = stream.upstream_host
        cluster = stream.cluster
        self.cluster = cluster.name if cluster is not None else None
        self.upstream_local = stream.upstream_local_address
        self.downstream_local = stream.downstream_local
        self.downstream_remote = stream.downstream_remote
        route = stream.route
        self.route_name = route.name if route is not None else None


def _cookie_lines(cookies, picks: int) -> bytes:
    return b"".join(b"set-cookie: " + c + b"\r\n" for c in cookies) * picks


__all__ = ["Dataplane", "RequestPlan", "LogRecord", "route_handle", "STRIPPED_REQUEST_HEADERS"]
