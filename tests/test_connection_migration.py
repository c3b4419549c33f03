"""A connection the I/O thread took (it came while node code held the main loop) moves to the main
loop once that loop is free and the connection is at rest, and nothing on it is lost, doubled or
reordered: the client sees one byte stream throughout (worker/server.py, "A connection the I/O
thread serves ...").

Raw WebSocket clients (tests/test_stallwatch.py's RawWS) check every server frame as it comes.
"""

import asyncio
import json
import os
import random
import time
import urllib.request

from helpers import WorkerProc, run, write_config
from test_stallwatch import RawWS, event, reply_to, start_block


def health(w) -> dict:
    with urllib.request.urlopen(w.url + "/healthz", timeout=5) as r:
        return json.loads(r.read())


async def until_health(w, pred, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = await asyncio.to_thread(health, w)
        if pred(h):
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; /healthz {h}")
        await asyncio.sleep(0.05)


def ids(c: RawWS, prefix: str) -> list[str]:
    return [d["id"] for d in c.texts() if str(d.get("id", "")).startswith(prefix)]


def events(c: RawWS) -> list[tuple]:
    """The graph's events in arrival order (what every client must see alike)."""
    return [(d["event"], json.dumps(d.get("data"), sort_keys=True)) for d in c.texts() if d.get("type") == "nsevent"]


def added(uuid: str):
    return lambda op, p: (op == 0x1 and json.loads(p).get("event") == "node_added"
                          and uuid in json.dumps(json.loads(p).get("data")))


def events_through(c: RawWS, marker: tuple) -> list[tuple]:
    """c's events up to and including marker (events after it may still be on their way)."""
    ev = events(c)
    return ev[:ev.index(marker) + 1]


def test_a_connection_from_a_block_moves_to_the_main_loop_and_keeps_its_stream(config_dir, port):
    write_config(config_dir, "mig")
    w = WorkerProc(config_dir, "mig", port).wait_ready()
    try:
        async def go():
            async with RawWS(w.port) as a:
                await a.send(a.text_frame({"type": "cmd", "cmd": "add_node", "id": "a",
                                           "kwargs": {"id": "demo.block", "uuid": "blk"}}))
                await a.until(reply_to("a"), 10, "add_node")
                await a.until(event("triggerdone"), 10, "the first run")
                await start_block(a, 3.0, "s")  # a node runs from its triggerstart: b goes to the I/O thread
                async with RawWS(w.port) as b:
                    await b.send(b.text_frame({"type": "cmd", "cmd": "uuid", "id": "b-u"}))
                    await b.until(reply_to("b-u"), 5, "uuid during the block")
                    assert health(w)["main_loop_clients"] == 1  # a only
                    await a.until(event("triggerdone"), 10, "the block's end")
                    # the old Client leaves once its frames are out, just after the new one came
                    h = await until_health(w, lambda h: h["migrated"] >= 1 and h["clients"] == 2, 10,
                                           "b moved to the main loop")
                    assert h["main_loop_clients"] == 2
                    # b keeps working, in order, and gets the graph's events as a does
                    n0a, n0b = len(events(a)), len(events(b))
                    for i in range(30):
                        await b.send(b.text_frame({"type": "cmd", "cmd": "update_node_view", "id": f"b-{i}",
                                                   "kwargs": {"nid": "blk", "data": {"pos": [i, i]}}}))
                    await b.send(b.text_frame({"type": "cmd", "cmd": "add_node", "id": "b-add",
                                               "kwargs": {"id": "demo.add", "uuid": "n1"}}))
                    await b.until(reply_to("b-add"), 10, "b's add_node")
                    assert ids(b, "b-")[1:] == [f"b-{i}" for i in range(30)] + ["b-add"]
                    await a.until(added("n1"), 10, "a sees the node")
                    await b.until(added("n1"), 10, "b sees the node")
                    marker = next(e for e in events(b)[n0b:] if e[0] == "node_added")
                    assert events_through(a, marker)[n0a:] == events_through(b, marker)[n0b:]
                    await b.send(b.frame(0x9, b"still?"))
                    await b.until(lambda op, p: op == 0xA and p == b"still?", 5, "pong after the move")
        run(go())
    finally:
        assert w.stop() == 0, w.output()[-3000:]


def test_random_moves_under_a_stream_of_edits_lose_and_reorder_nothing(config_dir, port):
    """Clients join during random blocks and keep editing while they are moved; every reply comes
    exactly once, in the order sent, and every client sees the graph's events in one order."""
    seed = int(os.environ.get("MIGRATION_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    write_config(config_dir, "mig")
    w = WorkerProc(config_dir, "mig", port).wait_ready()
    try:
        async def editor(c: RawWS, name: str, stop: asyncio.Event, sent: list):
            i = 0
            while not stop.is_set():
                mid = f"{name}-{i}"
                if rng.random() < 0.2:
                    msg = {"type": "cmd", "cmd": "set_io_value", "id": mid,
                           "kwargs": {"nid": "n1", "ioid": "a", "value": rng.randint(0, 999)}}
                else:
                    msg = {"type": "cmd", "cmd": "update_node_view", "id": mid,
                           "kwargs": {"nid": "n1", "data": {"pos": [i, rng.randint(0, 99)]}}}
                await c.send(c.text_frame(msg), split=rng if rng.random() < 0.3 else None)
                sent.append(mid)
                i += 1
                await asyncio.sleep(rng.choice((0, 0.001, 0.005, 0.02)))

        async def go():
            async with RawWS(w.port) as a:
                for mid, kw in (("a1", {"id": "demo.block", "uuid": "blk"}), ("a2", {"id": "demo.add", "uuid": "n1"})):
                    await a.send(a.text_frame({"type": "cmd", "cmd": "add_node", "id": mid, "kwargs": kw}))
                    await a.until(reply_to(mid), 10, mid)
                await a.until(event("triggerdone"), 10, "the first run")
                clients, tasks, sent, stop = [], [], {}, asyncio.Event()
                for rnd in range(3):
                    await start_block(a, rng.uniform(0.6, 1.2), f"s{rnd}")
                    await asyncio.sleep(rng.uniform(0.25, 0.5))  # join at a random moment of the block (I/O thread)
                    for k in range(rng.randint(1, 2)):
                        name = f"r{rnd}c{k}"
                        c = await RawWS(w.port).__aenter__()
                        clients.append((name, c))
                        sent[name] = []
                        tasks.append(asyncio.ensure_future(editor(c, name, stop, sent[name])))
                    await a.until(event("triggerdone"), 10, "the block's end")
                    await asyncio.sleep(rng.uniform(0.05, 0.4))
                await until_health(w, lambda h: h["migrated"] >= len(clients), 15, "every client moved")
                await asyncio.sleep(0.3)  # pacing, not a wait: every client edits on the main loop a while too
                stop.set()
                await asyncio.gather(*tasks)
                try:
                    for name, c in clients:
                        last = sent[name][-1]
                        await c.until(reply_to(last), 15, f"{name}'s last reply")
                        got = ids(c, name + "-")
                        assert got == sent[name], (seed, name, len(got), len(sent[name]))
                    # every client saw the events of the time all of them were connected alike:
                    # up to a node added last, which every client must see after all the others
                    await a.send(a.text_frame({"type": "cmd", "cmd": "add_node", "id": "end",
                                               "kwargs": {"id": "demo.add", "uuid": "endmark"}}))
                    for name, c in clients:
                        await c.until(added("endmark"), 15, f"{name} sees the last node")
                    marker = next(e for e in events(clients[0][1]) if e[0] == "node_added" and "endmark" in e[1])
                    tails = [events_through(c, marker) for _, c in clients]
                    shortest = min(len(t) for t in tails)
                    assert shortest > 1
                    assert all(t[-shortest:] == tails[0][-shortest:] for t in tails), seed
                finally:
                    for _, c in clients:
                        await c.__aexit__(None, None, None)
        run(go())
    finally:
        assert w.stop() == 0, w.output()[-3000:]
