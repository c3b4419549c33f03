"""Client text frames dispatched where they are read, with no task switch per message.

aiohttp reads a WebSocket frame into a queue, wakes the handler task (a future, a task step, a
WSMessage) and only then does the handler see it. For the edit path that hop is a fair part of
the worker's own CPU per edit. FrameTap sits in front of aiohttp's WebSocketReader as the
connection's payload parser: a complete, final, masked, uncompressed text frame of valid UTF-8 up
to FAST_MAX bytes goes straight to a callback, inside data_received. Every other frame (ping,
pong, close, binary, fragmented, compressed, too large, not UTF-8, unmasked) and everything after
a close frame is handed, byte for byte, to aiohttp's own reader, which answers it as before. A
text frame waits behind any message aiohttp still holds for the handler, so frames are handled in
the order they came.

Relies on aiohttp internals (pinned in installed()): RequestHandler._payload_parser,
WebSocketResponse._parser and ._reader._buffer. When they are absent, install() says so and the
handler reads the plain way (`async for msg in ws`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

FAST_MAX = 64 << 10  # larger frames take aiohttp's path (rare; no buffering of big frames here)
_NEVER = 1 << 62  # "hand every byte to aiohttp from now on"


def enabled() -> bool:
    """FN_SUPERVISE_WS_FAST_READ=0 keeps aiohttp's plain path (for tests of both paths)."""
    return os.environ.get("FN_SUPERVISE_WS_FAST_READ", "1") != "0"


def unmask(mask: bytes, payload: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


class FrameTap:
    """The protocol's payload parser: feed_data(data) -> (eof, tail), feed_eof(), as aiohttp's."""

    def __init__(self, inner: Any, on_text: Callable[[str], None], held: Callable[[], bool],
                 limit: int = FAST_MAX):
        self.inner = inner  # aiohttp's WebSocketReader
        self.on_text = on_text
        self.held = held  # aiohttp still holds a message for the handler
        self.limit = min(limit, FAST_MAX)
        self._buf = b""  # the start of a frame not complete yet
        self._owed = 0  # bytes of the current frame that go to aiohttp
        # Between feeds, with no chunk read and not yet fed (worker/stallwatch.py clears it on
        # recv): the reader's whole state is _buf and _owed, so another thread may continue it.
        self.idle = True

    def feed_eof(self) -> None:
        self.inner.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if type(data) is not bytes:
            data = bytes(data)
        if self._buf:
            data, self._buf = self._buf + data, b""
        pos, n = 0, len(data)
        while pos < n:
            if self._owed:
                take = min(self._owed, n - pos)
                self._owed -= take
                eof, tail = self.inner.feed_data(data[pos:pos + take])
                pos += take
                if eof:  # aiohttp saw a protocol error: it has told the handler
                    self._owed = _NEVER
                    self.idle = True
                    return eof, tail
                continue
            if n - pos < 2:
                break
            b0, b1 = data[pos], data[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                head = 4
                if n - pos < head:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
            elif length == 127:
                head = 10
                if n - pos < head:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
            masked = b1 & 0x80
            if masked:
                head += 4
            if b0 == 0x81 and masked and length <= self.limit and not self.held():
                end = pos + head + length
                if end > n:
                    break  # wait for the rest (at most limit bytes)
                try:
                    text = unmask(data[pos + head - 4:pos + head], data[pos + head:end]).decode("utf-8")
                except UnicodeDecodeError:
                    self._owed = head + length  # aiohttp closes with 1007, as before
                    continue
                pos = end
                self.on_text(text)
                continue
            # aiohttp's frame: exactly its bytes; after a close frame, everything
            self._owed = _NEVER if b0 & 0x0F == 0x8 else head + length
        if pos < n:
            self._buf = data[pos:]
        self.idle = True
        return False, b""


def install(ws: Any, protocol: Any, on_text: Callable[[str], None], limit: int) -> bool:
    """Put a FrameTap in front of ws's reader (after ws.prepare). False: the plain path stays."""
    if not enabled():
        return False
    inner = getattr(ws, "_parser", None)
    queue = getattr(ws, "_reader", None)
    if (inner is None or queue is None or getattr(protocol, "_payload_parser", None) is not inner
            or not hasattr(queue, "_buffer") or getattr(ws, "compress", 0)):
        return False
    protocol._payload_parser = FrameTap(inner, on_text, lambda: bool(queue._buffer), limit)
    return True
