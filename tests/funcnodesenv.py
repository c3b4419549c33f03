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

from pathlib import Path

from uvenv import ensure_venv

REPO = Path(__file__).resolve().parents[1]
PINS = ["funcnodes==1.7.1", "funcnodes-worker==1.6.0", "funcnodes-core==2.4.0", "subprocess-monitor==0.4.0"]
CHECK = ("import funcnodes, funcnodes.worker.worker_manager, funcnodes_worker.websocket, "
         "subprocess_monitor, aiohttp; print(funcnodes.__version__)")


def funcnodes_python() -> str:
    """Python of a venv with the real funcnodes CLI + Workermanager; built with uv if needed."""
    return str(ensure_venv("funcnodes", PINS, CHECK))


if __name__ == "__main__":  # build the env by hand: python tests/funcnodesenv.py
    print(funcnodes_python())
