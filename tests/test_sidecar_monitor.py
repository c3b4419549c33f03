"""Subprocess-monitor sidecar, driven by the stock subprocess_monitor 0.4.0 client helpers
(test-only dependency): spawn, subscribe, stop; bad input; process groups; nothing survives the
monitor or the supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import multiprocess
import pytest

from conftest import REPO, poll_until
from harness import child_env
from test_sidecars_support import Hosted, alive

from sidecars.host import stop_helper_processes
from sidecars.monitor import run_monitor, worker_start_uuid

helper = pytest.importorskip("subprocess_monitor.helper")

H = "127.0.0.1"
PY = sys.executable


async def until(cond, timeout: float, what: str = "condition", interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def read_pid(path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


@pytest.fixture
def mon(port):
    """The monitor sidecar under a SidecarKeeper, on a fixed port (so a restart keeps it)."""
    h = Hosted("monitor", run_monitor, (H, port), kwargs={"kill_timeout": 1.0},
               backoff_base=0.05)
    _, msg = h.rec.wait(lambda m: m["type"] == "monitor", 10, "monitor listening")
    h.info = msg
    yield h
    h.close()


def test_worker_start_detection():
    assert worker_start_uuid(PY, ["-m", "funcnodes", "--debug", "--dir", "/c", "worker",
                                  "--uuid", "U", "start"]) == "U"
    assert worker_start_uuid(PY, ["-m", "funcnodes", "worker", "start", "--uuid=V"]) == "V"
    assert worker_start_uuid("/venv/bin/funcnodes", ["worker", "--uuid", "W", "start"]) == "W"
    assert worker_start_uuid(PY, ["-m", "funcnodes", "worker", "--uuid", "U", "stop"]) is None
    assert worker_start_uuid(PY, ["-m", "funcnodes", "worker", "start"]) is None
    assert worker_start_uuid("sh", ["-c", "true", "worker", "--uuid", "U", "start"]) is None
    assert worker_start_uuid(PY, ["-m", "funcnodes", "runserver"]) is None


def test_spawn_subscribe_stop_with_the_stock_helpers(mon, port, tmp_path):
    info = mon.info
    assert info["port"] == port and info["host"] == H and alive(info["pid"])
    trigger = tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "while not os.path.exists(sys.argv[1]):\n"
        "    print('tick', flush=True); time.sleep(0.02)\n"
        "e = os.environ\n"
        "print('env', e['FOO'], e['SUBPROCESS_MONITOR_HOST'], e['SUBPROCESS_MONITOR_PORT'],"
        " e['SUBPROCESS_MONITOR_PID'], flush=True)\n"
        "print('oops', file=sys.stderr, flush=True)\n"
        "print('done  ', flush=True)\n"
        "time.sleep(300)\n"
    )

    async def go():
        assert await helper.get_status(host=H, port=port) == []
        res = await helper.send_spawn_request(PY, ["-c", code, str(trigger)], {"FOO": "bar"},
                                              host=H, port=port)
        assert res["status"] == "success", res
        pid = res["pid"]
        assert await helper.get_status(host=H, port=port) == [pid]
        lines = []
        sub = asyncio.create_task(helper.subscribe(pid, host=H, port=port,
                                                   callback=lines.append))
        await until(lambda: any(x["data"] == "tick" for x in lines), 5, "first tick")
        trigger.touch()
        await until(lambda: any(x["data"] == "done" for x in lines), 5, "done")
        out = [x for x in lines if x["data"] != "tick"]
        assert {"stream": "stdout", "pid": pid,
                "data": f"env bar {H} {port} {os.getpid()}"} in out
        assert {"stream": "stderr", "pid": pid, "data": "oops"} in out
        assert all(x["pid"] == pid for x in lines)

        t0 = time.monotonic()
        assert await helper.send_stop_request(pid, host=H, port=port) == {"status": "success"}
        await asyncio.wait_for(sub, 5)  # the stream ends when the process group is gone
        took = time.monotonic() - t0
        print(f"\nstop -> subscription closed: {took * 1000:.0f} ms")
        assert not alive(pid)
        assert await helper.get_status(host=H, port=port) == []
        # stopping it again: stock failure
        assert await helper.send_stop_request(pid, host=H, port=port) == {
            "status": "failure", "error": "PID not found"}
    asyncio.run(go())


def test_bad_requests_get_stock_failures_and_the_server_keeps_serving(mon, port):
    base = f"http://{H}:{port}"

    async def post(session, path, body=None, raw=None):
        kw = {"data": raw, "headers": {"Content-Type": "application/json"}} if raw is not None \
            else {"json": body}
        async with session.post(base + path, **kw) as r:
            return r.status, await r.json()

    async def go():
        async with aiohttp.ClientSession() as s:
            cases = [
                ("/spawn", None, "{not json", 400, "Invalid JSON"),
                ("/spawn", [1, 2], None, 400, "must be a dict"),
                ("/spawn", {"cmd": "true", "args": []}, None, 400, "missing required field: env"),
                ("/spawn", {"cmd": "true", "args": "x", "env": {}}, None, 400, "args must be list"),
                ("/spawn", {"cmd": "true", "args": [1], "env": {}}, None, 400, "args[0] must be str"),
                ("/spawn", {"cmd": "", "args": [], "env": {}}, None, 400, "cannot be empty"),
                ("/spawn", {"cmd": "true", "args": [], "env": {"A": 1}}, None, 400, "env[A]"),
                ("/spawn", {"cmd": "/no/such/cmd", "args": [], "env": {}}, None, 400,
                 "No such file"),
                ("/spawn", {"cmd": str(REPO), "args": [], "env": {}}, None, 400, "Permission"),
                ("/stop", None, "][", 400, "Invalid JSON"),
                ("/stop", {}, None, 400, "missing required field: pid"),
                ("/stop", {"pid": 0}, None, 400, "positive int"),
                ("/stop", {"pid": -5}, None, 400, "positive int"),
                ("/stop", {"pid": True}, None, 400, "positive int"),
                ("/stop", {"pid": "12"}, None, 400, "positive int"),
                ("/stop", {"pid": os.getpid()}, None, 404, "PID not found"),
            ]
            for path, body, raw, status, text in cases:
                st, data = await post(s, path, body, raw)
                assert (st, data["status"]) == (status, "failure"), (path, body, raw, data)
                assert text in data["error"], (path, body, raw, data)
            for q in ("pid=abc", "pid=-1", "pid=0", "", f"pid={os.getpid()}"):
                async with s.get(f"{base}/subscribe?{q}") as r:
                    assert r.status == 400, q
            async with s.get(base + "/") as r:
                assert r.status == 200 and await r.json() == []

        # the stock helpers read these failures as failures
        res = await helper.send_spawn_request("/no/such/cmd", [], {}, host=H, port=port)
        assert res["status"] == "failure" and "No such file" in res["error"]
        assert (await helper.send_stop_request(123456789, host=H, port=port))["error"] == \
            "PID not found"
        # and the monitor still works
        res = await helper.send_spawn_request(PY, ["-c", "pass"], {}, host=H, port=port)
        assert res["status"] == "success"
        await until(lambda: not alive(res["pid"]), 5, "short child reaped")
    asyncio.run(go())
    assert alive(mon.info["pid"]) and mon.status()["restarts"] == 0


def test_stop_escalates_to_sigkill_for_the_whole_group(mon, port, tmp_path):
    ready = tmp_path / "ready"
    # ignores SIGTERM, and so does its grandchild
    code = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
        "time.sleep(0.3)\n"
        "open(sys.argv[1] + '.tmp', 'w').write(str(g.pid)); os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
        "time.sleep(300)\n"
    )

    async def go():
        res = await helper.send_spawn_request(PY, ["-c", code, str(ready)], {}, host=H, port=port)
        pid = res["pid"]
        await until(lambda: read_pid(ready), 10, "grandchild started")
        gpid = read_pid(ready)
        t0 = time.monotonic()
        assert (await helper.send_stop_request(pid, host=H, port=port))["status"] == "success"
        await until(lambda: not alive(pid) and not alive(gpid), 5, "group killed")
        took = time.monotonic() - t0
        print(f"\nstop of a SIGTERM-ignoring group (kill_timeout 1.0 s): {took * 1000:.0f} ms")
        assert took >= 0.9  # it got its grace period
        await until(lambda: read_status_sync(port) == [], 5, "forgotten")
    asyncio.run(go())


def read_status_sync(port):
    import urllib.request
    with urllib.request.urlopen(f"http://{H}:{port}/", timeout=2) as r:
        return json.loads(r.read())


def test_background_member_keeps_the_pid_owned_until_the_group_is_gone(mon, port, tmp_path):
    bg = tmp_path / "bg"

    async def go():
        # the leader exits at once, leaving a background member of its group
        res = await helper.send_spawn_request(
            "sh", ["-c", f"sleep 300 & echo $! > {bg}"], {}, host=H, port=port)
        pid = res["pid"]
        await until(lambda: read_pid(bg) and not alive(pid), 5, "leader gone")
        bpid = read_pid(bg)
        assert alive(bpid)
        assert await helper.get_status(host=H, port=port) == [pid]  # still owned
        assert (await helper.send_stop_request(pid, host=H, port=port))["status"] == "success"
        await until(lambda: not alive(bpid), 5, "background member killed")
        await until(lambda: read_status_sync(port) == [], 5, "forgotten")
    asyncio.run(go())


def test_flooding_child_does_not_stall_the_server(mon, port):
    flood = "import sys\nline = 'x' * 200 + '\\n'\nw = sys.stdout.write\nwhile True: w(line)\n"

    async def go():
        res = await helper.send_spawn_request(PY, ["-c", flood], {}, host=H, port=port)
        pid = res["pid"]
        async with aiohttp.ClientSession() as s:
            # one subscriber that never reads, one that does
            lazy = await s.ws_connect(f"http://{H}:{port}/subscribe?pid={pid}")
            got = []
            reader = asyncio.create_task(helper.subscribe(pid, host=H, port=port,
                                                          callback=got.append))
            await until(lambda: len(got) > 1000, 10, "lines arrive")
            worst = 0.0
            for _ in range(10):
                t0, seen = time.monotonic(), len(got)
                # A stalled server never answers while the flood goes on: the bound is the one every
                # wait here has, not a guess at this machine's speed (the latency is printed below).
                async with asyncio.timeout(10):
                    async with s.get(f"http://{H}:{port}/") as r:
                        assert await r.json() == [pid]
                worst = max(worst, time.monotonic() - t0)
                # ...and the answer did not come from the relay stopping: lines still flow after it
                await until(lambda: len(got) > seen + 100, 10, "lines still relayed after the answer")
                assert alive(pid)
            print(f"\nGET / while a child floods stdout: worst {worst * 1000:.0f} ms "
                  f"({len(got)} lines relayed meanwhile)")
            assert got[-1]["data"] == "x" * 200
            assert (await helper.send_stop_request(pid, host=H, port=port))["status"] == "success"
            await asyncio.wait_for(reader, 10)
            await lazy.close()
        await until(lambda: not alive(pid), 5, "flooder gone")
    asyncio.run(go())


def test_worker_start_is_delegated_to_the_supervisor(mon, port):
    seen = []

    def reply(name, msg):
        if msg["type"] != "spawn_worker":
            return
        seen.append(msg)
        if msg["uuid"] == "good":
            mon.host.send({"type": "spawn_worker_result", "request_id": msg["request_id"],
                           "pid": 4242, "error": None})
        elif msg["uuid"] == "bad":
            mon.host.send({"type": "spawn_worker_result", "request_id": msg["request_id"],
                           "pid": None, "error": "venv install failed"})
        # "silent": nobody answers
    mon.rec.reply = reply
    args = ["-m", "funcnodes", "--dir", "/cfg", "worker", "--uuid", "good", "start"]

    async def go():
        res = await helper.send_spawn_request(PY, args, {}, host=H, port=port)
        assert res == {"status": "success", "pid": 4242}
        res = await helper.send_spawn_request(PY, ["-m", "funcnodes", "worker", "start",
                                                   "--uuid=bad"], {}, host=H, port=port)
        assert res["status"] == "failure" and "venv install failed" in res["error"]
        assert await helper.get_status(host=H, port=port) == []  # nothing spawned here
    asyncio.run(go())
    assert seen[0]["args"] == args and seen[0]["cmd"] == PY and seen[0]["env"] == {}
    assert [m["uuid"] for m in seen] == ["good", "bad"]


def test_unanswered_worker_start_fails_clearly(port):
    h = Hosted("monitor", run_monitor, (H, port), kwargs={"worker_spawn_timeout": 0.3})
    try:
        h.rec.wait(lambda m: m["type"] == "monitor", 10, "monitor listening")
        res = asyncio.run(helper.send_spawn_request(
            PY, ["-m", "funcnodes", "worker", "--uuid", "silent", "start"], {}, host=H, port=port))
        assert res["status"] == "failure" and "not handled by the supervisor" in res["error"]
    finally:
        h.close()


def test_sigkilled_monitor_loses_its_children_and_grandchildren_and_comes_back(mon, port,
                                                                              tmp_path):
    bg, orphan = tmp_path / "bg", tmp_path / "orphan"
    script = f"sleep 300 & echo $! > {bg}; (sleep 301 & echo $! > {orphan}); sleep 302"

    async def spawn():
        res = await helper.send_spawn_request("sh", ["-c", script], {}, host=H, port=port)
        return res["pid"]
    leader = asyncio.run(spawn())
    poll_until(lambda: read_pid(bg) and read_pid(orphan), 5, what="pid files")
    pids = [leader, read_pid(bg), read_pid(orphan)]
    assert all(alive(p) for p in pids)
    mpid = mon.info["pid"]
    t0 = time.monotonic()
    os.kill(mpid, signal.SIGKILL)
    poll_until(lambda: not any(alive(p) for p in pids), 5,
               what="spawned command, its background child and its orphan gone")
    print(f"\nmonitor SIGKILL -> its process groups gone: {(time.monotonic() - t0) * 1000:.0f} ms")
    # the host restarts it, on the same port (args pinned), with a clean slate
    _, again = mon.rec.wait(lambda m: m["type"] == "monitor" and m["pid"] != mpid, 10,
                            "monitor restarted")
    assert again["port"] == port
    assert asyncio.run(helper.get_status(host=H, port=port)) == []
    assert mon.status()["restarts"] == 1


@pytest.mark.parametrize("how", ["eof", "sigterm"])
def test_monitor_exit_kills_what_it_spawned(port, tmp_path, how):
    ctx = multiprocess.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=run_monitor, args=(child, H, port), daemon=True)
    p.start()
    child.close()
    bg = tmp_path / "bg"
    try:
        assert parent.poll(10)
        assert parent.recv()["type"] == "monitor"
        res = asyncio.run(helper.send_spawn_request(
            "sh", ["-c", f"sleep 300 & echo $! > {bg}; sleep 301"], {}, host=H, port=port))
        poll_until(lambda: read_pid(bg), 5, what="pid file")
        pids = [res["pid"], read_pid(bg)]
        if how == "eof":
            parent.close()
        else:
            p.terminate()
        p.join(5)
        assert p.exitcode in (0, None) or how == "sigterm"
        assert not p.is_alive()
        poll_until(lambda: not any(alive(x) for x in pids), 3, what="children gone")
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        stop_helper_processes()


STANDIN = """
import asyncio, json, os, sys
sys.path.insert(0, {repo!r})
from sidecars.host import SidecarKeeper
from sidecars.monitor import run_monitor

def on_message(name, msg):
    if msg["type"] == "monitor":
        out = sys.argv[1]
        with open(out + ".tmp", "w") as f:
            json.dump(msg, f)
        os.replace(out + ".tmp", out)

async def main():
    host = SidecarKeeper("monitor", run_monitor, ("127.0.0.1", int(sys.argv[2])),
                       on_message=on_message)
    host.start()
    await asyncio.Event().wait()

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_nothing_survives_a_sigkilled_supervisor(port, tmp_path):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN.format(repo=str(REPO)))
    info_file, bg = tmp_path / "monitor.json", tmp_path / "bg"
    sup = subprocess.Popen([PY, str(script), str(info_file), str(port)])
    try:
        poll_until(info_file.exists, 15, what="stand-in supervisor's monitor listening")
        info = json.loads(info_file.read_text())
        assert info["env_pid"] == sup.pid  # SUBPROCESS_MONITOR_PID = the supervisor
        res = asyncio.run(helper.send_spawn_request(
            "sh", ["-c", f"sleep 300 & echo $! > {bg}; sleep 301"], {}, host=H, port=port))
        poll_until(lambda: read_pid(bg), 5, what="pid file")
        pids = [info["pid"], res["pid"], read_pid(bg)]
        assert all(alive(x) for x in pids)
        t0 = time.monotonic()
        sup.kill()
        sup.wait(5)
        poll_until(lambda: not any(alive(x) for x in pids), 5,
                   what="monitor, spawned command and grandchild gone")
        print(f"\nsupervisor SIGKILL -> monitor and everything it spawned gone: "
              f"{(time.monotonic() - t0) * 1000:.0f} ms")
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait(5)


def test_port_in_use_is_reported_and_ends_fatal_not_in_a_storm(port):
    import socket
    with socket.socket() as busy:
        busy.bind((H, port))
        busy.listen()
        h = Hosted("monitor", run_monitor, (H, port), budget=1, backoff_base=0.05)
        try:
            st = poll_until(lambda: (s := h.status())["state"] == "fatal" and s, 15, what="fatal")
            errors = h.rec.messages("error")
            assert len(errors) == 2 and "address already in use" in errors[0]["error"].lower()
            assert st["restarts"] == 1 and st["last_exit"]["code"] == 1
        finally:
            h.close()


STOP_DURING_START = r'''
import sys, multiprocess
from sidecars.monitor import run_monitor
if __name__ == "__main__":
    ctx = multiprocess.get_context("spawn")
    ours, theirs = ctx.Pipe()
    if sys.argv[1] == "stop":
        ours.send({"type": "stop"})   # waiting in the pipe before the monitor binds
    p = ctx.Process(target=run_monitor, args=(theirs, "127.0.0.1", 0), kwargs={"kill_timeout": 1.0})
    p.start()
    theirs.close()
    if sys.argv[1] == "eof":
        ours.close()                  # the supervisor is gone while the monitor binds
    p.join(20)
    if p.exitcode is None:
        p.kill(); p.join(5)
    while sys.argv[1] == "stop" and ours.poll(0):
        try:
            print("announced", ours.recv())
        except EOFError:              # poll() is true at EOF too
            break
    print("exit", p.exitcode)
'''


@pytest.mark.parametrize("how", ["stop", "eof"])
def test_stop_during_start_ends_cleanly(how):
    """A stop (or the pipe's EOF) that reaches the monitor while it still binds, as when many
    supervised workers stop together: exit 0, no traceback, no address announced."""
    r = subprocess.run([PY, "-c", STOP_DURING_START, how], capture_output=True, text=True, timeout=60,
                       cwd=str(REPO), env=child_env(inherit_path=False))
    assert r.stdout.strip().splitlines()[-1] == "exit 0", r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "IndexError" not in r.stderr, r.stderr
    assert "announced" not in r.stdout, r.stdout
