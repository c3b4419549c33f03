"""The supervisor's side of the warm fork server (worker/forkserver.py).

One ForkServer per worker, of the worker's own interpreter: a fresh `python -m worker.forkserver`,
or, when that interpreter is the supervisor's own, the standby forked from the supervisor before
its first thread (forkstandby.py; its pages stay shared with us). `fork()` hands it the child ends
of the worker's control channel and output pipe (and the held listening socket) by
SCM_RIGHTS and gets back the PID of a worker that is already importing nothing: it loads the
graph and serves. Anything wrong (the server died, timed out, refused because its venv was
swapped) raises ForkError; the runner then spawns the plain way and replaces the server.

The server is a direct child in a session of its own; it dies with us (its parent-death
signal, and EOF on its socket) and is SIGKILLed and reaped when replaced or closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import time
from typing import Any

from . import forkstandby

log = logging.getLogger("fn-supervise")

FORK_TIMEOUT = 5.0
READY_TIMEOUT = 300.0  # preloading a venv's packages; a worker start is not waiting for it


class ForkError(RuntimeError):
    pass


def _become(standby: Any, args: list[str], env: dict[str, str], cwd: str | None, sock_fd: int, out: Any) -> Any:
    """The standby as the fork server; None if it cannot be reached (then it is spawned)."""
    null = os.open(os.devnull, os.O_WRONLY) if out is subprocess.DEVNULL else None
    try:
        return standby.become(args, env, cwd, sock_fd, out.fileno() if null is None else null)
    except OSError as e:
        log.warning("fork server standby %s unreachable (%s): spawning one", standby.proc.pid, e)
        standby.close()
        return None
    finally:
        if null is not None:
            os.close(null)


class ForkServer:
    def __init__(self, python: str, *, env: dict[str, str], cwd: str | None, deps: dict[str, Any],
                 key: str, worker: str = "", log_path: str | None = None):
        self.python = python
        self.env = env
        self.cwd = cwd
        self.deps = deps
        self.worker = worker
        self.key = key  # what it was built for (interpreter, fingerprint, deps): change -> replace
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.info: dict[str, Any] = {}
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self._buf = bytearray()
        self._lock = asyncio.Lock()
        self._ready_task: asyncio.Task | None = None
        self.on_ready: Any = None  # called (no args) once the server has preloaded

    # lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        ours, theirs = socket.socketpair()
        out: Any = subprocess.DEVNULL
        if self.log_path:
            out = open(self.log_path, "ab", buffering=0)  # preload errors land in the worker log
        args = ["--parent", str(os.getpid()), "--worker", self.worker, "--deps", json.dumps(self.deps)]
        try:
            standby = forkstandby.take(self.python, self.env)
            proc: Any = None
            if standby is not None:  # a copy of us, forked before any thread: shares our pages
                proc = _become(standby, args, self.env, self.cwd, theirs.fileno(), out)
            self.proc = proc if proc is not None else subprocess.Popen(
                    [self.python, "-m", "worker.forkserver", "--sock-fd", str(theirs.fileno()), *args],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(theirs.fileno(),),
                    start_new_session=True, env=self.env, cwd=self.cwd, close_fds=True)
        finally:
            theirs.close()
            if out is not subprocess.DEVNULL:
                out.close()
        ours.setblocking(False)
        self.sock = ours
        self.started_at = time.monotonic()
        # Read its "ready" as soon as it comes (status shows it), not only at the next fork.
        self._ready_task = asyncio.ensure_future(self._await_ready(READY_TIMEOUT))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.sock is not None

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and self.alive

    async def wait_ready(self, timeout: float) -> bool:
        """True once the server has preloaded; False if it died, or is not ready within timeout."""
        if self.ready:
            return True
        if self._ready_task is None:
            return False
        if timeout <= 0:
            return self.ready
        try:
            await asyncio.wait_for(asyncio.shield(self._ready_task), timeout)
        except asyncio.TimeoutError:
            pass
        return self.ready

    async def _await_ready(self, timeout: float) -> None:
        try:
            msg = await self._read(timeout)
        except ForkError as e:
            log.warning("fork server %s not ready: %s", self.pid, e)
            return
        if msg.get("type") != "ready":
            log.warning("fork server %s said %s instead of ready", self.pid, msg)
            return
        self.info = msg
        self.ready_at = time.monotonic()
        if self.on_ready is not None:
            self.on_ready()

    def close(self) -> None:
        if self._ready_task is not None and not self._ready_task.done():
            self._ready_task.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            for kill in (os.killpg, os.kill):  # the group; the pid too (a standby may not have its own group yet)
                try:
                    kill(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                log.error("fork server %s did not die after SIGKILL", self.proc.pid)

    # forking -------------------------------------------------------------------------
    async def fork(self, argv: list[str], env: dict[str, str], cwd: str | None,
                   fds: dict[str, int], timeout: float = FORK_TIMEOUT) -> int:
        async with self._lock:
            if not self.ready:
                raise ForkError("fork server is not running" if not self.alive else "fork server is not ready")
            names = list(fds)
            req = {"type": "fork", "argv": argv, "env": env, "cwd": cwd, "fds": names}
            data = (json.dumps(req) + "\n").encode()
            assert self.sock is not None
            try:
                # A few KB on an empty socket buffer: never blocks in practice, bounded if it does.
                self.sock.setblocking(True)
                self.sock.settimeout(timeout)
                n = socket.send_fds(self.sock, [data], [fds[k] for k in names])
                if n < len(data):
                    self.sock.sendall(data[n:])
            except OSError as e:
                raise ForkError(f"cannot reach the fork server: {e}") from None
            finally:
                if self.sock is not None:
                    self.sock.setblocking(False)
            msg = await self._read(timeout)
            if msg.get("type") == "forked" and isinstance(msg.get("pid"), int):
                return int(msg["pid"])
            raise ForkError(str(msg.get("error") or msg))

    async def _read(self, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while b"\n" not in self._buf:
            if self.sock is None:
                raise ForkError("fork server closed")
            left = deadline - loop.time()
            if left <= 0:
                raise ForkError(f"no answer within {timeout:g}s")
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), left)
            except asyncio.TimeoutError:
                raise ForkError(f"no answer within {timeout:g}s") from None
            except OSError as e:
                raise ForkError(f"fork server socket: {e}") from None
            if not chunk:
                code = self.proc.poll() if self.proc is not None else None
                raise ForkError("fork server exited" + (f" ({code})" if code is not None else ""))
            self._buf += chunk
        i = self._buf.index(b"\n")
        line = bytes(self._buf[:i])
        del self._buf[: i + 1]
        try:
            return json.loads(line)
        except ValueError as e:
            raise ForkError(f"bad answer from the fork server: {e}") from None

    def status(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self.alive, "ready": self.ready,
                "preload": self.info.get("preload"), "python": self.python,
                "imported": self.info.get("imported") or []}
