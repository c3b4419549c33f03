"""`fn-supervise modules list|install|remove worker_<uuid> NAME` with a supervised worker: install
and remove go through the worker's add/remove_package_dependency (the UI's install path), and
the config, pyproject.toml and the library follow."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import REPO, poll_until
from helpers import DEMO_NODES, Client, run
from harness import make_worker, running_worker, start_supervisor, stop_supervisor
from stockenv import stock_files_python


def cli(base, *args):
    return subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(base), *args],
                          capture_output=True, text=True, cwd=str(REPO), timeout=120)


def test_modules_install_list_remove_through_the_running_worker(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port, python=stock_files_python())  # where funcnodes-files is installed
    cfg = paths.read_config()
    cfg["package_dependencies"] = {"demo_nodes": {"package": "demo_nodes", "path": str(DEMO_NODES)}}
    paths.write_config(cfg)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    poll_until(lambda: running_worker(paths), 30, what="worker ready")
    url = f"http://127.0.0.1:{port}"

    async def shelves():
        async with Client(url) as c:
            return [s["name"] for s in (await c.cmd("get_library"))["shelves"]]

    r = cli(config_dir, "modules", "list", paths.name)
    assert r.returncode == 0 and "demo_nodes" in r.stdout, r
    assert "Files" not in run(shelves())
    # funcnodes-files is importable in the worker's env: the worker adds it without a download
    r = cli(config_dir, "modules", "install", paths.name, "funcnodes-files>=1.0")
    assert r.returncode == 0, r.stderr
    assert "installed funcnodes-files" in r.stdout and "Add package dependency funcnodes-files" in r.stderr
    assert paths.read_config()["package_dependencies"]["funcnodes-files"]["version"] == ">=1.0"
    pyproject = tomllib.loads((paths.data_dir() / "pyproject.toml").read_text())
    assert pyproject["project"]["dependencies"] == ["funcnodes-files>=1.0"]
    assert "Files" in run(shelves())
    assert "funcnodes-files" in cli(config_dir, "modules", "list", paths.name).stdout
    # refused by the worker: a clear error, exit 1, nothing changed
    r = cli(config_dir, "modules", "install", paths.name, str(tmp_path))  # a path outside its data folder
    assert r.returncode == 1 and "data folder" in r.stderr, r
    r = cli(config_dir, "modules", "remove", paths.name, "funcnodes-files")
    assert r.returncode == 0, r.stderr
    assert "funcnodes-files" not in paths.read_config()["package_dependencies"]
    assert "Files" not in run(shelves())
    assert tomllib.loads((paths.data_dir() / "pyproject.toml").read_text())["project"]["dependencies"] == []
    assert stop_supervisor(sup) == 0
    r = cli(config_dir, "modules", "install", paths.name, "funcnodes-files")
    assert r.returncode == 1 and "not running" in r.stderr, r
    assert cli(config_dir, "modules", "install", "worker_nosuch", "x").returncode == 2
