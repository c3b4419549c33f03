"""Test helpers: start a real worker process, talk to it over a real WebSocket."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from conftest import REPO, poll_until
from harness import child_env

DEMO_NODES = REPO / "examples" / "demo_nodes.py"


def write_config(base: Path, uuid: str, **cfg) -> Path:
    d = base / "workers"
    d.mkdir(parents=True, exist_ok=True)
    data = {"uuid": uuid, "type": "WSWorker", "host": "127.0.0.1"}
    data.setdefault("package_dependencies", {"demo_nodes": {"package": "demo_nodes", "path": str(DEMO_NODES)}})
    data.update(cfg)
    p = d / f"worker_{uuid}.json"
    p.write_text(json.dumps(data))
    return p


class WorkerProc:
    """A standalone `python -m worker` process (no supervisor)."""

    def __init__(self, base: Path, uuid: str, port: int, python: str = sys.executable, args=(), env=None):
        self.base, self.uuid, self.port = base, uuid, port
        self.log = open(base / f"worker_{uuid}.test.log", "ab")
        e = child_env(**(env or {}))
        self.proc = subprocess.Popen(
            [python, "-m", "worker", f"worker_{uuid}", "--dir", str(base), "--port", str(port), *args],
            cwd=str(REPO), env=e, stdout=self.log, stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> "WorkerProc":
        import urllib.request

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    return r.status == 200
            except Exception:
                return False

        poll_until(ready, timeout, what="worker ready")
        return self

    def output(self) -> str:
        self.log.flush()
        return (self.base / f"worker_{self.uuid}.test.log").read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


class RPCError(Exception):
    def __init__(self, msg: dict):
        super().__init__(msg.get("error"))
        self.msg = msg


class Client:
    """An asyncio protocol client that keeps every event and binary frame it sees."""

    def __init__(self, url: str, headers=None, params=None):
        self.url, self.headers, self.params = url, headers or {}, params
        self.events: list[dict] = []
        self.frames: list[bytes] = []
        self._n = 0
        self._pending: dict = {}

    async def __aenter__(self):
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url + "/", headers=self.headers, params=self.params)
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *a):
        self._reader.cancel()
        await self.ws.close()
        await self.session.close()

    async def _read(self):
        try:
            await self._read_frames()
        finally:  # the connection is gone: whoever waits for a reply learns it now, not at a timeout
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionResetError("connection closed before the reply"))

    async def _read_frames(self):
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.frames.append(msg.data)
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if data.get("type") == "large_message":
                async with self.session.get(self.url + "/message/" + data["msg_id"], headers=self.headers) as r:
                    data = json.loads(await r.text())
            fut = self._pending.get(data.get("id")) if data.get("type") in ("result", "error") else None
            if fut is not None and not fut.done():
                fut.set_result(data)
            else:
                self.events.append(data)

    async def send_raw(self, text: str):
        await self.ws.send_str(text)

    async def request(self, msg: dict, timeout: float = 15.0) -> dict:
        self._n += 1
        mid = msg.setdefault("id", f"t{self._n}")
        fut = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        await self.ws.send_str(json.dumps(msg))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(mid, None)

    async def cmd(self, cmd: str, timeout: float = 15.0, **kwargs):
        reply = await self.request({"type": "cmd", "cmd": cmd, "kwargs": kwargs}, timeout)
        if reply["type"] == "error":
            raise RPCError(reply)
        return reply["result"]

    async def wait_for(self, pred, timeout: float = 10.0, what: str = "event"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if pred(e):
                    return e
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    async def wait_value(self, nid: str, ioid: str, expected, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            v = await self.cmd("get_io_value", nid=nid, ioid=ioid)
            if v == expected:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{nid}.{ioid} is {v!r}, expected {expected!r}")
            await asyncio.sleep(0.02)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


class ChannelWorker:
    """A real `python -m worker` whose supervisor channel is held by the test (frames in and out)."""

    def __init__(self, base: Path, uuid: str, port: int, log_path: Path, before_start=()):
        import socket

        from worker.channel import FrameBuffer, encode

        self.encode, self.buf, self.frames = encode, FrameBuffer(), []
        self.log_path = log_path
        self.ours, theirs = socket.socketpair()
        for frame in before_start:  # queued before the worker starts: its channel thread reads them at once
            self.ours.sendall(encode(frame))
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", f"worker_{uuid}", "--dir", str(base),
                                      "--port", str(port), "--control-fd", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), cwd=str(REPO),
                                     env=child_env(inherit_path=False),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        theirs.close()
        self.ours.settimeout(0.5)

    def send(self, frame: dict) -> None:
        self.ours.sendall(self.encode(frame))

    def wait_ready(self, timeout: float = 60.0) -> "ChannelWorker":
        import socket

        def ready():
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                data = self.ours.recv(65536)
            except socket.timeout:
                return False
            self.frames.extend(f for f in self.buf.feed(data) if isinstance(f, dict))
            return any(f.get("type") == "ready" for f in self.frames)
        poll_until(ready, timeout, what="ready frame")
        return self

    def stop(self) -> int:
        self.send({"type": "stop", "deadline": 5})
        return self.proc.wait(20)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.ours.close()
        self.log.close()
