"""The supervisor <-> worker control channel: newline-delimited JSON over one socket pair.

Dependency-free on purpose: it is the only code the supervisor and the worker share.

Every frame is one JSON object with a "type" key, encoded as UTF-8 on a single line.

worker -> supervisor
  {"type": "runstate", "state": "starting", "detail": "Loading nodespace"}
  {"type": "ready", "host": h, "port": p, "pid": pid}
  {"type": "heartbeat", "seq": n, "lag": seconds, "busy_for": seconds|null, "node": uuid|null}
  {"type": "install", "id": rid, "deps": [{"package": name, "version": spec|null, "path": p|null}]}
  {"type": "stopping", "reason": text}       (the worker is going down on its own: stop_worker, heartbeat)

supervisor -> worker
  {"type": "stop", "deadline": seconds}     save, close clients with 1001, exit 0
  {"type": "save"}
  {"type": "install_progress", "id": rid, "message": text, "progress": 0..1}
  {"type": "install_result", "id": rid, "ok": bool, "error": text|null}
  {"type": "local_scripts", "changes": [{"change": "added"|"modified"|"deleted", "path": p}]}
  {"type": "monitor", "host": h, "port": p, "pid": pid}
"""

from __future__ import annotations

import json
from typing import Any, Iterator

# A frame bigger than this is a protocol violation (a torn or runaway writer), not data.
MAX_FRAME = 4 * 1024 * 1024


class ChannelError(ValueError):
    """A frame that cannot be decoded."""


def encode(msg: dict[str, Any]) -> bytes:
    if "type" not in msg:
        raise ChannelError("frame without 'type'")
    data = json.dumps(msg, separators=(",", ":"), default=str).encode("utf-8")
    # json.dumps never emits a raw newline, so one line is one frame.
    return data + b"\n"


def decode(line: bytes | str) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ChannelError(f"malformed frame: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ChannelError("frame is not an object with a string 'type'")
    return msg


class FrameBuffer:
    """Splits a byte stream into frames; keeps a partial line until its newline arrives."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> Iterator[dict[str, Any] | ChannelError]:
        self._buf += data
        while True:
            i = self._buf.find(b"\n")
            if i < 0:
                if len(self._buf) > self._max:
                    self._buf.clear()
                    yield ChannelError("frame exceeds the size limit")
                return
            line = bytes(self._buf[:i])
            del self._buf[: i + 1]
            if not line.strip():
                continue
            try:
                yield decode(line)
            except ChannelError as e:
                yield e
