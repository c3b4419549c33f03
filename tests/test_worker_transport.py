"""The WebSocket transport under stress: oversized frames, slow clients, staged large messages."""

import asyncio
import base64
import json
import os
import socket
import time

import aiohttp
import psutil
import pytest

from conftest import poll_until
from helpers import Client, WorkerProc, run, write_config


@pytest.fixture
def worker(config_dir, port):
    write_config(config_dir, "t1")
    w = WorkerProc(config_dir, "t1", port, env={"FN_SUPERVISE_LARGE_MESSAGE_TTL": "1.5"}).wait_ready()
    yield w
    assert w.stop() == 0, w.output()[-3000:]


def test_an_oversized_frame_is_answered_with_its_request_id(worker):
    async def go():
        async with Client(worker.url) as c:
            pad = "x" * (2 << 20)
            msg = {"type": "cmd", "cmd": "set_io_value", "kwargs": {"nid": "a", "id": "inner", "value": pad}, "id": "big1"}
            reply = await c.request(msg, timeout=10)  # waits for its own id: null would time out
            assert reply["type"] == "error" and reply["id"] == "big1" and "exceeds the limit" in reply["error"]
            reply = await c.request({"id": 42, "type": "cmd", "cmd": "uuid", "pad": pad}, timeout=10)
            assert reply["id"] == 42 and reply["type"] == "error"
            # the id last, as many clients put it
            reply = await c.request({"type": "cmd", "cmd": "uuid", "kwargs": {"v": pad}}, timeout=10)
            assert reply["type"] == "error" and reply["id"].startswith("t")
            # an id neither near the start nor last cannot be read: null
            await c.send_raw(json.dumps({"type": "cmd", "pad": pad, "id": "mid", "more": 1}))
            err = await c.wait_for(lambda e: e.get("type") == "error")
            assert err["id"] is None
            assert await c.cmd("uuid") == "t1"
    run(go())


async def _health(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/healthz") as r:
            return await r.json()


def test_staged_large_messages_expire_on_their_own_and_after_their_fetch(worker):
    """TTL is 1.5 s here. Nothing but /healthz (which does not touch the store) is asked."""
    async def go():
        async with aiohttp.ClientSession() as s, s.ws_connect(worker.url + "/") as ws:
            async def stub(mid):
                await ws.send_str(json.dumps({"type": "cmd", "cmd": "add_node", "id": "a" + mid,
                                              "kwargs": {"id": "demo.text", "uuid": "n" + mid}}))
                await ws.send_str(json.dumps({"type": "cmd", "cmd": "set_io_value", "id": mid,
                                              "kwargs": {"nid": "n" + mid, "ioid": "value", "value": "v" * 1_000_000}}))
                while True:
                    frame = await ws.receive(timeout=10)
                    if frame.type != aiohttp.WSMsgType.TEXT:
                        continue  # the io_value preview
                    msg = json.loads(frame.data)
                    if msg.get("type") == "large_message":
                        return msg
            first = await stub("1")
            assert (await _health(worker.url))["staged_messages"] == 1
            t0 = time.monotonic()
            while (await _health(worker.url))["staged_messages"]:
                assert time.monotonic() - t0 < 10, "the staged message never expired"
                await asyncio.sleep(0.1)
            assert (await _health(worker.url))["staged_bytes"] == 0
            async with s.get(first["url"]) as r:
                assert r.status == 404
            second = await stub("2")
            async with s.get(second["url"]) as r:
                assert r.status == 200 and json.loads(await r.text())["id"] == "2"
            assert (await _health(worker.url))["staged_messages"] == 0  # gone with its one fetch
            async with s.get(second["url"]) as r:
                assert r.status == 404
    run(go())


def _raw_ws(port: int) -> socket.socket:
    """A real WebSocket client on a plain socket with a tiny receive buffer, that never reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, "handshake failed"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def _frame(text: str) -> bytes:
    data = text.encode()
    n = len(data)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return head + b"\0\0\0\0" + data  # a zero mask leaves the payload as it is


def _worker_holds(pid: int, local_port: int) -> bool:
    return any(c.raddr and c.raddr.port == local_port for c in psutil.Process(pid).net_connections("tcp"))


def test_a_client_that_stops_reading_is_closed_and_let_go(worker):
    s = _raw_ws(worker.port)
    local_port = s.getsockname()[1]
    try:
        # Fast commands are answered inline: far more replies than the queue (10000) plus the
        # kernel's buffers hold, since this client never reads one.
        pad = "p" * 500
        burst = b"".join(_frame(json.dumps({"type": "cmd", "cmd": "uuid", "id": f"{pad}{i}"})) for i in range(1000))
        s.setblocking(False)
        view, sent = memoryview(burst * 30), 0

        def flood():  # send what the worker reads, never block: it may stop reading once it closes
            nonlocal sent
            try:
                while sent < len(view):
                    sent += s.send(view[sent:sent + (1 << 16)])
            except BlockingIOError:
                pass
            except OSError:
                return True  # reset: it let go already
            # Noticed by a full queue or by a reply blocked for SEND_TIMEOUT, whichever comes first
            # on a loaded machine; once everything is sent, no send can see the reset, so the log
            # line is the sign.
            return "too slow" in worker.output()

        poll_until(flood, 45, what="the worker to notice the slow client")
        # Let go within the bounded close handshake, although this client still reads nothing.
        poll_until(lambda: not _worker_holds(worker.proc.pid, local_port), 10, what="the worker to drop the socket")
        health = run(_health(worker.url))
        assert health["clients"] == 0
    finally:
        s.close()

    async def still_serving():
        async with Client(worker.url) as c:
            assert await c.cmd("uuid") == "t1"
    run(still_serving())
