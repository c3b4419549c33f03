"""update_on_startup: after the worker is ready, the supervisor builds an updated venv aside;
the next restart uses it; `status` says what is pending; offline or failing, nothing changes.
Packages come from hand-made wheels in a local --find-links folder, uv runs offline."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import poll_until
from helpers import Client, run
from supervisor import environment
from supervisor.cli import create_worker
from harness import FAST, child_env, output, running_worker, start_supervisor, stop_supervisor

MODULE = '''
import funcnodes_core as fn

VERSION = "{version}"

@fn.NodeDecorator("upd.version", name="Version")
def version() -> str:
    return VERSION

NODE_SHELF = fn.Shelf(nodes=[version], subshelves=[], name="upd", description="")
'''


def make_wheel(folder: Path, version: str) -> Path:
    """A pure-Python wheel of fn-upd-nodes, written by hand (no build backend, no network)."""
    files = {
        "fn_upd_nodes/__init__.py": MODULE.format(version=version),
        f"fn_upd_nodes-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: fn-upd-nodes\nVersion: {version}\n",
        f"fn_upd_nodes-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = f"fn_upd_nodes-{version}.dist-info/RECORD"
    lines = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(text.encode())}")
    lines.append(f"{record},,")
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / f"fn_upd_nodes-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(record, "\n".join(lines) + "\n")
    return whl


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    links = tmp_path / "wheels"
    make_wheel(links, "0.1.0")
    monkeypatch.setenv("UV_FIND_LINKS", str(links))
    monkeypatch.setenv("UV_OFFLINE", "1")  # nothing from the network: the cache and these wheels
    # The core as the supervisor has it (its exact closure), as a normal build pins it: the
    # update under test is the dependency's, not whatever newer core the uv cache may hold.
    pins = tmp_path / "core-pins.txt"
    pins.write_text("".join(f"{n}=={v}\n" for n, v in sorted(environment.core_closure().items())))
    monkeypatch.setenv("UV_CONSTRAINT", str(pins))
    return links


def site_version(venv: Path) -> str | None:
    return environment.installed_versions(venv).get("fn-upd-nodes")


def status_text(paths) -> str:
    r = subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(paths.base), "status", paths.name],
                       capture_output=True, text=True, timeout=30, env=child_env(inherit_path=False))
    return r.stdout


async def node_version(port: int, uid: str) -> str:
    """What the fn-upd-nodes module the worker has imported says its version is."""
    async with Client(f"http://127.0.0.1:{port}") as c:
        await c.cmd("add_node", id="upd.version", uuid=uid)
        await c.cmd("trigger_node", nid=uid)
        for _ in range(500):
            v = await c.cmd("get_io_value", nid=uid, ioid="out")
            if isinstance(v, str) and v != "<NoValue>":
                return v
            await asyncio.sleep(0.02)
        raise AssertionError("the version node never ran")


def test_update_is_built_after_ready_and_used_at_the_next_restart(config_dir, port, tmp_path, local_index):
    paths = create_worker(config_dir, name="upd", host="127.0.0.1", port=port, no_venv=False,
                          deps=["fn-upd-nodes"], supervisor=FAST)
    cfg = paths.read_config()
    cfg["update_on_startup"] = {"funcnodes": False, "funcnodes-core": True, "funcnodes-worker": False}
    paths.write_config(cfg)
    data = paths.data_dir()
    assert site_version(data / ".venv") == "0.1.0"
    make_wheel(local_index, "0.2.0")  # released while the worker was down
    sup = start_supervisor(paths, tmp_path)
    try:
        pid = poll_until(lambda: running_worker(paths), 60, what="worker ready")
        # the start did not wait for the update: it serves the old version, then the check ends
        st = poll_until(lambda: (s := environment.read_update_status(data)) and s.get("state") != "skipped" and s,
                        180, what="update check")
        assert st["state"] == "pending", st
        assert st["changes"]["fn-upd-nodes"] == ["0.1.0", "0.2.0"]
        assert site_version(data / ".venv") == "0.1.0" and site_version(data / environment.PENDING) == "0.2.0"
        assert run(node_version(port, "v1")) == "0.1.0"
        assert running_worker(paths) == pid
        assert "update:      pending (fn-upd-nodes 0.1.0 -> 0.2.0" in status_text(paths)
        # the next restart (SIGHUP, as `fn-supervise restart` sends) takes it
        os.kill(sup.pid, 1)
        poll_until(lambda: running_worker(paths, not_pid=pid), 60, what="restarted worker")
        assert site_version(data / ".venv") == "0.2.0" and not (data / environment.PENDING).exists()
        assert run(node_version(port, "v2")) == "0.2.0"
        assert "update:      applied (fn-upd-nodes 0.1.0 -> 0.2.0)" in status_text(paths)
    finally:
        assert stop_supervisor(sup, 20) == 0, output(sup)
    assert not list(data.glob(".venv.update-*"))


def test_nothing_newer_or_a_failing_check_changes_nothing(config_dir, tmp_path, local_index, monkeypatch):
    data = tmp_path / "data"
    deps = {"fn-upd-nodes": {"package": "fn-upd-nodes"}}
    environment.ensure_environment(data, deps)
    venv = data / ".venv"
    ino, marker = venv.stat().st_ino, (venv / environment.MARKER_NAME).read_text()
    flags = {"funcnodes-core": True}
    assert environment.check_update(data, deps, {"funcnodes-core": False}) == {"state": "off"}
    st = environment.check_update(data, deps, flags)
    assert st["state"] == "current", st
    assert environment.describe_update(data) == "up to date"
    # failing: the dependency cannot be resolved any more (its wheels are gone, uv is offline)
    for whl in local_index.glob("*.whl"):
        whl.unlink()
    monkeypatch.setenv("UV_NO_CACHE", "1")
    st = environment.check_update(data, deps, flags)
    monkeypatch.delenv("UV_NO_CACHE")
    assert st["state"] == "failed", st
    assert environment.describe_update(data).startswith("check failed, nothing changed")
    assert venv.stat().st_ino == ino and (venv / environment.MARKER_NAME).read_text() == marker
    assert not (data / environment.PENDING).exists() and not list(data.glob(".venv.update-*"))
    # a prepare afterwards uses the venv as it was (hot path)
    info = environment.ensure_environment(data, deps)
    assert info.venv.stat().st_ino == ino
