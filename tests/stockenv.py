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

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV_DIR = REPO / ".envs" / "stock"
# Pins of the stock worker the spec describes (spec/worker-protocol.md: funcnodes-worker 1.6.0 on
# funcnodes-core 2.4.0 with exposedfunctionality 1.0.3). The `http` extra brings aiohttp and
# aiohttp-cors, without which WSWorker cannot serve.
PINS = ["funcnodes-worker[http]==1.6.0", "funcnodes-core==2.4.0", "exposedfunctionality==1.0.3"]
MARKER = ".fn-supervise-stock-complete"
VENV_TIMEOUT = 120.0
INSTALL_TIMEOUT = 600.0
LOCK_TIMEOUT = INSTALL_TIMEOUT + VENV_TIMEOUT + 60.0


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


def _run(argv: list[str], timeout: float, env: dict) -> None:
    try:
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def stock_python(env_dir: Path = ENV_DIR) -> str:
    """Python of a venv with the stock worker; built with uv (current interpreter) if needed."""
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
            _run([str(_python_of(env_dir)), "-c", "import funcnodes_worker.websocket, aiohttp"], 120, env)
            tmp = env_dir / (MARKER + ".tmp")
            tmp.write_text(json.dumps({"pins": PINS, "built": time.time()}))
            os.replace(tmp, env_dir / MARKER)
            return str(_python_of(env_dir))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


class StockWorker:
    """A stock WSWorker process in `base` (its FUNCNODES_CONFIG_DIR) on 127.0.0.1:`port`."""

    def __init__(self, python: str, base: Path, uuid: str, port: int, env=None):
        self.base, self.uuid, self.port = Path(base), uuid, port
        write_stock_config(self.base, uuid, port)
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
