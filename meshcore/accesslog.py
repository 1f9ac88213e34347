"""Access log lines in Istio's default text format (semantics.md §10.2), written in batches.

Workers append finished lines to a list; a flusher writes them with one os.write, so lines from
several worker processes never interleave inside a line (each write ends on a line boundary).
"""
from __future__ import annotations

import os
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


class AccessLog:
    """Buffered writer to a file descriptor (stdout by default)."""

    FLUSH_LINES = 256
    FLUSH_INTERVAL = 0.2

    def __init__(self, fd: int = 1):
        self.fd = fd
        self.pending: list[str] = []

    def log(self, rec) -> None:
        self.pending.append(format_line(rec))
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
