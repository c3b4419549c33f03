"""A node run's events are encoded when the main loop is about to wait (worker/server.py
post_later, worker/wakeup.py before_idle), not inside the run: every client still gets every
frame, in the order it happened, on the main loop's connections and on the I/O thread's alike,
and an edit's own events before its reply."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from helpers import Client, WorkerProc, run, write_config

N = 15  # demo.add nodes in the chain c0 -> c1 -> ... (out -> a)


class FrameLog:
    """Every frame one connection gets, in arrival order: ("value", node, io),
    ("event", node, name) or ("reply", id)."""

    def __init__(self, url: str):
        self.url, self.log, self.n = url, [], 0

    async def __aenter__(self):
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url + "/")
        self.reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *a):
        self.reader.cancel()
        await self.ws.close()
        await self.session.close()

    async def _read(self):
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                head = dict(kv.split("=", 1) for kv in msg.data.split(b"\r\n\r\n", 1)[0].decode().replace("; ", ";").split(";"))
                self.log.append(("value", head.get("node"), head.get("io")))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if data.get("type") in ("result", "error"):
                    self.log.append(("reply", data.get("id")))
                elif data.get("type") == "nsevent":
                    self.log.append(("event", (data.get("data") or {}).get("node"), data.get("event")))

    async def send(self, cmd: str, **kwargs) -> str:
        self.n += 1
        mid = f"f{self.n}"
        await self.ws.send_str(json.dumps({"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": mid}))
        return mid

    async def until(self, item, timeout: float = 15.0) -> None:
        for _ in range(int(timeout / 0.01)):
            if item in self.log:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{item} never arrived")


def _chain_frames(log: list, since: int) -> list:
    ids = {f"c{k}" for k in range(N)}
    return [f for f in log[since:] if f[0] != "reply" and f[1] in ids]


async def _scenario(url: str) -> dict:
    async with Client(url) as editor:
        for k in range(N):
            await editor.cmd("add_node", id="demo.add", uuid=f"c{k}")
        for k in range(N - 1):
            await editor.cmd("add_edge", src_nid=f"c{k}", src_ioid="out", trg_nid=f"c{k + 1}", trg_ioid="a")
        async with FrameLog(url) as main_watcher:  # nothing runs: the main loop serves it
            await editor.cmd("add_node", id="demo.sleep", uuid="sleeper")
            await editor.cmd("set_io_value", nid="sleeper", ioid="seconds", value=60)
            await editor.wait_for(lambda e: e.get("event") == "triggerstart"
                                  and (e.get("data") or {}).get("node") == "sleeper", 10, "the sleeper running")
            async with FrameLog(url) as io_watcher, FrameLog(url) as actor:  # a node runs: the I/O thread keeps them
                logs = {"main": main_watcher, "io": io_watcher, "actor": actor}
                since = {k: len(v.log) for k, v in logs.items()}
                mid = await actor.send("set_io_value", nid="c0", ioid="a", value=5)
                for lg in logs.values():
                    await lg.until(("value", f"c{N - 1}", "out"))
                await actor.until(("reply", mid))
                await asyncio.sleep(0.2)  # anything still coming
                return {"since": since, "logs": {k: list(v.log) for k, v in logs.items()}, "mid": mid}


def test_every_client_gets_a_runs_frames_in_causal_order_and_an_edits_events_before_its_reply(config_dir, port):
    write_config(config_dir, "defer1")
    w = WorkerProc(config_dir, "defer1", port).wait_ready()
    try:
        out = run(_scenario(w.url))
    finally:
        assert w.stop() == 0
    logs, since = out["logs"], out["since"]
    chains = {k: _chain_frames(v, since[k]) for k, v in logs.items()}
    assert chains["main"] == chains["io"] == chains["actor"], chains
    seq = chains["main"]
    for k in range(N):
        got_a = seq.index(("value", f"c{k}", "a"))
        start = next(i for i, f in enumerate(seq) if f[0] == "event" and f[1] == f"c{k}"
                     and f[2] in ("triggerstart", "triggerfast"))
        got_out = seq.index(("value", f"c{k}", "out"))
        assert got_a < start < got_out, (k, seq)
        if k + 1 < N:
            assert got_out < seq.index(("value", f"c{k + 1}", "a")), (k, seq)
    actor = logs["actor"][since["actor"]:]
    assert actor.index(("value", "c0", "a")) < actor.index(("reply", out["mid"]))
