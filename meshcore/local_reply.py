"""Envoy's local replies: status, body text, response flag and details (semantics.md §9).

Each reply is a `LocalReply` constant, so the proxy and the access log agree on flag and details.
"""
from __future__ import annotations

import time
from http import HTTPStatus
from typing import NamedTuple

from meshcore.proto.wire import R_FRAGMENT  # not the pure twin: a worker never loads it

_RESET_PREFIX = "upstream connect error or disconnect/reset before headers. "


class LocalReply(NamedTuple):
    status: int
    body: bytes
    flag: str  # Envoy response flag (UH, UF, ...); "-" when none
    details: str  # %RESPONSE_CODE_DETAILS%


NO_ROUTE = LocalReply(404, b"", "NR", "route_not_found")
NO_HEALTHY_UPSTREAM = LocalReply(503, b"no healthy upstream", "UH", "no_healthy_upstream")
CONNECT_FAILURE = LocalReply(
    503, (_RESET_PREFIX + "reset reason: remote connection failure").encode(), "UF",
    "upstream_reset_before_response_started{remote_connection_failure}")
CONNECT_TIMEOUT = LocalReply(
    503, (_RESET_PREFIX + "reset reason: connection timeout").encode(), "UF",
    "upstream_reset_before_response_started{connection_timeout}")
CONNECTION_TERMINATION = LocalReply(
    503, (_RESET_PREFIX + "reset reason: connection termination").encode(), "UC",
    "upstream_reset_before_response_started{connection_termination}")
UPSTREAM_PROTOCOL_ERROR = LocalReply(
    502, (_RESET_PREFIX + "reset reason: protocol error").encode(), "UPE",
    "upstream_reset_before_response_started{protocol_error}")
ROUTE_TIMEOUT = LocalReply(504, b"upstream request timeout", "UT", "response_timeout")
PER_TRY_TIMEOUT = LocalReply(504, b"upstream request timeout", "UT", "upstream_per_try_timeout")
OVERFLOW = LocalReply(
    503, (_RESET_PREFIX + "reset reason: overflow").encode(), "UO",
    "upstream_reset_before_response_started{overflow}")
OVERLOADED_HEADER = b"x-envoy-overloaded: true\r\n"
HTTP10_REJECTED = LocalReply(426, b"Upgrade Required", "-", "low_version")
# an Upgrade other than websocket (Istio's only upgrade_configs entry); the connection is closed
UPGRADE_FAILED = LocalReply(403, b"", "-", "upgrade_failed")
# A target with a fragment: Envoy's connection manager refuses it (not its codec): empty body.
PATH_NORMALIZATION_FAILED = LocalReply(400, b"", "-", "path_normalization_failed")
_BY_REASON = {R_FRAGMENT: PATH_NORMALIZATION_FAILED}
INTERNAL_ERROR = LocalReply(500, b"internal error", "-", "meshcore_internal_error")
# HCM stream_idle_timeout: 408 while the request is still arriving, 504 once it is complete
# (Envoy's Utility::maybeRequestTimeoutCode); a response already started is reset instead.
STREAM_IDLE_TIMEOUT = LocalReply(408, b"stream timeout", "SI", "stream_idle_timeout")
STREAM_IDLE_TIMEOUT_COMPLETE = LocalReply(504, b"stream timeout", "SI", "stream_idle_timeout")
# HCM request_timeout: the whole request was not received in time (Envoy sets no flag).
REQUEST_TIMEOUT = LocalReply(408, b"request timeout", "-", "request_overall_timeout")


def retried(reply: LocalReply) -> LocalReply:
    """The same reset reply after retries: Envoy words it `retried and the latest reset reason`."""
    if not reply.body.startswith(_RESET_PREFIX.encode()):
        return reply
    reason = reply.body[len(_RESET_PREFIX):].replace(b"reset reason: ", b"", 1)
    return reply._replace(body=_RESET_PREFIX.encode() + b"retried and the latest reset reason: " + reason)


def downstream_protocol_error(status: int, reason: str | None = None) -> LocalReply:
    """Reply to a malformed request (hardening.md §1.6): Envoy flag DPE, body is the reason phrase;
    the parser's `reason` picks Envoy's own reply where Envoy refuses it elsewhere (a fragment)."""
    reply = _BY_REASON.get(reason)
    if reply is not None:
        return reply
    return LocalReply(status, reason_phrase(status), "DPE", "codec_error")


_date_cache = [0, b""]
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date() -> bytes:
    """IMF-fixdate of the current second, formatted once per second (no locale, no email pkg)."""
    now = int(time.time())
    if now != _date_cache[0]:
        t = time.gmtime(now)
        _date_cache[0] = now
        _date_cache[1] = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
                          f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT").encode()
    return _date_cache[1]


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def render(reply: LocalReply, close: bool = False, extra: bytes = b"") -> bytes:
    """The full HTTP/1.1 response bytes of a local reply."""
    body = reply.body
    parts = [b"HTTP/1.1 %d %s\r\n" % (reply.status, reason_phrase(reply.status)),
             b"content-length: %d\r\n" % len(body)]
    if body:
        parts.append(b"content-type: text/plain\r\n")
    parts.append(b"date: " + http_date() + b"\r\nserver: envoy\r\n")
    if extra:
        parts.append(extra)
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)
