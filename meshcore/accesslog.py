"""Access log lines, written in batches: Istio's default text format (semantics.md §10.2), Istio's
JSON encoding, or a custom format from Envoy's command operators.

Rules of this module:

* `format_line(rec)` is Istio's default text format, hand-written for speed (the hot path's).
* `compile_format(fmt, encoding)` turns an Envoy format string (`%REQ(USER-AGENT)%`,
  `%RESPONSE_CODE%` ...; OPERATORS lists what is supported) into a function of a finished
  RequestRecord, once, at start-up. Text: missing values print `-`. JSON (`encoding="json"`):
  `fmt` is a JSON object of field -> format string (default: Istio's JSON fields, ISTIO_JSON);
  a field that is exactly one numeric operator is a number, a missing value is null, as Envoy's
  json_format writes them. An unknown operator raises AccessLogFormatError naming it.
* `%RESP(...)%` knows only x-envoy-upstream-service-time (response headers are not kept);
  other response headers print `-`. `%REQ(A?B)%` falls back to B; `%REQ(X):N%` truncates to N.
* Workers append finished lines to a list; a flusher writes them with one os.write, so lines
  from several worker processes never interleave inside a line (each write ends on a line
  boundary; a file is opened O_APPEND).
"""
from __future__ import annotations

import os
import re
import time

import trio


def _q(value) -> str:
    if value is None or value == b"" or value == "":
        return "-"
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def start_time(epoch: float) -> str:
    """%START_TIME% as Envoy prints it: 2026-11-26T06:33:23.139Z."""
    ms = int(epoch * 1000 + 0.5)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)


def format_line(rec) -> str:
    """One line from a finished `RequestRecord` (request fields are read from its parsed head)."""
    head = rec.head
    return (
        f'[{start_time(rec.start)}] "{_q(head.method)} {_q(head.path)} HTTP/1.1" '
        f'{rec.status} {rec.flags or "-"} {rec.details or "-"} - "-" '
        f'{rec.bytes_received} {rec.bytes_sent} {rec.duration_ms} {_q(rec.upstream_service_time)} '
        f'"{_q(head.get(b"x-forwarded-for"))}" "{_q(head.get(b"user-agent"))}" "{_q(rec.request_id)}" '
        f'"{_q(head.host)}" '
        f'"{_q(rec.upstream_host)}" {_q(rec.cluster)} {_q(rec.upstream_local)} {_q(rec.downstream_local)} '
        f'{_q(rec.downstream_remote)} - {_q(rec.route_name)}\n'
    )


class AccessLogFormatError(ValueError):
    pass


def _text(value) -> str | None:
    if value is None or value == b"" or value == "" or value == "-":
        return None
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


_PROTOCOL = "HTTP/1.1"


def _req_getter(spec: str):
    """%REQ(NAME?ALT)% -> rec -> str | None."""
    names = [n.strip().lower() for n in spec.split("?")]

    def one(name):
        if name == ":method":
            return lambda rec: _text(rec.head.method)
        if name == ":path":
            return lambda rec: _text(rec.head.path)
        if name in (":authority", "host"):
            return lambda rec: _text(rec.head.host)
        if name == "x-request-id":
            return lambda rec: _text(rec.request_id)
        if name == ":scheme":
            return lambda rec: "http"
        key = name.encode("latin-1")
        return lambda rec: _text(rec.head.get(key))

    getters = [one(n) for n in names if n]
    if not getters:
        raise AccessLogFormatError(f"empty header name in REQ({spec})")
    if len(getters) == 1:
        return getters[0]

    def first(rec):
        for g in getters:
            v = g(rec)
            if v is not None:
                return v
        return None
    return first


def _resp_getter(spec: str):
    if spec.strip().lower() == "x-envoy-upstream-service-time":
        return lambda rec: _text(rec.upstream_service_time)
    return lambda rec: None


def _host_only(addr):
    if not addr:
        return None
    host = addr.rsplit(":", 1)[0]
    return host.strip("[]")


# operator -> (getter, numeric)
OPERATORS = {
    "START_TIME": (lambda rec: start_time(rec.start), False),
    "PROTOCOL": (lambda rec: _PROTOCOL, False),
    "RESPONSE_CODE": (lambda rec: rec.status, True),
    "RESPONSE_FLAGS": (lambda rec: rec.flags if rec.flags and rec.flags != "-" else None, False),
    "RESPONSE_CODE_DETAILS": (lambda rec: rec.details, False),
    "CONNECTION_TERMINATION_DETAILS": (lambda rec: None, False),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": (lambda rec: None, False),
    "BYTES_RECEIVED": (lambda rec: rec.bytes_received, True),
    "BYTES_SENT": (lambda rec: rec.bytes_sent, True),
    "DURATION": (lambda rec: rec.duration_ms, True),
    "UPSTREAM_HOST": (lambda rec: rec.upstream_host, False),
    "UPSTREAM_CLUSTER": (lambda rec: rec.cluster, False),
    "UPSTREAM_CLUSTER_RAW": (lambda rec: rec.cluster, False),
    "UPSTREAM_LOCAL_ADDRESS": (lambda rec: rec.upstream_local, False),
    "DOWNSTREAM_LOCAL_ADDRESS": (lambda rec: rec.downstream_local, False),
    "DOWNSTREAM_REMOTE_ADDRESS": (lambda rec: rec.downstream_remote, False),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (lambda rec: _host_only(rec.downstream_remote),
                                               False),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": (lambda rec: _host_only(rec.downstream_local),
                                              False),
    "REQUESTED_SERVER_NAME": (lambda rec: None, False),
    "ROUTE_NAME": (lambda rec: rec.route_name, False),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": (lambda rec: None, True),
}

_OPERATOR = re.compile(r"%([A-Z_]+)(?:\(([^)]*)\))?(?::(\d+))?%")

# Istio's default text format (meshConfig.accessLogFormat unset), as Envoy operators.
ISTIO_TEXT = ('[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
              '%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% '
              '%CONNECTION_TERMINATION_DETAILS% "%UPSTREAM_TRANSPORT_FAILURE_REASON%" '
              '%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% '
              '"%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" '
              '"%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
              '%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% '
              '%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n')

# Istio's JSON encoding fields (meshConfig.accessLogEncoding: JSON), in Istio's order.
ISTIO_JSON = {
    "start_time": "%START_TIME%",
    "route_name": "%ROUTE_NAME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}


def _parse(fmt: str):
    """[(literal str) | (getter, numeric)] for a format string."""
    parts = []
    pos = 0
    for m in _OPERATOR.finditer(fmt):
        if m.start() > pos:
            parts.append(fmt[pos:m.start()])
        name, arg, limit = m.group(1), m.group(2), m.group(3)
        if name == "REQ":
            if arg is None:
                raise AccessLogFormatError("REQ needs a header name: %REQ(NAME)%")
            getter, numeric = _req_getter(arg), False
        elif name == "RESP":
            if arg is None:
                raise AccessLogFormatError("RESP needs a header name: %RESP(NAME)%")
            getter, numeric = _resp_getter(arg), False
        elif name in OPERATORS and arg is None:
            getter, numeric = OPERATORS[name]
        else:
            raise AccessLogFormatError(f"unsupported command operator %{m.group(0)[1:-1]}% "
                                       f"(supported: REQ(...), RESP(...), "
                                       f"{', '.join(sorted(OPERATORS))})")
        if limit is not None:
            n = int(limit)
            inner = getter

            def getter(rec, inner=inner, n=n):
                v = inner(rec)
                return None if v is None else str(v)[:n]
        parts.append((getter, numeric))
        pos = m.end()
    if pos < len(fmt):
        parts.append(fmt[pos:])
    stray = [p for p in parts if isinstance(p, str) and "%" in p.replace("%%", "")]
    if stray:
        raise AccessLogFormatError(f"unterminated or malformed command operator in {stray[0]!r}")
    return [p.replace("%%", "%") if isinstance(p, str) else p for p in parts]


def compile_format(fmt: str | None, encoding: str = "text"):
    """A function rec -> one log line (ending in a newline). See the module rules."""
    if encoding not in ("text", "json"):
        raise AccessLogFormatError(f"unknown encoding {encoding!r} (text or json)")
    if encoding == "text":
        if fmt is None:
            return format_line
        parts = _parse(fmt)

        def text_line(rec):
            out = []
            for p in parts:
                if isinstance(p, str):
                    out.append(p)
                else:
                    v = p[0](rec)
                    out.append("-" if v is None or v == "" else str(v))
            line = "".join(out)
            return line if line.endswith("\n") else line + "\n"
        return text_line
    if fmt is None:
        fields = ISTIO_JSON
    else:
        try:
            fields = _orjson().loads(fmt)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            raise AccessLogFormatError(f"with json encoding the format is a JSON object of "
                                       f"field -> format string: {exc}") from None
        if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
            raise AccessLogFormatError("with json encoding the format is a JSON object of "
                                       "field -> format string")
    dumps = _orjson().dumps
    compiled = []
    for key, value in fields.items():
        parts = _parse(value)
        if len(parts) == 1 and not isinstance(parts[0], str):
            compiled.append((key, parts[0][0], parts[0][1], None))
        else:
            compiled.append((key, None, False, parts))

    def json_line(rec):
        obj = {}
        for key, getter, numeric, parts in compiled:
            if getter is not None:
                v = getter(rec)
                if v is None or v == "":
                    obj[key] = None
                elif numeric:
                    obj[key] = v if isinstance(v, int) else int(v)
                else:
                    obj[key] = v.decode("latin-1") if isinstance(v, bytes) else str(v)
            else:
                out = []
                for p in parts:
                    if isinstance(p, str):
                        out.append(p)
                    else:
                        v = p[0](rec)
                        out.append("-" if v is None or v == "" else str(v))
                obj[key] = "".join(out)
        return dumps(obj).decode() + "\n"
    return json_line


def _orjson():
    """orjson, imported only for JSON encoding (it costs a worker over 2 MB of memory)."""
    import orjson
    return orjson


def open_log_fd(path: str | None) -> int:
    """The descriptor to log to: 1 for stdout ("/dev/stdout", "-", None), else the file opened
    for appending (created 0644 when missing)."""
    if path in (None, "", "-", "/dev/stdout"):
        return 1
    if path == "/dev/stderr":
        return 2
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class AccessLog:
    """Buffered writer to a file descriptor (stdout by default)."""

    FLUSH_LINES = 256
    FLUSH_INTERVAL = 0.2

    def __init__(self, fd: int = 1, formatter=format_line):
        self.fd = fd
        self.format = formatter
        self.pending: list[str] = []

    @classmethod
    def from_options(cls, options: dict) -> "AccessLog":
        """The worker's access log from the CLI options (file, encoding, format)."""
        return cls(open_log_fd(options.get("access_log_file")),
                   compile_format(options.get("access_log_format"),
                                  options.get("access_log_encoding", "text")))

    def log(self, rec) -> None:
        self.pending.append(self.format(rec))
        if len(self.pending) >= self.FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = "".join(self.pending).encode("utf-8", "replace")
        self.pending.clear()
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except BlockingIOError:
            pass  # a stuck log reader must never stall the data path; drop the rest
        except OSError:
            pass

    async def run_flusher(self) -> None:
        while True:
            await trio.sleep(self.FLUSH_INTERVAL)
            self.flush()
