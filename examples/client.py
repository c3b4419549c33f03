"""Build and run a small graph over the FuncNodes protocol, then print the result.

    python examples/client.py ws://127.0.0.1:9382 [--token TOKEN]

Needs only aiohttp. The worker must have the demo nodes (examples/demo_nodes.py), as the
demo worker (`fn-supervise demo`) has.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys

import aiohttp


class WorkerClient:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.ids = itertools.count(1)

    async def cmd(self, cmd: str, timeout: float = 10.0, **kwargs):
        mid = f"c{next(self.ids)}"
        await self.ws.send_str(json.dumps({"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": mid}))
        async with asyncio.timeout(timeout):
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary io_value frames and the like
                data = json.loads(msg.data)
                if data.get("id") != mid or data.get("type") not in ("result", "error"):
                    continue  # events for everyone
                if data["type"] == "error":
                    raise RuntimeError(f"{cmd}: {data['error']}")
                return data["result"]
        raise ConnectionError("connection closed")


async def main(url: str, token: str | None) -> float:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers=headers) as ws:
            c = WorkerClient(ws)
            print("worker", await c.cmd("uuid"))
            for nid in ("example_a", "example_b", "example_sum"):
                await c.cmd("remove_node", id=nid)
            await c.cmd("add_node", id="demo.number", uuid="example_a", properties={"frontend:pos": [0, 0]})
            await c.cmd("add_node", id="demo.number", uuid="example_b", properties={"frontend:pos": [0, 200]})
            await c.cmd("add_node", id="demo.add", uuid="example_sum", properties={"frontend:pos": [300, 100]})
            await c.cmd("add_edge", src_nid="example_a", src_ioid="out", trg_nid="example_sum", trg_ioid="a")
            await c.cmd("add_edge", src_nid="example_b", src_ioid="out", trg_nid="example_sum", trg_ioid="b")
            await c.cmd("set_io_value", nid="example_a", ioid="value", value=20, set_default=True)
            await c.cmd("set_io_value", nid="example_b", ioid="value", value=22, set_default=True)
            async with asyncio.timeout(10):
                while (result := await c.cmd("get_io_value", nid="example_sum", ioid="out")) != 42:
                    await asyncio.sleep(0.05)
            print("example_sum.out =", result)
            return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="ws://host:port of the worker")
    ap.add_argument("--token", help="the worker's auth token, if it has one")
    a = ap.parse_args()
    sys.exit(0 if asyncio.run(main(a.url, a.token)) == 42 else 1)
