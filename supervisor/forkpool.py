"""One warm fork server per environment for the whole host, instead of one per worker.

A Supervisor's ForkLauncher (launcher.py) makes its own `forkclient.ForkServer` (one process per
worker, each importing aiohttp, funcnodes-core and the worker again). In `fn-supervise host`, the
LauncherPool gives each Supervisor a ForkLauncher whose server factory is `ForkPool.make`: Supervisors whose environment key is the same (interpreter, environment
fingerprint, package dependencies; e.g. every `--no-venv` worker with the same deps) get a handle
on ONE server, so their workers are forked from one warm process and share its imported pages.
A worker with an environment of its own gets a server of its own, as before.

A handle is a ForkServer as far as the launcher can tell: `close()` drops the handle;
the server is closed when its last handle goes (or when the runner replaces a dead or failing
one: a dead server is replaced for everyone). Forks through one server are serialized by its
own lock, and every forked worker is re-parented to the host (a child subreaper) as it would
be to a per-worker supervisor.
"""

from __future__ import annotations

from typing import Any

from .forkclient import ForkServer


class ForkPool:
    def __init__(self) -> None:
        self.servers: dict[str, ForkServer] = {}
        self.users: dict[str, int] = {}

    def make(self, python: str, *, key: str, **kw: Any) -> "SharedForkServer":
        return SharedForkServer(self, python, key, kw)

    def _acquire(self, h: "SharedForkServer") -> ForkServer:
        fs = self.servers.get(h.key)
        if fs is None or not fs.alive:
            if fs is not None:
                fs.close()
            fs = ForkServer(h.python, key=h.key, **h.kw)
            fs.start()
            self.servers[h.key] = fs
        self.users[h.key] = self.users.get(h.key, 0) + 1
        return fs

    def _release(self, h: "SharedForkServer", fs: ForkServer) -> None:
        n = self.users.get(h.key, 0) - 1
        if self.servers.get(h.key) is not fs:
            fs.close()  # replaced meanwhile: this one only had us
            return
        if n <= 0 or not fs.alive:
            self.users.pop(h.key, None)
            self.servers.pop(h.key, None)
            fs.close()
        else:
            self.users[h.key] = n

    def close(self) -> None:
        for fs in self.servers.values():
            fs.close()
        self.servers.clear()
        self.users.clear()

    def status(self) -> list[dict[str, Any]]:
        return [{**fs.status(), "workers": self.users.get(k, 0)} for k, fs in self.servers.items()]


class SharedForkServer:
    """A Supervisor's handle on the pool's server for its key (the ForkServer interface)."""

    def __init__(self, pool: ForkPool, python: str, key: str, kw: dict[str, Any]):
        self.pool, self.python, self.key, self.kw = pool, python, key, kw
        self.fs: ForkServer | None = None
        self.on_ready: Any = None

    def start(self) -> None:
        self.fs = self.pool._acquire(self)
        if self.fs.on_ready is None:
            self.fs.on_ready = self.on_ready

    def close(self) -> None:
        fs, self.fs = self.fs, None
        if fs is not None:
            self.pool._release(self, fs)

    def __getattr__(self, name: str) -> Any:  # alive, ready, pid, proc, wait_ready, fork, status...
        fs = self.__dict__.get("fs")
        if fs is None:
            raise AttributeError(name)
        return getattr(fs, name)
