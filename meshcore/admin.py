"""Admin endpoint in the supervisor (never on a worker's hot path): /ready, /stats, /config_dump,
/server_info.

Like Envoy's admin port it must stay on loopback: the CLI refuses a non-loopback address unless
explicitly allowed.
"""
from __future__ import annotations

import ipaddress

import orjson
import trio

from meshcore.config.dump import snapshot_to_json
from meshcore.errors import ProtocolError
from meshcore.local_reply import http_date, reason_phrase
from meshcore.proto.wire import parse_request


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _response(status: int, body: bytes, ctype: bytes = b"text/plain") -> bytes:
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\ndate: %s\r\n"
            b"server: envoy\r\nconnection: close\r\n\r\n"
            % (status, reason_phrase(status), ctype, len(body), http_date())) + body


def handle(supervisor, method: bytes, path: bytes) -> bytes:
    path = path.split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"method not allowed\n")
    if path == b"/ready":
        if supervisor.ready():
            return _response(200, b"LIVE\n")
        return _response(503, supervisor.server_info()["state"].encode() + b"\n")
    if path == b"/config_dump":
        return _response(200, snapshot_to_json(supervisor.snapshot), b"application/json")
    if path == b"/server_info":
        return _response(200, orjson.dumps(supervisor.server_info(), option=orjson.OPT_INDENT_2),
                         b"application/json")
    if path == b"/stats":
        return _response(200, supervisor.stats_text().encode())
    if path == b"/":
        return _response(200, b"meshcore admin: /ready /stats /config_dump /server_info\n")
    return _response(404, b"not found\n")


async def serve_admin(supervisor, address, task_status=trio.TASK_STATUS_IGNORED) -> None:
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
                    await stream.send_all(handle(supervisor, head.method, head.path))
            except ProtocolError as exc:
                await stream.send_all(_response(exc.status, exc.reason.encode() + b"\n"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)
    await trio.serve_listeners(on_connection, listeners)
