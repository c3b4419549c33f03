"""WebSocket compression: a browser-like client that offers permessage-deflate gets a plain
connection by default (the one-send-per-turn path and the stall watch cover it, /healthz counts
it), and a compressed one when the config asks for it; both are served the same."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import pytest

from conftest import poll_until
from helpers import WorkerProc, run, write_config


def _watched(w: WorkerProc) -> int:
    with urllib.request.urlopen(w.url + "/healthz", timeout=5) as r:
        return json.loads(r.read())["stall_watched"]


@pytest.mark.parametrize("on", [False, True])
def test_a_client_offering_deflate_gets_what_the_config_says(config_dir, port, on):
    uid = f"deflate{int(on)}"
    write_config(config_dir, uid, **({"ws_compression": True} if on else {}))
    w = WorkerProc(config_dir, uid, port).wait_ready()
    try:
        async def go():
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(w.url, compress=15) as ws:  # what a browser offers
                    negotiated = ws.compress
                    for i in range(3):
                        await ws.send_str(json.dumps({"type": "cmd", "cmd": "uuid", "id": f"u{i}"}))
                        while True:
                            msg = json.loads((await ws.receive(timeout=10)).data)
                            if msg.get("id") == f"u{i}":
                                break
                        assert msg["result"] == uid
                    watched = await asyncio.to_thread(poll_until, lambda: _watched(w) == (0 if on else 1) or None,
                                                      10, 0.05, "the stall watch's count")
                    return negotiated, watched
        negotiated, _ = run(go())
        assert negotiated == (15 if on else 0)
    finally:
        assert w.stop() == 0
