"""The real FuncNodes CLI and Workermanager (PyPI funcnodes 1.7.1) as a test-only dependency.

`funcnodes_python()` returns the interpreter of a venv at `<repo>/.envs/funcnodes` (gitignored)
holding `funcnodes==1.7.1` (the CLI, the Workermanager, and what it pulls: funcnodes-worker,
funcnodes-core, funcnodes-react-flow, subprocess-monitor, venvmngr, ...), built with uv from the
current interpreter (no Python download) when it is missing or half-built. The marker file is
written last, and a file lock keeps parallel test sessions from building it twice. The manager
thus never shares an interpreter with fn-supervise.

Pins are the versions spec/workermanager.md was read from; anything they pull floats within
funcnodes' own bounds.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV_DIR = REPO / ".envs" / "funcnodes"
PINS = ["funcnodes==1.7.1", "funcnodes-worker==1.6.0", "funcnodes-core==2.4.0", "subprocess-monitor==0.4.0"]
MARKER = ".fn-supervise-funcnodes-complete"
VENV_TIMEOUT = 120.0
INSTALL_TIMEOUT = 900.0
LOCK_TIMEOUT = INSTALL_TIMEOUT + VENV_TIMEOUT + 60.0
CHECK = ("import funcnodes, funcnodes.worker.worker_manager, funcnodes_worker.websocket, "
         "subprocess_monitor, aiohttp; print(funcnodes.__version__)")


def _python_of(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _complete(env: Path) -> bool:
    marker = env / MARKER
    if not marker.is_file() or not _python_of(env).exists():
        return False
    try:
        return json.loads(marker.read_text()).get("pins") == PINS
    except (OSError, ValueError):
        return False


def _run(argv: list[str], timeout: float, env: dict) -> str:
    try:
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout


def funcnodes_python(env_dir: Path = ENV_DIR) -> str:
    """Python of a venv with the real funcnodes CLI + Workermanager; built with uv if needed."""
    env_dir = Path(env_dir)
    if _complete(env_dir):
        return str(_python_of(env_dir))
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = env_dir.parent / (env_dir.name + ".lock")
    with open(lock_path, "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not lock {lock_path} within {LOCK_TIMEOUT}s")
                time.sleep(0.2)
        try:
            if _complete(env_dir):  # another session built it while we waited
                return str(_python_of(env_dir))
            import uv

            uv_bin = uv.find_uv_bin()
            env = dict(os.environ)
            env["UV_PYTHON_DOWNLOADS"] = "never"
            env.pop("VIRTUAL_ENV", None)
            if env_dir.exists():
                shutil.rmtree(env_dir)
            _run([uv_bin, "venv", "--quiet", "--python", sys.executable, str(env_dir)], VENV_TIMEOUT, env)
            _run([uv_bin, "pip", "install", "--quiet", "--python", str(_python_of(env_dir)), *PINS],
                 INSTALL_TIMEOUT, env)
            _run([str(_python_of(env_dir)), "-c", CHECK], 180, env)
            tmp = env_dir / (MARKER + ".tmp")
            tmp.write_text(json.dumps({"pins": PINS, "built": time.time()}))
            os.replace(tmp, env_dir / MARKER)
            return str(_python_of(env_dir))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


if __name__ == "__main__":  # build the env by hand: python tests/funcnodesenv.py
    print(funcnodes_python())
