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
