"""Sidecars under a real supervisor: local scripts reach the worker, the monitor serves the
stock client, a killed sidecar comes back while the worker keeps its PID, and nothing that
the monitor spawned survives a SIGKILLed supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import poll_until
from helpers import Client, run
from harness import child_env, make_worker, output, running_worker, start_supervisor, state, stop_supervisor

SCRIPT = '''
from worker.external import ExternalWorker

class {cls}(ExternalWorker):
    NODECLASSID = "{cid}"
    NAME = "{name}"
'''


async def monitor_of(c):
    """The monitor's address as the worker has it (it may arrive just after the worker is ready)."""
    deadline = time.monotonic() + 15
    while "subprocess_monitor" not in (cfg := await c.cmd("get_config")):
        assert time.monotonic() < deadline, "the worker never learned the monitor's address"
        await asyncio.sleep(0.02)
    return cfg["subprocess_monitor"]


def sidecar(paths, name):
    for sc in state(paths).get("sidecars") or []:
        if sc.get("name") == name and sc.get("state") == "running" and sc.get("pid"):
            return sc
    return None


@pytest.fixture
def supervised(config_dir, port, tmp_path):
    paths = make_worker(config_dir, port)
    sup = start_supervisor(paths, tmp_path)
    poll_until(lambda: running_worker(paths), 30, what="worker ready")
    poll_until(lambda: sidecar(paths, "discovery") and sidecar(paths, "monitor"), 30, what="sidecars running")
    yield paths, sup, f"http://127.0.0.1:{port}"
    assert stop_supervisor(sup) == 0, output(sup)


def test_local_scripts_appear_change_disappear_and_broken_ones_are_reported(supervised):
    paths, sup, url = supervised
    scripts = paths.data_dir(paths.read_config()) / "local_scripts"

    async def go():
        async with Client(url) as c:
            async def until(pred, what):
                t0 = time.monotonic()
                while not pred(await c.cmd("list_local_workers")):
                    assert time.monotonic() - t0 < 10, what
                    await asyncio.sleep(0.02)
                return time.monotonic() - t0

            tmp = scripts / ".alpha.py.tmp"
            tmp.write_text(SCRIPT.format(cls="Alpha", cid="alpha", name="Alpha"))
            os.replace(tmp, scripts / "alpha.py")  # an editor's atomic save
            added = await until(lambda lw: [w["nodeclassid"] for w in lw] == ["alpha"], "added")
            (scripts / "alpha.py").write_text(SCRIPT.format(cls="Alpha", cid="alpha", name="Alpha v2"))
            changed = await until(lambda lw: lw and lw[0]["name"] == "Alpha v2", "modified")
            (scripts / "broken.py").write_text("import os\n\nraise RuntimeError('bad script')\n")
            err = await c.wait_for(lambda e: e.get("type") == "error_event" and "broken.py" in e.get("error", ""))
            assert "broken.py:3" in err["error"] and "bad script" in err["error"]
            assert [w["nodeclassid"] for w in await c.cmd("list_local_workers")] == ["alpha"]
            (scripts / "alpha.py").unlink()
            removed = await until(lambda lw: lw == [], "deleted")
            print(f"save-to-visible latency: added {added:.3f}s, modified {changed:.3f}s, deleted {removed:.3f}s")
            assert await c.cmd("uuid") == paths.uuid
    run(go())


def test_monitor_serves_the_stock_client_and_the_worker_knows_it(supervised):
    paths, sup, url = supervised
    from subprocess_monitor import helper

    async def go():
        async with Client(url) as c:
            mon = await monitor_of(c)
        assert mon["host"] == "127.0.0.1" and mon["port"]
        res = await helper.send_spawn_request(sys.executable, ["-c", "print('hello from the monitor')"], {},
                                              host=mon["host"], port=mon["port"])
        assert res["status"] == "success" and res["pid"] > 0
        return mon
    run(go())


def test_killed_sidecar_comes_back_and_the_worker_keeps_its_pid(supervised):
    paths, sup, url = supervised
    wpid = running_worker(paths)
    old = sidecar(paths, "discovery")["pid"]
    os.kill(old, signal.SIGKILL)
    new = poll_until(lambda: (sc := sidecar(paths, "discovery")) and sc["pid"] != old and sc, 15, what="sidecar restart")
    assert new["restarts"] >= 1
    assert running_worker(paths) == wpid
    out = subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(paths.base), "status", paths.name],
                         capture_output=True, text=True, timeout=30, env=child_env(os.getcwd(), inherit_path=False))
    assert "sidecar:     discovery: running" in out.stdout and "sidecar:     monitor: running" in out.stdout


def test_supervisor_sigkill_takes_monitor_commands_and_their_children(config_dir, port, tmp_path, no_leaked_processes):
    paths = make_worker(config_dir, port)
    sup = start_supervisor(paths, tmp_path)
    poll_until(lambda: running_worker(paths), 30, what="worker ready")
    poll_until(lambda: sidecar(paths, "monitor"), 30, what="monitor")
    from subprocess_monitor import helper

    async def go():
        async with Client(f"http://127.0.0.1:{port}") as c:
            mon = await monitor_of(c)
        code = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
        res = await helper.send_spawn_request(sys.executable, ["-c", code], {}, host=mon["host"], port=mon["port"])
        return res["pid"]
    pid = run(go())
    import psutil
    poll_until(lambda: len(psutil.Process(pid).children()) == 1, 10, what="grandchild")
    grandchild = psutil.Process(pid).children()[0].pid
    sup.send_signal(signal.SIGKILL)
    sup.wait(10)
    poll_until(lambda: not psutil.pid_exists(pid) and not psutil.pid_exists(grandchild), 5, what="command and grandchild gone")
    # the autouse leak check then proves that the worker and both sidecars are gone too


def test_script_present_at_start_is_listed_and_nothing_is_logged_at_error(config_dir, port, tmp_path):
    """The discovery sidecar's first listing reaches the worker before it is ready: it is kept
    and applied once the graph exists, instead of raising in the control handler."""
    paths = make_worker(config_dir, port)
    data = paths.data_dir(paths.read_config())
    (data / "local_scripts").mkdir(parents=True, exist_ok=True)
    (data / "local_scripts" / "early.py").write_text(SCRIPT.format(cls="Early", cid="early", name="Early"))
    sup = start_supervisor(paths, tmp_path)
    try:
        poll_until(lambda: running_worker(paths), 30, what="worker ready")
        poll_until(lambda: sidecar(paths, "discovery"), 30, what="discovery running")

        async def go():
            async with Client(f"http://127.0.0.1:{port}") as c:
                t0 = time.monotonic()
                while [w["nodeclassid"] for w in await c.cmd("list_local_workers")] != ["early"]:
                    assert time.monotonic() - t0 < 10, "the early script was never listed"
                    await asyncio.sleep(0.02)
        run(go())
    finally:
        assert stop_supervisor(sup) == 0, output(sup)
    log = paths.log_file(paths.read_config()).read_text(errors="replace") + output(sup)
    assert "Listening" in log or "ready" in log.lower(), log[-2000:]  # the log is the worker's
    bad = [ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln or "AttributeError" in ln]
    assert not bad, "\n".join(bad)
