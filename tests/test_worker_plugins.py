"""Frontend plugins and file nodes beside the stock worker, both run on the interpreter of one test
env with funcnodes-files and funcnodes-react-flow (through which the stock worker serves plugins). Deliberate difference: the plugin keys. Stock's are `str(module)` (the server's
install path) plus a duplicate 'None'; ours are the module names. The plugins behind them, and
what a file node reads after load_data and clear, must be the same."""

from __future__ import annotations

import asyncio
import base64
import re

import pytest

from conftest import free_port
from helpers import Client, RPCError, WorkerProc, run, write_config
from stockenv import StockWorker, stock_files_python
from test_differential import wait_ws
from test_files_dir import FILES_DEP, TEXT, file_info_reads

pytestmark = pytest.mark.stock

async def gather(*coros):
    return await asyncio.gather(*coros)


STOCK_KEY = re.compile(r"^<module '([A-Za-z0-9_.]+)' from '.*'>$")


@pytest.fixture
def both(config_dir, tmp_path):
    sbase = tmp_path / "stockcfg"
    sbase.mkdir()
    stock = StockWorker(stock_files_python(), sbase, "plug1", free_port(), config={"package_dependencies": FILES_DEP})
    write_config(config_dir, "plug1", package_dependencies=FILES_DEP)
    ours = WorkerProc(config_dir, "plug1", free_port(), python=stock_files_python(),  # the same packages
                      env={"FN_SUPERVISE_MODULES_URL": ""})
    try:
        run(gather(wait_ws(stock.url, stock.proc), wait_ws(ours.url, ours.proc)))
        yield stock, ours
    except BaseException:
        print("--- stock ---\n", stock.output()[-3000:], "\n--- ours ---\n", ours.output()[-3000:])
        raise
    finally:
        stock.kill()
        ours.stop()


async def plugins(url: str) -> tuple[list[str], dict[str, dict], str]:
    async with Client(url) as c:
        keys = await c.cmd("get_plugin_keys", type="react", timeout=60)
        got = {k: await c.cmd("get_plugin", key=k, type="react", timeout=60) for k in keys}
        try:
            await c.cmd("get_plugin", key="no_such_plugin", type="react")
            missing = ""
        except RPCError as e:
            missing = str(e)
    return keys, got, missing


def test_plugins_are_the_stock_workers(both):
    stock, ours = both
    (s_keys, s_plugins, s_missing), (o_keys, o_plugins, o_missing) = run(
        gather(plugins(stock.url), plugins(ours.url)))
    # stock: "<module 'funcnodes_files' from '/…/__init__.py'>" and "None" (the same plugin again)
    named = {}
    for k in s_keys:
        m = STOCK_KEY.match(k)
        if m:
            named[m.group(1)] = s_plugins[k]
        else:
            assert k == "None" and s_plugins[k] in s_plugins.values(), k
    assert "funcnodes_files" in named, s_keys
    assert o_keys == sorted(named), (o_keys, s_keys)
    for k in o_keys:
        assert o_plugins[k] == named[k], k  # {"js": [...], "module": base64, "css": [...]}, the same bytes
    assert set(o_plugins["funcnodes_files"]) == {"js", "module", "css"}
    assert isinstance(o_plugins["funcnodes_files"]["module"], str) and len(o_plugins["funcnodes_files"]["module"]) > 1000
    assert s_missing == o_missing == "React plugin no_such_plugin not found"


def test_file_node_reads_the_same_after_load_data_and_clear(both, tmp_path):
    """The stock worker sets files_dir on load and on clear; so do we, with the same outcome."""
    stock, ours = both

    async def drive(url: str) -> list:
        seen = []
        async with Client(url) as c:
            # the upload command (stock's POST /upload/ keeps aiohttp's %2F in the name)
            assert await c.cmd("upload", data=base64.b64encode(TEXT).decode(), filename="docs/a.txt") == "docs/a.txt"
            await c.cmd("add_node", id="files.file_info", uuid="fi")
            await c.cmd("set_io_value", nid="fi", ioid="path", value="docs/a.txt", set_default=True)
            await file_info_reads(c)
            seen.append(await c.cmd("get_io_value", nid="fi", ioid="filename"))
            state = await c.cmd("get_save_state")
            state["backend"]["prop"] = {"files_dir": str(tmp_path / "elsewhere")}
            await c.cmd("load_data", data=state)
            await file_info_reads(c)
            seen.append(await c.cmd("get_io_value", nid="fi", ioid="size"))
            await c.cmd("clear")
            await c.cmd("add_node", id="files.file_info", uuid="fi2")
            await c.cmd("set_io_value", nid="fi2", ioid="path", value="docs/a.txt")
            await file_info_reads(c, "fi2")
            seen.append(await c.cmd("get_io_value", nid="fi2", ioid="size"))
        return seen

    s, o = run(gather(drive(stock.url), drive(ours.url)))
    assert s == o == ["a.txt", len(TEXT), len(TEXT)], (s, o)
