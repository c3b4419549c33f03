"""A copy of the supervisor, forked before its first thread, that becomes the worker's fork server.

Per-worker mode, worker on the supervisor's own interpreter (no venv): instead of a fresh
`python -m worker.forkserver` (a new interpreter, 15 MB of its own before it imports anything
of the worker's), the fork server is this standby, so the interpreter, asyncio and the stdlib
the supervisor imported are pages the supervisor, the fork server and every worker forked from
it share. The worker's own imports (funcnodes-core, aiohttp) happen in the fork server as before.

    prepare()                  fork the standby (no-op unless this process has a single thread)
    take(python, env)          the standby, if it can stand in for `python` with `env`, else None
    standby.become(...)        it turns into `worker.forkserver.main(argv)`: a Popen-like handle

The standby waits on a socket pair; EOF (the supervisor is gone or dropped it) or its
parent-death signal ends it. It is used once: a fork server replaced later (crash, venv swap)
is spawned the plain way (supervisor/forkclient.py). Becoming the fork server it does what the
spawn did: own session, stdout/stderr to the worker log, cwd, the worker's environment (with
PYTHONPATH entries put on sys.path, as a fresh interpreter would).
"""

from __future__ import annotations

import array
import gc
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from sidecars.forked import clean_child, exit_with, set_title, show_environ

_standby: "Standby | None" = None
MAX_REQUEST = 1 << 20


class ChildProcess:
    """The Popen surface forkclient uses (pid, poll, wait, returncode) for a forked child."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 255  # reaped elsewhere: dead, status unknown
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout)
            time.sleep(0.005)
        return self.returncode


class Standby:
    def __init__(self, pid: int, sock: socket.socket):
        self.proc = ChildProcess(pid)
        self.sock = sock

    def become(self, argv: list[str], env: dict[str, str], cwd: str | None, sock_fd: int, out_fd: int) -> ChildProcess:
        """Turn the standby into `python -m worker.forkserver` + argv (its socket and output fd
        passed by SCM_RIGHTS; `--sock-fd` is added by the standby)."""
        data = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode() + b"\n"
        try:
            n = socket.send_fds(self.sock, [data], [sock_fd, out_fd])
            if n < len(data):
                self.sock.sendall(data[n:])
        finally:
            self.sock.close()
        return self.proc

    def close(self) -> None:
        self.sock.close()  # EOF: it exits
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            pass


def prepare() -> None:
    """Fork the standby now, while this process has no other thread (a fork copies only one)."""
    global _standby
    if _standby is not None or threading.active_count() > 1 or not sys.platform.startswith("linux"):
        return

    ours, theirs = socket.socketpair()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    gc.collect()  # what is garbage now would stay frozen, uncollected, on both sides
    gc.freeze()  # neither side's collector scans what they share: the pages stay shared (forked.py)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return
    if pid == 0:
        def run() -> int:
            clean_child({theirs.fileno()}, parent, death_signal=signal.SIGKILL)
            set_title(f"fn-supervise: fork server standby of {parent}", "fn-standby")
            return _wait_and_become(theirs)

        exit_with(run)
    theirs.close()
    _standby = Standby(pid, ours)


def take(python: str, env: dict[str, str]) -> Standby | None:
    """The standby, if a fresh `python` with `env` would be this very interpreter; else None
    (and the standby is left for nobody: closed)."""
    global _standby
    s, _standby = _standby, None
    if s is None:
        return None
    if s.proc.poll() is not None or not _same_interpreter(python, env):
        s.close()
        return None
    return s


def close() -> None:
    global _standby
    s, _standby = _standby, None
    if s is not None:
        s.close()


def _same_interpreter(python: str, env: dict[str, str]) -> bool:
    # The very path: a venv's python is often a symlink to this binary, yet another sys.prefix.
    if os.path.normpath(os.path.abspath(python)) != os.path.normpath(os.path.abspath(sys.executable)):
        return False
    # what would make a fresh interpreter differ from this one (PYTHONPATH and PYTHONUNBUFFERED
    # are applied when it becomes the fork server)
    for k in set(env) | set(os.environ):
        if k.startswith("PYTHON") and k not in ("PYTHONPATH", "PYTHONUNBUFFERED") and env.get(k) != os.environ.get(k):
            return False
    return True


def _wait_and_become(sock: socket.socket) -> int:
    """In the standby: wait for the request, then run the fork server. Returns its exit code."""
    sock.setblocking(True)
    buf, fds = b"", []
    while not buf.endswith(b"\n"):
        msg, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(2 * 4))
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
                fds.extend(a)
        if not msg or len(buf) > MAX_REQUEST:
            return 0  # the supervisor is gone, or took the plain way
        buf += msg
    sock.close()
    req = json.loads(buf)
    server_fd, out = fds
    os.setsid()  # its own session, as start_new_session gave the spawned one
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    if req.get("cwd"):
        os.chdir(req["cwd"])
    env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
    os.environ.clear()
    os.environ.update(env)
    show_environ()  # what /proc/PID/environ shows: this environment, not the supervisor's at exec
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[0:0] = extra
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True,
                                  errors="backslashreplace")
    argv = ["--sock-fd", str(server_fd)] + [str(a) for a in req.get("argv") or []]
    sys.argv = ["-m worker.forkserver", *argv]
    set_title(" ".join([sys.executable, "-m", "worker.forkserver", *argv]))  # as if spawned
    from worker.forkserver import main  # noqa: PLC0415

    return main(argv)
