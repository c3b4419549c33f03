"""The one test harness for supervised workers and hosts: start, wait, stop a real supervisor or
`fn-supervise host`, the child environment every process started here gets, and the fake clock
of the pure tests. Every test module that needs one of these imports it from here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import REPO, free_port

FIXTURES = Path(__file__).resolve().parent / "fixtures_supervisor"
HAVE_WORKER = (REPO / "worker" / "__main__.py").exists()

# Timers shrunk so a test sees a hang, a crash or a restart in about a second.
FAST = {"heartbeat_timeout": 1.5, "stop_grace": 1.0, "term_timeout": 1.0, "kill_timeout": 1.0,
        "backoff_base": 0.05, "backoff_cap": 0.5, "start_timeout": 20.0, "eof_grace": 0.5}


# ---------------------------------------------------------------------- child environment
def child_env(*paths: Path | str, inherit_path: bool = True, **extra: str) -> dict[str, str]:
    """os.environ with `paths` and the repo first on PYTHONPATH (so a child imports this checkout),
    plus `extra`. inherit_path=False drops the caller's own PYTHONPATH."""
    env = dict(os.environ)
    tail = [env.get("PYTHONPATH", "")] if inherit_path else []
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(REPO), *tail]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_cli(base: Path | None, *args: str, timeout: float = 60.0, env: dict | None = None,
            cwd: Path | str = REPO) -> subprocess.CompletedProcess:
    """`python -m supervisor [--dir base] args...` to its end, output captured."""
    pre = ["--dir", str(base)] if base is not None else []
    return subprocess.run([sys.executable, "-m", "supervisor", *pre, *args], capture_output=True, text=True,
                          env=env or child_env(), cwd=str(cwd), timeout=timeout)


def popen_logged(argv: list[str], out: Path, *, env: dict | None = None, cwd: Path | str = REPO,
                 **kw) -> subprocess.Popen:
    """Start argv with stdout+stderr into `out`; output(p) reads it back."""
    with open(out, "wb") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env or child_env(), cwd=str(cwd), **kw)
    p.outfile = str(out)  # type: ignore[attr-defined]
    return p


def output(p: subprocess.Popen) -> str:
    return Path(p.outfile).read_text(errors="replace")  # type: ignore[attr-defined]


def stop_process(p: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, wait; SIGKILL if it does not stop (then fail: a stop that hangs is a bug)."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
        raise AssertionError(f"pid {p.pid} did not stop on SIGTERM:\n" + output(p)[-4000:])


def stop_all(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """Teardown: whatever the test left running gets SIGTERM, then SIGKILL past the deadline."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def sup_procs():
    """Supervisors (or hosts) a test starts; stopped at teardown even when the test fails."""
    procs: list[subprocess.Popen] = []
    yield procs
    stop_all(procs)


# ---------------------------------------------------------------------- one supervised worker
def make_worker(config_dir: Path, port: int, *, fake: bool = False, hb: float = 0.2, **sup):
    """A worker folder made by the real `create_worker`, FAST timers plus `sup`; fake=True runs
    the fault-injecting tests/fixtures_supervisor/fakeworker.py instead of the real worker."""
    from supervisor.cli import create_worker

    opts = dict(FAST)
    opts.update(sup)
    if fake:
        opts["worker_module"] = "fakeworker"
    paths = create_worker(config_dir, name="t", host="127.0.0.1", port=port, no_venv=True, supervisor=opts)
    cfg = paths.read_config()
    cfg["heartbeat_interval"] = hb
    paths.write_config(cfg)
    return paths


def start_supervisor(paths, tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return popen_logged([sys.executable, "-m", "supervisor", "--dir", str(paths.base), *extra, paths.name],
                        tmp_path / f"supervisor-{time.monotonic_ns()}.out", env=env or child_env(FIXTURES))


def stop_supervisor(p: subprocess.Popen, timeout: float = 10.0) -> int:
    return stop_process(p, timeout)


def state(paths) -> dict:
    return paths.read_state() or {}


def running_worker(paths, not_pid: int | None = None):
    """The worker's pid once the supervisor reports RUNNING (and not `not_pid`), else None."""
    st = state(paths)
    w = st.get("worker")
    if st.get("state") == "RUNNING" and w and w["pid"] != not_pid and paths.pidfile.exists():
        return w["pid"]
    return None


async def _ws_uuid(port: int) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"ws://127.0.0.1:{port}/", timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
            await ws.send_str(json.dumps({"type": "cmd", "cmd": "uuid", "kwargs": {}, "id": "u1"}))
            msg = await asyncio.wait_for(ws.receive(), 3)
            return json.loads(msg.data)["result"]


def ws_uuid(port: int) -> str | None:
    """The uuid the worker on `port` answers with, or None if nothing answers (yet)."""
    try:
        return asyncio.run(_ws_uuid(port))
    except (OSError, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------- host mode
def start_host(base: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    return popen_logged([sys.executable, "-m", "supervisor", "--dir", str(base), "host", "--poll", "0.3", *extra],
                        tmp_path / f"host-{time.monotonic_ns()}.out")


def workers(config_dir: Path, n: int = 3, autostart: str = "unless-stopped") -> list:
    """n worker folders for a host, each on a free port."""
    out = []
    for _ in range(n):
        paths = make_worker(config_dir, free_port())
        paths.update_config(autostart=autostart)
        out.append(paths)
    return out


def running_pid(paths, not_pid: int | None = None) -> int | None:
    """Like running_worker, but also the worker answers its uuid on its port."""
    st = paths.read_state() or {}
    w = st.get("worker")
    if st.get("state") == "RUNNING" and w and w["pid"] != not_pid and ws_uuid(st["port"]) == paths.uuid:
        return w["pid"]
    return None


# ---------------------------------------------------------------------- pure tests
class FakeClock:
    """A monotonic clock the test moves by hand: pure decisions are tested without sleeping."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt
