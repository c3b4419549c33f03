"""worker_<uuid>.json names the subprocess monitor of the run that is going on (issue 16, defect
6): written when the worker learns it, not at the next snapshot or stop, so a second run's file
never names the first run's monitor (a port nobody listens on)."""

from __future__ import annotations

import json
import socket

from conftest import poll_until
from helpers import DEMO_NODES, Client, run
from harness import make_worker, running_worker, start_supervisor, stop_supervisor


def _listening(addr: dict | None) -> bool:
    if not addr or not addr.get("port"):
        return False
    try:
        socket.create_connection((addr["host"], addr["port"]), timeout=1).close()
        return True
    except OSError:
        return False


def _live_monitor(port: int) -> dict | None:
    async def get():
        async with Client(f"http://127.0.0.1:{port}") as c:
            return (await c.cmd("get_config")).get("subprocess_monitor")
    try:
        return run(get())
    except (OSError, AssertionError):
        return None


def test_config_names_the_running_monitor_at_once(config_dir, port, tmp_path):
    paths = make_worker(config_dir, port, hb=0.5)
    cfg = paths.read_config()
    cfg.update(save_delay=3600, package_dependencies={"demo_nodes": {"package": "demo_nodes", "path": str(DEMO_NODES)}})
    paths.write_config(cfg)
    first = None
    for run_no in (1, 2):  # the second run's monitor listens on another port than the first's
        sup = start_supervisor(paths, tmp_path)
        try:
            poll_until(lambda: running_worker(paths), 30, what="worker ready")

            def file_matches_live():
                live = _live_monitor(port)
                on_file = json.loads(paths.config.read_text()).get("subprocess_monitor")
                return live if live and on_file == live and _listening(on_file) and live != first else None

            first = poll_until(file_matches_live, 15, interval=0.1,
                               what=f"run {run_no}: the config file names the live monitor")
        finally:
            stop_supervisor(sup, 20)
