"""The real FuncNodes Workermanager under `fn-supervise host --workermanager`: its worker
starts reach the host's shared monitor and run inside the host (no supervisor process per
worker); it lists them, stops them (stop_worker) and starts them again, all through the host."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import psutil

from conftest import free_port, marked_processes, poll_until
from helpers import run
from harness import child_env, make_worker, run_cli, running_pid
from test_workermanager import UI, fn_python, listed, manager_pings, write_fn_config  # noqa: F401 (fixture)


def test_workermanager_starts_lists_and_stops_workers_through_the_host(fn_python, config_dir, tmp_path,  # noqa: F811
                                                                       no_leaked_processes):
    from subprocess_monitor import helper

    wm_port, mon_port = free_port(), free_port()
    write_fn_config(config_dir, wm_port)
    a = make_worker(config_dir, free_port())
    a.update_config(autostart="unless-stopped")
    b = make_worker(config_dir, free_port())  # autostart never: only the manager starts it
    env = child_env(inherit_path=False)
    out = tmp_path / "host.out"
    with open(out, "wb") as f:
        host = subprocess.Popen([sys.executable, "-m", "supervisor", "--dir", str(config_dir), "host", "--poll", "0.3",
                                 "--workermanager", "--python", fn_python, "--wm-host", "127.0.0.1",
                                 "--wm-port", str(wm_port), "--monitor-port", str(mon_port)],
                                env=env, cwd=str(tmp_path), stdout=f, stderr=subprocess.STDOUT)
    try:
        poll_until(lambda: host.poll() is None and manager_pings(wm_port), 60, interval=0.2,
                   what="manager answering")
        pid_a = poll_until(lambda: running_pid(a), 40, what="autostart worker A")

        async def go():
            async with UI(wm_port) as ui:
                await ui.status_until(lambda s: listed(s, "active", a.uuid) and listed(s, "inactive", b.uuid),
                                      20, "A active, B inactive")
                n = len(ui.messages)
                await ui.send({"type": "set_active", "workerid": b.uuid})
                sw = await ui.wait_for(lambda m: isinstance(m, dict) and m.get("type") in ("set_worker", "error"),
                                       60, "set_worker", start=n)
                assert sw["type"] == "set_worker", sw
                pid_b = await asyncio.to_thread(poll_until, lambda: running_pid(b), 40, 0.05, "B running")
                # in the host: the worker is the host's child, and no supervisor process was made
                assert psutil.Process(pid_b).ppid() == host.pid
                # its children: the two workers, sh, fork server, discovery, monitor, manager
                assert len(psutil.Process(host.pid).children()) == 2 + 5
                again = await helper.send_spawn_request(
                    fn_python, ["-m", "funcnodes", "--dir", str(config_dir), "worker", "--uuid", b.uuid, "start"],
                    {}, host="127.0.0.1", port=mon_port)
                assert again == {"status": "success", "pid": pid_b}, again  # once per uuid
                await ui.status_until(lambda s: listed(s, "active", b.uuid), 20, "B active")

                await ui.send({"type": "stop_worker", "workerid": b.uuid})
                await asyncio.to_thread(poll_until, lambda: not psutil.pid_exists(pid_b)
                                        or psutil.Process(pid_b).status() == psutil.STATUS_ZOMBIE, 20, 0.05, "B gone")
                await asyncio.to_thread(poll_until, lambda: (b.read_state() or {}).get("state") == "STOPPED", 10,
                                        0.05, "B STOPPED")
                await ui.status_until(lambda s: listed(s, "inactive", b.uuid), 20, "B inactive again")
                assert await asyncio.to_thread(running_pid, a) == pid_a  # the other worker never noticed

                n = len(ui.messages)
                await ui.send({"type": "set_active", "workerid": b.uuid})
                await ui.wait_for(lambda m: isinstance(m, dict) and m.get("type") == "set_worker", 60,
                                  "set_worker again", start=n)
                pid_b2 = await asyncio.to_thread(poll_until, lambda: running_pid(b, not_pid=pid_b), 40, 0.05,
                                                 "B running again")
                assert psutil.Process(pid_b2).ppid() == host.pid
        run(go())
        r = run_cli(config_dir, "list", "--json")
        assert r.returncode == 0 and a.name in r.stdout and b.name in r.stdout, r.stderr
    finally:
        if host.poll() is None:
            host.send_signal(signal.SIGTERM)
        try:
            code = host.wait(40)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait(5)
            raise
    assert code == 0, out.read_text(errors="replace")[-3000:]
    poll_until(lambda: not marked_processes(no_leaked_processes), 10, what="nothing left")
