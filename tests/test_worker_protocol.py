"""The worker speaks the FuncNodes protocol: envelopes, commands, events, bad input."""

import json
import struct

import pytest

from helpers import Client, RPCError, WorkerProc, run, write_config


@pytest.fixture
def worker(config_dir, port):
    write_config(config_dir, "w1")
    w = WorkerProc(config_dir, "w1", port).wait_ready()
    yield w
    assert w.stop() == 0, w.output()[-3000:]


def test_identity_files_and_ping(worker, config_dir):
    async def go():
        async with Client(worker.url) as c:
            assert await c.cmd("uuid") == "w1"
            assert await c.cmd("name") == "w1"
            meta = await c.cmd("get_meta")
            assert len(meta["id"]) == 32 and meta["version"]
            assert await c.cmd("get_runstate") == "running"
            await c.send_raw('{"type": "ping"}')
            await c.wait_for(lambda e: e == {"type": "pong"}, what="pong")
    run(go())
    cfg = json.loads((config_dir / "workers" / "worker_w1.json").read_text())
    assert cfg["port"] == worker.port and cfg["type"] == "WSWorker" and cfg["uuid"] == "w1"
    assert (config_dir / "workers" / "worker_w1.p").read_text() == str(worker.proc.pid)
    assert (config_dir / "workers" / "worker_w1.runstate").read_text() == "running"


def test_build_and_run_graph_with_events_and_binary_frames(worker):
    async def go():
        async with Client(worker.url) as c, Client(worker.url) as other:
            lib = await c.cmd("get_library")
            assert lib["shelves"][0]["name"] == "demo"
            n1 = await c.cmd("add_node", id="demo.number", uuid="n1")
            assert n1["id"] == "n1" and n1["node_id"] == "demo.number"
            assert [io["id"] for io in n1["io"]][:1] == ["value"]
            await c.cmd("add_node", id="demo.add", uuid="n2")
            edge = await c.cmd("add_edge", src_nid="n2", src_ioid="a", trg_nid="n1", trg_ioid="out")
            assert edge == ["n1", "out", "n2", "a"]  # normalized: output first
            assert await c.cmd("set_io_value", nid="n1", ioid="value", value=5) == 5
            await c.wait_value("n2", "out", 6.0)
            assert await c.cmd("get_edges") == [["n1", "out", "n2", "a"]]
            vals = await c.cmd("get_ios_values", nid="n2")
            assert vals["a"] == 5 and vals["out"] == 6.0
            # events go to every client
            await other.wait_for(lambda e: e.get("event") == "node_added" and e["data"]["node"]["id"] == "n2")
            await other.wait_for(lambda e: e.get("event") == "after_connect" and e["data"]["result"] == ["n1", "out", "n2", "a"])
            # binary io_value frames in the stock header format
            def frame_for(node, io):  # the latest frame for that IO
                found = None
                for f in other.frames:
                    head, _, payload = f.partition(b"\r\n\r\n")
                    if f"node={node}; io={io};".encode() in head:
                        found = head, payload
                return found
            import asyncio, time
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                found = frame_for("n2", "out")
                if found and found[1] == struct.pack("!d", 6.0):
                    break
                await asyncio.sleep(0.02)
            head, payload = frame_for("n2", "out")
            assert head.startswith(b"chunk=1/1;msgid=")
            assert b"mime=application/fn.struct.!d; type=io_value; preview=1" in head
            assert struct.unpack("!d", payload)[0] == 6.0
            # full value as bytes
            reply = await c.request({"type": "cmd", "cmd": "get_io_full_value", "kwargs": {"nid": "n2", "ioid": "out"}})
            assert reply["result"]["handeled"] is True
            # node status, node, update_node, view
            st = await c.cmd("get_node_status", nid="n2")
            assert st["ready"] is True
            assert (await c.cmd("update_node", nid="n1", data={"name": "first", "properties": {"frontend:pos": [10, 20]}})) == {"name": "first"}
            assert (await c.cmd("view_state"))["nodes"]["n1"]["pos"] == [10, 20]
            assert (await c.cmd("update_node", nid="zz", data={})) == {"error": "Node with id zz not found"}
            nodes = await c.cmd("get_nodes", with_frontend=True)
            assert {n["id"] for n in nodes} == {"n1", "n2"} and nodes[0]["frontend"]["pos"]
            io = await c.cmd("update_io_options", nid="n2", ioid="b", name="bee", hidden=True)
            assert io["name"] == "bee" and io["hidden"] is True
            # groups
            groups = await c.cmd("group_nodes", node_ids=["n1", "n2"], group_ids=[])
            gid = next(iter(groups))
            assert sorted(groups[gid]["node_ids"]) == ["n1", "n2"]
            assert await c.cmd("update_group", gid=gid, data={"position": [1, 2]}) == {"position": [1, 2]}
            assert (await c.cmd("full_state"))["backend"]["groups"][gid]["position"] == [1, 2]
            assert await c.cmd("remove_group", gid=gid) is True
            assert await c.cmd("get_groups") == {}
            # remove
            assert await c.cmd("remove_edge", src_nid="n1", src_ioid="out", trg_nid="n2", trg_ioid="a") is True
            assert await c.cmd("get_edges") == []
            assert await c.cmd("remove_node", id="n2") == "n2"
            assert await c.cmd("remove_node", id="n2") is None
            await c.cmd("clear")
            assert await c.cmd("get_nodes") == []
    run(go())


@pytest.mark.parametrize("chunk", [262144, None])
def test_a_large_binary_value_goes_out_in_chunks_when_configured(config_dir, port, chunk):
    """With `binary_chunk_size` binary values are cut into frames of that size in the stock header
    format (chunk=i/n;msgid=..., one msgid), so they do not hold up other clients' replies (issue
    16; measured by benchmarks/bench_binary_stream.py). By default one frame, as stock: the React
    UI's reassembly of several chunks keeps their headers in the data."""
    import aiohttp

    write_config(config_dir, "chunks", **({"binary_chunk_size": chunk} if chunk else {}))
    worker = WorkerProc(config_dir, "chunks", port).wait_ready()
    value = "".join(chr(97 + i % 26) for i in range(1_500_000))

    async def go():
        async with Client(worker.url) as c:
            await c.cmd("add_node", id="demo.text", uuid="t")
            async with aiohttp.ClientSession() as s:  # > 1 MiB: the HTTP route, as the UI does
                body = {"type": "cmd", "cmd": "set_io_value", "id": "big",
                        "kwargs": {"nid": "t", "ioid": "value", "value": value}}
                async with s.post(worker.url + "/message/", json=body) as r:
                    assert r.status == 200, await r.text()
            c.frames.clear()
            await c.send_raw(json.dumps({"type": "cmd", "cmd": "get_io_full_value", "id": "full", "as_bytes": True,
                                         "kwargs": {"nid": "t", "ioid": "value"}}))
            import asyncio, time
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                mine = [f for f in c.frames if b"id=full;" in f.partition(b"\r\n\r\n")[0]]
                heads = [f.partition(b"\r\n\r\n")[0].decode() for f in mine]
                if heads and all(h.split(";")[0].split("/")[1] == str(len(mine)) for h in heads):
                    break
                await asyncio.sleep(0.02)
            n = len(mine)
            sizes = [len(f.partition(b"\r\n\r\n")[2]) for f in mine]
            if chunk is None:
                assert n == 1 and heads[0].startswith("chunk=1/1;")
            else:
                assert n >= -(-len(value) // chunk) and len(set(sizes[:-1])) == 1, sizes
                assert all(len(f) <= chunk for f in mine)
            assert [h.split(";")[0] for h in heads] == [f"chunk={i}/{n}" for i in range(1, n + 1)]
            assert len({h.split(";")[1] for h in heads}) == 1  # one msgid
            payload = b"".join(f.partition(b"\r\n\r\n")[2] for f in mine)
            assert "type=result" in heads[0] and payload.decode() == value
    try:
        run(go())
    finally:
        assert worker.stop() == 0


def test_node_errors_become_events_not_crashes(worker):
    async def go():
        async with Client(worker.url) as c:
            await c.cmd("add_node", id="demo.fail", uuid="f1")
            await c.cmd("set_io_value", nid="f1", ioid="message", value="kaputt")
            e = await c.wait_for(lambda e: e.get("event") == "node_trigger_error")
            assert "kaputt" in e["data"]["error"] and e["data"]["node"] == "f1"
            assert await c.cmd("uuid") == "w1"
    run(go())


@pytest.mark.parametrize(
    "raw, expect",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"type"', "must be a JSON object"),
        ('{"cmd": "uuid"}', "has no 'type'"),
        ('{"type": "foo"}', "unknown message type"),
        ('{"type": "cmd", "id": "A3"}', "'cmd' is missing"),
        ('{"type": "cmd", "cmd": "nope", "id": 1}', "Unknown command nope"),
        ('{"type": "cmd", "cmd": "get_node", "kwargs": {"bogus": 1}, "id": 2}', "bad arguments for 'get_node'"),
        ('{"type": "cmd", "cmd": "uuid", "kwargs": [1], "id": 3}', "'kwargs' must be an object"),
        ('{"type": "cmd", "cmd": "add_node", "kwargs": {"id": "demo.add", "evil": 1}}', "unexpected ['evil']"),
        ('{"type": "cmd", "cmd": "get_node", "kwargs": {"id": "zzz"}}', "not found"),
    ],
)
def test_bad_input_gets_an_error_reply_and_the_connection_stays(worker, raw, expect):
    async def go():
        async with Client(worker.url) as c:
            await c.send_raw(raw)
            err = await c.wait_for(lambda e: e.get("type") == "error", what="error reply")
            assert expect in err["error"], err
            assert all("/" not in line.split('"')[1] or line.split('"')[1].startswith("<server>")
                       for line in err["tb"] if line.strip().startswith('File "'))
            assert await c.cmd("uuid") == "w1"  # same connection still works
    run(go())


def test_binary_and_oversized_frames_are_refused_with_an_error(worker):
    async def go():
        async with Client(worker.url) as c:
            await c.ws.send_bytes(b"\x00\x01")
            err = await c.wait_for(lambda e: e.get("type") == "error")
            assert "binary frames" in err["error"]
            c.events.clear()
            big = json.dumps({"type": "cmd", "cmd": "uuid", "kwargs": {}, "pad": "x" * (1 << 21)})
            await c.send_raw(big)
            err = await c.wait_for(lambda e: e.get("type") == "error")
            assert "exceeds the limit" in err["error"]
            assert await c.cmd("uuid") == "w1"
    run(go())


def test_errors_go_to_the_sender_only(worker):
    async def go():
        async with Client(worker.url) as a, Client(worker.url) as b:
            with pytest.raises(RPCError):
                await a.cmd("get_node", id="missing")
            assert await b.cmd("uuid") == "w1"
            assert not [e for e in b.events if e.get("type") == "error"]
    run(go())


def test_stop_worker_replies_true_then_exits(config_dir, port):
    write_config(config_dir, "w2")
    w = WorkerProc(config_dir, "w2", port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            assert await c.cmd("stop_worker") is True
    run(go())
    w.proc.wait(10)
    assert w.stop() == 0
    assert not (config_dir / "workers" / "worker_w2.p").exists()
    assert not (config_dir / "workers" / "worker_w2.runstate").exists()


def test_required_heartbeat_counts_from_running(config_dir, port):
    write_config(config_dir, "hb", required_heartbeat=1.0)
    w = WorkerProc(config_dir, "hb", port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            import asyncio, time
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:  # heartbeats keep it alive past the limit
                await c.cmd("heartbeat")
                await asyncio.sleep(0.2)
            assert await c.cmd("uuid") == "hb"
    run(go())
    w.proc.wait(10)  # without heartbeats it stops itself
    assert w.stop() == 0


def test_uuid_and_ping_answer_while_a_node_blocks_the_loop(worker):
    """The Workermanager probes with `uuid` on a fresh connection and gives it 1 s."""
    async def go():
        async with Client(worker.url) as c:
            done = lambda e: e.get("event") == "triggerdone" and e["data"]["node"] == "blk"
            await c.cmd("add_node", id="demo.block", uuid="blk")
            # A new node runs once with its defaults (1 s here), and whether that run reads the
            # 3.0 set below depends on which the worker reaches first. Let it end first: the
            # triggerstart awaited below is then the 3 s run's, never a 1 s block the probe races.
            await c.wait_for(done)
            c.events.clear()
            await c.request({"type": "cmd", "cmd": "set_io_value", "kwargs": {"nid": "blk", "ioid": "seconds", "value": 3.0}})
            await c.wait_for(lambda e: e.get("event") == "triggerstart" and e["data"]["node"] == "blk")
            async with Client(worker.url) as fresh:
                assert await fresh.cmd("uuid", timeout=5) == "w1"
                await fresh.send_raw('{"type": "ping"}')
                await fresh.wait_for(lambda e: e == {"type": "pong"}, timeout=5)
                # answered while the node still held the loop (checked at the answer)
                assert not any(done(e) for e in c.events)
            await c.wait_for(done, timeout=10)
            assert await c.cmd("get_io_value", nid="blk", ioid="out") == 3.0  # it was the 3 s run
    run(go())


def test_liveness_answers_during_a_slow_start_and_commands_wait_for_the_graph(config_dir, port):
    """A package that takes seconds to import: `uuid` and ping answer at once, /readyz says 503,
    and a command sent meanwhile runs once the graph is loaded (it is not refused)."""
    import asyncio
    import urllib.error
    import urllib.request

    slow = config_dir / "slowpkg.py"
    slow.write_text("import time\ntime.sleep(3)\n")
    deps = {"demo_nodes": {"package": "demo_nodes", "path": str(__import__("helpers").DEMO_NODES)},
            "slowpkg": {"package": "slowpkg", "path": str(slow)}}
    write_config(config_dir, "slow", package_dependencies=deps)
    w = WorkerProc(config_dir, "slow", port)

    def readyz():
        try:
            with urllib.request.urlopen(w.url + "/readyz", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    from conftest import poll_until
    poll_until(lambda: readyz() == 503, 30, what="listening while starting")

    async def go():
        async with Client(w.url) as c:
            assert await c.cmd("uuid") == "slow"
            assert await c.cmd("get_runstate") == "starting"
            lib = asyncio.ensure_future(c.cmd("get_library", timeout=30))
            await asyncio.sleep(0)
            assert readyz() == 503  # still loading, yet liveness answered
            assert [s["name"] for s in (await lib)["shelves"]] == ["demo"]
            assert readyz() == 200
    run(go())
    assert w.stop() == 0
