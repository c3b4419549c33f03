"""The examples are used as they stand, so they cannot rot."""

import shutil
import subprocess
import sys

from conftest import REPO
from helpers import Client, WorkerProc, run, write_config


def test_client_example_builds_and_runs_a_graph(config_dir, port):
    write_config(config_dir, "ex1", auth_token="tok")
    w = WorkerProc(config_dir, "ex1", port).wait_ready()
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "client.py"), f"ws://127.0.0.1:{port}", "--token", "tok"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "example_sum.out = 42" in out.stdout
    assert w.stop() == 0


def test_local_script_example_loads_and_runs(config_dir, port):
    write_config(config_dir, "ex2")
    scripts = config_dir / "workers" / "worker_ex2" / "local_scripts"
    scripts.mkdir(parents=True)
    shutil.copy(REPO / "examples" / "local_scripts" / "ticker.py", scripts)
    w = WorkerProc(config_dir, "ex2", port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            assert [x["nodeclassid"] for x in await c.cmd("list_local_workers")] == ["ticker"]
            inst = await c.cmd("start_local_worker", worker_id="ticker", config={"interval": 0.01})
            import asyncio, time
            deadline = time.monotonic() + 10
            while True:
                cfg = await c.cmd("get_external_worker_config", worker_id=inst["uuid"], class_id="ticker")
                if cfg["formData"].get("ticks", 0) >= 3:
                    break
                assert time.monotonic() < deadline, cfg
                await asyncio.sleep(0.02)
            assert await c.cmd("stop_local_worker", worker_id="ticker", instance_id=inst["uuid"]) is True
    run(go())
    assert w.stop() == 0
