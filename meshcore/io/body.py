"""The downstream request body: read from the client once, re-framed, kept for replay up to a cap.

A retry must send the same body again, but the client sends it only once. `RequestBody` keeps the
re-framed pieces it has forwarded while their total stays under `REPLAY_LIMIT` (Envoy's 1 MiB
per-connection buffer); past it the body is no longer replayable and retries stop
(hardening.md §5 rule 3). A later attempt first replays what was kept, then goes on pulling the
rest from the client, so a body is streamed in bounded memory whatever its size.
"""
from __future__ import annotations

from meshcore.io.sockets import recv, send_all, send_nowait
from meshcore.proto.wire import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, DATA, DONE, ChunkedReader

REPLAY_LIMIT = 1 << 20
LAST_CHUNK = b"0\r\n\r\n"


class DownstreamGone(Exception):
    """The client went away; nothing more can be read from or sent to it."""


class RequestBody:
    __slots__ = ("kind", "length", "received", "done", "replayable", "kept", "kept_bytes", "leftover",
                 "_buf", "_pos", "_reader", "_dsock", "keep")

    def __init__(self, dsock, head, data: bytes, kind: int, length: int, keep: bool):
        self.kind = kind
        self.length = length
        self.received = 0  # body bytes read from the client so far
        self.done = kind == BODY_NONE
        self.keep = keep  # keep pieces for replay (only when a retry is possible)
        self.replayable = True
        self.kept: list[bytes] = []
        self.kept_bytes = 0
        self.leftover = data[head.end:] if self.done else b""  # bytes after the body (pipelining)
        self._buf = data
        self._pos = head.end
        self._reader = ChunkedReader() if kind == BODY_CHUNKED else None
        self._dsock = dsock

    def _keep(self, piece: bytes) -> None:
        if not self.keep or not self.replayable:
            return
        self.kept_bytes += len(piece)
        if self.kept_bytes > REPLAY_LIMIT:
            self.replayable = False
            self.kept = []
        else:
            self.kept.append(piece)

    async def _more(self) -> bytes:
        try:
            chunk = await recv(self._dsock)
        except OSError as exc:
            raise DownstreamGone() from exc
        if not chunk:
            raise DownstreamGone()
        return chunk

    async def send(self, usock, head_bytes: bytes, replay: bool) -> int:
        """Send `head_bytes` and the whole body to `usock` (OSError: the upstream failed).
        Returns the bytes written (upstream_cx_tx_bytes_total).

        `replay` is True on a second or later attempt: the kept pieces go first. The caller
        checks `replayable` before replaying.
        """
        if replay and self.kept:
            out = head_bytes + b"".join(self.kept)
            await send_all(usock, out)
            n = len(out)
        else:
            sent = send_nowait(usock, head_bytes)  # the usual case: all of it at once
            if sent != len(head_bytes):
                await send_all(usock, memoryview(head_bytes)[sent:])
            n = len(head_bytes)
        if self.done:
            return n
        if self.kind == BODY_LENGTH:
            return n + await self._pump_length(usock)
        return n + await self._pump_chunked(usock)

    async def _pump_length(self, usock) -> int:
        buf, pos = self._buf, self._pos
        sent = 0
        while True:
            take = min(len(buf) - pos, self.length - self.received)
            if take:
                piece = buf[pos:pos + take]
                pos += take
                self.received += take
                self._buf, self._pos = buf, pos
                self._keep(piece)
                await send_all(usock, piece)
                sent += take
            if self.received == self.length:
                self.done = True
                self.leftover = buf[pos:]
                self._buf = b""
                return sent
            buf, pos = await self._more(), 0
            self._buf, self._pos = buf, pos

    async def _pump_chunked(self, usock) -> int:
        reader = self._reader
        buf, pos = self._buf, self._pos
        sent = 0
        while True:
            out = []
            while True:
                kind, a, b = reader.step(buf, pos, len(buf))  # ProtocolError: a bad client body
                if kind == DATA:
                    out.append(b"%x\r\n" % (b - a) + buf[a:b] + b"\r\n")
                    self.received += b - a
                    pos = b
                elif kind == DONE:
                    out.append(LAST_CHUNK)
                    self.done = True
                    self.leftover = buf[a:]
                    self._buf = b""
                    piece = b"".join(out)
                    self._keep(piece)
                    await send_all(usock, piece)
                    return sent + len(piece)
                else:
                    pos = a
                    break
            self._buf, self._pos = buf, pos
            if out:
                piece = b"".join(out)
                self._keep(piece)
                await send_all(usock, piece)
                sent += len(piece)
            buf = buf[pos:] + await self._more()
            pos = 0
            self._buf, self._pos = buf, pos
