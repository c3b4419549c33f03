"""A sidecar forked from the supervisor: shares the supervisor's imported pages instead of
starting a fresh interpreter (a spawned sidecar re-imports Python, asyncio and its own
dependencies: 15-30 MB each; a forked one starts with every page shared).

`ForkedSidecar` has the few attributes SidecarKeeper reads from a multiprocess.Process (pid,
sentinel, exitcode, join, close, _popen.returncode), so the host supervises either the same way.

The child is made clean before the target runs, which is what "spawn" gave for free:
  - only stdout/stderr, its end of the pipe and the sentinel stay open; every other inherited
    descriptor (the worker's channel, the held listening socket, the dead-man's switch pipe,
    the loop's epoll and self-pipe) is replaced by /dev/null, so EOF lifelines still fire and
    a stale object closing "its" fd later closes only /dev/null;
  - no Python signal handler and no wakeup fd of the supervisor's loop;
  - no logging handlers of the supervisor (a sidecar configures its own, like a fresh one);
  - no collector scans the objects alive at the fork, in the child nor in the supervisor
    (gc.freeze before the fork, never undone: a full collection writes to every object it scans,
    which would copy each shared page into both processes). They are the supervisor's modules
    and long-lived state; cyclic garbage among them at that moment is not collected (a few KB
    per sidecar start).
Threads: a fork copies only the calling thread. The per-worker supervisor starts its sidecars
before any other thread exists; a later restart may find idle executor threads (waiting on
their queue, holding no lock the child needs).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection, Pipe  # stdlib: multiprocess would add dill
from typing import Any, Callable, NoReturn

from . import _lifeline


class ForkedSidecar:
    def __init__(self, target: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, name: str = "sidecar"):
        self.name = name
        self.target = target
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.pid: int | None = None
        self.sentinel: int | None = None
        self.returncode: int | None = None
        self._popen = self  # SidecarKeeper records a status it learned elsewhere as _popen.returncode

    def start(self) -> Connection:
        """Fork the sidecar; returns the supervisor's end of the duplex pipe."""
        ours, theirs = Pipe(duplex=True)
        r, w = os.pipe()  # the sentinel: only the child holds w, so EOF on r = it exited
        os.set_inheritable(r, False)
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        gc.collect()  # what is garbage now would stay frozen, uncollected, on both sides
        gc.freeze()  # see the module's docstring: stays frozen on both sides
        try:
            pid = os.fork()
        except BaseException:
            for c in (ours, theirs):
                c.close()
            os.close(r)
            os.close(w)
            raise
        if pid == 0:
            _run_child(self.target, theirs, self.args, self.kwargs, keep={w, theirs.fileno()}, parent=parent,
                       name=self.name)
        theirs.close()
        os.close(w)
        self.pid, self.sentinel = pid, r
        return ours

    @property
    def exitcode(self) -> int | None:
        return self.returncode

    def join(self, timeout: float | None = 0) -> None:
        """Reap without blocking (SidecarKeeper calls this once the sentinel says it exited)."""
        if self.returncode is not None or self.pid is None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return  # reaped by someone else: the host records that
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None


def _run_child(target: Callable[..., Any], conn: Connection, args: tuple, kwargs: dict, *,
               keep: set[int], parent: int, name: str) -> None:
    def run() -> None:
        clean_child(keep, parent)
        set_title(f"fn-supervise: {name} sidecar of {parent}", f"fn-{name}")
        target(conn, *args, **kwargs)

    exit_with(run)


def exit_with(fn: Callable[[], Any]) -> NoReturn:
    """In a forked child: run fn, then _exit with its status (an int it returns, SystemExit's
    code, 1 after a traceback, else 0); never returns into the code the parent was running."""
    code = 1
    try:
        r = fn()
        code = r if isinstance(r, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def clean_child(keep: set[int], parent: int, death_signal: int | None = None) -> None:
    """In a child just forked from the supervisor: what a fresh interpreter would not have, gone
    (and, with death_signal, that signal when the supervisor dies)."""
    _lifeline.set_fork_parent(parent)
    if death_signal is not None:
        _lifeline.set_parent_death_signal(death_signal, parent)
    _reset_signals()
    _detach_fds(keep | {1, 2})
    _reset_logging()
    show_environ()
    if "asyncio" in sys.modules:
        try:
            sys.modules["asyncio"].set_event_loop(None)  # not the supervisor's loop, ever
        except Exception:  # noqa: BLE001
            pass


def _region(first: int) -> tuple[int, int] | None:
    """(start, size) of the argv (first=45) or environ (first=47) block, from /proc/self/stat."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # fields[0] is field 3 of proc(5)
        start, end = int(fields[first]), int(fields[first + 1])
    except (OSError, ValueError, IndexError):
        return None
    return (start, end - start) if end > start else None


def set_title(title: str, comm: str | None = None) -> None:
    """What ps, top and psutil show for this process: a forked child would otherwise show the
    supervisor's command line (and be taken for a second supervisor of the same worker). The
    kernel reads it from the process's own argv block, rewritten here the way setproctitle(3)
    does (title, NUL, blank padding: the kernel then shows the title). Cut to the block's size."""
    region = _region(45)
    if region is not None:
        import ctypes  # noqa: PLC0415

        start, size = region
        data = title.encode(errors="replace")[: size - 2] + b"\0"
        ctypes.memmove(start, data.ljust(size, b" "), size)
    if comm:
        try:
            import ctypes  # noqa: PLC0415

            ctypes.CDLL(None).prctl(15, comm.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            pass


def show_environ() -> None:
    """Make /proc/PID/environ (ps e, psutil) show os.environ: a forked child would otherwise show
    the supervisor's environment as it was at exec, NOTIFY_SOCKET and LISTEN_FDS included, that
    the supervisor has long removed. The kernel reads that block from the process's own memory
    (env_start..env_end in /proc/PID/stat), so it is rewritten in place: first the variables
    it held (current values), then new ones while they fit. Linux only; best effort."""
    region = _region(47)
    try:
        with open("/proc/self/environ", "rb") as f:
            old = [e.split(b"=", 1)[0] for e in f.read().split(b"\0") if b"=" in e]
    except OSError:
        return
    if region is None:
        return
    start, size = region
    import ctypes  # noqa: PLC0415

    env = {k.encode(): v.encode() for k, v in os.environ.items()}
    seen = set(old)
    keys = [k for k in old if k in env] + [k for k in env if k not in seen]
    blob = b""
    for k in keys:
        entry = k + b"=" + env[k] + b"\0"
        if len(blob) + len(entry) < size:
            blob += entry
    saved = dict(os.environ)
    os.environ.clear()  # the C environ may point into the block: nothing may, while it is rewritten
    ctypes.memmove(start, blob.ljust(size, b"\0"), size)
    os.environ.update(saved)


def _reset_signals() -> None:
    try:
        signal.set_wakeup_fd(-1)  # the supervisor loop's self-pipe
    except ValueError:
        pass
    for sig in signal.valid_signals():
        try:
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass


def _detach_fds(keep: set[int]) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    try:
        fds = [int(f) for f in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux: the soft limit bounds the scan
        import resource  # noqa: PLC0415

        fds = list(range(min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 4096)))
    for fd in fds:
        if fd in keep or fd == null:
            continue
        try:
            os.dup2(null, fd, inheritable=False)
        except OSError:
            pass  # not open (the listdir's own fd)
    os.close(null)  # stdin (not kept) reads /dev/null now, like a multiprocess child's


def _reset_logging() -> None:
    root = logging.getLogger()
    for lg in [root, *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]:
        lg.handlers.clear()
        if lg is not root:
            lg.setLevel(logging.NOTSET)
            lg.propagate = True
    root.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)
