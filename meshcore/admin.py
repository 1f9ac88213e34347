"""Admin endpoint in the supervisor (never on a worker's hot path), after Envoy's admin interface.

Endpoints (`/help` lists them): `/ready`, `/stats` (filter=, usedonly, format=json),
`/stats/prometheus`, `/clusters` (format=json), `/config_dump`, `/server_info`, `/listeners`
(format=json), `/memory`, and the mutating ones, POST only as in Envoy (any other method gets
405 "Method GET not allowed, POST required."): `/healthcheck/fail`, `/healthcheck/ok`,
`/logging`, `/quitquitquit`, `/reset_counters`.

The health port (Istio's 15021, `run --sidecar`) answers only `GET /healthz/ready`: 200 once every
worker serves, 503 (with the state) before that and while draining or after
POST /healthcheck/fail; a pod's readinessProbe points there, as at Istio's pilot-agent.

The Prometheus port (Istio's 15090) is a second listener that answers only
`GET /stats/prometheus`, so it can face the network while the admin port stays on loopback: the
CLI refuses a non-loopback admin address unless explicitly allowed.

Error handling: a malformed request gets its status; a bad `filter=` regex gets 400 with the
error, as Envoy words it; an unknown path 404.
"""
from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qs

import orjson
import trio

from meshcore.config.dump import snapshot_to_json
from meshcore.errors import ProtocolError
from meshcore.local_reply import http_date, reason_phrase
from meshcore.metrics.envoy import render_json, render_text, select
from meshcore.metrics.prometheus import CONTENT_TYPE as PROMETHEUS_TYPE
from meshcore.proto.wire import parse_request
from meshcore.stats_render import render_clusters_json, render_clusters_text

__all__ = ["is_loopback", "handle", "handle_prometheus", "handle_health", "serve_admin",
           "serve_prometheus", "serve_health", "ENDPOINTS", "LOG_LEVELS", "READY_PATH"]

JSON = b"application/json"
TEXT = b"text/plain; charset=UTF-8"
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
READY_PATH = b"/healthz/ready"  # Istio's sidecar readiness probe path (pilot-agent, port 15021)

# path -> (POST only, help text, parameter help)
ENDPOINTS = {
    "/": (False, "Admin home page", ()),
    "/clusters": (False, "upstream cluster status", (
        "format: File format to use; One of (text, json)",)),
    "/config_dump": (False, "dump current meshcore config (compiled from the Istio YAML)", ()),
    "/healthcheck/fail": (True, "cause the server to fail health checks (/ready answers 503)",
                          ()),
    "/healthcheck/ok": (True, "cause the server to pass health checks", ()),
    "/help": (False, "print out list of admin commands", ()),
    "/listeners": (False, "print listener info", (
        "format: File format to use; One of (text, json)",)),
    "/logging": (True, "query/change logging levels", (
        "level: desired logging level, this will change all loggers's level; One of ("
        + ", ".join(LOG_LEVELS) + ")",
        "<logger>=<level>: change one logger's level")),
    "/memory": (False, "print current memory use (resident set size per process)", ()),
    "/quitquitquit": (True, "exit the server (in-flight requests get the drain grace)", ()),
    "/ready": (False, "print server state, return 200 if LIVE, otherwise return 503", ()),
    "/reset_counters": (True, "reset all counters to zero", ()),
    "/server_info": (False, "print server version/status information", ()),
    "/stats": (False, "print server stats", (
        "usedonly: Only include stats with a non-zero value",
        "filter: Regular expression (Python re, searched) for filtering stats",
        "format: Format to use; One of (text, json)")),
    "/stats/prometheus": (False, "print server stats in prometheus format", (
        "usedonly: Only include Envoy stats with a non-zero value",
        "filter: Regular expression (Python re, searched) for filtering Envoy stats")),
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _response(status: int, body: bytes, ctype: bytes = TEXT, head_only: bool = False) -> bytes:
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\ndate: %s\r\n"
            b"cache-control: no-cache, max-age=0\r\nx-content-type-options: nosniff\r\n"
            b"server: envoy\r\nconnection: close\r\n\r\n"
            % (status, reason_phrase(status), ctype, len(body), http_date())) \
        + (b"" if head_only else body)


def _json(value, status: int = 200) -> tuple[int, bytes, bytes]:
    return status, orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n", JSON


def help_text() -> bytes:
    lines = ["admin commands are:"]
    for path, (post, text, params) in sorted(ENDPOINTS.items()):
        lines.append(f"  {path}{' (POST)' if post else ''}: {text}")
        lines.extend(f"      {p}" for p in params)
    return ("\n".join(lines) + "\n").encode()


def _flag(query: dict, name: str) -> bool:
    return name in query


def _dispatch(sup, method: bytes, path: str, query: dict) -> tuple[int, bytes, bytes]:
    if path == "/ready":
        state = sup.health_state()
        return (200 if state == "LIVE" else 503), state.encode() + b"\n", TEXT
    if path == "/stats":
        try:
            stats = select(sup.stats(), query.get("filter", [None])[0],
                           _flag(query, "usedonly"))
        except re.error as exc:
            return 400, f"Invalid regex: {exc}: {query['filter'][0]}\n".encode(), TEXT
        if query.get("format", ["text"])[0] == "json":
            body = render_json(stats)
            body["stats"].append({"histograms": sup.histograms_json()})
            return 200, orjson.dumps(body), JSON
        return 200, render_text(stats).encode(), TEXT
    if path == "/stats/prometheus":
        try:
            return 200, sup.prometheus(query.get("filter", [None])[0],
                                       _flag(query, "usedonly")), PROMETHEUS_TYPE
        except re.error as exc:
            return 400, f"Invalid regex: {exc}: {query['filter'][0]}\n".encode(), TEXT
    if path == "/clusters":
        views = sup.cluster_views()
        if query.get("format", ["text"])[0] == "json":
            return _json(render_clusters_json(views))
        return 200, render_clusters_text(views).encode(), TEXT
    if path == "/config_dump":
        return 200, snapshot_to_json(sup.snapshot), JSON
    if path == "/server_info":
        return _json(sup.server_info())
    if path == "/listeners":
        host, port = sup.listen
        if query.get("format", ["text"])[0] == "json":
            return _json({"listener_statuses": [{"name": "outbound", "local_address": {
                "socket_address": {"address": host, "port_value": port}}}]})
        return 200, f"outbound::{host}:{port}\n".encode(), TEXT
    if path == "/memory":
        return _json(sup.memory())
    if path == "/help" or path == "/":
        return 200, help_text(), TEXT
    if path == "/healthcheck/fail":
        sup.set_health_failed(True)
        return 200, b"OK\n", TEXT
    if path == "/healthcheck/ok":
        sup.set_health_failed(False)
        return 200, b"OK\n", TEXT
    if path == "/quitquitquit":
        sup.quit("admin /quitquitquit")
        return 200, b"OK\n", TEXT
    if path == "/reset_counters":
        sup.reset_counters()
        return 200, b"OK\n", TEXT
    if path == "/logging":
        changes = {k: v[-1] for k, v in query.items()}
        problem = sup.set_log_levels(changes)
        if problem:
            return 400, (problem + "\n").encode() + help_text(), TEXT
        body = "active loggers:\n" + "".join(f"  {name}: {level}\n"
                                             for name, level in sup.log_levels().items())
        return 200, body.encode(), TEXT
    return 404, b"invalid path. admin commands are listed by /help\n", TEXT


def handle(supervisor, method: bytes, target: bytes) -> bytes:
    raw_path, _, raw_query = target.partition(b"?")
    path = raw_path.decode("latin-1")
    query = parse_qs(raw_query.decode("latin-1"), keep_blank_values=True)
    known = ENDPOINTS.get(path)
    if known is not None and known[0] and method != b"POST":
        return _response(405, b"Method %s not allowed, POST required.\n" % method)
    if method not in (b"GET", b"HEAD", b"POST"):
        return _response(405, b"Method %s not allowed.\n" % method)
    status, body, ctype = _dispatch(supervisor, method, path, query)
    return _response(status, body, ctype, head_only=method == b"HEAD")


def handle_prometheus(supervisor, method: bytes, target: bytes) -> bytes:
    """The Prometheus port: `/stats/prometheus` only (Istio's 15090)."""
    path = target.partition(b"?")[0]
    if path != b"/stats/prometheus":
        return _response(404, b"not found\n")
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"Method %s not allowed.\n" % method)
    return handle(supervisor, method, target)


def handle_health(supervisor, method: bytes, target: bytes) -> bytes:
    """The health port: `/healthz/ready` only, from the supervisor's readiness()."""
    path = target.partition(b"?")[0]
    if path != READY_PATH:
        return _response(404, b"not found\n")
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"Method %s not allowed.\n" % method)
    ready, state = supervisor.readiness()
    if ready:
        return _response(200, b"", head_only=method == b"HEAD")
    return _response(503, f"not ready: {state}\n".encode(), head_only=method == b"HEAD")


async def _serve(handler, supervisor, address, task_status) -> None:
    host, port = address

    async def on_connection(stream):
        async with stream:
            data = b""
            try:
                with trio.move_on_after(5):
                    while True:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        data += chunk
                        head = parse_request(data, 0)
                        if head is not None:
                            break
                    await stream.send_all(handler(supervisor, head.method, head.path))
            except ProtocolError as exc:
                await stream.send_all(_response(exc.status, exc.reason.encode() + b"\n"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)
    await trio.serve_listeners(on_connection, listeners)


async def serve_admin(supervisor, address, task_status=trio.TASK_STATUS_IGNORED) -> None:
    await _serve(handle, supervisor, address, task_status)


async def serve_prometheus(supervisor, address, task_status=trio.TASK_STATUS_IGNORED) -> None:
    await _serve(handle_prometheus, supervisor, address, task_status)


async def serve_health(supervisor, address, task_status=trio.TASK_STATUS_IGNORED) -> None:
    await _serve(handle_health, supervisor, address, task_status)
