"""Package dependencies and local scripts on a standalone worker (no network needed)."""

import pytest

from helpers import Client, RPCError, WorkerProc, run, write_config

MOD = '''
import funcnodes_core as fn

@fn.NodeDecorator("extra.square", name="Square")
def square(x: float) -> float:
    return x * x

NODE_SHELF = fn.Shelf(nodes=[square], subshelves=[], name="extra", description="extra nodes")
'''

SCRIPT = '''
from worker.external import ExternalWorker

class Counter(ExternalWorker):
    NODECLASSID = "counter"
    NAME = "Counter"
'''


def test_path_dependency_inside_data_folder(config_dir, port):
    write_config(config_dir, "k1")
    data = config_dir / "workers" / "worker_k1"
    (data / "pkgs").mkdir(parents=True)
    (data / "pkgs" / "extra_nodes.py").write_text(MOD)
    (data / "files").mkdir()
    (data / "files" / "up.py").write_text(MOD)
    w = WorkerProc(config_dir, "k1", port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            await c.cmd("add_package_dependency", name="extra_nodes", dep={"path": str(data / "pkgs" / "extra_nodes.py")})
            await c.wait_for(lambda e: e.get("event") == "lib_update" and e["type"] == "workerevent")
            names = [s["name"] for s in (await c.cmd("get_library"))["shelves"]]
            assert "extra" in names
            await c.cmd("add_node", id="extra.square", uuid="sq")
            await c.cmd("set_io_value", nid="sq", ioid="x", value=3)
            await c.wait_value("sq", "out", 9.0)
            cfg = await c.cmd("get_config")
            assert "extra_nodes" in cfg["package_dependencies"]
            # an uploaded file or a path outside the data folder is never imported
            for bad in (str(data / "files" / "up.py"), "/etc/passwd", str(data / ".." / "x.py")):
                with pytest.raises(RPCError, match="inside the worker's data folder"):
                    await c.cmd("add_package_dependency", name="up", dep={"path": bad})
            for bad_name in ("x; rm -rf /", "--index-url=http://x"):
                with pytest.raises(RPCError, match="invalid package name"):
                    await c.cmd("add_package_dependency", name=bad_name)
            with pytest.raises(RPCError, match="installed module name only"):
                await c.cmd("add_shelf", src="pip://evil")
            await c.cmd("remove_package_dependency", name="extra_nodes")
            assert "extra" not in [s["name"] for s in (await c.cmd("get_library"))["shelves"]]
    run(go())
    assert w.stop() == 0


def test_local_scripts_loaded_at_start_and_broken_ones_reported(config_dir, port):
    write_config(config_dir, "k2")
    scripts = config_dir / "workers" / "worker_k2" / "local_scripts"
    scripts.mkdir(parents=True)
    (scripts / "counter.py").write_text(SCRIPT)
    (scripts / "broken.py").write_text("x = 1\ndef oops(:\n")
    (scripts / "forever.py").write_text("import time\nwhile True:\n    time.sleep(0.05)\n")
    write_config(config_dir, "k2", script_import_timeout=0.5)
    w = WorkerProc(config_dir, "k2", port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            lw = await c.cmd("list_local_workers")
            assert [x["nodeclassid"] for x in lw] == ["counter"] and lw[0]["file"] == "counter.py"
            inst = await c.cmd("start_local_worker", worker_id="counter")
            assert inst["nodeclassid"] == "counter" and inst["running"] is True
            assert (await c.cmd("list_local_workers"))[0]["instances"][0]["uuid"] == inst["uuid"]
            assert await c.cmd("stop_local_worker", worker_id="counter", instance_id=inst["uuid"]) is True
            with pytest.raises(RPCError, match="No worker with id"):
                await c.cmd("start_local_worker", worker_id="nope")
    run(go())
    assert "broken.py:2" in w.output()
    assert "forever.py" in w.output() and "did not finish importing" in w.output()
    assert w.stop() == 0


STOCK_SCRIPT = '''
import funcnodes_core as fn
from funcnodes_worker import FuncNodesExternalWorker


class Doubler(FuncNodesExternalWorker):
    NODECLASSID = "doubler"
    NAME = "Doubler"

    @fn.instance_nodefunction()
    def double(self, x: int) -> int:
        return 2 * x
'''


@pytest.mark.stock
def test_scripts_written_for_the_stock_worker_keep_working(config_dir, port):
    """Where funcnodes-worker is installed (here: the stock test env runs our worker), a local
    script derived from its FuncNodesExternalWorker loads, runs and offers its nodes."""
    from stockenv import stock_python

    write_config(config_dir, "k3")
    scripts = config_dir / "workers" / "worker_k3" / "local_scripts"
    scripts.mkdir(parents=True)
    (scripts / "doubler.py").write_text(STOCK_SCRIPT)
    w = WorkerProc(config_dir, "k3", port, python=stock_python()).wait_ready()

    async def go():
        async with Client(w.url) as c:
            lw = await c.cmd("list_local_workers")
            assert [x["nodeclassid"] for x in lw] == ["doubler"]
            inst = await c.cmd("start_local_worker", worker_id="doubler")
            lib = await c.cmd("get_library")
            ext = [s for s in lib["shelves"] if s["name"] == "_external_worker"]
            node_ids = [n["node_id"] for sub in ext[0]["subshelves"] for n in sub["nodes"]]
            assert node_ids == [f"doubler.{inst['uuid']}.double"]
            await c.cmd("add_node", id=node_ids[0], uuid="d")
            await c.cmd("set_io_value", nid="d", ioid="x", value=21)
            await c.wait_value("d", "out", 42)
            assert await c.cmd("stop_local_worker", worker_id="doubler", instance_id=inst["uuid"]) is True
            lib = await c.cmd("get_library")
            assert not [n for s in lib["shelves"] if s["name"] == "_external_worker" for sub in s["subshelves"] for n in sub["nodes"]]
    run(go())
    assert w.stop() == 0
