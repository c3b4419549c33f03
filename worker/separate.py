"""`separate_process=True` made real: such a node's function runs in a child forked from the worker.

funcnodes-core turns the flag into a thread (it switches multiprocessing off), so a node that
crashes the interpreter (segfault, os._exit, the kernel's OOM kill) takes the whole worker down.
`install()` swaps the wrapper funcnodes-core's nodemaker builds for the flag before any node
module is imported (graph.py on import, the fork server before its preloads), so it applies to
every such node alike, however it reaches the graph (snapshot, journal replay, add_node).

Each call forks the worker: the child inherits the function and its inputs as they are (nothing
is pickled on the way in), runs the function, sends back `pickle((ok, value))` over a pipe and
calls os._exit. The worker reads the pipe and waits for the exit through a pidfd, both with
loop.add_reader, so the loop never blocks. A child that dies before it answered fails the node's
run with SeparateProcessError (which signal, or which exit status); the worker stays. The child
stays in the worker's process group, so the supervisor's memory watch counts it, and it is
killed when the run is cancelled, when the worker stops (kill_all) or dies (parent-death signal).
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import select
import signal
import struct
import sys
import time
import traceback
from typing import Any, Callable

from .control import set_parent_death_signal

_HEADER = struct.Struct("!Q")  # the payload's length: a child cut short leaves a short payload
_READ = 1 << 20

_live: dict[int, int] = {}  # pid -> pidfd of every child running now
_pipes: set[int] = set()  # both ends of every result pipe now open (a child closes all but its own)


class SeparateProcessError(RuntimeError):
    """A separate_process node's child ended without a result (or with one that cannot travel)."""


# region the child
def _child(func: Callable, args: tuple, kwargs: dict, w: int, parent: int) -> None:
    """Runs in the forked child; never returns.

    Fork safety: only the forking thread (the loop's) exists here; any lock another thread (the
    worker's I/O thread) held at the fork stays held. So the child touches only what it needs:
    no event loop of the worker, no channel, no logging of ours (logging's own handler locks are
    re-created at fork by logging itself), fresh sys.stdout/err objects (the old ones' buffer
    locks may be held), the libc prctl resolved before the fork (control.py). Signals go back to their
    defaults and the loop's wakeup fd is dropped, so a signal to the child never reaches the
    worker's loop. Inherited sockets (clients, the supervisor channel) are pointed at /dev/null:
    a long run must not keep a closed client's connection open; dup2 keeps the fd numbers taken,
    so nothing the parent's objects still name is reused. The end is os._exit: no atexit, no
    finalizers of objects the worker owns.
    """
    code = 0
    try:
        gc.freeze()  # the worker's objects: never scanned (their pages stay shared), never finalized here
        for fd in _pipes - {w}:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            pass
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:  # the worker died before the prctl took
            os._exit(1)
        _release_sockets()
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        try:
            value = func(*args, **kwargs)
            if asyncio.iscoroutine(value):  # an async node: a fresh loop of its own, nothing shared
                value = asyncio.run(value)
            reply = ("ok", value)
        except BaseException as e:  # noqa: BLE001
            reply = ("err", e, traceback.format_exc())
        try:
            payload = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001
            what = "result" if reply[0] == "ok" else "exception"
            payload = pickle.dumps(("unpicklable", f"the node's {what} ({type(reply[1]).__qualname__}) cannot "
                                    f"be pickled to leave its separate process: {type(e).__name__}: {e}"))
        data = _HEADER.pack(len(payload)) + payload
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
    except BaseException:  # noqa: BLE001
        code = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
        os._exit(code)


def _release_sockets() -> None:
    try:
        fds = os.listdir("/proc/self/fd")
        null = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return
    for name in fds:
        fd = int(name)
        try:
            if fd > 2 and fd != null and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)
# endregion


# region the worker's side
def _describe(status: int | None) -> str:
    if status is None:
        return "ended without a result (its exit status is unknown)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = {signal.SIGKILL: " (killed: out of memory, memory_max, or by someone)",
               signal.SIGSEGV: " (a crash: segmentation fault)", signal.SIGABRT: " (aborted)",
               signal.SIGBUS: " (a crash: bus error)"}.get(sig, "")
        return f"was killed by {name}{why} before it returned a result"
    return f"exited with status {os.waitstatus_to_exitcode(status)} before it returned a result"


def _reap(pid: int, pidfd: int) -> int | None:
    try:
        _, status = os.waitpid(pid, 0)  # only called once the pidfd said it ended: no wait
    except ChildProcessError:
        status = None  # somebody else reaped it
    finally:
        os.close(pidfd)
        _live.pop(pid, None)
    return status


async def run(func: Callable, args: tuple, kwargs: dict) -> Any:
    """func(*args, **kwargs) in a child forked now; its value, or its exception, comes back."""
    loop = asyncio.get_running_loop()
    me = os.getpid()
    r, w = os.pipe()
    _pipes.update((r, w))
    try:
        pid = os.fork()
    except OSError:
        _pipes.difference_update((r, w))
        os.close(r)
        os.close(w)
        raise
    if pid == 0:  # pragma: no cover (the child)
        _child(func, args, kwargs, w, me)
    _pipes.difference_update((r, w))
    os.close(w)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # out of fds: the child must not outlive a run nobody waits for
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        raise
    _live[pid] = pidfd
    os.set_blocking(r, False)
    buf = bytearray()
    done = loop.create_future()  # the whole reply is in, or the child ended
    ended: list[int | None] = []  # its wait status, once reaped

    def on_data() -> None:
        try:
            while chunk := os.read(r, _READ):
                buf.extend(chunk)
            loop.remove_reader(r)  # EOF
        except BlockingIOError:
            pass
        n = _HEADER.size
        if len(buf) >= n and len(buf) - n >= _HEADER.unpack_from(buf)[0] and not done.done():
            done.set_result(None)  # no need to wait for its exit (half the cost): reaped below, later

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        ended.append(_reap(pid, pidfd))
        if not done.done():
            done.set_result(None)

    loop.add_reader(r, on_data)
    loop.add_reader(pidfd, on_exit)
    try:
        await done
        if ended:
            on_data()  # the child is gone: what it wrote is all in the pipe
    except BaseException:  # cancelled (the run, or the worker stopping): the child goes too
        if not ended:
            try:
                os.kill(pid, signal.SIGKILL)  # on_exit reaps it
            except ProcessLookupError:
                pass
        raise
    finally:
        loop.remove_reader(r)
        os.close(r)
    return _result(bytes(buf), ended[0] if ended else None, pid)


def _result(data: bytes, status: int | None, pid: int) -> Any:
    n = _HEADER.size
    if len(data) < n or len(data) - n < _HEADER.unpack_from(data)[0]:
        raise SeparateProcessError(f"the node's separate process (pid {pid}) {_describe(status)}")
    reply = pickle.loads(data[n:])
    if reply[0] == "ok":
        return reply[1]
    if reply[0] == "unpicklable":
        raise SeparateProcessError(reply[1])
    _, exc, tb = reply
    exc.__cause__ = SeparateProcessError(f"in the node's separate process (pid {pid}):\n{tb}")
    raise exc


def kill_all(timeout: float = 2.0) -> list[int]:
    """SIGKILL every child still running (the worker stops) and wait until each is gone; their
    runs then end with "killed by SIGKILL" and reap them. The pids, for the log."""
    pids = list(_live)
    poller = select.poll()
    for pid, pidfd in list(_live.items()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        poller.register(pidfd, select.POLLIN)
    left, deadline = set(_live.values()), time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        left -= {fd for fd, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000)))}
    return pids


def children() -> list[int]:
    return list(_live)
# endregion


# region the hook into funcnodes-core
def install() -> bool:
    """Make nodemaker build our wrapper for separate_process=True from now on (idempotent).
    Node classes made before this keep funcnodes-core's thread: call it before node modules load."""
    from funcnodes_core import nodemaker
    from funcnodes_core.utils.functions import ThreadExecutorWrapper

    if getattr(nodemaker.make_run_in_new_process, "_fn_supervise", False):
        return False

    class SeparateProcessCall(ThreadExecutorWrapper):
        """Still an ExecutorWrapper (what funcnodes-core checks for), but a call forks."""

        separate_process = True

        def run_in_executor(self, *args: Any, **kwargs: Any) -> Any:
            return run(self.func, args, kwargs)

    def make_run_in_new_process(func: Callable) -> SeparateProcessCall:
        return SeparateProcessCall(func)

    make_run_in_new_process._fn_supervise = True  # type: ignore[attr-defined]
    nodemaker.make_run_in_new_process = make_run_in_new_process
    return True
# endregion
