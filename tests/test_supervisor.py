"""The supervisor with real processes: the real worker (`python -m worker`) where the test is
about serving, the fault-injecting fake (tests/fixtures_supervisor/fakeworker.py) where it
is about misbehaviour. Timers are shrunk through the worker config; every wait has a deadline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import psutil
import pytest

from conftest import REPO, marked_processes, poll_until
from harness import (FAST, FIXTURES, HAVE_WORKER, child_env, make_worker, output, popen_logged,  # noqa: F401
                     run_cli, running_worker, start_supervisor, state, stop_supervisor, ws_uuid)
from supervisor.cli import create_worker
from supervisor.process import RotatingLog, WorkerProcess

# ---------------------------------------------------------------------- real worker
@pytest.mark.skipif(not HAVE_WORKER, reason="worker package not there yet")
def test_kill9_worker_comes_back_on_same_port(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid1 = poll_until(lambda: running_worker(paths), 20, what="worker ready")
    assert paths.pidfile.read_text().strip() == str(pid1)
    assert paths.runstate.read_text().splitlines()[0] == "running"
    assert ws_uuid(port) == paths.uuid
    os.kill(pid1, signal.SIGKILL)
    t0 = time.monotonic()
    pid2 = poll_until(lambda: running_worker(paths, not_pid=pid1), 20, what="replacement")
    assert poll_until(lambda: ws_uuid(port), 10, what="uuid answer") == paths.uuid
    took = time.monotonic() - t0
    st = state(paths)
    assert st["port"] == port and st["restarts"] == 1
    crash = st["crashes"][-1]
    assert crash["reason"] == "crashed" and crash["signal_name"] == "SIGKILL" and not crash["signal_by_supervisor"]
    assert crash["phase"] == "run" and crash["pid"] == pid1
    assert paths.pidfile.read_text().strip() == str(pid2)
    assert stop_supervisor(sup) == 0
    assert not paths.pidfile.exists() and not paths.runstate.exists()
    assert state(paths)["state"] == "STOPPED"
    print(f"kill -9 to serving again: {took:.2f}s")


@pytest.mark.skipif(not HAVE_WORKER, reason="worker package not there yet")
def test_busy_port_walks_to_the_next_free_one_and_writes_it_to_the_config(config_dir, port, tmp_path, sup_procs,
                                                                            monkeypatch):
    """Issue 10: a busy port is no longer fatal; the supervisor binds the next free one (the
    stock walk) and the config says so before the worker is ready."""
    monkeypatch.setenv("FUNCNODES_WS_WORKER_ENDPORT", str(port + 30))
    paths = make_worker(config_dir, port)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        sup = start_supervisor(paths, tmp_path)
        sup_procs.append(sup)
        poll_until(lambda: running_worker(paths), 30, what="worker ready: " + output(sup)[-2000:])
        got = paths.read_config()["port"]
        assert got != port and port < got <= port + 30
        assert state(paths)["port"] == got
        assert ws_uuid(got) == paths.uuid
        assert stop_supervisor(sup) == 0
    finally:
        blocker.close()


def test_no_free_port_in_the_range_is_an_environment_error(config_dir, port, tmp_path, sup_procs, monkeypatch):
    monkeypatch.setenv("FUNCNODES_WS_WORKER_ENDPORT", str(port))
    paths = make_worker(config_dir, port, fake=True)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        sup = start_supervisor(paths, tmp_path)
        sup_procs.append(sup)
        assert sup.wait(30) == 5, output(sup)
    finally:
        blocker.close()
    st = state(paths)
    assert st["state"] == "FATAL" and "no free port" in st["reason"], st


# ---------------------------------------------------------------------- fake worker
def test_worker_failing_every_start_ends_fatal_with_no_more_starts(config_dir, port, tmp_path, sup_procs,
                                                                   monkeypatch):
    starts = tmp_path / "starts"
    monkeypatch.setenv("FAKE_FAIL_ON_START", "1")
    monkeypatch.setenv("FAKE_STARTS_FILE", str(starts))
    paths = make_worker(config_dir, port, fake=True, start_budget=4)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    assert sup.wait(30) == 4, output(sup)
    assert len(starts.read_text().split()) == 4
    st = state(paths)
    assert st["state"] == "FATAL" and st["exit_code"] == 4
    assert [c["exit_code"] for c in st["crashes"]] == [1, 1, 1, 1]
    assert "failing on purpose" in st["crashes"][-1]["last_log_lines"][-1]
    # the supervisor is gone: nothing can start it again
    assert len(starts.read_text().split()) == 4
    # status still explains it
    r = subprocess.run([sys.executable, "-m", "supervisor", "status", paths.name, "--json"],
                       capture_output=True, text=True, cwd=str(REPO), timeout=30)
    js = json.loads(r.stdout)
    assert js["state"] == "FATAL" and not js["supervisor_alive"] and len(js["crashes"]) == 4


def test_sigstop_is_detected_as_hung_and_replaced(config_dir, port, tmp_path, sup_procs):
    hb, timeout = 0.2, 1.0
    paths = make_worker(config_dir, port, fake=True, hb=hb, heartbeat_timeout=timeout)
    cfg = paths.read_config()["supervisor"]
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid1 = poll_until(lambda: running_worker(paths), 15, what="worker ready")
    os.kill(pid1, signal.SIGSTOP)
    stopped_at = time.time()
    # The replacement's own start is under start_timeout (after the backoff), not under the
    # hang detector: wait for it that long, and time the detection by the crash record.
    poll_until(lambda: running_worker(paths, not_pid=pid1), cfg["backoff_cap"] + cfg["start_timeout"],
               what="replacement")
    crash = state(paths)["crashes"][-1]
    detected = crash["time"] - stopped_at
    # Never early: the last beat came at most one interval before the SIGSTOP. Never unbounded:
    # the hang deadline, then SIGKILL and the reap, which the supervisor gives kill_timeout + 1 s
    # before it abandons the pid (attempt.Attempt.deadline); the bounds are the config's.
    assert timeout - hb <= detected < timeout + cfg["kill_timeout"] + 1.0, detected
    print(f"SIGSTOP to crash record: {detected:.2f}s (heartbeat_timeout {timeout:g}s)")
    assert crash["reason"] == "hung" and crash["signal_name"] == "SIGKILL" and crash["signal_by_supervisor"]
    assert "no heartbeat" in crash["detail"] and not crash["suspected_oom"]
    assert not psutil.pid_exists(pid1) or psutil.Process(pid1).status() == psutil.STATUS_ZOMBIE
    assert ws_uuid(port) == paths.uuid
    assert stop_supervisor(sup) == 0


STOP_EXIT_SLACK = 3.0  # the supervisor's own exit after the worker is gone (sidecars, files)


def test_worker_ignoring_stop_and_sigterm_is_sigkilled_at_deadline(config_dir, port, tmp_path, sup_procs,
                                                                    monkeypatch):
    monkeypatch.setenv("FAKE_IGNORE_SIGTERM", "1")
    monkeypatch.setenv("FAKE_IGNORE_STOP", "1")
    paths = make_worker(config_dir, port, fake=True, stop_grace=0.5, term_timeout=0.7, kill_timeout=1.0)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid = poll_until(lambda: running_worker(paths), 15, what="worker ready")
    t0 = time.monotonic()
    assert stop_supervisor(sup) == 0
    took = time.monotonic() - t0
    # Never early: SIGKILL only after stop_grace + term_timeout (1.2 s). Never unbounded: the
    # staged stop's own worst case (stop_deadline, 2.2 s) plus the supervisor's exit, with room
    # for a loaded machine (a wall-clock bound tighter than the config's was flaky under load).
    assert 1.2 <= took < 0.5 + 0.7 + 1.0 + STOP_EXIT_SLACK, took
    assert not psutil.pid_exists(pid)
    log = paths.log_file().read_text()
    assert "stopped at stage sigkill" in log


def test_stop_escalation_stages_with_real_children(tmp_path):
    """process.WorkerProcess without a supervisor: which stage ended the child, and when."""

    async def run(code: str, grace: float, term: float):
        lg = RotatingLog(tmp_path / "w.log")
        w = WorkerProcess([sys.executable, "-c", code], env=dict(os.environ), cwd=str(tmp_path), logfile=lg,
                          on_frame=lambda m: None, on_exit=lambda wp: None)
        w.spawn(control=False)
        await asyncio.sleep(0.3)  # let it install its handler (bounded by the stop deadlines below)
        t0 = time.monotonic()
        stage = await w.stop(grace, term, 2.0)
        took = time.monotonic() - t0
        lg.close()
        return stage, took, w.status

    ignore = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    obey = "import time; time.sleep(60)"
    stage, took, status = asyncio.run(run(ignore, 0.0, 0.5))
    # Bounds from the deadlines given (term 0.5 s, kill 2.0 s), never a guess at the machine's speed.
    assert stage == "sigkill" and status.signal == signal.SIGKILL and 0.5 <= took < 0.5 + 2.0, took
    stage, took, status = asyncio.run(run(obey, 0.0, 2.0))
    assert stage == "sigterm" and status.signal == signal.SIGTERM and took < 2.0, took
    assert "up" in (tmp_path / "w.log").read_text()


def test_sigkill_of_supervisor_leaves_nothing(config_dir, port, tmp_path, sup_procs, monkeypatch,
                                              no_leaked_processes):
    monkeypatch.setenv("FAKE_GRANDCHILD", "1")
    paths = make_worker(config_dir, port, fake=True)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    poll_until(lambda: running_worker(paths), 15, what="worker ready")
    assert len(marked_processes(no_leaked_processes)) >= 3  # supervisor, worker, grandchild
    sup.kill()
    sup.wait(5)
    t0 = time.monotonic()
    poll_until(lambda: not marked_processes(no_leaked_processes), 2.0, what="no process left")
    print(f"all gone {time.monotonic() - t0:.2f}s after SIGKILL of the supervisor")


def test_stale_files_and_unrelated_pid_do_not_block_or_get_signalled(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port, fake=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # a .p pointing at an unrelated live process, a stale runstate, and a state file whose
        # worker record has the sleeper's PID but another start time (a reused PID)
        paths.write_pid(sleeper.pid)
        paths.write_runstate("running")
        paths.write_state({"state": "RUNNING", "supervisor": {"pid": sleeper.pid, "start_time": 1.0, "boot_id": ""},
                           "worker": {"pid": sleeper.pid, "start_time": 1.0, "boot_id": ""}})
        sup = start_supervisor(paths, tmp_path)
        sup_procs.append(sup)
        pid = poll_until(lambda: running_worker(paths, not_pid=sleeper.pid), 15, what="worker ready")
        assert paths.pidfile.read_text().strip() == str(pid)
        assert stop_supervisor(sup) == 0
        assert sleeper.poll() is None, "the unrelated process was signalled"
        # `stop` with a state file that names the sleeper must not signal it either
        paths.write_state({"state": "RUNNING", "supervisor": {"pid": sleeper.pid, "start_time": 1.0,
                                                              "boot_id": ""}})
        r = subprocess.run([sys.executable, "-m", "supervisor", "stop", paths.name], capture_output=True, text=True,
                           cwd=str(REPO), timeout=30)
        assert r.returncode == 0 and "not running" in r.stdout
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(5)


def test_second_supervisor_refuses(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port, fake=True)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid = poll_until(lambda: running_worker(paths), 15, what="worker ready")
    second = start_supervisor(paths, tmp_path)
    sup_procs.append(second)
    assert second.wait(20) == 3
    assert "already supervised" in output(second) and str(sup.pid) in output(second)
    assert running_worker(paths) == pid  # undisturbed
    assert stop_supervisor(sup) == 0


def test_stop_worker_from_a_client_stops_the_supervisor(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port, fake=True)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    poll_until(lambda: running_worker(paths), 15, what="worker ready")

    async def stop():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send_str(json.dumps({"type": "cmd", "cmd": "stop_worker", "id": 1}))
                await asyncio.wait_for(ws.receive(), 5)

    asyncio.run(stop())
    assert sup.wait(15) == 0, output(sup)
    st = state(paths)
    assert st["state"] == "STOPPED" and st["restarts"] == 0 and not st["crashes"]
    assert not paths.pidfile.exists() and not paths.runstate.exists()


def test_sighup_restarts_with_reread_config_and_cli_controls(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port, fake=True)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid1 = poll_until(lambda: running_worker(paths), 15, what="worker ready")
    cfg = paths.read_config()
    cfg["supervisor"]["heartbeat_timeout"] = 4.0
    paths.write_config(cfg)

    def cli(*args):
        return run_cli(None, *args, timeout=30)

    assert cli("restart", paths.name).returncode == 0
    pid2 = poll_until(lambda: running_worker(paths, not_pid=pid1), 15, what="restarted worker")
    assert "no heartbeat for" not in paths.log_file().read_text()
    assert "heartbeat_timeout" in json.dumps(paths.read_config())
    st = state(paths)
    assert st["restarts"] == 0 and not st["crashes"]  # a requested restart is no crash
    r = cli("status", paths.name)
    assert "RUNNING" in r.stdout and str(pid2) in r.stdout and f":{port}" in r.stdout
    r = cli("list")
    assert paths.name in r.stdout and "RUNNING" in r.stdout
    r = cli("logs", paths.name, "-n", "200")
    assert "fake worker ready" in r.stdout and "SIGHUP" in r.stdout
    r = cli("stop", paths.name)
    assert r.returncode == 0 and "stopped" in r.stdout
    assert sup.wait(5) == 0
    assert cli("status", paths.name, "--json").returncode == 0


def test_start_timeout_counts_as_failed_start(config_dir, port, tmp_path, sup_procs, monkeypatch):
    monkeypatch.setenv("FAKE_STARTUP_DELAY", "30")
    paths = make_worker(config_dir, port, fake=True, start_timeout=0.8, start_budget=2)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    assert sup.wait(20) == 4, output(sup)
    st = state(paths)
    assert [c["reason"] for c in st["crashes"]] == ["start_timeout", "start_timeout"]
    assert all(c["signal_by_supervisor"] for c in st["crashes"])


def test_sigterm_during_backoff_stops_at_once(config_dir, port, tmp_path, sup_procs, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_ON_START", "1")
    paths = make_worker(config_dir, port, fake=True, backoff_base=30.0, backoff_cap=30.0, start_budget=5)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    poll_until(lambda: state(paths).get("state") == "BACKOFF", 15, what="backoff")
    t0 = time.monotonic()
    assert stop_supervisor(sup) == 0
    # At once, not after the 30 s backoff: no worker to stop, so only the supervisor's own exit
    # (the bound the stop tests above give it), far below the backoff it must not wait out.
    assert time.monotonic() - t0 < STOP_EXIT_SLACK < 30.0


def test_cli_new_and_unknown_worker(config_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "supervisor", "new", "--no-venv", "--name", "n1", "--dep", "numpy>=1"],
                       capture_output=True, text=True, cwd=str(REPO), timeout=30)
    assert r.returncode == 0, r.stderr
    wid = r.stdout.strip().splitlines()[-1]
    assert wid.startswith("worker_")
    cfg = json.loads((config_dir / "workers" / f"{wid}.json").read_text())
    assert cfg["type"] == "WSWorker" and cfg["name"] == "n1" and cfg["supervisor"]["venv"] is False
    assert cfg["package_dependencies"] == {"numpy": {"package": "numpy", "version": ">=1"}}
    assert (config_dir / "workers" / wid).is_dir()
    r = subprocess.run([sys.executable, "-m", "supervisor", "worker_nope"], capture_output=True, text=True,
                       cwd=str(REPO), timeout=30)
    assert r.returncode == 2 and "unknown worker" in r.stderr
    r = subprocess.run([sys.executable, "-m", "supervisor", "frobnicate"], capture_output=True, text=True,
                       cwd=str(REPO), timeout=30)
    assert r.returncode == 2


@pytest.mark.skipif(not HAVE_WORKER, reason="worker package not there yet")
def test_failed_install_keeps_old_venv_and_worker_serving(config_dir, port, tmp_path, sup_procs, monkeypatch):
    monkeypatch.setenv("UV_OFFLINE", "1")  # the package cannot be found: a fast, certain install failure
    paths = create_worker(config_dir, name="v", host="127.0.0.1", port=port, no_venv=False, supervisor=FAST)
    venv_marker = paths.data_dir() / ".venv" / "fn-supervise-env.json"
    marker_before = venv_marker.read_text()
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid = poll_until(lambda: running_worker(paths), 30, what="venv worker ready")
    fp = state(paths)["env"]["fingerprint"]
    assert state(paths)["env"]["python"].startswith(str(paths.data_dir() / ".venv"))

    async def add_dep():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send_str(json.dumps({"type": "cmd", "cmd": "add_package_dependency",
                                              "kwargs": {"name": "fn-supervise-no-such-package-zz"}, "id": "d1"}))
                while True:
                    m = await asyncio.wait_for(ws.receive(), 60)
                    if m.type != aiohttp.WSMsgType.TEXT:
                        continue
                    js = json.loads(m.data)
                    if js.get("id") == "d1":
                        return js

    reply = asyncio.run(add_dep())
    assert reply["type"] == "error" and "install" in reply["error"], reply
    assert running_worker(paths) == pid  # never a crash, never a restart
    st = state(paths)
    assert st["restarts"] == 0 and not st["crashes"] and st["env"]["fingerprint"] == fp
    assert venv_marker.read_text() == marker_before  # the old venv is untouched
    assert ws_uuid(port) == paths.uuid
    assert "install failed" in paths.log_file().read_text()
    assert stop_supervisor(sup) == 0


def test_sd_notify_ready_status_stopping(config_dir, port, tmp_path, sup_procs, monkeypatch):
    sock_path = tmp_path / "notify.sock"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(sock_path))
    ns.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    paths = make_worker(config_dir, port, fake=True)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    msgs: list[str] = []

    def got(what):
        try:
            msgs.append(ns.recv(4096).decode())
        except socket.timeout:
            pass
        return any(what in m for m in msgs)

    poll_until(lambda: got("READY=1"), 15, what="READY=1")
    assert stop_supervisor(sup) == 0
    poll_until(lambda: got("STOPPING=1"), 5, what="STOPPING=1")
    ns.close()
    ready_i = next(i for i, m in enumerate(msgs) if m == "READY=1")
    assert any(m.startswith("STATUS=RUNNING") for m in msgs[:ready_i])  # READY only once running
    assert msgs[0].startswith("STATUS=PREPARING")


def test_demo_prints_its_url(config_dir, tmp_path, sup_procs, monkeypatch):
    p = popen_logged([sys.executable, "-m", "supervisor", "demo", "--no-venv"], tmp_path / "demo.out",
                     env=child_env(FIXTURES, inherit_path=False))
    sup_procs.append(p)
    text = poll_until(lambda: "serving at ws://" in output(p) and output(p), 30, what="demo URL")
    url_port = int(text.split("serving at ws://127.0.0.1:")[1].split("/")[0])
    wid = text.split("demo worker ")[1].split()[0]
    seed = REPO / "examples" / "demo" / "nodespace.json"
    if seed.exists():
        assert "seeded" in text
    cfg = json.loads((config_dir / "workers" / f"{wid}.json").read_text())
    if (REPO / "examples" / "demo_nodes.py").exists():
        assert cfg["package_dependencies"]["demo_nodes"]["path"].startswith(str(config_dir / "workers" / wid))
    assert poll_until(lambda: ws_uuid(url_port), 10, what="demo answers") == wid[len("worker_"):]
    from helpers import Client, run

    async def graph():  # the seeded example graph runs: (20 + 22) * 2
        async with Client(f"http://127.0.0.1:{url_port}") as c:
            await c.wait_value("double", "out", 84.0)
    run(graph())
    assert stop_supervisor(p) == 0


@pytest.mark.skipif(not HAVE_WORKER, reason="worker package not there yet")
def test_real_worker_dying_at_import_of_a_dependency_ends_fatal(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port, start_budget=3)
    data = paths.data_dir()
    (data / "crashdep.py").write_text("import os\nprint('crashdep: dying', flush=True)\nos._exit(1)\n")
    cfg = paths.read_config()
    cfg["package_dependencies"] = {"crashdep": {"package": "crashdep", "version": None,
                                                "path": str(data / "crashdep.py")}}
    paths.write_config(cfg)
    t0 = time.monotonic()
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    assert sup.wait(60) == 4, output(sup)
    st = state(paths)
    assert st["state"] == "FATAL" and len(st["crashes"]) == 3
    assert all(c["exit_code"] == 1 and c["phase"] == "start" for c in st["crashes"])
    assert any("crashdep: dying" in ln for ln in st["crashes"][-1]["last_log_lines"])
    print(f"FATAL after 3 failed real starts in {time.monotonic() - t0:.2f}s")


def test_signal_storm_hup_and_term_ends_in_one_clean_stop(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port, fake=True)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    poll_until(lambda: running_worker(paths), 15, what="worker ready")
    for _ in range(3):
        sup.send_signal(signal.SIGHUP)
    for _ in range(10):
        sup.send_signal(signal.SIGTERM)
    sup.send_signal(signal.SIGHUP)
    assert sup.wait(15) == 0, output(sup)
    st = state(paths)
    assert st["state"] == "STOPPED" and not st["crashes"] and st["worker"] is None
    assert not paths.pidfile.exists() and not paths.runstate.exists()


def test_two_supervisors_started_together_only_one_runs(config_dir, port, tmp_path, sup_procs, monkeypatch):
    starts = tmp_path / "starts"
    monkeypatch.setenv("FAKE_STARTS_FILE", str(starts))
    paths = make_worker(config_dir, port, fake=True)
    a = start_supervisor(paths, tmp_path)
    b = start_supervisor(paths, tmp_path)
    sup_procs += [a, b]
    loser = poll_until(lambda: next((p for p in (a, b) if p.poll() is not None), None), 20, what="one refuses")
    assert loser.returncode == 3
    winner = b if loser is a else a
    poll_until(lambda: running_worker(paths), 15, what="worker ready")
    assert len(starts.read_text().split()) == 1
    assert stop_supervisor(winner) == 0


def test_workers_folder_stays_readable_for_the_stock_workermanager(config_dir, port, tmp_path, sup_procs):
    """The stock manager takes every worker_*.json for a worker config: ours must not look like one."""
    paths = make_worker(config_dir, port, fake=True)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    poll_until(lambda: running_worker(paths), 15, what="worker ready")
    jsons = [f for f in os.listdir(paths.workers) if f.startswith("worker_") and f.endswith(".json")]
    assert jsons == [paths.config.name]
    cfg = json.loads(paths.config.read_text())
    assert {"type", "uuid", "host", "port"} <= cfg.keys() and cfg["type"] == "WSWorker"
    assert stop_supervisor(sup) == 0


def test_worker_group_is_cleared_and_orphans_reaped_after_a_crash(config_dir, port, tmp_path, sup_procs,
                                                                   monkeypatch):
    monkeypatch.setenv("FAKE_GRANDCHILD", "1")
    paths = make_worker(config_dir, port, fake=True)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid1 = poll_until(lambda: running_worker(paths), 15, what="worker ready")
    grandchild = poll_until(lambda: [c for c in psutil.Process(pid1).children() if c.name() == "sleep"], 5,
                            what="grandchild")[0]
    os.kill(pid1, signal.SIGKILL)
    poll_until(lambda: running_worker(paths, not_pid=pid1), 15, what="replacement")

    def clean():
        if grandchild.is_running() and grandchild.status() != psutil.STATUS_ZOMBIE:
            return False  # the old group was not cleared
        kids = psutil.Process(sup.pid).children()
        return not [k for k in kids if k.status() == psutil.STATUS_ZOMBIE]

    poll_until(clean, 10, what="old group killed and its orphans reaped (no zombies under the supervisor)")
    assert stop_supervisor(sup) == 0


@pytest.mark.skipif(not HAVE_WORKER, reason="worker package not there yet")
def test_pidfile_deleted_by_the_workermanager_comes_back(config_dir, port, tmp_path, sup_procs):
    """The Workermanager deletes .p when a probe fails; a running worker's .p is put back."""
    paths = make_worker(config_dir, port)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid = poll_until(lambda: running_worker(paths), 30, what="worker ready")
    paths.pidfile.unlink()
    poll_until(lambda: paths.pidfile.exists() and paths.pidfile.read_text() == str(pid), 10, what=".p rewritten")
    assert stop_supervisor(sup) == 0


@pytest.mark.skipif(not HAVE_WORKER, reason="worker package not there yet")
def test_kill9_worker_comes_back_with_its_graph_and_set_values(config_dir, port, tmp_path, sup_procs):
    from helpers import DEMO_NODES, Client, run

    paths = make_worker(config_dir, port)
    cfg = paths.read_config()
    cfg["package_dependencies"] = {"demo_nodes": {"package": "demo_nodes", "path": str(DEMO_NODES)}}
    cfg["save_delay"] = 0.05
    paths.write_config(cfg)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid1 = poll_until(lambda: running_worker(paths), 30, what="worker ready")
    url = f"http://127.0.0.1:{port}"

    async def build():
        async with Client(url) as c:
            await c.cmd("add_node", id="demo.number", uuid="a", properties={"frontend:pos": [5, 7]})
            await c.cmd("add_node", id="demo.add", uuid="b")
            await c.cmd("add_edge", src_nid="a", src_ioid="out", trg_nid="b", trg_ioid="a")
            await c.cmd("set_io_value", nid="a", ioid="value", value=40)
            await c.cmd("set_io_value", nid="b", ioid="b", value=2)
            await c.wait_value("b", "out", 42.0)
    run(build())
    nsfile = paths.data_dir(cfg) / "nodespace.json"

    def saved():
        try:
            nodes = {n["id"]: n for n in json.loads(nsfile.read_text())["backend"]["nodes"]}
        except (OSError, ValueError, KeyError):
            return False
        return nodes.get("b", {}).get("io", {}).get("b", {}).get("value") == 2
    poll_until(saved, 10, what="graph saved")
    os.kill(pid1, signal.SIGKILL)
    poll_until(lambda: running_worker(paths, not_pid=pid1), 30, what="replacement")

    async def check():
        async with Client(url) as c:
            nodes = {n["id"]: n for n in await c.cmd("get_nodes", with_frontend=True)}
            assert set(nodes) == {"a", "b"} and nodes["a"]["frontend"]["pos"] == [5, 7]
            assert await c.cmd("get_edges") == [["a", "out", "b", "a"]]
            assert await c.cmd("get_io_value", nid="a", ioid="value") == 40
            assert await c.cmd("get_io_value", nid="b", ioid="b") == 2
            await c.wait_value("b", "out", 42.0)
    run(check())
    assert stop_supervisor(sup) == 0
