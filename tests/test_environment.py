"""The worker venv: real uv, real venvs in tmp_path, the user's uv cache shared (warm = fast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import environment as envmod
from supervisor.environment import (
    MARKER_NAME,
    InstallError,
    InvalidDependency,
    ensure_environment,
    fingerprint,
    install_into,
    normalize_deps,
)

REPO = Path(__file__).resolve().parents[1]


def run_py(info, code: str) -> str:
    return subprocess.run(
        [str(info.python), "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()


def marker(venv: Path) -> dict:
    return json.loads((venv / MARKER_NAME).read_text())


@pytest.fixture
def data_dir(config_dir) -> Path:
    d = config_dir / "workers" / "worker_test"
    d.mkdir(parents=True)
    return d


@pytest.fixture
def worker_src(tmp_path) -> Path:
    """A private copy of the worker package, so a test can change 'the installed fn-supervise'."""
    src = tmp_path / "src" / "worker"
    shutil.copytree(REPO / "worker", src, ignore=shutil.ignore_patterns("__pycache__"))
    return src


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fail the test if anything spawns a process."""

    def boom(*a, **kw):
        raise AssertionError(f"unexpected subprocess: {a[0] if a else kw.get('args')}")

    monkeypatch.setattr(envmod.subprocess, "Popen", boom)


def leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.glob(".venv.*") if p.name != ".venv.lock")


@pytest.fixture
def built(data_dir, worker_src):
    """A complete venv with no extra deps."""
    return ensure_environment(data_dir, {}, worker_src=worker_src)


# --------------------------------------------------------------------------- create / hot path


def test_fresh_venv_then_noop(data_dir, worker_src, monkeypatch):
    stages = []
    info = ensure_environment(data_dir, {}, worker_src=worker_src, progress=lambda m, f: stages.append((m, f)))
    assert info.venv == data_dir / ".venv" and info.python == info.venv / "bin" / "python"
    assert [m for m, _ in stages] == ["creating venv", f"installing {len(envmod.CORE_PACKAGES)} packages",
                                      "copying worker code", "verifying", "done"]
    assert "prometheus-client" in envmod.CORE_PACKAGES  # the worker's /metrics
    assert stages[-1][1] == 1.0

    out = run_py(info, "import sys, worker, funcnodes_core, aiohttp; print(sys.prefix, worker.__file__)")
    prefix, wfile = out.split()
    assert Path(prefix) == info.venv  # its own env, not the supervisor's
    assert Path(wfile).is_relative_to(info.venv)
    # pinned to the supervisor's own versions
    got = run_py(info, "import importlib.metadata as m; print(m.version('funcnodes-core'), m.version('aiohttp'))")
    assert got.split() == [envmod.core_versions()["funcnodes-core"], envmod.core_versions()["aiohttp"]]
    # the supervisor's other packages are not dragged in
    assert run_py(info, "import importlib.util as u; print(u.find_spec('psutil') is None)") == "True"

    m = marker(info.venv)
    assert m["fingerprint"] == info.fingerprint == fingerprint({}, sys.executable, worker_src=worker_src)
    assert leftovers(data_dir) == []

    # Second call: the hot path. Same fingerprint, same venv inode, and no process at all.
    inode = info.venv.stat().st_ino
    monkeypatch.setattr(envmod.subprocess, "Popen", lambda *a, **k: pytest.fail("spawned on the hot path"))
    again = ensure_environment(data_dir, {}, worker_src=worker_src)
    assert again == info and info.venv.stat().st_ino == inode


def test_invalid_names_rejected_before_any_subprocess(data_dir, no_subprocess):
    bad = [
        {"foo; rm -rf /": {"package": "foo; rm -rf /", "version": None}},
        {"x": {"package": "--index-url=http://evil", "version": None}},
        {"x": {"package": "ok", "version": "1.0; rm -rf /"}},
        {"x": {"package": "ok", "version": ">=1.0 --pre"}},
        {"x": {"package": "ok", "version": 3}},
        {"x": {"package": "ok", "path": "/no/such/dir/for/fn-supervise"}},
    ]
    for deps in bad:
        with pytest.raises(InvalidDependency):
            ensure_environment(data_dir, deps)
    assert not (data_dir / ".venv").exists() and leftovers(data_dir) == []
    assert issubclass(InvalidDependency, InstallError) and issubclass(InvalidDependency, ValueError)


def test_dependency_normalization():
    a = normalize_deps({"Foo_Bar": {"package": "Foo_Bar", "version": "1.2"}, "b": {"package": "b"}})
    b = normalize_deps([{"package": "b", "version": None}, {"package": "foo-bar", "version": "==1.2"}])
    assert a == b and [d.requirement() for d in a] == ["b", "foo-bar==1.2"]
    assert normalize_deps({"x": {"package": "x", "version": ">= 1.0 , <2"}})[0].spec == ">=1.0,<2"
    assert fingerprint(a) == fingerprint(b) != fingerprint({"b": {"package": "b", "version": ">=1"}})


# --------------------------------------------------------------------------- installs


def test_local_project_installs_and_local_module_counts(built, data_dir, worker_src, tmp_path):
    proj = tmp_path / "tinyproj"
    (proj / "fn_tiny_pkg").mkdir(parents=True)
    (proj / "fn_tiny_pkg" / "__init__.py").write_text("VALUE = 42\n")
    (proj / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "fn-tiny-pkg"\nversion = "0.1.0"\n'
        '[tool.setuptools]\npackages = ["fn_tiny_pkg"]\n'
    )
    script = tmp_path / "my_nodes.py"
    script.write_text("X = 1\n")
    deps = {
        "fn-tiny-pkg": {"package": "fn-tiny-pkg", "version": None, "path": str(proj)},
        "my-nodes": {"package": "my-nodes", "version": None, "path": str(script)},
    }
    old_inode = built.venv.stat().st_ino
    stages = []
    info = install_into(data_dir, deps, worker_src=worker_src, progress=lambda m, f: stages.append(m))
    assert f"installing {len(envmod.CORE_PACKAGES) + 1} packages" in stages  # core + the project; the .py file is not installed
    assert info.fingerprint != built.fingerprint
    assert info.venv.stat().st_ino != old_inode  # built beside and swapped in
    assert leftovers(data_dir) == []
    assert run_py(info, "import fn_tiny_pkg; print(fn_tiny_pkg.VALUE)") == "42"
    assert run_py(info, "import importlib.util as u; print(u.find_spec('my_nodes') is None)") == "True"
    assert [d[0] for d in marker(info.venv)["deps"]] == ["fn-tiny-pkg", "my-nodes"]


@pytest.mark.parametrize(
    "deps",
    [
        {"fn-supervise-no-such-pkg-zz": {"package": "fn-supervise-no-such-pkg-zz", "version": None}},
        {"broken": {"package": "broken", "version": None, "path": "BROKENPROJ"}},
    ],
    ids=["unknown-package", "broken-local-project"],
)
def test_failed_install_keeps_old_venv(built, data_dir, worker_src, tmp_path, deps):
    if "broken" in deps:  # a local project that does not build
        proj = tmp_path / "broken"
        proj.mkdir()
        (proj / "setup.py").write_text("raise SystemExit('this project does not build')\n")
        deps = {"broken": {"package": "broken", "version": None, "path": str(proj)}}
    before = (built.venv.stat().st_ino, (built.venv / MARKER_NAME).read_bytes())
    with pytest.raises(InstallError) as ei:
        install_into(data_dir, deps, worker_src=worker_src)
    err = ei.value
    assert err.stage == "install" and "failed" in str(err)
    assert ("fn-supervise-no-such-pkg-zz" in str(err)) or ("does not build" in str(err) or "broken" in str(err))
    assert (built.venv.stat().st_ino, (built.venv / MARKER_NAME).read_bytes()) == before
    assert leftovers(data_dir) == []
    # the old venv still works and is still what a start gets, without rebuilding
    assert ensure_environment(data_dir, {}, worker_src=worker_src) == built
    run_py(built, "import worker, funcnodes_core, aiohttp")


def test_timeout_kills_uv(data_dir, worker_src, monkeypatch):
    monkeypatch.setattr(envmod, "VENV_TIMEOUT", 0.001)
    with pytest.raises(InstallError) as ei:
        ensure_environment(data_dir, {}, worker_src=worker_src)
    assert ei.value.timed_out and ei.value.stage == "venv"
    assert not (data_dir / ".venv").exists() and leftovers(data_dir) == []
    # the leak check (conftest) proves the killed uv is gone


def test_cancel_kills_the_build_and_keeps_the_old_venv(built, data_dir, worker_src):
    import threading

    cancel = threading.Event()
    deps = {"my-nodes": {"package": "my-nodes", "path": str(worker_src)}}  # any change: a rebuild

    def progress(message, fraction):
        if message == "verifying":  # the slowest stage (~0.8 s): cancel while it runs
            cancel.set()

    before = (built.venv.stat().st_ino, (built.venv / MARKER_NAME).read_bytes())
    with pytest.raises(InstallError) as ei:
        install_into(data_dir, deps, worker_src=worker_src, progress=progress, cancel=cancel)
    assert ei.value.cancelled and ei.value.stage == "verify"
    assert (built.venv.stat().st_ino, (built.venv / MARKER_NAME).read_bytes()) == before
    assert leftovers(data_dir) == []


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_run_kills_the_whole_process_group(tmp_path, how):
    import threading
    import time

    cancel = threading.Event()
    if how == "cancel":
        threading.Timer(0.3, cancel.set).start()
    # a child that starts a grandchild: both must go (the leak check in conftest proves it)
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    t0 = time.monotonic()
    with pytest.raises(InstallError) as ei:
        envmod._run(
            [sys.executable, "-c", code], stage="x", timeout=0.5 if how == "timeout" else 60,
            cwd=tmp_path, env=dict(os.environ), cancel=cancel,
        )
    assert time.monotonic() - t0 < 5
    assert (ei.value.cancelled, ei.value.timed_out) == ((True, False) if how == "cancel" else (False, True))


# --------------------------------------------------------------------------- half-written, crashes


def test_venv_without_marker_is_rebuilt(built, data_dir, worker_src):
    (built.venv / MARKER_NAME).unlink()  # killed before the marker: never used
    (data_dir / ".venv.new-dead1" / "bin").mkdir(parents=True)  # half a build
    (data_dir / ".venv.old-dead2").mkdir()
    inode = built.venv.stat().st_ino
    info = ensure_environment(data_dir, {}, worker_src=worker_src)
    assert info.venv.stat().st_ino != inode and marker(info.venv)["fingerprint"] == info.fingerprint
    assert leftovers(data_dir) == []
    run_py(info, "import worker, funcnodes_core, aiohttp")


def test_leftovers_removed_on_hot_path_unless_a_build_runs(built, data_dir, worker_src, no_subprocess):
    (data_dir / ".venv.new-dead1" / "bin").mkdir(parents=True)
    (data_dir / ".venv.old-dead2").mkdir()
    with envmod._Lock(data_dir / ".venv.lock"):  # a builder at work: its .venv.new-* is not ours
        assert ensure_environment(data_dir, {}, worker_src=worker_src) == built
        assert leftovers(data_dir) == [".venv.new-dead1", ".venv.old-dead2"]
    assert ensure_environment(data_dir, {}, worker_src=worker_src) == built
    assert leftovers(data_dir) == []


def test_complete_venv_stranded_between_renames_is_adopted(built, data_dir, worker_src, no_subprocess):
    stranded = data_dir / ".venv.new-k1ll"
    os.rename(built.venv, stranded)  # killed after ".venv -> old", before "new -> .venv"
    (data_dir / ".venv.old-k1ll").mkdir()
    info = ensure_environment(data_dir, {}, worker_src=worker_src)
    assert info == built and marker(info.venv)["fingerprint"] == built.fingerprint
    assert leftovers(data_dir) == []


def test_worker_code_change_only_recopies(built, data_dir, worker_src, no_subprocess):
    inode = built.venv.stat().st_ino
    (worker_src / "newmodule.py").write_text("UPGRADED = True\n")
    info = ensure_environment(data_dir, {}, worker_src=worker_src)
    assert info.fingerprint != built.fingerprint
    assert info.venv.stat().st_ino == inode  # same venv, no uv run (no_subprocess)
    sp = info.venv / marker(info.venv)["site_packages"]
    assert (sp / "worker" / "newmodule.py").read_text() == "UPGRADED = True\n"
    assert not list(sp.glob(".fn-worker-*"))
    assert marker(info.venv)["worker_hash"] == envmod.worker_hash(worker_src)
    assert ensure_environment(data_dir, {}, worker_src=worker_src) == info  # and now the hot path


def test_new_venv_is_ready_offline_from_a_warm_cache(built, config_dir, worker_src, monkeypatch):
    # `built` warmed the cache; now every network request would fail (a dead proxy).
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    info = ensure_environment(config_dir / "workers" / "worker_offline", {}, worker_src=worker_src)
    assert info.fingerprint == built.fingerprint
    run_py(info, "import worker, funcnodes_core, aiohttp")
