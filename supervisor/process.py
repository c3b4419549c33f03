"""Spawning the worker, capturing its output, the control channel, and the staged stop.

The worker runs as `<python> -m <module> worker_<uuid> --dir <base> --control-fd N
[--listen-fd M]` in a new session (its own process group), with the child end of a socketpair
(and the supervisor's held listening socket) passed by `pass_fds`; or it is forked by the warm
fork server (`spawn_forked`, forkclient.py), which hands it the same fds and makes it a session
leader re-parented to us, so everything below holds for it too. Its exit is seen at once through a pidfd in the event loop (no polling); on
exit the rest of its process group is SIGKILLed *before* the zombie is reaped, so the
group id cannot have been reused. Signals go through pidfd_send_signal / killpg of a group
whose leader we have not reaped: a reused PID never gets one.

Staged stop: in-band `stop` frame -> (stop_grace) SIGTERM to the group -> (term_timeout)
SIGKILL to the group -> (kill_timeout) give up waiting. Each wait is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from worker.channel import ChannelError, FrameBuffer, encode

from .crash import ExitStatus

log = logging.getLogger("fn-supervise")

PR_SET_CHILD_SUBREAPER = 36
MAX_LINE = 64 * 1024


def set_child_subreaper() -> bool:
    """Orphaned descendants get re-parented to us instead of init, so we can reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(pgids: set[int], exclude: set[int] = frozenset()) -> list[tuple[int, int]]:
    """Reap zombie children of ours that belonged to a worker's process group.

    Never waitpid(-1): that would steal the exit status of a subprocess some other part of
    the supervisor (installs, sidecars) is waiting for. `exclude` is the live worker itself,
    whose status its own WorkerProcess collects."""
    me = os.getpid()
    reaped = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return reaped
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2:].split()
        try:
            st, ppid, pgrp = rest[0], int(rest[1]), int(rest[2])
        except (IndexError, ValueError):
            continue
        if ppid != me or st != b"Z" or pgrp not in pgids or int(e) in exclude:
            continue
        try:
            pid, status = os.waitpid(int(e), os.WNOHANG)
        except ChildProcessError:
            continue
        if pid:
            reaped.append((pid, status))
    return reaped


class GroupReaper:
    """Ray-style dead-man's switch for the worker's process group.

    The worker dies with us (lifeline EOF, its own PR_SET_PDEATHSIG), but what *it* started
    (node subprocesses, in its process group) would outlive a SIGKILLed supervisor: we are
    their subreaper and we are gone. A tiny `/bin/sh` in a session of its own reads the
    current worker pgid from a pipe whose only write end we hold; when we die the pipe
    closes and it SIGKILLs that group. An empty line clears it (the group is gone, or we stop
    cleanly).
    """

    # Each line is the whole list of groups to kill (space-separated; empty = none), so one
    # switch serves one worker here and every worker of a host (host.SharedGroupReaper).
    SCRIPT = 'g=; while read -r l; do g=$l; done; for x in $g; do kill -s KILL -- "-$x" 2>/dev/null; done; exit 0'

    def __init__(self) -> None:
        self._w: int | None = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> bool:
        if not os.path.exists("/bin/sh"):
            return False
        r, w = os.pipe()
        try:
            self._proc = subprocess.Popen(["/bin/sh", "-c", self.SCRIPT], stdin=r, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        except OSError:
            os.close(w)
            return False
        finally:
            os.close(r)
        self._w = w
        return True

    def _send(self, line: str) -> None:
        if self._w is None:
            return
        try:
            os.write(self._w, (line + "\n").encode())
        except OSError:
            pass

    def watch(self, pgid: int) -> None:
        self._send(str(int(pgid)))

    def clear(self) -> None:
        self._send("")

    def close(self) -> None:
        if self._w is None:
            return
        self.clear()
        os.close(self._w)
        self._w = None
        if self._proc is not None:
            try:
                self._proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(2.0)


class RotatingLog:
    """Size-rotated line log (<path>, <path>.1 .. .<backups>). Keeps a tail of worker lines."""

    def __init__(self, path: Path, max_bytes: int = 100_000, backups: int = 5, tail: int = 30):
        self.path = Path(path)
        self.max_bytes = max(1024, int(max_bytes))
        self.backups = max(0, int(backups))
        self.tail: collections.deque[str] = collections.deque(maxlen=max(1, tail))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab", buffering=0)
        self._size = self._f.tell()

    def _rotate(self) -> None:
        self._f.close()
        if self.backups:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "ab", buffering=0)
        self._size = 0

    def write(self, line: str, *, worker: bool = True) -> None:
        if worker:
            self.tail.append(line)
        data = (line + "\n").encode("utf-8", "replace")
        if self._size and self._size + len(data) > self.max_bytes:
            try:
                self._rotate()
            except OSError:
                pass
        try:
            self._f.write(data)
            self._size += len(data)
        except (OSError, ValueError):
            pass

    def event(self, text: str) -> None:
        """A supervisor event line, interleaved with the worker's output."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write(f"[fn-supervise {stamp}] {text}", worker=False)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


class WorkerLog:
    """The worker's log (RotatingLog) under the config's log settings (path, size, backups, level):
    opened at start, reopened when a restart brings other settings, kept when the new place fails."""

    def __init__(self) -> None:
        self.file: RotatingLog | None = None
        self.settings: tuple | None = None

    def open(self, path: Path, cfg: Any) -> RotatingLog:
        if self.file is not None:
            self.file.close()
        self.file = RotatingLog(path, cfg.log_max_bytes, cfg.log_backups, cfg.log_tail_lines)
        logging.getLogger("fn-supervise").setLevel(cfg.log_level)
        self.settings = (self.file.path, cfg.log_max_bytes, cfg.log_backups, cfg.log_level)
        return self.file

    def apply(self, path: Path, cfg: Any) -> RotatingLog | None:
        """Reopen under changed settings, and say so in the log; -> the log now in use."""
        want = (path, cfg.log_max_bytes, cfg.log_backups, cfg.log_level)
        if self.file is None or want == self.settings:
            return self.file
        old = self.file.path
        try:
            self.open(path, cfg)
        except OSError as e:  # a bad location: keep the log we have, and say so there
            self.file = RotatingLog(old, cfg.log_max_bytes, cfg.log_backups, cfg.log_tail_lines)
            self.file.event(f"cannot open the log at {want[0]}: {e.strerror or e}; still logging here")
            return self.file
        self.file.event(f"log settings applied: {want[0]}, level {want[3]}, {want[1]} bytes x {want[2]} backups"
                        + (f" (was {old})" if old != want[0] else ""))
        return self.file


class WorkerProcess:
    """One spawned worker: its channel, output pipe and pidfd, all on the asyncio loop."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: str | None, logfile: RotatingLog,
                 on_frame: Callable[[dict[str, Any]], None], on_exit: Callable[["WorkerProcess"], None],
                 on_eof: Callable[["WorkerProcess"], None] | None = None, reaper: GroupReaper | None = None,
                 listen_fd: int | None = None):
        self.argv = list(argv)
        self.listen_fd = listen_fd  # the supervisor's held listening socket, passed to the worker
        self.launch: str | None = None  # "spawn" | "fork"
        self.launch_time: float | None = None  # seconds to get a pid
        self.reaper = reaper
        self.env = env
        self.cwd = cwd
        self.logfile = logfile
        self.on_frame = on_frame
        self.on_exit = on_exit
        self.on_eof = on_eof
        self.pid: int | None = None
        self.pgid: int | None = None
        self.status: ExitStatus | None = None
        self.signalled: set[int] = set()
        self.spawned_at: float | None = None
        self.exited: asyncio.Future | None = None
        self.channel_open = False
        self.stop_stage: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._out: int | None = None
        self._pidfd: int | None = None
        self._frames = FrameBuffer()
        self._partial = b""
        self._wbuf = bytearray()
        self._popen: subprocess.Popen | None = None

    # spawn ---------------------------------------------------------------------
    def spawn(self, loop: asyncio.AbstractEventLoop | None = None, control: bool = True) -> int:
        """Start `argv` as a new process (its own session) with the channel and output pipe."""
        self._loop = loop or asyncio.get_running_loop()
        t0 = time.monotonic()
        parent, child = socket.socketpair()
        out_r, out_w = os.pipe()
        argv = list(self.argv)
        fds = []
        if control:
            argv += ["--control-fd", str(child.fileno())]
            fds.append(child.fileno())
        if self.listen_fd is not None:
            argv += ["--listen-fd", str(self.listen_fd)]
            fds.append(self.listen_fd)
        try:
            self._popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w,
                pass_fds=tuple(fds), start_new_session=True,
                env=self.env, cwd=self.cwd, close_fds=True)
        except BaseException:
            parent.close()
            os.close(out_r)
            raise
        finally:
            child.close()
            os.close(out_w)
        self.launch, self.launch_time = "spawn", time.monotonic() - t0
        return self._attach(self._popen.pid, parent, out_r, control)

    async def spawn_forked(self, server: Any, loop: asyncio.AbstractEventLoop | None = None) -> int:
        """Get the worker from the warm fork server (supervisor/forkclient.py). Raises ForkError
        (nothing is left open) when the server cannot deliver; the caller then spawns."""
        self._loop = loop or asyncio.get_running_loop()
        t0 = time.monotonic()
        parent, child = socket.socketpair()
        out_r, out_w = os.pipe()
        fds = {"control": child.fileno(), "out": out_w}
        if self.listen_fd is not None:
            fds["listen"] = self.listen_fd
        # argv[0:3] is `<python> -m <module>`: the fork server runs worker.__main__.main itself.
        try:
            pid = await server.fork(self.argv[3:], self.env, self.cwd, fds)
        except BaseException:
            parent.close()
            os.close(out_r)
            raise
        finally:
            child.close()
            os.close(out_w)
        self.launch, self.launch_time = "fork", time.monotonic() - t0
        return self._attach(pid, parent, out_r, True)

    def _attach(self, pid: int, parent: socket.socket, out_r: int, control: bool) -> int:
        assert self._loop is not None
        self.exited = self._loop.create_future()
        self.pid = self.pgid = pid  # a spawned or forked worker leads its own session
        self.spawned_at = time.monotonic()
        parent.setblocking(False)
        self._sock = parent
        self.channel_open = control
        os.set_blocking(out_r, False)
        self._out = out_r
        self._pidfd = os.pidfd_open(self.pid)
        if self.reaper is not None:
            self.reaper.watch(self.pgid)
        self._loop.add_reader(self._pidfd, self._on_pidfd)
        self._loop.add_reader(out_r, self._on_output)
        if control:
            self._loop.add_reader(parent.fileno(), self._on_channel)
        else:
            parent.close()
            self._sock = None
        return self.pid

    # I/O callbacks ---------------------------------------------------------------
    def _on_output(self) -> None:
        assert self._out is not None
        try:
            data = os.read(self._out, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_output()
            return
        buf = self._partial + data
        lines = buf.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:  # a runaway line without newline: cut it
            lines.append(self._partial)
            self._partial = b""
        for ln in lines:
            self.logfile.write(ln.decode("utf-8", "replace").rstrip("\r"))

    def _close_output(self) -> None:
        if self._out is None:
            return
        # drain what is left (non-blocking) before closing
        while True:
            try:
                data = os.read(self._out, 65536)
            except OSError:
                break
            if not data:
                break
            self._partial += data
        if self._partial:
            for ln in self._partial.split(b"\n"):
                if ln:
                    self.logfile.write(ln.decode("utf-8", "replace"))
            self._partial = b""
        assert self._loop is not None
        self._loop.remove_reader(self._out)
        os.close(self._out)
        self._out = None

    def _on_channel(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_channel()
            if self.on_eof:
                self.on_eof(self)
            return
        for item in self._frames.feed(data):
            if isinstance(item, ChannelError):
                log.warning("worker %s: bad control frame: %s", self.pid, item)
                continue
            self.on_frame(item)

    def _close_channel(self) -> None:
        if self._sock is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self._sock = None
        self.channel_open = False

    def send(self, msg: dict[str, Any]) -> bool:
        if self._sock is None:
            return False
        self._wbuf += encode(msg)
        self._flush()
        return True

    def _flush(self) -> None:
        if self._sock is None:
            return
        had = bool(self._wbuf)
        try:
            n = self._sock.send(self._wbuf)
            del self._wbuf[:n]
        except BlockingIOError:
            pass
        except OSError:
            self._wbuf.clear()
        assert self._loop is not None
        if self._wbuf:
            self._loop.add_writer(self._sock.fileno(), self._flush)
        elif had:
            self._loop.remove_writer(self._sock.fileno())

    def _on_pidfd(self) -> None:
        assert self._loop is not None and self._pidfd is not None and self.pid is not None
        # The leader is a zombie: its pgid cannot be reused yet. Clear the group, then reap.
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.reaper is not None:
            self.reaper.clear()
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return  # spurious wakeup
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self.status = ExitStatus.from_wait_status(status)
        if self._popen is not None:
            self._popen.returncode = status  # keep Popen from waiting on a reaped PID
        if self._out is not None:
            self._on_output_drain()
        self._close_channel()
        if self.exited is not None and not self.exited.done():
            self.exited.set_result(self.status)
        self.on_exit(self)

    def _on_output_drain(self) -> None:
        self._close_output()

    # control ------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.pid is not None and self.status is None

    def signal(self, sig: int, group: bool = True) -> bool:
        """Signal the worker (and its group). Only while we have not reaped it."""
        if not self.alive or self._pidfd is None:
            return False
        self.signalled.add(sig)
        try:
            if group:
                os.killpg(self.pgid, sig)
            else:
                signal.pidfd_send_signal(self._pidfd, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    async def wait(self, timeout: float) -> bool:
        if self.exited is None:
            return True
        if self.exited.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, grace: float, term_timeout: float, kill_timeout: float,
                   reason: str = "stop") -> str:
        """Staged stop. Returns the stage that ended it: stop | sigterm | sigkill | exited | unkillable."""
        if not self.alive:
            self.stop_stage = self.stop_stage or "exited"
            return self.stop_stage
        if self.channel_open and grace > 0:
            self.send({"type": "stop", "deadline": grace, "reason": reason})
            if await self.wait(grace):
                self.stop_stage = "stop"
                return "stop"
        self.signal(signal.SIGTERM)
        if await self.wait(term_timeout):
            self.stop_stage = "sigterm"
            return "sigterm"
        self.signal(signal.SIGKILL)
        if await self.wait(kill_timeout):
            self.stop_stage = "sigkill"
            return "sigkill"
        self.stop_stage = "unkillable"
        return "unkillable"

    async def kill(self, kill_timeout: float) -> bool:
        self.signal(signal.SIGCONT)  # no-op unless stopped; SIGKILL works either way
        self.signal(signal.SIGKILL)
        self.signalled.discard(signal.SIGCONT)
        return await self.wait(kill_timeout)

    def close(self) -> None:
        """Drop loop registrations (after exit or when abandoning)."""
        self._close_channel()
        if self._out is not None:
            self._close_output()
        if self._pidfd is not None and self._loop is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
