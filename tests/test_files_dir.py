"""File nodes keep finding uploads: the NodeSpace's `files_dir` is set whenever the graph loads
(start, crash restart, SIGHUP restart, import, load_data) and after `clear`, as the stock worker
does, not only after an upload. Driven with the real funcnodes-files module: our worker runs on
the interpreter of a test env that has it (stockenv.stock_files_python)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp

from conftest import REPO, poll_until
from helpers import Client, WorkerProc, run, write_config
from harness import make_worker, running_worker, start_supervisor, stop_supervisor
from stockenv import stock_files_python

FILES_DEP = {"funcnodes-files": {"package": "funcnodes-files", "version": None}}
TEXT = b"hello, files\n"  # 13 bytes


async def post_upload(url: str, name: str, data: bytes) -> dict:
    with aiohttp.MultipartWriter("form-data") as mp:
        mp.append(data).set_content_disposition("form-data", name="file", filename=name)
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/upload/", data=mp) as r:
                assert r.status == 200, await r.text()
                return await r.json()


async def file_info_reads(c: Client, nid: str = "fi") -> None:
    """Run the node; it must read files/docs/a.txt (size) and raise no error."""
    c.events.clear()
    await c.cmd("trigger_node", nid=nid)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        errors = [e for e in c.events if e.get("type") == "nsevent" and e.get("event") in ("node_trigger_error", "node_error")]
        assert not errors, f"file_info failed: {errors[0]['data'].get('error')}"
        if await c.cmd("get_io_value", nid=nid, ioid="size") == len(TEXT):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("file_info did not report the file's size")


async def build(url: str) -> None:
    assert await post_upload(url, "docs/a.txt", TEXT) == {"file": "docs/a.txt"}
    async with Client(url) as c:
        await c.cmd("add_node", id="files.file_info", uuid="fi")
        await c.cmd("set_io_value", nid="fi", ioid="path", value="docs/a.txt", set_default=True)
        await file_info_reads(c)


def test_file_node_works_after_a_crash_and_a_restart(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port, python=stock_files_python())
    cfg = paths.read_config()
    cfg["package_dependencies"] = FILES_DEP
    paths.write_config(cfg)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid1 = poll_until(lambda: running_worker(paths), 30, what="worker ready")
    url = f"http://127.0.0.1:{port}"
    run(build(url))

    async def still_reads():
        async with Client(url) as c:
            await file_info_reads(c)

    os.kill(pid1, signal.SIGKILL)  # a crash: the supervisor restarts it, the journal brings the node back
    pid2 = poll_until(lambda: running_worker(paths, not_pid=pid1), 30, what="worker after the crash")
    run(still_reads())
    r = subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(config_dir), "restart", paths.name],
                       capture_output=True, text=True, cwd=str(REPO), timeout=30)
    assert r.returncode == 0, r.stderr
    poll_until(lambda: running_worker(paths, not_pid=pid2), 30, what="worker after fn-supervise restart")
    run(still_reads())
    assert stop_supervisor(sup) == 0


def test_file_node_works_after_import_load_data_and_clear(config_dir, tmp_path):
    from conftest import free_port

    write_config(config_dir, "fa", package_dependencies=FILES_DEP)
    write_config(config_dir, "fb", package_dependencies=FILES_DEP)
    py = stock_files_python()
    a = WorkerProc(config_dir, "fa", free_port(), python=py).wait_ready()
    b = WorkerProc(config_dir, "fb", free_port(), python=py).wait_ready()
    try:
        run(build(a.url))

        async def go():
            async with Client(a.url) as c:
                export = await c.cmd("export_worker")
                state = await c.cmd("get_save_state")
            async with Client(b.url) as c:  # b never saw an upload: only the import sets its folder
                await c.cmd("import_worker", data=export, timeout=60)
                await file_info_reads(c)
                # a saved public files_dir (another machine's folder) must not shadow ours
                state["backend"]["prop"] = {"files_dir": str(tmp_path / "elsewhere")}
                await c.cmd("load_data", data=state)
                await file_info_reads(c)
                await c.cmd("clear")
                await c.cmd("add_node", id="files.file_info", uuid="fi2")
                await c.cmd("set_io_value", nid="fi2", ioid="path", value="docs/a.txt")
                await file_info_reads(c, "fi2")
        run(go())
        saved = json.loads((config_dir / "workers" / "worker_fb" / "nodespace.json").read_text())
        assert "files_dir" not in json.dumps(saved["backend"].get("prop", {}))  # never saved
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
