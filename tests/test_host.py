"""`fn-supervise host`: N real workers under one real host process (real sockets, signals,
SIGKILL), the control socket through the real CLI, and what is left after each kind of stop."""

from __future__ import annotations

import json
import os
import signal
import stat
import time

import psutil
import pytest

from conftest import free_port, marked_processes, poll_until
from harness import make_worker, output, run_cli, running_pid, start_host, workers
from supervisor.files import WorkerPaths

N = 3


def group_alive(pgid: int) -> bool:
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def test_three_workers_answer_a_kill_restarts_only_it_a_stop_leaves_nothing(config_dir, tmp_path, sup_procs,
                                                                           no_leaked_processes):
    ws = workers(config_dir)
    never = make_worker(config_dir, free_port())  # autostart never: left alone
    host = start_host(config_dir, tmp_path)
    sup_procs.append(host)
    pids = [poll_until(lambda p=p: running_pid(p), 40, what=f"{p.name} answers") for p in ws]
    assert len(set(pids)) == N
    # one process, one supervisor identity for all: the host's
    assert {(p.read_state() or {})["supervisor"]["pid"] for p in ws} == {host.pid}
    assert (never.read_state() or {}).get("state") is None
    sock = config_dir / "fn-supervise-host.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    # SIGKILL of one worker: only it comes back (new pid, same port); the others keep their pid
    os.kill(pids[0], signal.SIGKILL)
    new0 = poll_until(lambda: running_pid(ws[0], not_pid=pids[0]), 30, what="worker 0 restarted")
    assert new0 != pids[0]
    assert [running_pid(p) for p in ws[1:]] == pids[1:]
    crashes = (ws[0].read_state() or {}).get("crashes") or []
    assert crashes and crashes[-1]["signal"] == signal.SIGKILL
    assert not (ws[1].read_state() or {}).get("crashes")

    # CLI through the control socket
    r = run_cli(config_dir, "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {w["id"]: w for w in json.loads(r.stdout)}
    assert all(rows[p.name]["state"] == "RUNNING" for p in ws)
    assert rows[never.name]["state"] == "STOPPED"
    r = run_cli(config_dir, "status", ws[1].name)
    assert r.returncode == 0 and f"{host.pid} (fn-supervise host)" in r.stdout, r.stdout + r.stderr

    # stopping one leaves nothing of it: its pid and its group are gone, the others run on
    pgid1 = os.getpgid(pids[1])
    r = run_cli(config_dir, "stop", ws[1].name)
    assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
    assert not psutil.pid_exists(pids[1]) or psutil.Process(pids[1]).status() == psutil.STATUS_ZOMBIE
    poll_until(lambda: not group_alive(pgid1), 5, what="worker 1's group gone")
    assert (ws[1].read_state() or {}).get("state") == "STOPPED"
    assert not ws[1].pidfile.exists()
    assert running_pid(ws[0]) == new0 and running_pid(ws[2]) == pids[2]
    time.sleep(1.0)  # several scans (0.3 s): a stopped worker is not brought back by one
    assert (ws[1].read_state() or {}).get("state") == "STOPPED"

    # restart brings it back
    r = run_cli(config_dir, "restart", ws[1].name)
    assert r.returncode == 0, r.stderr
    poll_until(lambda: running_pid(ws[1]), 30, what="worker 1 started again")

    host.send_signal(signal.SIGTERM)
    assert host.wait(40) == 0, output(host)
    assert not sock.exists()
    poll_until(lambda: not marked_processes(no_leaked_processes), 10, what="nothing left after the host stopped")


@pytest.mark.parametrize("spawn", ["forked", "spawned"])
def test_sigkill_of_the_host_leaves_no_process(spawn, config_dir, tmp_path, sup_procs, no_leaked_processes):
    ws = workers(config_dir)
    host = start_host(config_dir, tmp_path, *(["--no-fork-server"] if spawn == "spawned" else []))
    sup_procs.append(host)
    for p in ws:
        poll_until(lambda p=p: running_pid(p), 40, what=f"{p.name} answers")
    # the sidecars are up too (they would be the ones to linger)
    poll_until(lambda: len(psutil.Process(host.pid).children()) >= 3, 20, what="sidecars started")
    before = marked_processes(no_leaked_processes)
    assert len(before) >= N + 3
    for p in ws:  # forked by the fork server or spawned: either way the host is the parent
        wpid = running_pid(p)
        assert psutil.Process(wpid).ppid() == host.pid
        assert os.getpgid(wpid) == wpid  # a process group (and session) of its own
        cmd = " ".join(psutil.Process(wpid).cmdline())
        assert ("worker.forkserver" in cmd) == (spawn == "forked"), cmd
    # one fork server for the host (every worker here has the same environment), not one each
    servers = [c for c in psutil.Process(host.pid).children() if c.name() == "fn-forkserver"]
    assert len(servers) == (1 if spawn == "forked" else 0), [(c.pid, c.name()) for c in servers]
    host.send_signal(signal.SIGKILL)
    host.wait(10)
    poll_until(lambda: not marked_processes(no_leaked_processes), 15, what="no process left after SIGKILL")


def test_workers_added_changed_and_removed_are_picked_up(config_dir, tmp_path, sup_procs):
    (a,) = workers(config_dir, 1)
    host = start_host(config_dir, tmp_path)
    sup_procs.append(host)
    pid_a = poll_until(lambda: running_pid(a), 40, what="a answers")
    (b,) = workers(config_dir, 1)  # added while the host runs
    poll_until(lambda: running_pid(b), 40, what="b started by a scan")
    a.update_config(autostart="never")  # changed: autostart off -> stopped
    poll_until(lambda: (a.read_state() or {}).get("state") == "STOPPED", 30, what="a stopped")
    assert not psutil.pid_exists(pid_a) or psutil.Process(pid_a).status() == psutil.STATUS_ZOMBIE
    pid_b = running_pid(b)
    b.config.unlink()  # removed -> stopped
    poll_until(lambda: not psutil.pid_exists(pid_b) or psutil.Process(pid_b).status() == psutil.STATUS_ZOMBIE,
               30, what="b stopped after its config was removed")
    assert host.poll() is None
    # one host per folder
    second = start_host(config_dir, tmp_path)
    sup_procs.append(second)
    assert second.wait(30) == 3, output(second)
    host.send_signal(signal.SIGTERM)
    assert host.wait(40) == 0, output(host)


def test_new_autostart_is_started_by_a_running_host_and_cli_falls_back_without_one(config_dir, tmp_path, sup_procs):
    host = start_host(config_dir, tmp_path, "--no-sidecars")
    sup_procs.append(host)
    poll_until(lambda: (config_dir / "fn-supervise-host.sock").exists(), 20, what="host socket")
    r = run_cli(config_dir, "new", "--no-venv", "--autostart")
    assert r.returncode == 0, r.stderr
    paths = WorkerPaths(config_dir, r.stdout.strip().removeprefix("worker_"))
    assert paths.read_config()["autostart"] == "unless-stopped"
    poll_until(lambda: running_pid(paths), 40, what="new worker started by the host")
    host.send_signal(signal.SIGTERM)
    assert host.wait(40) == 0, output(host)
    # the host remembers the hand stop only for unless-stopped; without a host the CLI is per-worker
    r = run_cli(config_dir, "stop", paths.name)
    assert r.returncode == 0 and "not running" in r.stdout, r.stdout + r.stderr
