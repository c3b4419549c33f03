"""How a worker process comes to be: the launching seam of a Supervisor.

A `Launcher` is told the environment (`prepare`), starts workers (`launch` -> "fork" | "spawn"),
reports itself for the state file (`status`) and ends (`close`). The runner never sees a fork
server. Two launchers:

- `ForkLauncher`: a warm fork server per environment (forkclient.py, worker/forkserver.py),
  replaced when the environment changes. It owns the fork-or-spawn policy: fork when the server
  is ready; the first start waits for its preload (a spawn would import the same), a restart
  never waits for a server still warming up; a failed or dead server means a spawn now and a new
  server for next time, and after FORK_GIVE_UP failures in a row that environment is spawned
  only (until it changes).
- `SpawnLauncher`: always a plain spawn (fork_server false, a fake worker module, or
  `host --no-fork-server`).

`LauncherPool` hands host mode its launchers: ForkLaunchers whose servers are shared per
environment (forkpool.py), or SpawnLaunchers. argv, env and callbacks are passed in; nothing is
patched from outside.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .forkclient import ForkError, ForkServer
from .forkpool import ForkPool

log = logging.getLogger("fn-supervise")

FORK_GIVE_UP = 3  # fork servers in a row that die or fail before we stop replacing them


def worker_command(python: str, module: str, worker: str, base: Path, *, pin_port: int | None = None,
                   quarantine: dict[str, str] | None = None) -> list[str]:
    """`<python> -m <module> worker_<uuid> ...`; the fds (--control-fd, --listen-fd) are added
    by whoever starts it (WorkerProcess.spawn, or the fork server for its own fd numbers)."""
    argv = [python, "-m", module, worker, "--dir", str(base)]
    if pin_port:
        argv += ["--port", str(pin_port)]
    if quarantine:
        argv += ["--quarantine", json.dumps(quarantine)]
    return argv


def project_root() -> str:
    import worker  # the package our own `worker.channel` came from

    return str(Path(worker.__file__).resolve().parent.parent)


def worker_env(python: str, base: Path) -> dict[str, str]:
    """The worker's environment: ours, unbuffered, its config folder, our PID; this checkout on
    PYTHONPATH when it runs our own interpreter (no venv: the worker package is ours)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["FUNCNODES_CONFIG_DIR"] = str(base)
    env["FN_SUPERVISE_PID"] = str(os.getpid())
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        pp = env.get("PYTHONPATH")
        env["PYTHONPATH"] = project_root() + (os.pathsep + pp if pp else "")
    return env


@dataclass(frozen=True)
class LaunchSpec:
    """The environment workers are launched in (what a fork server preloads)."""
    python: str
    env: dict[str, str] = field(hash=False)
    cwd: str
    deps: dict[str, Any] = field(hash=False)
    fingerprint: str
    worker: str  # worker_<uuid>, for the fork server's log lines
    log_path: str
    forkable: bool = True  # false: fork_server off in the config, or not the real worker module

    @property
    def key(self) -> str:
        """What a fork server is built for: interpreter, environment fingerprint, dependencies."""
        return json.dumps([self.python, self.fingerprint, self.deps or {}], sort_keys=True, default=str)


class Launcher(Protocol):
    def attach(self, note: Callable[[str], None], on_change: Callable[[], None]) -> None:
        """note: a line for the worker's log; on_change: the status changed (write the state)."""

    def prepare(self, spec: LaunchSpec, why: str = "") -> None:
        """Use this environment from now on (cheap when nothing changed); why: forces a new one."""

    async def launch(self, w: Any, first: bool, wait: float) -> str:
        """Start the worker process w. first: no worker was ever ready (may wait `wait` seconds
        for a warm-up). -> "fork" | "spawn". Raises OSError when even a spawn fails."""

    def status(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class SpawnLauncher:
    def attach(self, note: Callable[[str], None], on_change: Callable[[], None]) -> None:
        pass

    def prepare(self, spec: LaunchSpec, why: str = "") -> None:
        pass

    async def launch(self, w: Any, first: bool, wait: float) -> str:
        w.spawn()
        return "spawn"

    def status(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        pass


class ForkLauncher:
    def __init__(self, server_factory: Callable[..., Any] = ForkServer):
        self.server_factory = server_factory  # ForkServer, or a pool's shared handle
        self.fork: Any = None                 # the warm fork server of the current environment
        self.spec: LaunchSpec | None = None
        self.failures = 0                     # servers in a row that died or failed
        self.given_up_key: str | None = None  # this environment is spawned only
        self.note: Callable[[str], None] = lambda line: None
        self.on_change: Callable[[], None] = lambda: None

    def attach(self, note: Callable[[str], None], on_change: Callable[[], None]) -> None:
        self.note, self.on_change = note, on_change

    def prepare(self, spec: LaunchSpec, why: str = "") -> None:
        self.spec = spec
        if not spec.forkable:
            self._close_server()
            return
        if why:
            self._replace(why)  # e.g. an install changed the environment under the same key
            return
        if self.fork is not None and self.fork.alive and self.fork.key == spec.key:
            return
        self.failures, self.given_up_key = 0, None  # a new environment gets a fresh chance
        self._replace("environment changed" if self.fork is not None else "first start")

    async def launch(self, w: Any, first: bool, wait: float) -> str:
        fs = self.fork
        if fs is None:
            w.spawn()
            return "spawn"
        if not fs.ready and fs.alive:
            await fs.wait_ready(wait if first else 0.0)
        if fs.ready:
            try:
                await w.spawn_forked(fs)
                self.failures = 0
                return "fork"
            except ForkError as e:
                why = f"fork server {fs.pid} failed: {e}"
        elif not fs.alive:
            why = f"fork server {fs.pid} is dead ({fs.proc.returncode if fs.proc else '?'})"
        else:
            why = f"fork server {fs.pid} is still preloading"
        log.warning("%s: %s; spawning instead", self.spec.worker if self.spec else "?", why)
        self.note(f"{why}; spawning instead")
        if not fs.alive or fs.ready:  # ready but failed (e.g. its venv was swapped), or dead
            self.failures += 1
            if self.failures >= FORK_GIVE_UP:
                self.given_up_key = self.spec.key if self.spec else None
                self.note(f"{self.failures} fork servers in a row failed: workers are spawned until the "
                          "environment changes")
            self._replace(why)
        w.spawn()
        return "spawn"

    def status(self) -> dict[str, Any] | None:
        return self.fork.status() if self.fork is not None else None

    def close(self) -> None:
        self._close_server()

    def _close_server(self) -> None:
        if self.fork is not None:
            self.fork.close()
            self.fork = None

    def _replace(self, why: str) -> None:
        self._close_server()
        spec = self.spec
        if spec is None or not spec.forkable or self.given_up_key == spec.key:
            return  # this environment's fork servers keep dying: spawn until it changes
        fs = self.server_factory(spec.python, env=spec.env, cwd=spec.cwd, deps=dict(spec.deps), key=spec.key,
                                 worker=spec.worker, log_path=spec.log_path)
        fs.on_ready = self.on_change
        try:
            fs.start()
        except OSError as e:
            log.warning("%s: cannot start a fork server (%s); workers are spawned", spec.worker, e)
            return
        self.fork = fs
        self.note(f"fork server {fs.pid} started ({why})")


class LauncherPool:
    """Host mode: one warm fork server per environment for all its Supervisors (forkpool.py), or
    none at all (`--no-fork-server`)."""

    def __init__(self, fork: bool = True):
        self.pool: ForkPool | None = ForkPool() if fork else None

    def launcher(self) -> Launcher:
        return ForkLauncher(self.pool.make) if self.pool is not None else SpawnLauncher()

    def status(self) -> list[dict[str, Any]]:
        return self.pool.status() if self.pool is not None else []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()  # the Supervisors closed their handles already
