"""Moving a worker: an export carries the path dependencies that live in its data folder (module
files bundled, paths relative, restored on import, also into the worker `fn-supervise demo`
makes), no machine-local config keys, and pyproject.toml; an import is all or nothing."""

from __future__ import annotations

import base64
import io
import json
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import free_port
from helpers import Client, RPCError, WorkerProc, run, write_config
from stockenv import stock_files_python
from supervisor.cli import add_demo_nodes, create_worker

MY_NODES = '''
import funcnodes_core as fn


@fn.NodeDecorator("my.double", name="Double")
def double(x: float = 1.0) -> float:
    return 2 * x


NODE_SHELF = fn.Shelf(name="Mine", nodes=[double], subshelves=[], description="")
'''


def zip_of(b64: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(base64.b64decode(b64)))


def export_zip(entries: dict[str, str | bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return base64.b64encode(buf.getvalue()).decode()


def snapshot_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "worker.log" and not p.name.startswith("nodespace.")}


def test_export_with_a_local_module_imports_into_the_demo_worker(config_dir):
    # the source: a module of its own in its data folder, and machine-local keys in its config
    write_config(config_dir, "src1", package_dependencies={}, cors_origins=["https://a.example"], debug=True,
                 supervisor={"heartbeat_timeout": 9}, subprocess_monitor={"host": "127.0.0.1", "port": 1})
    src_data = config_dir / "workers" / "worker_src1"
    (src_data / "mods").mkdir(parents=True)
    (src_data / "mods" / "my_nodes.py").write_text(MY_NODES)
    cfg = json.loads((config_dir / "workers" / "worker_src1.json").read_text())
    cfg["package_dependencies"] = {"my_nodes": {"package": "my_nodes", "path": str(src_data / "mods" / "my_nodes.py")}}
    (config_dir / "workers" / "worker_src1.json").write_text(json.dumps(cfg))
    # the target: the worker `fn-supervise demo` makes (its own demo_nodes.py in its data folder)
    demo = create_worker(config_dir, name="demo", no_venv=True)
    assert add_demo_nodes(demo)
    a = WorkerProc(config_dir, "src1", free_port()).wait_ready()
    b = WorkerProc(config_dir, demo.uuid, free_port()).wait_ready()
    try:
        async def go():
            async with Client(a.url) as c:
                await c.cmd("add_node", id="my.double", uuid="d")
                await c.cmd("set_io_value", nid="d", ioid="x", value=21, set_default=True)
                await c.wait_value("d", "out", 42)
                export = await c.cmd("export_worker")
            z = zip_of(export)
            exported = json.loads(z.read("config"))
            assert exported["package_dependencies"]["my_nodes"]["path"] == "mods/my_nodes.py"
            assert z.read("modules/mods/my_nodes.py").decode() == MY_NODES
            assert str(config_dir) not in z.read("config").decode()  # nothing of the source's machine
            for key in ("subprocess_monitor", "supervisor", "debug", "cors_origins", "auth_token", "port"):
                assert key not in exported, key
            assert "pyproject.toml" in z.namelist()
            async with Client(b.url) as c:
                await c.cmd("import_worker", data=export, timeout=60)
                await c.wait_value("d", "out", 42)
                assert "d" in [n["id"] for n in await c.cmd("get_nodes")]
        run(go())
        target = demo.data_dir() / "mods" / "my_nodes.py"
        assert target.read_text() == MY_NODES
        deps = demo.read_config()["package_dependencies"]
        assert deps["my_nodes"]["path"] == str(target) and "demo_nodes" in deps
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    # and it comes back by itself: the module is now the demo worker's own
    b = WorkerProc(config_dir, demo.uuid, free_port()).wait_ready()
    try:
        async def again():
            async with Client(b.url) as c:
                await c.cmd("trigger_node", nid="d")
                await c.wait_value("d", "out", 42)
        run(again())
    finally:
        assert b.stop() == 0


def test_a_refused_import_leaves_nothing_behind(config_dir, port, tmp_path):
    far = tmp_path / "far.py"  # another machine's path: the export does not carry it
    far.write_text(MY_NODES)
    write_config(config_dir, "imp1")
    w = WorkerProc(config_dir, "imp1", port).wait_ready()
    data = config_dir / "workers" / "worker_imp1"
    cfgfile = config_dir / "workers" / "worker_imp1.json"
    try:
        async def setup():
            async with Client(w.url) as c:
                await c.cmd("add_node", id="demo.number", uuid="keep")
                await c.cmd("upload", data=base64.b64encode(b"old").decode(), filename="old.txt")
                return await c.cmd("get_library")
        lib = run(setup())
        before, cfg_before = snapshot_tree(data), cfgfile.read_text()
        state = {"backend": {"nodes": [{"id": "n", "node_id": "good.node", "io": {}}], "edges": [], "prop": {}},
                 "view": {}, "meta": {}, "external_workers": {}}
        config = {"package_dependencies": {
            "good_mod": {"package": "good_mod", "path": "good_mod.py"},
            "bad_mod": {"package": "bad_mod", "path": "pkgs/bad_mod.py"}}}
        bad = export_zip({
            "config": json.dumps(config), "state": json.dumps(state),
            "files/new.txt": "new", "files/old.txt": "overwritten", "files/deep/er.txt": "x",
            "modules/good_mod.py": MY_NODES.replace("my.double", "good.node"),
            "modules/pkgs/bad_mod.py": "raise RuntimeError('bad_mod refuses to import')\n"})

        async def refused():
            async with Client(w.url) as c:
                with pytest.raises(RPCError, match="bad_mod refuses to import"):
                    await c.cmd("update_from_export", data=bad, timeout=60)
                assert [n["id"] for n in await c.cmd("get_nodes")] == ["keep"]
                assert await c.cmd("get_library") == lib  # good_mod's shelf went again
                # a module without its file, or a file of no dependency: refused before anything
                with pytest.raises(RPCError, match="does not carry"):
                    await c.cmd("import_worker", data=export_zip({"config": json.dumps(config), "state": "{}",
                                                                  "files/new.txt": "new"}))
                with pytest.raises(RPCError, match="belongs to no path dependency"):
                    await c.cmd("import_worker", data=export_zip({"config": "{}", "state": "{}",
                                                                  "modules/evil.py": "x", "files/new.txt": "n"}))
                with pytest.raises(RPCError, match="lies outside this worker's data folder"):
                    await c.cmd("update_from_export", data=export_zip({
                        "config": json.dumps({"package_dependencies": {"far": {"package": "far", "path": str(far)}}}),
                        "state": "{}", "files/new.txt": "new"}))
                with pytest.raises(RPCError, match="own files"):
                    await c.cmd("import_worker", data=export_zip({
                        "config": json.dumps({"package_dependencies": {"x": {"package": "x", "path": "nodespace.json"}}}),
                        "state": "{}", "modules/nodespace.json": "{}"}))
        run(refused())
        assert snapshot_tree(data) == before  # no files/, no module, no temp file, pyproject unchanged
        assert cfgfile.read_text() == cfg_before
    finally:
        assert w.stop() == 0


def test_pyproject_names_the_dependencies_and_travels(config_dir):
    write_config(config_dir, "py1")
    write_config(config_dir, "py2")
    py = stock_files_python()  # funcnodes-files is installed there: added without a download
    a = WorkerProc(config_dir, "py1", free_port(), python=py).wait_ready()
    b = WorkerProc(config_dir, "py2", free_port(), python=py).wait_ready()
    pa = config_dir / "workers" / "worker_py1" / "pyproject.toml"
    pb = config_dir / "workers" / "worker_py2" / "pyproject.toml"

    def deps(p: Path) -> list[str]:
        return tomllib.loads(p.read_text())["project"]["dependencies"]

    try:
        assert deps(pa) == []  # demo_nodes is a plain module: imported, never installed
        async def go():
            async with Client(a.url) as c:
                # importable already, so nothing is installed; named as uv would install it
                await c.cmd("add_package_dependency", name="funcnodes-files", version=">=1.0", timeout=60)
                assert deps(pa) == ["funcnodes-files>=1.0"]
                export = await c.cmd("export_worker")
                assert tomllib.loads(zip_of(export).read("pyproject.toml").decode())["project"]["dependencies"] \
                    == ["funcnodes-files>=1.0"]
                await c.cmd("remove_package_dependency", name="funcnodes-files")
                assert deps(pa) == []
            async with Client(b.url) as c:
                await c.cmd("import_worker", data=export, timeout=60)
                assert "funcnodes-files" in json.loads((config_dir / "workers" / "worker_py2.json").read_text())[
                    "package_dependencies"]
        run(go())
        assert deps(pb) == ["funcnodes-files>=1.0"]
    finally:
        assert a.stop() == 0
        assert b.stop() == 0


def test_pyproject_names_local_projects_by_a_path_that_travels(tmp_path):
    from worker.pyproject import render

    data = tmp_path / "data"
    (data / "proj").mkdir(parents=True)
    (data / "proj" / "pyproject.toml").write_text('[project]\nname = "proj"\nversion = "1"\n')
    (data / "plain.py").write_text("")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "setup.py").write_text("")
    text = render("worker-x", {
        "proj": {"package": "proj", "path": str(data / "proj")},
        "plain": {"package": "plain", "path": str(data / "plain.py")},
        "far": {"package": "far", "path": str(tmp_path / "elsewhere")},
        "numpy": {"package": "numpy", "version": "==2.0"},
    }, data)
    doc = tomllib.loads(text)
    assert doc["project"]["dependencies"] == ["far", "numpy==2.0", "proj"]
    assert doc["tool"]["uv"]["sources"] == {"proj": {"path": "proj"}, "far": {"path": str(tmp_path / "elsewhere")}}
