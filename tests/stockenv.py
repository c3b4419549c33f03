"""The stock FuncNodes worker (PyPI funcnodes-worker 1.6.0) as a test-only dependency.

`stock_python()` returns the interpreter of a venv at `<repo>/.envs/stock` (gitignored) that
holds the stock worker, building it with uv when it is missing or half-built: the marker file is
written last, and a file lock keeps parallel test sessions from building it twice.
`StockWorker` starts that worker in a test's FUNCNODES_CONFIG_DIR on a given loopback port with
the demo node library (examples/demo_nodes.py) and kills it by PID.

Nothing here needs the network once the uv cache is warm; the stock worker itself starts a
background download of its module list, which may fail offline without harm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from uvenv import ensure_venv

REPO = Path(__file__).resolve().parents[1]
# Pins of the stock worker the spec describes (spec/worker-protocol.md: funcnodes-worker 1.6.0 on
# funcnodes-core 2.4.0 with exposedfunctionality 1.0.3). The `http` extra brings aiohttp and
# aiohttp-cors, without which WSWorker cannot serve.
PINS = ["funcnodes-worker[http]==1.6.0", "funcnodes-core==2.4.0", "exposedfunctionality==1.0.3"]


FILES_PINS = PINS + ["funcnodes-files==1.0.0", "funcnodes-react-flow==2.4.0"]


def stock_python() -> str:
    """Python of a venv with the stock worker; built with uv (current interpreter) if needed."""
    return str(ensure_venv("stock", PINS, "import funcnodes_worker.websocket, aiohttp"))


def stock_files_python() -> str:
    """The stock worker with funcnodes-files (file nodes, a react_plugin) and funcnodes-react-flow,
    through which the stock worker serves frontend plugins (without it, it installs it from PyPI).

    Our worker runs on it too in the tests that need a real FuncNodes module (tests/
    test_files_dir.py, test_worker_plugins.py, ...): both sides then see the same installed
    packages, and the project's own test env stays free of FuncNodes packages (whose presence
    would change what `get_available_modules` reports as installed)."""
    return str(ensure_venv("stock-files", FILES_PINS,
                           "import funcnodes_worker.websocket, aiohttp, funcnodes_files, funcnodes_react_flow"))


# The stock worker has no `python -m` entry of its own (the `funcnodes` CLI is not installed and
# would start a subprocess monitor): construct WSWorker and run it, as `funcnodes worker start` does.
LAUNCHER = (
    "import sys\n"
    "from funcnodes_worker import WSWorker\n"
    "WSWorker(uuid=sys.argv[1], host='127.0.0.1', port=int(sys.argv[2])).run_forever()\n"
)


def write_stock_config(base: Path, uuid: str, port: int, **extra) -> Path:
    """A worker config as the stock worker writes it (it needs every key, e.g. env_path).

    The demo nodes come in as the package dependency `demo-nodes`: the stock worker's
    try_import_module imports `demo_nodes` (on PYTHONPATH) and registers it as `demo-nodes`.
    """
    d = Path(base) / "workers"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "type": "WSWorker", "uuid": uuid, "name": uuid, "data_path": None, "env_path": None,
        "worker_dependencies": {},
        "package_dependencies": {"demo-nodes": {"package": "demo-nodes", "version": None}},
        "autostart": "never",
        "update_on_startup": {"funcnodes": False, "funcnodes-core": False, "funcnodes-worker": False},
        "host": "127.0.0.1", "port": port, "ssl": False,
    }
    cfg.update(extra)
    p = d / f"worker_{uuid}.json"
    p.write_text(json.dumps(cfg, indent=2))
    return p


def stock_launch(base: Path, uuid: str, port: int, env: dict) -> tuple[list[str], Path]:
    """argv and cwd of a stock worker in `base` on 127.0.0.1:`port` (benchmarks); sets env."""
    write_stock_config(base, uuid, port)
    env.update({"FUNCNODES_HOST": "127.0.0.1", "FUNCNODES_WS_WORKER_STARTPORT": str(port),
                "FUNCNODES_WS_WORKER_ENDPORT": str(port), "PYTHONPATH": str(REPO / "examples")})
    return [stock_python(), "-c", LAUNCHER, uuid, str(port)], Path(base)


class StockWorker:
    """A stock WSWorker process in `base` (its FUNCNODES_CONFIG_DIR) on 127.0.0.1:`port`."""

    def __init__(self, python: str, base: Path, uuid: str, port: int, env=None, config=None):
        self.base, self.uuid, self.port = Path(base), uuid, port
        write_stock_config(self.base, uuid, port, **(config or {}))
        self.logpath = self.base / f"stock_{uuid}.log"
        self.log = open(self.logpath, "ab")
        e = dict(os.environ)
        e.update(env or {})
        e.update({
            "FUNCNODES_CONFIG_DIR": str(self.base),
            "FUNCNODES_HOST": "127.0.0.1",
            # the stock worker only scans STARTPORT..ENDPORT (spec 7): pin the range to our port
            "FUNCNODES_WS_WORKER_STARTPORT": str(port),
            "FUNCNODES_WS_WORKER_ENDPORT": str(port),
            "PYTHONPATH": str(REPO / "examples"),
            "PYTHONUNBUFFERED": "1",
        })
        e.pop("VIRTUAL_ENV", None)
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(
            [python, "-c", LAUNCHER, uuid, str(port)], cwd=str(self.base), env=e,
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        return self.logpath.read_text(errors="replace")

    def kill(self) -> None:
        """Kill by PID (the stock worker leaves .p/.runstate behind; fine inside tmp)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if not self.log.closed:
            self.log.close()


if __name__ == "__main__":  # build the env by hand: python tests/stockenv.py
    print(stock_python())
