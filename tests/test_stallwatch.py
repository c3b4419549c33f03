"""Liveness on connections the main loop already serves, while a node blocks that loop
(worker/stallwatch.py): WebSocket pings, JSON pings, `uuid` and `heartbeat` are answered during
the block, every other frame after it, in order, and no frame is lost, doubled or corrupted.

A raw WebSocket client (no aiohttp on our side of the wire) so that frames can be split at any
byte and every server frame is checked as it comes.
"""

import asyncio
import base64
import json
import os
import random
import time

import pytest
import urllib.request

from helpers import WorkerProc, run, write_config
from test_tls import cert  # noqa: F401  (the fixture: a self-signed certificate for the run)


class RawWS:
    """A masked-frame client over a plain TCP stream; records every server frame in order."""

    def __init__(self, port: int, read: bool = True):
        self.port, self.read = port, read
        self.frames: list[tuple[int, bytes]] = []  # (opcode, payload) in arrival order
        self.got = asyncio.Event()

    async def __aenter__(self):
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.w.write((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(self.r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"permessage-deflate" not in head.lower()
        self.reader = asyncio.ensure_future(self._read()) if self.read else None
        return self

    def start_reading(self):
        self.reader = asyncio.ensure_future(self._read())

    async def __aexit__(self, *a):
        if self.reader is not None:
            self.reader.cancel()
        self.w.close()
        try:
            await self.w.wait_closed()
        except ConnectionError:
            pass

    async def _read(self):
        while True:
            b0, b1 = await self.r.readexactly(2)
            assert b0 & 0x80 and not b0 & 0x70, f"a fragmented or compressed server frame: {b0:#x}"
            assert not b1 & 0x80, "a masked server frame"
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.r.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.r.readexactly(8), "big")
            payload = await self.r.readexactly(n)
            op = b0 & 0x0F
            assert op in (0x1, 0x2, 0xA), f"unexpected opcode {op:#x}"
            if op == 0x1:
                json.loads(payload)  # every text frame parses
            self.frames.append((op, payload))
            self.got.set()

    @staticmethod
    def frame(op: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | op, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | op, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | op, 0x80 | 127)) + n.to_bytes(8, "big")
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
        body = (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little") if n else b""
        return head + mask + body

    def text_frame(self, msg: dict) -> bytes:
        return self.frame(0x1, json.dumps(msg).encode())

    async def send(self, data: bytes, split: random.Random | None = None):
        """data, cut at random byte boundaries (each piece its own write, a pause between)."""
        if split is None:
            self.w.write(data)
        else:
            cuts = sorted(split.sample(range(1, len(data)), min(len(data) - 1, split.randint(0, 4))))
            for a, b in zip([0] + cuts, cuts + [len(data)]):
                self.w.write(data[a:b])
                await self.w.drain()
                await asyncio.sleep(split.choice((0, 0.001, 0.02)))
        await self.w.drain()

    def texts(self) -> list[dict]:
        return [json.loads(p) for op, p in self.frames if op == 0x1]

    def index(self, pred) -> int | None:
        for i, (op, p) in enumerate(self.frames):
            if pred(op, p):
                return i
        return None

    async def until(self, pred, timeout: float, what: str) -> int:
        deadline = time.monotonic() + timeout
        while True:
            i = self.index(pred)
            if i is not None:
                return i
            left = deadline - time.monotonic()
            if left <= 0 or (self.reader is not None and self.reader.done()):
                if self.reader is not None and self.reader.done() and not self.reader.cancelled():
                    self.reader.result()  # a corrupt frame: its assertion, not a timeout
                raise AssertionError(f"timed out waiting for {what}; got {self.frames[-8:]}")
            self.got.clear()
            try:
                await asyncio.wait_for(self.got.wait(), left)
            except asyncio.TimeoutError:
                pass


def watched(w) -> int:
    """Connections the stall watch covers (/healthz): the main loop serves them, their sockets are plain."""
    with urllib.request.urlopen(w.url + "/healthz", timeout=5) as r:
        return json.loads(r.read())["stall_watched"]


def reply_to(mid):
    return lambda op, p: op == 0x1 and json.loads(p).get("id") == mid


def event(name: str):
    return lambda op, p: op == 0x1 and json.loads(p).get("event") == name


@pytest.fixture(params=["on", "off"])
def worker(request, config_dir, port):
    write_config(config_dir, "sw")
    env = {"FN_SUPERVISE_STALL_WATCH": "1" if request.param == "on" else "0"}
    w = WorkerProc(config_dir, "sw", port, env=env).wait_ready()
    w.watch = request.param == "on"
    yield w
    assert w.stop() == 0, w.output()[-3000:]


async def start_block(c: RawWS, seconds: float, mid: str):
    """Set the block node's seconds (it runs at once) and wait for that run's triggerstart."""
    c.frames.clear()
    await c.send(c.text_frame({"type": "cmd", "cmd": "set_io_value", "id": mid,
                               "kwargs": {"nid": "blk", "ioid": "seconds", "value": seconds}}))
    await c.until(event("triggerstart"), 10, "triggerstart")


def test_a_served_connection_is_answered_during_a_block_and_its_commands_after_it(worker):
    async def go():
        async with RawWS(worker.port) as c:
            await c.send(c.text_frame({"type": "cmd", "cmd": "add_node", "id": "a", "kwargs": {"id": "demo.block", "uuid": "blk"}}))
            await c.until(reply_to("a"), 10, "add_node")
            await c.until(event("triggerdone"), 10, "the first run")  # a new node runs once (1 s)
            assert watched(worker) == (1 if worker.watch else 0)  # served by the main loop
            await start_block(c, 4.0, "s")
            await asyncio.sleep(0.4)  # past STALL_AFTER: the main loop now counts as stalled
            await c.send(c.frame(0x9, b"live?"))
            await c.send(c.text_frame({"type": "ping"}))
            await c.send(c.text_frame({"type": "cmd", "cmd": "get_io_value", "id": "g1",
                                       "kwargs": {"nid": "blk", "ioid": "seconds"}}))
            await c.send(c.text_frame({"type": "cmd", "cmd": "uuid", "id": "u"}))
            await c.send(c.text_frame({"type": "cmd", "cmd": "heartbeat", "id": "h"}))
            await c.send(c.text_frame({"type": "cmd", "cmd": "get_io_value", "id": "g2",
                                       "kwargs": {"nid": "blk", "ioid": "out"}}))
            done = await c.until(event("triggerdone"), 10, "the 4 s run's end")
            g1, g2 = await c.until(reply_to("g1"), 10, "g1"), await c.until(reply_to("g2"), 10, "g2")
            assert done < g1 < g2  # commands wait for the loop, in the order sent
            pong = await c.until(lambda op, p: op == 0xA, 10, "pong")
            jpong = await c.until(lambda op, p: op == 0x1 and json.loads(p) == {"type": "pong"}, 10, "JSON pong")
            u, h = await c.until(reply_to("u"), 10, "uuid"), await c.until(reply_to("h"), 10, "heartbeat")
            assert c.frames[pong] == (0xA, b"live?")
            assert json.loads(c.frames[u][1]) == {"type": "result", "result": "sw", "id": "u"}
            assert json.loads(c.frames[h][1])["type"] == "result"
            if worker.watch:  # answered while the node held the loop
                assert max(pong, jpong, u, h) < done, c.frames
            else:  # the stock worker's behaviour: nothing until the block ends (so the test can fail)
                assert min(pong, jpong, u, h) > done, c.frames
            # the connection stays usable, and each reply came exactly once
            await c.send(c.text_frame({"type": "cmd", "cmd": "uuid", "id": "u2"}))
            await c.send(c.frame(0x9, b"again"))
            await c.until(reply_to("u2"), 10, "uuid after the block")
            await c.until(lambda op, p: op == 0xA and p == b"again", 10, "pong after the block")
            for mid in ("u", "h", "g1", "g2", "u2"):
                assert sum(1 for d in c.texts() if d.get("id") == mid) == 1, mid
            assert sum(1 for op, p in c.frames if op == 0xA) == 2
            assert sum(1 for d in c.texts() if d == {"type": "pong"}) == 1
    run(go())


def answered_in_blocks(c: RawWS, fast_ids: set) -> int:
    """Liveness replies that arrived between a triggerstart and its triggerdone."""
    inside, n = False, 0
    for op, p in c.frames:
        d = json.loads(p) if op == 0x1 else None
        if d is not None and d.get("event") in ("triggerstart", "triggerdone"):
            inside = d["event"] == "triggerstart"
        elif inside and (op == 0xA or d == {"type": "pong"} or (d or {}).get("id") in fast_ids):
            n += 1
    return n


def test_random_blocks_and_split_frames_on_two_clients_every_reply_exactly_once(worker):
    seed = int(os.environ.get("STALLWATCH_SEED") or random.randrange(1 << 30))
    print("seed", seed)
    rnd = random.Random(seed)

    async def go():
        async with RawWS(worker.port) as a, RawWS(worker.port) as b:
            await a.send(a.text_frame({"type": "cmd", "cmd": "add_node", "id": "add", "kwargs": {"id": "demo.block", "uuid": "blk"}}))
            await a.until(reply_to("add"), 10, "add_node")
            await a.until(event("triggerdone"), 10, "the first run")
            assert watched(worker) == (2 if worker.watch else 0)
            sent = {a: [], b: []}  # per client: ("id", mid, fast) | ("ping", payload) | ("jping",)
            n = 0
            for rnd_no in range(6):
                seconds = round(rnd.uniform(0.3, 1.6), 3)
                n += 1
                trig = f"t{n}"
                await a.send(a.text_frame({"type": "cmd", "cmd": "set_io_value", "id": trig,
                                           "kwargs": {"nid": "blk", "ioid": "seconds", "value": seconds}}))
                sent[a].append(("id", trig, False))
                end = time.monotonic() + seconds + 0.5
                while time.monotonic() < end:
                    c = rnd.choice((a, b))
                    batch = b""
                    for _ in range(rnd.randint(1, 4)):
                        n += 1
                        kind = rnd.choice(("wsping", "jping", "uuid", "heartbeat", "cmd"))
                        if kind == "wsping":
                            payload = f"p{n}".encode()
                            batch += c.frame(0x9, payload)
                            sent[c].append(("ping", payload))
                        elif kind == "jping":
                            batch += c.text_frame({"type": "ping"})
                            sent[c].append(("jping",))
                        elif kind == "cmd":
                            batch += c.text_frame({"type": "cmd", "cmd": "get_io_value", "id": f"m{n}",
                                                   "kwargs": {"nid": "blk", "ioid": "seconds"}})
                            sent[c].append(("id", f"m{n}", False))
                        else:
                            batch += c.text_frame({"type": "cmd", "cmd": kind, "id": f"m{n}"})
                            sent[c].append(("id", f"m{n}", True))
                    await c.send(batch, split=rnd)
                    await asyncio.sleep(rnd.choice((0, 0.01, 0.05, 0.15)))
            for c in (a, b):
                ids = [s[1] for s in sent[c] if s[0] == "id"]
                for mid in ids:
                    await c.until(reply_to(mid), 20, f"the reply to {mid}")
                pings = [s[1] for s in sent[c] if s[0] == "ping"]
                jpings = sum(1 for s in sent[c] if s[0] == "jping")
                deadline = time.monotonic() + 10
                while (sum(1 for op, _ in c.frames if op == 0xA) < len(pings)
                       or sum(1 for d in c.texts() if d == {"type": "pong"}) < jpings):
                    assert time.monotonic() < deadline, "pongs missing"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)  # a doubled reply would come now
                texts = c.texts()
                for mid in ids:
                    assert sum(1 for d in texts if d.get("id") == mid) == 1, (seed, mid)
                assert sorted(p for op, p in c.frames if op == 0xA) == sorted(pings), seed
                assert sum(1 for d in texts if d == {"type": "pong"}) == jpings, seed
                # commands that wait for the loop are answered in the order they were sent
                slow = [s[1] for s in sent[c] if s[0] == "id" and not s[2]]
                order = [d["id"] for d in texts if d.get("id") in set(slow)]
                assert order == slow, seed
            during = sum(answered_in_blocks(c, {s[1] for s in sent[c] if s[0] == "id" and s[2]}) for c in (a, b))
            print("liveness replies during blocks:", during)
            if worker.watch:
                assert during >= 20, seed  # the rounds did exercise the watchdog (off: a handful)
    run(go())


def test_tls_connections_are_not_borrowed_and_come_through_a_block_intact(config_dir, port, cert):
    """TLS bytes are records, not frames: such a connection waits for the loop, as before, and
    every frame of it arrives whole after the block."""
    import ssl

    import aiohttp

    write_config(config_dir, "st", ssl=True, ssl_certfile=str(cert[0]), ssl_keyfile=str(cert[1]))
    w = WorkerProc(config_dir, "st", port)
    ctx = ssl.create_default_context(cafile=str(cert[0]))

    async def go():
        poll_until_ready = time.monotonic() + 30
        while True:  # wait_ready polls http://; this worker only speaks https
            try:
                async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{port}/readyz", ssl=ctx) as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < poll_until_ready, w.output()[-2000:]
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as s, s.ws_connect(f"wss://127.0.0.1:{port}/", ssl=ctx, autoping=False) as ws:
            got: list = []

            async def send(msg):
                await ws.send_str(json.dumps(msg))

            async def until(pred, what):
                deadline = time.monotonic() + 15
                while not any(pred(m) for m in got):
                    assert time.monotonic() < deadline, (what, got[-5:])
                    m = await asyncio.wait_for(ws.receive(), deadline - time.monotonic())
                    got.append((m.type, json.loads(m.data) if m.type == aiohttp.WSMsgType.TEXT else m.data))
                return next(i for i, m in enumerate(got) if pred(m))

            ev = lambda name: lambda m: m[0] == aiohttp.WSMsgType.TEXT and m[1].get("event") == name  # noqa: E731
            rid = lambda mid: lambda m: m[0] == aiohttp.WSMsgType.TEXT and m[1].get("id") == mid  # noqa: E731
            await send({"type": "cmd", "cmd": "add_node", "id": "a", "kwargs": {"id": "demo.block", "uuid": "blk"}})
            await until(ev("triggerdone"), "the first run")
            got.clear()
            await send({"type": "cmd", "cmd": "set_io_value", "id": "s",
                        "kwargs": {"nid": "blk", "ioid": "seconds", "value": 2.0}})
            await until(ev("triggerstart"), "triggerstart")
            await asyncio.sleep(0.4)
            await ws.ping(b"tls?")
            await send({"type": "cmd", "cmd": "uuid", "id": "u"})
            await send({"type": "cmd", "cmd": "get_io_value", "id": "g", "kwargs": {"nid": "blk", "ioid": "seconds"}})
            done = await until(ev("triggerdone"), "triggerdone")
            pong = await until(lambda m: m[0] == aiohttp.WSMsgType.PONG, "pong")
            u, g = await until(rid("u"), "uuid"), await until(rid("g"), "get_io_value")
            # Not borrowed (an SSL transport has no socket to lend): the main loop answers after
            # the block. (A connection accepted during a load spike would be the I/O thread's for
            # its lifetime and answered during it; only the command's order is certain.)
            assert done < g and u < g, got
            assert got[pong][1] == b"tls?" and got[u][1]["result"] == "st" and got[g][1]["result"] == 2.0
            await send({"type": "cmd", "cmd": "uuid", "id": "u2"})
            await until(rid("u2"), "uuid after the block")
    try:
        run(go())
    finally:
        assert w.stop() == 0, w.output()[-3000:]


def test_scan_parses_only_whole_simple_frames_and_gives_up_on_the_rest():
    from worker.stallwatch import scan

    ping = RawWS.frame(0x9, b"abc")
    text = RawWS.frame(0x1, b'{"type": "ping"}')
    assert scan(ping, 1 << 16) == (0x9, b"abc", len(ping))
    assert scan(text + ping, 1 << 16) == (0x1, b'{"type": "ping"}', len(text))
    for cut in range(len(text)):
        assert scan(text[:cut], 1 << 16) is None  # incomplete: wait for more
    long = RawWS.frame(0x1, b"x" * 300)
    assert scan(long, 1 << 16)[2] == len(long) and scan(long, 299) == "opaque"  # beyond the limit
    assert scan(bytes((0x01,)) + text[1:], 1 << 16) == "opaque"  # not final: a fragment
    assert scan(bytes((0xC1,)) + text[1:], 1 << 16) == "opaque"  # RSV1: deflated
    assert scan(RawWS.frame(0x8, b"\x03\xe8"), 1 << 16) == "opaque"  # close: all after it is the loop's
    assert scan(bytes((0x81, 0x02)) + b"{}", 1 << 16) == "opaque"  # unmasked: aiohttp's error to give
    assert scan(RawWS.frame(0x9, b"p" * 126), 1 << 16) == "opaque"  # a control frame too long


@pytest.mark.parametrize("worker", ["on"], indirect=True)  # the refusal to write exists only with the watch
def test_replies_wait_for_the_loop_while_its_own_output_is_pending(worker):
    """A client that reads nothing has megabytes of replies pending in the transport when a block
    starts: the watchdog must not write into that stream, so its pings wait for the loop, and the
    client, once it reads, gets every frame whole and every reply once."""
    async def go():
        async with RawWS(worker.port) as b, RawWS(worker.port, read=False) as x:
            await b.send(b.text_frame({"type": "cmd", "cmd": "add_node", "id": "a1", "kwargs": {"id": "demo.block", "uuid": "blk"}}))
            await b.send(b.text_frame({"type": "cmd", "cmd": "add_node", "id": "a2", "kwargs": {"id": "demo.text", "uuid": "txt"}}))
            await b.until(reply_to("a2"), 10, "add_node")
            await b.until(event("triggerdone"), 10, "the first run")
            big = "x" * 200_000
            await b.send(b.text_frame({"type": "cmd", "cmd": "set_io_value", "id": "v",
                                       "kwargs": {"nid": "txt", "ioid": "value", "value": big}}))
            await b.until(reply_to("v"), 10, "set_io_value")
            assert watched(worker) == 2
            ids = [f"g{i}" for i in range(40)]  # 11 MB of replies (base64) x does not read yet
            for mid in ids:
                await x.send(x.text_frame({"type": "cmd", "cmd": "get_io_full_value", "id": mid,
                                           "kwargs": {"nid": "txt", "ioid": "value"}}))
            await asyncio.sleep(0.5)  # the loop answers them; most stay in its transport's buffer
            await start_block(b, 2.0, "s")
            await asyncio.sleep(0.5)  # stalled now: the watchdog borrows x's socket
            await x.send(x.frame(0x9, b"x?"))
            await x.send(x.text_frame({"type": "ping"}))
            await x.send(x.text_frame({"type": "cmd", "cmd": "uuid", "id": "u"}))
            await b.until(event("triggerdone"), 10, "the block's end")
            x.start_reading()
            for mid in ids:
                i = await x.until(reply_to(mid), 20, mid)
                assert base64.b64decode(json.loads(x.frames[i][1])["result"]["data"]) == big.encode()
            u = await x.until(reply_to("u"), 10, "uuid")
            await x.until(lambda op, p: op == 0xA and p == b"x?", 10, "pong")
            await x.until(lambda op, p: op == 0x1 and json.loads(p) == {"type": "pong"}, 10, "JSON pong")
            assert u > max(x.index(reply_to(mid)) for mid in ids)  # the loop answered it, after its output
            await asyncio.sleep(0.2)
            texts = x.texts()
            for mid in ids + ["u"]:
                assert sum(1 for d in texts if d.get("id") == mid) == 1, mid
            assert sum(1 for op, _ in x.frames if op == 0xA) == 1
    run(go())
