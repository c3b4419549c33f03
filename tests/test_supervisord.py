"""fn-supervise under the real supervisord (PyPI `supervisor`, in its own venv: see
tests/supervisordenv.py) with the section `fn-supervise supervisord-conf` prints, as printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import marked_processes, poll_until
from supervisor import units
from supervisor.config import SupervisorConfig
from supervisordenv import Supervisord
from harness import HAVE_WORKER, REPO, make_worker, running_worker, state, ws_uuid

pytestmark = pytest.mark.skipif(not HAVE_WORKER, reason="worker package not there yet")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def descends_from(p: psutil.Process, root: int) -> bool:
    try:
        return any(a.pid == root for a in p.parents())
    except psutil.Error:
        return False


def test_supervisord_runs_restarts_and_stops_fn_supervise(config_dir, port, tmp_path, no_leaked_processes):
    paths = make_worker(config_dir, port)
    r = subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(config_dir), "supervisord-conf", paths.name],
                       capture_output=True, text=True, cwd=str(REPO), timeout=30)
    assert r.returncode == 0, r.stderr
    section = r.stdout
    prog = f"fn-supervise-{paths.uuid}"
    assert f"[program:{prog}]" in section
    cfg = SupervisorConfig.from_worker_config(paths.read_config())
    stopwaitsecs = units.stop_timeout(cfg)
    assert f"stopwaitsecs={stopwaitsecs}" in section and stopwaitsecs > cfg.stop_deadline()

    sv = Supervisord(tmp_path / "svd", section)
    try:
        # supervisord starts fn-supervise; the worker answers
        poll_until(lambda: sv.status(prog) == "RUNNING", 30, interval=0.2, what="RUNNING in supervisord")
        w1 = poll_until(lambda: running_worker(paths), 30, what="worker ready")
        assert ws_uuid(port) == paths.uuid
        sup1 = sv.pid(prog)
        assert sup1 and state(paths)["supervisor"]["pid"] == sup1
        env = psutil.Process(sup1).environ()
        assert env.get("SUPERVISOR_ENABLED") == "1" and env.get("FUNCNODES_CONFIG_DIR") == str(config_dir)

        # SIGKILL of fn-supervise: supervisord restarts it; the old worker does not outlive it
        os.kill(sup1, signal.SIGKILL)
        poll_until(lambda: gone(w1), 10, what="old worker gone with its supervisor")
        sup2 = poll_until(lambda: (p := sv.pid(prog)) and p != sup1 and p, 30, interval=0.2, what="restarted")
        w2 = poll_until(lambda: running_worker(paths, not_pid=w1), 30, what="new worker ready")
        assert state(paths)["supervisor"]["pid"] == sup2
        assert poll_until(lambda: ws_uuid(port), 10, what="uuid answer") == paths.uuid
        # nothing orphaned: every process of this test is supervisord or below it
        strays = [p for p in marked_processes(no_leaked_processes)
                  if p.pid != sv.proc.pid and not descends_from(p, sv.proc.pid)]
        assert not strays, [(p.pid, p.cmdline()[:4]) for p in strays]

        # supervisorctl stop: everything goes, within stopwaitsecs
        t0 = time.monotonic()
        rc = sv.ctl("stop", prog, timeout=stopwaitsecs + 30)
        took = time.monotonic() - t0
        assert rc.returncode == 0 and "stopped" in rc.stdout, rc.stdout + rc.stderr
        assert took < stopwaitsecs
        assert gone(sup2) and gone(w2)
        assert [p.pid for p in marked_processes(no_leaked_processes)] == [sv.proc.pid]
        assert sv.status(prog) == "STOPPED"
        assert state(paths)["state"] == "STOPPED" and state(paths)["exit_code"] == 0
        assert not paths.pidfile.exists()
        log = sv.log()
        assert f"stopped: {prog} (exit status 0)" in log, log[-3000:]
        assert "with signal SIGKILL" not in log  # supervisord never had to escalate
        print(f"supervisorctl stop took {took:.2f}s (stopwaitsecs {stopwaitsecs})")
    finally:
        code = sv.shutdown(60)
        assert code == 0, sv.log()[-3000:]
