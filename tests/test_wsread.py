"""worker/wsread.py: text frames handled inside data_received, every other frame by aiohttp, in order.

Part one serves a real aiohttp app in this process (the handler records which path saw each
message) and talks to it over a real socket with hand-built frames; part two drives a real
worker, with the tap on and off (FN_SUPERVISE_WS_FAST_READ=0), over the same raw frames.
"""

import asyncio
import base64
import json
import os
import struct

import pytest
from aiohttp import WSMsgType, web

from helpers import WorkerProc, run, write_config
from worker import wsread


def frame(payload: bytes | str, opcode: int = 0x1, fin: bool = True, mask: bytes | None = None) -> bytes:
    """A client frame (masked, RFC 6455 5.2)."""
    data = payload.encode() if isinstance(payload, str) else payload
    mask = os.urandom(4) if mask is None else mask
    n = len(data)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def connect(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_frame(reader) -> tuple[int, bytes]:
    """A server frame (unmasked): (opcode, payload)."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 10)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await reader.readexactly(n)


class App:
    """A real aiohttp server whose handler records ('fast', text) or ('aiohttp', type, data)."""

    def __init__(self):
        self.seen: list[tuple] = []
        self.tapped: list[bool] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request):
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        self.tapped.append(wsread.install(ws, request.protocol, lambda t: self.seen.append(("fast", t)), 1 << 20))
        async for msg in ws:
            self.seen.append(("aiohttp", msg.type, msg.data))
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
        return ws

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    async def until(self, n: int) -> list[tuple]:
        for _ in range(500):  # 5 s at most
            if len(self.seen) >= n:
                return self.seen
            await asyncio.sleep(0.01)
        raise AssertionError(f"saw only {self.seen!r}")


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.delenv("FN_SUPERVISE_WS_FAST_READ", raising=False)


def test_text_frames_are_handled_where_they_are_read_however_they_arrive(fast):
    async def go():
        async with App() as app:
            reader, writer = await connect(app.port)
            writer.write(frame("a") + frame("b") + frame("ü" * 200))  # several frames in one read
            await app.until(3)
            for byte in frame("x" * 300):  # one frame a byte at a time (16-bit length)
                writer.write(bytes([byte]))
                await writer.drain()
            await app.until(4)
            half = frame("y" * 70000, mask=b"\1\2\3\4")  # above FAST_MAX: aiohttp's, 64-bit length
            writer.write(half[:1000])
            await asyncio.sleep(0.05)
            writer.write(half[1000:] + frame("z"))
            seen = await app.until(6)
            assert app.tapped == [True]
            # the frame after the big one waits while aiohttp still holds that one for the handler
            assert seen[:5] == [("fast", "a"), ("fast", "b"), ("fast", "ü" * 200), ("fast", "x" * 300),
                                ("aiohttp", WSMsgType.TEXT, "y" * 70000)]
            assert seen[5][-1] == "z"
            assert (await read_frame(reader)) == (0x1, b"echo:" + b"y" * 70000)
            writer.close()
    run(go())


def test_other_frames_go_to_aiohttp_in_order(fast):
    async def go():
        async with App() as app:
            reader, writer = await connect(app.port)
            # ping between texts: answered by aiohttp; the text behind it waits its turn
            writer.write(frame("1") + frame(b"hi", opcode=0x9) + frame("2") + frame(b"\0\1", opcode=0x2)
                         + frame("3a", fin=False) + frame("3b", opcode=0x0) + frame("4"))
            seen = await app.until(5)
            # the ping is answered inside aiohttp's receive(): the handler never sees it
            assert [x[-1] for x in seen] == ["1", "2", b"\0\1", "3a3b", "4"], seen
            assert seen[2] == ("aiohttp", WSMsgType.BINARY, b"\0\1")
            assert seen[3] == ("aiohttp", WSMsgType.TEXT, "3a3b")  # fragmented: aiohttp joins it
            assert seen[0] == ("fast", "1")
            frames = [await read_frame(reader)]
            while frames[-1][0] != 0xA:
                frames.append(await read_frame(reader))
            assert frames[-1] == (0xA, b"hi")  # the pong
            # after a close frame, nothing more is handled
            n = len(app.seen)
            writer.write(frame(struct.pack("!H", 1000), opcode=0x8) + frame("late"))
            while (op := (await read_frame(reader))[0]) != 0x8:
                pass
            await asyncio.sleep(0.1)
            assert all(s[-1] != "late" for s in app.seen[n:]), app.seen[n:]
            writer.close()
    run(go())


def test_a_text_frame_not_utf8_is_closed_with_1007_as_aiohttp_does(fast):
    async def go():
        async with App() as app:
            reader, writer = await connect(app.port)
            writer.write(frame("ok") + frame(b"\xff\xfe", opcode=0x1))
            while True:
                op, data = await read_frame(reader)
                if op == 0x8:
                    break
            assert struct.unpack("!H", data[:2])[0] == 1007
            assert app.seen[0] == ("fast", "ok")
            writer.close()
    run(go())


def test_off_switch_keeps_the_plain_path(monkeypatch):
    monkeypatch.setenv("FN_SUPERVISE_WS_FAST_READ", "0")

    async def go():
        async with App() as app:
            reader, writer = await connect(app.port)
            writer.write(frame("a") + frame("b"))
            assert await app.until(2) == [("aiohttp", WSMsgType.TEXT, "a"), ("aiohttp", WSMsgType.TEXT, "b")]
            assert app.tapped == [False]
            writer.close()
    run(go())


@pytest.mark.parametrize("path", ["1", "0"])
def test_the_worker_answers_raw_frames_in_order_on_both_paths(config_dir, port, path):
    write_config(config_dir, "t1")
    w = WorkerProc(config_dir, "t1", port, env={"FN_SUPERVISE_WS_FAST_READ": path}).wait_ready()

    async def go():
        reader, writer = await connect(port)
        cmd = lambda i, c="uuid": frame(json.dumps({"type": "cmd", "cmd": c, "id": i}))  # noqa: E731
        stream = (cmd(1) + frame(b"p", opcode=0x9) + cmd(2, "get_nodes") + frame(b"\0", opcode=0x2)
                  + cmd(3, "view_state") + frame(json.dumps({"type": "ping"})))
        for k in range(0, len(stream), 7):  # in pieces that split headers and payloads
            writer.write(stream[k:k + 7])
            await writer.drain()
        texts, pongs = [], 0
        while len(texts) < 5:
            op, data = await read_frame(reader)
            if op == 0xA:
                pongs += 1
            elif op == 0x1:
                texts.append(json.loads(data))
        assert [t.get("id") for t in texts] == [1, 2, None, 3, None], texts  # in the order sent
        assert texts[0]["result"] == "t1" and texts[0]["type"] == "result"
        assert texts[1]["type"] == "result" and texts[3]["type"] == "result"
        assert texts[2]["type"] == "error" and "binary frames are not accepted" in texts[2]["error"]
        assert texts[4] == {"type": "pong"}
        if not pongs:
            op, data = await read_frame(reader)
            assert (op, data) == (0xA, b"p")
        writer.close()

    try:
        run(go())
    finally:
        assert w.stop() == 0, w.output()[-3000:]
