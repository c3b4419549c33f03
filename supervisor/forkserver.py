"""The host's side of the warm fork server (worker/zygote.py): start it, ask it for workers.

`ForkServer.spawn` is synchronous and quick (a fork and a reply over a socketpair). A worker
can be forked only when it would run in this very interpreter with this project on its path
(`--no-venv`, `venv: false`, or `python` = ours); any other worker, or any failure of the fork
server, falls back to an ordinary spawn. A fork server that died is started again at the next
spawn. `ForkedWorkerProcess` is runner's WorkerProcess with that spawn path; host.py installs
it for the Supervisors of the host (runner.py itself is unchanged).
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

from .process import WorkerProcess

log = logging.getLogger("fn-supervise")

START_TIMEOUT = 60.0
SPAWN_TIMEOUT = 10.0


class ForkServer:
    def __init__(self, base: str | None = None, env: dict[str, str] | None = None):
        self.base = base
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.failures = 0
        self.spawned = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.sock is not None

    def start(self) -> bool:
        self.close()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(self.env if self.env is not None else os.environ)
        from .runner import project_root

        root = project_root()
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["FN_SUPERVISE_PID"] = str(os.getpid())
        if self.base:  # funcnodes-core reads (and may create) its config folder at import
            env["FUNCNODES_CONFIG_DIR"] = str(self.base)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-c", f"from worker.zygote import serve; serve({child.fileno()})"],
                pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            log.warning("fork server: cannot start (%s); workers are spawned", e)
            parent.close()
            return False
        finally:
            child.close()
        parent.settimeout(START_TIMEOUT)
        try:
            hello = json.loads(parent.recv(4096) or b"{}")
        except (OSError, ValueError):
            hello = {}
        if not hello.get("ready"):
            log.warning("fork server did not come up; workers are spawned")
            parent.close()
            self._reap()
            return False
        parent.settimeout(SPAWN_TIMEOUT)
        self.sock = parent
        log.info("fork server ready, pid %d", self.proc.pid)
        return True

    def usable_for(self, argv: list[str], env: dict[str, str]) -> bool:
        from .runner import project_root

        if len(argv) < 3 or argv[1:3] != ["-m", "worker"]:
            return False
        if os.path.realpath(argv[0]) != os.path.realpath(sys.executable):
            return False
        return (env.get("PYTHONPATH") or "").split(os.pathsep)[0] == project_root()

    def spawn(self, args: list[str], env: dict[str, str], cwd: str | None, fds: tuple[int, int]) -> int:
        """Fork a worker with these `python -m worker` args; -> its pid (raises OSError)."""
        if not self.alive and not self.start():
            raise OSError("no fork server")
        assert self.sock is not None
        msg = json.dumps({"args": args, "env": env, "cwd": cwd}).encode()
        try:
            self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            reply = json.loads(self.sock.recv(65536) or b"{}")
        except (OSError, ValueError) as e:
            self.failures += 1
            self.close()  # out of step or dead: a fresh one next time
            raise OSError(f"fork server: {e}") from None
        if not reply.get("pid"):
            self.failures += 1
            raise OSError(f"fork server: {reply.get('error') or 'no pid'}")
        self.spawned += 1
        return int(reply["pid"])

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()  # EOF: it exits
            self.sock = None
        self._reap()
        self.proc = None


class ForkedWorkerProcess(WorkerProcess):
    """WorkerProcess whose spawn asks the fork server first (same channel, output, pidfd)."""

    forkserver: ForkServer | None = None

    def spawn(self, loop: Any = None, control: bool = True) -> int:
        import asyncio

        fs = self.forkserver
        if fs is None or not control or not fs.usable_for(self.argv, self.env):
            return super().spawn(loop, control)
        self._loop = loop or asyncio.get_running_loop()
        parent, child = socket.socketpair()
        out_r, out_w = os.pipe()
        try:
            pid = fs.spawn(self.argv[3:], self.env, self.cwd, (child.fileno(), out_w))
        except OSError as e:
            parent.close()
            os.close(out_r)
            log.warning("%s; spawning instead", e)
            return super().spawn(loop, control)
        finally:
            child.close()
            os.close(out_w)
        self.exited = self._loop.create_future()
        self.pid = self.pgid = pid
        self.spawned_at = time.monotonic()
        parent.setblocking(False)
        self._sock = parent
        self.channel_open = True
        os.set_blocking(out_r, False)
        self._out = out_r
        self._pidfd = os.pidfd_open(pid)
        if self.reaper is not None:
            self.reaper.watch(self.pgid)
        self._loop.add_reader(self._pidfd, self._on_pidfd)
        self._loop.add_reader(out_r, self._on_output)
        self._loop.add_reader(parent.fileno(), self._on_channel)
        return pid
