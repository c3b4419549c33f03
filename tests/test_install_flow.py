"""add_package_dependency on a supervised worker with its own venv: the supervisor builds the
new environment beside the old one, swaps it in, and the live worker (same PID) imports it."""

import os
import signal

from conftest import poll_until
from helpers import Client, run
from supervisor.cli import create_worker
from harness import FAST, child_env, output, running_worker, start_supervisor, state, stop_supervisor

def pyproject(name: str) -> str:
    return f"""
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
"""


PYPROJECT = pyproject("fn-extra-nodes")
PYPROJECT2 = pyproject("fn-more-nodes")

MODULE = '''
import funcnodes_core as fn

@fn.NodeDecorator("extra.cube", name="Cube")
def cube(x: float) -> float:
    return x ** 3

NODE_SHELF = fn.Shelf(nodes=[cube], subshelves=[], name="extra", description="")
'''


def test_install_through_the_supervisor_swaps_the_venv_under_a_live_worker(config_dir, port, tmp_path):
    paths = create_worker(config_dir, name="inst", host="127.0.0.1", port=port, no_venv=False, supervisor=FAST)
    data = paths.data_dir()
    proj = data / "packages" / "fn-extra-nodes"
    (proj / "fn_extra_nodes").mkdir(parents=True)
    (proj / "pyproject.toml").write_text(PYPROJECT)
    (proj / "fn_extra_nodes" / "__init__.py").write_text(MODULE)
    proj2 = data / "packages" / "fn-more-nodes"
    (proj2 / "fn_more_nodes").mkdir(parents=True)
    (proj2 / "pyproject.toml").write_text(PYPROJECT2)
    (proj2 / "fn_more_nodes" / "__init__.py").write_text(MODULE.replace("extra.cube", "more.cube").replace('name="extra"', 'name="more"'))
    sup = start_supervisor(paths, tmp_path)
    try:
        pid = poll_until(lambda: running_worker(paths), 60, what="venv worker ready")
        old_venv_inode = (data / ".venv").stat().st_ino
        fs_before = poll_until(lambda: (state(paths).get("fork_server") or {}).get("ready")
                               and state(paths)["fork_server"]["pid"], 60, what="fork server ready")

        async def go():
            async with Client(f"http://127.0.0.1:{port}") as c:
                await c.cmd("add_package_dependency", name="fn-extra-nodes", dep={"path": str(proj)}, timeout=120)
                progress = [e for e in c.events if e.get("type") == "progress"]
                assert progress and progress[-1]["status"] == "success"
                assert "extra" in [s["name"] for s in (await c.cmd("get_library"))["shelves"]]
                await c.cmd("add_node", id="extra.cube", uuid="c")
                await c.cmd("set_io_value", nid="c", ioid="x", value=3)
                await c.wait_value("c", "out", 27.0)
                # a second install builds on the first: both packages are in the swapped-in venv
                await c.cmd("add_package_dependency", name="fn-more-nodes", dep={"path": str(proj2)}, timeout=120)
                assert {"extra", "more"} <= {s["name"] for s in (await c.cmd("get_library"))["shelves"]}
        run(go())
        site = next((data / ".venv" / "lib").glob("python3*/site-packages"))
        assert (site / "fn_extra_nodes").is_dir() and (site / "fn_more_nodes").is_dir()
        assert running_worker(paths) == pid  # no restart: the new venv was swapped in under it
        assert (data / ".venv").stat().st_ino != old_venv_inode
        assert {"fn-extra-nodes", "fn-more-nodes"} <= set(paths.read_config()["package_dependencies"])
        assert state(paths)["restarts"] == 0
        # the fork server was replaced by one of the new venv, with the new packages preloaded,
        # and the next restart comes from it
        fs = poll_until(lambda: (state(paths).get("fork_server") or {}).get("ready")
                        and state(paths)["fork_server"], 60, what="new fork server ready")
        assert fs["pid"] != fs_before and {"fn_extra_nodes", "fn_more_nodes"} <= set(fs["imported"]), fs
        os.kill(pid, signal.SIGKILL)
        poll_until(lambda: running_worker(paths, not_pid=pid), 60, what="restart after the installs")
        assert state(paths)["crashes"][-1]["restart"]["launch"] == "fork"

        async def after():
            async with Client(f"http://127.0.0.1:{port}") as c:
                await c.cmd("set_io_value", nid="c", ioid="x", value=4)
                await c.wait_value("c", "out", 64.0)
        run(after())
    finally:
        assert stop_supervisor(sup) == 0, output(sup)


def test_standalone_worker_installs_into_its_own_interpreter_with_uv(config_dir, port, tmp_path):
    """Without a supervisor the worker installs a dependency into its own venv with uv."""
    from helpers import WorkerProc, write_config
    from supervisor.environment import ensure_environment

    env = ensure_environment(tmp_path / "envhome", {})  # a throwaway venv with our worker in it
    write_config(config_dir, "solo")
    data = config_dir / "workers" / "worker_solo"
    proj = data / "packages" / "fn-extra-nodes"
    (proj / "fn_extra_nodes").mkdir(parents=True)
    (proj / "pyproject.toml").write_text(PYPROJECT)
    (proj / "fn_extra_nodes" / "__init__.py").write_text(MODULE)
    import os
    import sys
    from pathlib import Path

    uv_on_path = {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    w = WorkerProc(config_dir, "solo", port, python=str(env.python), env=uv_on_path).wait_ready()
    try:
        more = make_project(data / "packages", "fn-more-nodes", "more")

        async def go():
            import asyncio

            async with Client(f"http://127.0.0.1:{port}") as c:
                # two at once: one after the other, uv's output shown as progress
                await asyncio.gather(
                    c.cmd("add_package_dependency", name="fn-extra-nodes", dep={"path": str(proj)}, timeout=120),
                    c.cmd("add_package_dependency", name="fn-more-nodes", dep={"path": str(more)}, timeout=120))
                await c.cmd("add_node", id="extra.cube", uuid="c")
                await c.cmd("set_io_value", nid="c", ioid="x", value=2)
                await c.wait_value("c", "out", 8.0)
                msgs = [e["message"] for e in c.events if e.get("type") == "progress"]
                assert any(m.startswith("Install fn-extra-nodes: ") for m in msgs), msgs
                assert any(m.startswith("Install fn-more-nodes: ") for m in msgs), msgs
                # importable now: adding it again installs nothing
                n = len(c.events)
                await c.cmd("add_package_dependency", name="fn-more-nodes", timeout=60)
                assert not [e for e in c.events[n:] if e.get("type") == "progress" and e["message"].startswith("Install ")]
        run(go())
        site = next((env.venv / "lib").glob("python3*/site-packages"))
        assert (site / "fn_extra_nodes").is_dir() and (site / "fn_more_nodes").is_dir()
    finally:
        assert w.stop() == 0


def throwaway_python(tmp_path):
    """A venv of its own in tmp that sees our dev environment through a .pth file: installs
    into it (what --no-venv does to the interpreter it runs in) leave the dev venv untouched."""
    import os
    import subprocess
    import sys
    import sysconfig

    import uv

    env = tmp_path / "pyenv"
    subprocess.run([uv.find_uv_bin(), "venv", "--quiet", "--python", sys.executable, str(env)], check=True,
                   env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"}, timeout=120)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "_fn_supervise_dev.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env / "bin" / "python", site


def make_project(root, name: str, shelf: str, pyproject: str | None = None):
    mod = name.replace("-", "_")
    (root / name / mod).mkdir(parents=True)
    (root / name / "pyproject.toml").write_text(pyproject if pyproject is not None else globals()["pyproject"](name))
    (root / name / mod / "__init__.py").write_text(
        MODULE.replace("extra.cube", f"{shelf}.cube").replace('name="extra"', f'name="{shelf}"'))
    return root / name


def test_no_venv_adds_importable_installs_missing_into_its_interpreter_and_reports_failures(config_dir, port, tmp_path):
    """`fn-supervise run --no-venv`: an importable package only gets its shelf added; missing
    ones are installed (two at once: one after the other) into the interpreter the worker runs
    in; a broken one fails with a reason; the worker keeps its PID throughout."""
    import asyncio
    import subprocess
    import time

    from conftest import REPO

    py, site = throwaway_python(tmp_path)
    paths = create_worker(config_dir, name="nv", host="127.0.0.1", port=port, no_venv=True, supervisor=FAST)
    data = paths.data_dir()
    here = tmp_path / "onpath"
    make_project(here, "fn-here-nodes", "here")  # importable by name through PYTHONPATH: no install
    pkgs = data / "packages"
    extra = make_project(pkgs, "fn-extra-nodes", "extra")
    more = make_project(pkgs, "fn-more-nodes", "more")
    broken = make_project(pkgs, "fn-broken-nodes", "broken", pyproject="[project\nname = ")
    env = child_env(here / "fn-here-nodes", inherit_path=False)
    out = open(tmp_path / "sup.out", "wb")
    sup = subprocess.Popen([str(py), "-m", "supervisor", "--dir", str(config_dir), "run", paths.name, "--no-venv"],
                           stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    sup.outfile = out.name
    try:
        pid = poll_until(lambda: running_worker(paths), 60, what="worker ready")
        assert state(paths)["env"]["python"] == str(py)

        async def go():
            async with Client(f"http://127.0.0.1:{port}") as c:
                await c.cmd("add_package_dependency", name="fn-here-nodes", timeout=60)
                assert "here" in [s["name"] for s in (await c.cmd("get_library"))["shelves"]]
                t0 = time.monotonic()
                await asyncio.gather(
                    c.cmd("add_package_dependency", name="fn-extra-nodes", dep={"path": str(extra)}, timeout=180),
                    c.cmd("add_package_dependency", name="fn-more-nodes", dep={"path": str(more)}, timeout=180))
                print(f"two local projects installed into the interpreter in {time.monotonic() - t0:.1f}s")
                assert {"here", "extra", "more"} <= {s["name"] for s in (await c.cmd("get_library"))["shelves"]}
                await c.cmd("add_node", id="more.cube", uuid="m")
                await c.cmd("set_io_value", nid="m", ioid="x", value=3)
                await c.wait_value("m", "out", 27.0)
                progress = [e for e in c.events if e.get("type") == "progress"]
                assert any(e["status"] == "success" for e in progress)
                try:
                    await c.cmd("add_package_dependency", name="fn-broken-nodes", dep={"path": str(broken)}, timeout=180)
                    raise AssertionError("a broken project installed")
                except Exception as e:  # noqa: BLE001
                    assert "install" in str(e) and "fn-broken-nodes" in str(e), e
                assert [e for e in c.events if e.get("type") == "progress"][-1]["status"] == "error"
                assert await c.cmd("uuid") == paths.uuid
        run(go())
        assert (site / "fn_extra_nodes").is_dir() and (site / "fn_more_nodes").is_dir()
        assert not (site / "fn_broken_nodes").exists() and not (site / "fn_here_nodes").exists()
        deps = paths.read_config()["package_dependencies"]
        assert {"fn-here-nodes", "fn-extra-nodes", "fn-more-nodes"} <= set(deps) and "fn-broken-nodes" not in deps
        assert running_worker(paths) == pid and state(paths)["restarts"] == 0
        log = paths.log_file().read_text()
        assert "install failed" in log and "installed into" in log
    finally:
        assert stop_supervisor(sup) == 0, output(sup)
