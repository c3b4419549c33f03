"""Test-only virtualenvs built with uv (the stock worker, the real Workermanager, supervisord).

Each lives under `<repo>/.envs/<name>` (gitignored), is made from the current interpreter (no
Python download), and counts as complete only when its marker, written last, names the same
pins: a half-built env is rebuilt. A file lock keeps parallel test sessions from building one
twice. Every step has a deadline.
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
ENVS = REPO / ".envs"
MARKER = ".fn-supervise-complete"
VENV_TIMEOUT = 120.0
INSTALL_TIMEOUT = 900.0
LOCK_TIMEOUT = INSTALL_TIMEOUT + VENV_TIMEOUT + 240.0


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def _complete(env: Path, pins: list[str]) -> bool:
    marker = env / MARKER
    if not marker.is_file() or not python_of(env).exists():
        return False
    try:
        return json.loads(marker.read_text()).get("pins") == pins
    except (OSError, ValueError):
        return False


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env["UV_PYTHON_DOWNLOADS"] = "never"
    for k in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(k, None)  # our `supervisor` package must never shadow supervisord's
    return env


def _run(argv: list[str], timeout: float, env: dict, cwd: Path) -> None:
    try:
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(cwd))
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def ensure_venv(name: str, pins: list[str], check: str) -> Path:
    """The python of `.envs/<name>` holding `pins`, built if needed; `check` is code it must run."""
    env_dir = ENVS / name
    if _complete(env_dir, pins):
        return python_of(env_dir)
    ENVS.mkdir(parents=True, exist_ok=True)
    lock_path = ENVS / f"{name}.lock"
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
            if _complete(env_dir, pins):  # another session built it while we waited
                return python_of(env_dir)
            import uv

            uv_bin = uv.find_uv_bin()
            env = clean_env()
            if env_dir.exists():
                shutil.rmtree(env_dir)
            # cwd outside the repo: its packages must not be importable during the check
            _run([uv_bin, "venv", "--quiet", "--python", sys.executable, str(env_dir)], VENV_TIMEOUT, env, ENVS)
            py = python_of(env_dir)
            _run([uv_bin, "pip", "install", "--quiet", "--python", str(py), *pins], INSTALL_TIMEOUT, env, ENVS)
            _run([str(py), "-c", check], 180, env, ENVS)
            tmp = env_dir / (MARKER + ".tmp")
            tmp.write_text(json.dumps({"pins": pins, "built": time.time()}))
            os.replace(tmp, env_dir / MARKER)
            return py
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
