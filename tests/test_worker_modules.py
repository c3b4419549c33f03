"""Manage Libraries: get_available_modules reads the FuncNodes module list from
<config_dir>/cache/funcnodes_modules.csv, refreshes it in the background from a URL (here a local
aiohttp server) and then sends repos_update; offline, slow or broken sources change nothing."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from aiohttp import web

from conftest import free_port
from helpers import Client, WorkerProc, run, write_config

FIXTURE = Path("/work/shared/data/funcnodes_modules.csv")
if not FIXTURE.exists():  # the copy beside the repo, wherever it is checked out
    FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "funcnodes_modules.csv"
UUID = "5e1ec7ed000000000000000000000010"
HEADER = FIXTURE.read_text().splitlines()[0]
# Rows the server adds: one nobody has, one importable here (funcnodes-core is), one active.
EXTRA = (
    'funcnodes-localtest,0.3.0,"A test module",funcnodes_localtest,funcnodes_localtest:NODE_SHELF,,,,'
    'Local test,,False,"0.3.0, 0.2.0",\n'
    'funcnodes-core,9.9.9,"core",funcnodes_core,,,https://example.invalid,,core,,True,"9.9.9, 2.4.0",\n'
    'demo-nodes,1.0.0,"demo",demo_nodes,demo_nodes:NODE_SHELF,,,,demo,,False,"1.0.0, 0.9.0",\n'
)


async def poll_async(cond, timeout: float):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def names(lst):
    return [m["name"] for m in lst]


def fixture_names() -> list[str]:
    import csv
    return [r["package_name"] for r in csv.DictReader(FIXTURE.read_text().splitlines())]


def start(config_dir: Path, url: str | None, cache: bool = True) -> WorkerProc:
    cfg = {} if url is None else {"modules_url": url}
    write_config(config_dir, UUID, **cfg)
    if cache:
        (config_dir / "cache").mkdir(exist_ok=True)
        shutil.copy(FIXTURE, config_dir / "cache" / "funcnodes_modules.csv")
    return WorkerProc(config_dir, UUID, free_port()).wait_ready()


async def serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/modules.csv", handler)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/modules.csv"


def test_list_from_cache_then_refreshed_from_the_url_with_repos_update(config_dir):
    served = FIXTURE.read_text().rstrip("\n") + "\n" + EXTRA
    hits = []

    async def handler(_req):
        hits.append(1)
        return web.Response(text=served, content_type="text/csv")

    async def go():
        runner, url = await serve(handler)
        w = await asyncio.to_thread(start, config_dir, url)
        try:
            async with Client(w.url) as c:
                first = await c.cmd("get_available_modules")
                # from the cache: every listed module, ours (demo_nodes) active
                assert names(first["available"]) == fixture_names()
                assert names(first["active"]) == ["demo_nodes"] and first["installed"] == []
                ev = await c.wait_for(lambda e: e.get("event") == "repos_update", 20, "repos_update")
                repos = ev["data"]["data"]["repos"]
                assert set(fixture_names()) | {"funcnodes-localtest", "funcnodes-core", "demo-nodes"} == set(repos)
                assert repos["funcnodes-localtest"]["releases"] == ["0.3.0", "0.2.0"]
                assert repos["funcnodes-core"]["installed"] is True
                assert repos["funcnodes-localtest"]["installed"] is False
                second = await c.cmd("get_available_modules")
            basic = next(m for m in second["available"] if m["name"] == "funcnodes-basic")
            assert basic["version"] == "1.1.0" and basic["releases"][:2] == ["1.1.0", "1.0.0"]
            assert basic["homepage"] == "https://github.com/Linkdlab/funcnodes_basic"
            assert "funcnodes-localtest" in names(second["available"])
            # importable and not active: installed, with the version that is installed
            core = next(m for m in second["installed"] if m["name"] == "funcnodes-core")
            import funcnodes_core
            assert core["version"] == funcnodes_core.__version__ and "9.9.9" in core["releases"]
            # in the worker's dependencies: active, once, with the list's releases
            assert names(second["active"]) == ["demo-nodes"]
            assert second["active"][0]["releases"] == ["1.0.0", "0.9.0"]
            assert not set(names(second["active"])) & set(names(second["available"]) + names(second["installed"]))
            assert (config_dir / "cache" / "funcnodes_modules.csv").read_text() == served
            assert (config_dir / "cache" / "funcnodes_modules.csv.meta.json").exists()
        finally:
            assert w.stop() == 0, w.output()
            await runner.cleanup()
    run(go())
    assert hits


def test_offline_hanging_or_broken_source_keeps_the_cache_and_never_delays(config_dir, tmp_path):
    before = FIXTURE.read_text()

    async def hang(_req):
        await asyncio.sleep(3600)

    async def garbage(_req):
        return web.Response(text="<html>rate limited</html>", content_type="text/html")

    async def go():
        hang_runner, hang_url = await serve(hang)
        bad_runner, bad_url = await serve(garbage)
        closed = f"http://127.0.0.1:{free_port()}/modules.csv"
        try:
            for url in (closed, bad_url, hang_url):
                w = await asyncio.to_thread(start, config_dir, url)
                try:
                    async with Client(w.url) as c:
                        # The fetch timeout is 30 s; these replies come well inside 5 s.
                        for _ in range(3):
                            r = await c.cmd("get_available_modules", timeout=5)
                            assert names(r["available"]) == fixture_names(), url
                            assert await c.cmd("on_repo_refresh", timeout=5) is None
                        if url != hang_url:  # the failed refresh is logged: after it, no event came
                            await poll_async(lambda: "module list refresh from" in w.output(), 10)
                        assert not [e for e in c.events if e.get("event") == "repos_update"], url
                finally:
                    assert w.stop() == 0, w.output()
                assert (config_dir / "cache" / "funcnodes_modules.csv").read_text() == before, url
        finally:
            await hang_runner.cleanup()
            await bad_runner.cleanup()
    run(go())


def test_no_cache_and_no_network_lists_only_the_active_module(config_dir):
    async def go():
        w = await asyncio.to_thread(start, config_dir, f"http://127.0.0.1:{free_port()}/x.csv", False)
        try:
            async with Client(w.url) as c:
                r = await c.cmd("get_available_modules")
            assert r == {"installed": [], "available": [],
                         "active": [{"name": "demo_nodes", "description": "No description available",
                                     "version": "latest", "homepage": "", "source": "", "releases": []}]}
        finally:
            assert w.stop() == 0
    run(go())
