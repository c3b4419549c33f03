"""Frames a client gets in one loop turn leave in one send, just before the loop polls again
(worker/wakeup.py before_sleep, worker/server.py Client.flush), in the order they were put."""

import asyncio
import base64
import os
import socket
import struct
import time

from aiohttp import web

from worker import wakeup
from worker.server import Client


def test_before_sleep_runs_after_the_turn_and_never_lets_a_scheduled_callback_wait():
    loop = wakeup.new_loop()
    sel = wakeup.selector_of(loop)
    seen = []

    async def go():
        loop.call_later(30, seen.append, "far")  # the loop would sleep up to 30 s
        done = loop.create_future()

        def hook():
            seen.append("hook")
            loop.call_soon(done.set_result, None)  # scheduled from the hook: must not wait 30 s

        def a():
            seen.append("a")
            sel.before_sleep.append(hook)

        loop.call_soon(a)
        loop.call_soon(seen.append, "b")
        t0 = time.monotonic()
        await asyncio.wait_for(done, 5)
        return time.monotonic() - t0

    try:
        elapsed = loop.run_until_complete(go())
    finally:
        loop.close()
    assert seen == ["a", "b", "hook"]
    assert elapsed < 5


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        n, h = data[1] & 0x7F, 2
        if n == 126:
            n, h = struct.unpack("!H", data[2:4])[0], 4
        out.append((data[0], data[h:h + n]))
        data = data[h + n:]
    return out


def test_frames_of_one_turn_are_held_then_sent_together_in_order():
    loop = wakeup.new_loop()
    result = {}

    async def handle(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        client = Client(ws, request.transport, main=True)
        peer = result["peer"]
        peer.settimeout(5)  # the handshake reply is written by prepare(): read it whole
        head = b""
        while b"\r\n\r\n" not in head:
            head += peer.recv(1)
        peer.setblocking(False)
        client.put("one")
        client.put([b"\x01\x02"])  # a binary value in one chunk: a frame like any other
        client.put("t" * 300)
        try:
            result["mid_turn"] = peer.recv(65536)  # nothing yet: held until the turn ends
        except BlockingIOError:
            result["mid_turn"] = None
        await asyncio.sleep(0)  # the turn ends: one send
        data = b""
        deadline = time.monotonic() + 5
        while len(data) < 2 + 3 + 2 + 2 + 4 + 300 and time.monotonic() < deadline:
            try:
                data += peer.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        result["data"] = data
        client.put(None)
        return ws

    async def go():
        app = web.Application()
        app.router.add_get("/", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        peer = socket.create_connection(("127.0.0.1", port))
        result["peer"] = peer
        key = base64.b64encode(os.urandom(16)).decode()
        peer.sendall((f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        for _ in range(500):
            if "data" in result:
                break
            await asyncio.sleep(0.01)
        peer.close()
        await runner.cleanup()

    try:
        loop.run_until_complete(go())
    finally:
        loop.close()
    assert result["mid_turn"] is None
    assert _frames(result["data"])[:3] == [(0x81, b"one"), (0x82, b"\x01\x02"), (0x81, b"t" * 300)]


def test_before_idle_runs_when_the_loop_would_wait_and_on_a_busy_loop_within_a_few_turns():
    loop = wakeup.new_loop()
    sel = wakeup.selector_of(loop)
    seen = []

    async def go():
        # idle: after the turn's callbacks, before the before_sleep hooks
        def a():
            seen.append("a")
            sel.before_idle.append(lambda: seen.append("idle"))
            sel.before_sleep.append(lambda: seen.append("sleep"))
            loop.call_soon(seen.append, "b")  # the next turn: the loop does not wait yet

        loop.call_soon(a)
        await asyncio.sleep(0.05)
        # busy: a callback that schedules itself every turn; the hook still runs
        turns = {"n": 0, "at": None}
        stop = loop.create_future()

        def spin():
            turns["n"] += 1
            if turns["at"] is None and turns["n"] < 1000:
                loop.call_soon(spin)
            elif not stop.done():
                stop.set_result(None)

        def hook():
            turns["at"] = turns["n"]

        sel.before_idle.append(hook)
        loop.call_soon(spin)
        await asyncio.wait_for(stop, 5)
        return turns["at"]

    try:
        at = loop.run_until_complete(go())
    finally:
        loop.close()
    assert seen[:4] == ["a", "sleep", "b", "idle"] or seen[:4] == ["a", "b", "idle", "sleep"], seen
    assert at is not None and at <= wakeup.IDLE_WAIT_TURNS + 1


def test_a_hooks_own_time_shortens_the_wait_instead_of_delaying_the_timer(monkeypatch):
    """The wait after a before_sleep hook ends at the deadline asyncio computed before the hook ran
    (a 3 ms flush before an 8 ms timer leaves a wait of <= 5 ms, not 8). Checked against the times
    each turn actually saw, so a loaded host that stretches the hook itself proves nothing wrong;
    a turn whose hook ended before the deadline must have waited, and only until it."""
    cls = wakeup.WakingSelector
    turns = []  # per sleeping turn: [entered, asked timeout, hook ended, wait asked or None]
    real_select, real_precise = cls.select, cls._select_precisely

    def select(self, timeout=None):
        turns.append([time.monotonic(), timeout, None, None])
        return real_select(self, timeout)

    def precise(self, timeout):
        if turns:
            turns[-1][3] = (time.monotonic(), timeout)
        return real_precise(self, timeout)

    monkeypatch.setattr(wakeup, "WAIT_PRECISELY", True)
    monkeypatch.setattr(cls, "select", select)
    monkeypatch.setattr(cls, "_select_precisely", precise)

    def hook():  # a flush that takes 3 ms
        time.sleep(0.003)
        if turns:
            turns[-1][2] = time.monotonic()

    checked = 0
    for _ in range(20):  # until a turn's hook ended before its deadline (a loaded host may stretch it)
        turns.clear()
        loop = wakeup.new_loop()
        sel = wakeup.selector_of(loop)

        async def go():
            fired = loop.create_future()
            loop.call_later(0.008, fired.set_result, None)
            sel.before_sleep.append(hook)
            await asyncio.wait_for(fired, 5)

        try:
            loop.run_until_complete(go())
        finally:
            loop.close()
        for entered, asked, hook_end, wait in turns:
            if not asked or hook_end is None:
                continue  # no timer pending, or no hook ran in this turn
            deadline = entered + asked
            if hook_end < deadline:
                assert wait is not None, f"the turn did not wait though its deadline was {deadline - hook_end:.4f}s away"
                called, waited = wait
                # 0.1 ms for the spies' own clock reads; without the deadline it overshoots by the hook's 3 ms
                assert called + waited <= deadline + 1e-4, (called + waited - deadline, turns)
                checked += 1
        if checked:
            break
    assert checked, f"no turn's 3 ms hook ended before its 8 ms deadline in 20 tries: {turns}"
