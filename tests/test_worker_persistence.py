"""The graph survives SIGKILL: nodes, edges, positions, groups and set values come back."""

import base64
import io
import json
import zipfile

import pytest

from conftest import poll_until
from helpers import Client, RPCError, WorkerProc, run, write_config


def test_sigkill_after_save_delay_loses_nothing(config_dir, port):
    write_config(config_dir, "p1", save_delay=0.1)
    w = WorkerProc(config_dir, "p1", port).wait_ready()
    nsfile = config_dir / "workers" / "worker_p1" / "nodespace.json"

    async def build():
        async with Client(w.url) as c:
            await c.cmd("add_node", id="demo.number", uuid="a")
            await c.cmd("add_node", id="demo.add", uuid="b")
            await c.cmd("add_node", id="demo.text", uuid="t")
            await c.cmd("add_edge", src_nid="a", src_ioid="out", trg_nid="b", trg_ioid="a")
            await c.cmd("set_io_value", nid="a", ioid="value", value=7)
            await c.cmd("set_io_value", nid="b", ioid="b", value=0.5)  # a value, not a default
            await c.cmd("set_io_value", nid="t", ioid="value", value="hello", set_default=True)
            await c.cmd("update_node", nid="b", data={"properties": {"frontend:pos": [120, 45]}})
            await c.cmd("update_node_view", nid="a", data={"pos": [1, 2], "size": [300, 200]})
            g = await c.cmd("group_nodes", node_ids=["a", "b"], group_ids=[])
            await c.wait_value("b", "out", 7.5)
            return next(iter(g)), (await c.cmd("get_meta"))["id"]

    gid, nsid = run(build())

    def saved():
        try:
            st = json.loads(nsfile.read_text())
        except (FileNotFoundError, ValueError):
            return False
        nodes = {n["id"]: n for n in st["backend"]["nodes"]}
        return (
            set(nodes) == {"a", "b", "t"}
            and nodes["b"]["io"]["b"].get("value") == 0.5
            and nodes["b"].get("properties", {}).get("frontend:pos") == [120, 45]
            and gid in st["backend"]["groups"]
        )

    poll_until(saved, 10, what="nodespace.json to hold the graph")
    w.kill9()
    # the kill leaves a stale .p behind; it must not block the restart
    assert (config_dir / "workers" / "worker_p1.p").exists()
    w2 = WorkerProc(config_dir, "p1", port).wait_ready()

    async def check():
        async with Client(w2.url) as c:
            nodes = {n["id"]: n for n in await c.cmd("get_nodes", with_frontend=True)}
            assert set(nodes) == {"a", "b", "t"}
            assert await c.cmd("get_edges") == [["a", "out", "b", "a"]]
            assert nodes["b"]["properties"]["frontend:pos"] == [120, 45]
            assert nodes["a"]["frontend"] == {"pos": [1, 2], "size": [300, 200]}
            assert await c.cmd("get_io_value", nid="a", ioid="value") == 7
            assert await c.cmd("get_io_value", nid="b", ioid="b") == 0.5
            assert await c.cmd("get_io_value", nid="t", ioid="value") == "hello"
            await c.wait_value("b", "out", 7.5)
            assert gid in await c.cmd("get_groups")
            assert (await c.cmd("get_meta"))["id"] == nsid
    run(check())
    assert w2.stop() == 0


def test_corrupt_nodespace_is_kept_aside_not_lost(config_dir, port):
    write_config(config_dir, "p2")
    data = config_dir / "workers" / "worker_p2"
    data.mkdir(parents=True)
    (data / "nodespace.json").write_text('{"backend": {"nodes": [')
    w = WorkerProc(config_dir, "p2", port).wait_ready()
    kept = list(data.glob("nodespace.corrupt-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == '{"backend": {"nodes": ['
    assert w.stop() == 0


def test_corrupt_config_is_a_clear_start_error(config_dir, port):
    (config_dir / "workers").mkdir()
    cfg = config_dir / "workers" / "worker_p3.json"
    cfg.write_text("{nope")
    w = WorkerProc(config_dir, "p3", port)
    assert w.proc.wait(30) == 3
    assert "not valid JSON" in w.output()
    assert cfg.read_text() == "{nope"  # never overwritten
    w.stop()


def test_export_and_import_roundtrip_and_zip_slip_refused(config_dir, port):
    write_config(config_dir, "x1")
    w = WorkerProc(config_dir, "x1", port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            await c.cmd("add_node", id="demo.number", uuid="n")
            await c.cmd("upload", data=base64.b64encode(b"payload").decode(), filename="sub/data.txt")
            z = base64.b64decode(await c.cmd("export_worker"))
            names = zipfile.ZipFile(io.BytesIO(z)).namelist()
            assert {"config", "state", "files/sub/data.txt"} <= set(names)
            cfg = json.loads(zipfile.ZipFile(io.BytesIO(z)).read("config"))
            assert "port" not in cfg and "uuid" not in cfg
            await c.cmd("clear")
            await c.cmd("update_from_export", data=base64.b64encode(z).decode())
            assert [n["id"] for n in await c.cmd("get_nodes")] == ["n"]
            # a hostile archive is refused whole, nothing is written
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                zf.writestr("config", "{}")
                zf.writestr("state", "{}")
                zf.writestr("files/../../evil.txt", "x")
            with pytest.raises(RPCError, match="escapes the data folder"):
                await c.cmd("update_from_export", data=base64.b64encode(buf.getvalue()).decode())
            with pytest.raises(RPCError, match="not a ZIP"):
                await c.cmd("import_worker", data=base64.b64encode(b"junk").decode())
            assert [n["id"] for n in await c.cmd("get_nodes")] == ["n"]
    run(go())
    assert not (config_dir / "workers" / "evil.txt").exists()
    assert w.stop() == 0


def test_stock_written_folder_loads(config_dir, port):
    """A nodespace.json in the stock format (no values, legacy view.nodes) loads whole."""
    write_config(config_dir, "s1")
    data = config_dir / "workers" / "worker_s1"
    data.mkdir(parents=True)
    state = {
        "backend": {
            "nodes": [
                {"name": "NumberNode(x)", "id": "x", "node_id": "demo.number", "node_name": "Number",
                 "io": {"value": {"is_input": True, "emit_value_set": True, "default": 3},
                        "out": {"is_input": False, "emit_value_set": True},
                        "_triggeroutput": {"name": "\u27a1", "is_input": False, "hidden": True, "emit_value_set": False}}},
                {"name": "AddNode(y)", "id": "y", "node_id": "demo.add", "node_name": "Add",
                 "io": {"a": {"is_input": True, "emit_value_set": True}, "b": {"is_input": True, "emit_value_set": True},
                        "out": {"is_input": False, "emit_value_set": True}},
                 "properties": {"frontend:pos": [420, 140]}},
            ],
            "edges": [["x", "out", "y", "a"]], "prop": {}, "groups": {},
        },
        "view": {"renderoptions": {"typemap": {}, "inputconverter": {}}, "nodes": {"x": {"pos": [5, 6], "size": [1, 2]}}},
        "meta": {"id": "0123456789abcdef0123456789abcdef", "version": "2.4.0"},
        "external_workers": {},
    }
    (data / "nodespace.json").write_text(json.dumps(state))
    w = WorkerProc(config_dir, "s1", port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            nodes = {n["id"]: n for n in await c.cmd("get_nodes", with_frontend=True)}
            assert nodes["y"]["frontend"]["pos"] == [420, 140]
            assert nodes["x"]["frontend"]["pos"] == [5, 6]
            assert await c.cmd("get_edges") == [["x", "out", "y", "a"]]
            await c.wait_value("y", "out", 4.0)
            assert (await c.cmd("get_meta"))["id"] == "0123456789abcdef0123456789abcdef"
    run(go())
    assert w.stop() == 0


def test_saves_keep_concurrent_config_edits(config_dir, port):
    """The supervisor's timers or a user's keys written while the worker runs survive its saves."""
    cfgfile = write_config(config_dir, "c1", custom={"keep": True})
    w = WorkerProc(config_dir, "c1", port).wait_ready()
    cfg = json.loads(cfgfile.read_text())
    cfg["supervisor"] = {"heartbeat_timeout": 7}
    cfgfile.write_text(json.dumps(cfg))

    async def go():
        async with Client(w.url) as c:
            await c.cmd("update_worker_config", name="renamed")
            await c.cmd("save")
    run(go())
    cfg = json.loads(cfgfile.read_text())
    assert cfg["name"] == "renamed" and cfg["port"] == port
    assert cfg["supervisor"] == {"heartbeat_timeout": 7} and cfg["custom"] == {"keep": True}
    assert w.stop() == 0


def test_bad_load_data_and_zip_bomb_lose_nothing(config_dir, port):
    write_config(config_dir, "b1", max_upload_size=1 << 20)
    w = WorkerProc(config_dir, "b1", port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            for nid in ("a", "b"):
                await c.cmd("add_node", id="demo.number", uuid=nid)
            with pytest.raises(RPCError):  # a node entry without node_name: deserialization fails midway
                await c.cmd("load_data", data={"backend": {"nodes": [{"node_id": "x", "id": "n1"}]}})
            assert sorted(n["id"] for n in await c.cmd("get_nodes")) == ["a", "b"]
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr("config", "{}")
                zf.writestr("state", "{}")
                zf.writestr("files/zeros.bin", b"\0" * (4 << 20))  # 4 MB that packs into a few KB
            assert len(buf.getvalue()) < 100_000
            with pytest.raises(RPCError, match="over the limit"):
                await c.cmd("update_from_export", data=base64.b64encode(buf.getvalue()).decode())
            await c.cmd("save")
    run(go())
    saved = json.loads((config_dir / "workers" / "worker_b1" / "nodespace.json").read_text())
    assert sorted(n["id"] for n in saved["backend"]["nodes"]) == ["a", "b"]
    assert not (config_dir / "workers" / "worker_b1" / "files" / "zeros.bin").exists()
    assert w.stop() == 0


def test_parsable_but_malformed_nodespace_is_kept_aside(config_dir, port):
    write_config(config_dir, "b2")
    data = config_dir / "workers" / "worker_b2"
    data.mkdir(parents=True)
    # valid JSON, but an unknown node class without node_name: the load raises midway
    bad = json.dumps({"backend": {"nodes": [{"node_id": "no.such.class", "id": "n1"}]}})
    (data / "nodespace.json").write_text(bad)
    w = WorkerProc(config_dir, "b2", port)
    try:
        w.wait_ready()
        kept = list(data.glob("nodespace.corrupt-*.json"))
        assert len(kept) == 1 and kept[0].read_text() == bad
        assert "cannot be loaded" in w.output()
    finally:
        assert w.stop() == 0
