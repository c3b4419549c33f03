"""Shared fixtures: an isolated FUNCNODES_CONFIG_DIR, free loopback ports, bounded polling,
and a leak check that fails a test whose processes outlive it."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "FN_SUPERVISE_TEST_MARKER"

# Anything that imports funcnodes-core without FUNCNODES_CONFIG_DIR writes ~/.funcnodes; give the
# whole session (the pytest process and all it starts) a folder of its own before any import.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Made once, by the process that started the session; its xdist workers and any helper process
# that imports this module reuse it (a helper killed by a test would never remove its own).
_SESSION_CFG = os.environ.get("FN_SUPERVISE_TEST_SESSION_CFG", "")
if not _SESSION_CFG or not os.path.isdir(_SESSION_CFG):
    _SESSION_CFG = tempfile.mkdtemp(prefix="fn-supervise-tests-")
    os.environ["FN_SUPERVISE_TEST_SESSION_CFG"] = _SESSION_CFG
    atexit.register(shutil.rmtree, _SESSION_CFG, True)
os.environ["FUNCNODES_CONFIG_DIR"] = _SESSION_CFG


def poll_until(cond, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll cond() until it returns a truthy value or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get(MARKER) == marker:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                pass
    return found


@pytest.fixture(autouse=True)
def no_leaked_processes(monkeypatch):
    """Every process a test starts inherits a marker; none may be alive after the test."""
    marker = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, marker)
    yield marker
    deadline = time.monotonic() + 5.0
    left = marked_processes(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = marked_processes(marker)
    if left:
        desc = [(p.pid, " ".join(p.cmdline()[:4])) for p in left if p.is_running()]
        for p in left:  # only processes this test started (they carry its marker)
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        pytest.fail(f"processes outlived the test: {desc}")


@pytest.fixture
def config_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "fncfg"
    d.mkdir()
    monkeypatch.setenv("FUNCNODES_CONFIG_DIR", str(d))
    monkeypatch.delenv("FN_SUPERVISE_TOKEN", raising=False)
    return d


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def python() -> str:
    return sys.executable


# The supervised-worker harness's fixtures, for every test module (imported last: it uses the above).
from harness import sup_procs  # noqa: E402,F401
