"""Supervision of one sidecar process from the supervisor's asyncio loop.

`SidecarKeeper` starts the sidecar as a `multiprocess` process (or forks it from the supervisor:
start_method="fork", sidecars/forked.py), learns of its messages and of its
death from file descriptors registered with the loop (the pipe and the process sentinel; no
polling), restarts it one-for-one with capped backoff while it stays within its own crash budget,
and otherwise leaves it FATAL: a sidecar never takes the worker or the supervisor down with it.

The restart decision is `CrashBudget`, a plain class driven by an injectable clock.

Host-level messages (consumed here, not passed to `on_message`):
  {"type": "pgroup", "op": "add"|"remove", "pgid": int}
      a process group the sidecar owns; if the sidecar dies without removing it (SIGKILL,
      crash), the host SIGKILLs the group, so a command the monitor spawned (and whatever that
      command forked into its group) does not outlive the monitor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import types
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)

# Start method: "spawn", deliberately. The supervisor runs an asyncio loop with signal handlers
# (signal.set_wakeup_fd on a socket pair), threads (the default executor, watchers) and open
# sockets. A forked child inherits all of that: a signal delivered to the child is written into
# the *supervisor's* wakeup socket pair, locks held by other threads stay locked forever, and the
# child holds copies of every listening socket and pipe end (which also defeats EOF lifelines).
# "forkserver" avoids that but leaves a long-lived fork server process that must itself be
# supervised and would outlive a test. "spawn" costs a fresh interpreter start (~0.1-0.3 s) per
# (re)start, which is irrelevant at sidecar restart rates, and gives a clean child whose only
# inherited descriptors are the ones multiprocess passes explicitly.
# "spawn" would also start multiprocess's resource-tracker helper (one per supervisor, at the first
# sidecar start). It would hold nothing for us (we use no named semaphores or shared memory), so
# SidecarKeeper._spawn hands the child /dev/null instead and none is started; stop_helper_processes()
# still ends one that something else in the process started.
# "fork" (sidecars/forked.py) is the lean alternative for a supervisor that starts its sidecars
# before any thread: the child shares the supervisor's pages and is cleaned up explicitly (fds,
# signal handlers, logging). multiprocess (and dill with it) is imported only for "spawn".
START_METHOD = "spawn"
START_METHODS = ("spawn", "fork")
_live_hosts: set["SidecarKeeper"] = set()


_devnull_fd: int | None = None


def _no_tracker_fd() -> int:
    global _devnull_fd
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _devnull_fd


def stop_helper_processes(timeout: float = 2.0) -> bool:
    """Stop multiprocess's resource tracker, if no sidecar of any host is alive.

    Returns False (and does nothing) while a sidecar still runs: it holds the tracker's pipe,
    so the tracker could not see EOF yet. Bounded: a tracker that does not exit is SIGKILLed.
    """
    if _live_hosts:
        return False
    if "multiprocess" not in sys.modules:
        return True  # nothing could have started a tracker
    import psutil  # noqa: PLC0415

    try:
        from multiprocess import resource_tracker
        tracker = resource_tracker._resource_tracker
        with tracker._lock:
            fd, pid = tracker._fd, tracker._pid
            tracker._fd = tracker._pid = None
    except (ImportError, AttributeError):  # pragma: no cover - other multiprocess versions
        return True
    if fd is None:
        return True
    os.close(fd)  # EOF: the tracker exits
    if pid is not None:
        try:
            proc = psutil.Process(pid)
            try:
                proc.wait(timeout)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        except psutil.Error:
            pass
    return True


class CrashBudget:
    """Crash budget and capped exponential backoff; pure (the clock is injected).

    At most `budget` restarts within any `window` seconds; the crash after that is fatal.
    Delay before restart n (n = crashes in the window, 1-based) = min(cap, base * 2**(n-1)).
    """

    def __init__(self, budget: int = 5, window: float = 60.0, backoff_base: float = 0.2,
                 backoff_cap: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if budget < 0 or window <= 0 or backoff_base < 0 or backoff_cap < 0:
            raise ValueError("budget/window/backoff must be non-negative (window > 0)")
        self.budget = budget
        self.window = window
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.clock = clock
        self._crashes: deque[float] = deque()
        self.fatal = False

    def _trim(self, now: float) -> None:
        while self._crashes and now - self._crashes[0] > self.window:
            self._crashes.popleft()

    def crashes_in_window(self) -> int:
        self._trim(self.clock())
        return len(self._crashes)

    def on_crash(self) -> float | None:
        """Record a crash now; return the delay before restarting, or None when fatal."""
        if self.fatal:
            return None
        now = self.clock()
        self._trim(now)
        self._crashes.append(now)
        n = len(self._crashes)
        if n > self.budget:
            self.fatal = True
            return None
        return min(self.backoff_cap, self.backoff_base * (2 ** (n - 1)))

    def reset(self) -> None:
        self._crashes.clear()
        self.fatal = False


def _describe_exit(exitcode: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"code": None, "signal": None, "at": time.time()}
    if exitcode is None:
        return out
    if exitcode < 0:
        try:
            out["signal"] = signal.Signals(-exitcode).name
        except ValueError:
            out["signal"] = str(-exitcode)
    else:
        out["code"] = exitcode
    return out


def kill_process_groups(pgids) -> None:
    """SIGKILL each process group (best effort; a group already empty is fine)."""
    for pgid in list(pgids):
        if pgid <= 1 or pgid == os.getpgid(0):
            continue  # never our own group, never init's
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class SidecarKeeper:
    """One supervised sidecar process.

    States: idle -> running -> (crash) backoff -> running ... -> fatal;
            any -> stopping -> stopped.

    `target(conn, *args)` runs in the child; `on_message(name, msg)` is called on the loop
    for each message the sidecar sends (a coroutine result is scheduled as a task). `args` and
    `kwargs` are public attributes: change them (e.g. to pin the monitor's port after its first
    start, so the worker's copy of the address stays valid) and the next restart uses them.
    Must be used from the loop's thread (start() is also where PR_SET_PDEATHSIG's "parent
    thread" is decided: call it from the long-lived loop thread).
    """

    def __init__(self, name: str, target: Callable[..., Any], args: tuple = (), *,
                 on_message: Callable[[str, dict], Any] | None = None,
                 kwargs: dict | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 budget: int = 5, window: float = 60.0,
                 backoff_base: float = 0.2, backoff_cap: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, start_method: str = START_METHOD):
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, not {start_method!r}")
        self.name = name
        self.start_method = start_method
        self.target = target
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.on_message = on_message
        self._loop = loop
        self.policy = CrashBudget(budget, window, backoff_base, backoff_cap, clock)
        self.state = "idle"
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self.fatal_reason: str | None = None
        self.pgroups: set[int] = set()
        self._proc = None
        self._conn = None
        self._restart_handle: asyncio.TimerHandle | None = None
        self._eof_kill_handle: asyncio.TimerHandle | None = None
        self._exited: asyncio.Event | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._exited is not None \
            and not self._exited.is_set() else None

    def start(self) -> None:
        """Start the sidecar (no-op if it is running or fatal)."""
        if self.state in ("running", "fatal", "stopping"):
            return
        self._spawn()

    def send(self, msg: dict) -> bool:
        """Send a message to the sidecar; False if it is not reachable right now."""
        conn = self._conn
        if conn is None:
            return False
        try:
            conn.send(msg)
            return True
        except (OSError, EOFError, ValueError):
            return False

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the sidecar: stop message, then SIGTERM, then SIGKILL; bounded by ~timeout."""
        self._cancel_restart()
        if self._proc is None or self._exited is None or self._exited.is_set():
            self.state = "stopped"
            kill_process_groups(self.pgroups)
            self.pgroups.clear()
            return
        self.state = "stopping"
        timeout = max(0.3, timeout)
        stages = [
            (lambda: self.send({"type": "stop"}), timeout * 0.5),
            (self._terminate, timeout * 0.3),
            (self._kill, timeout * 0.2),
        ]
        for action, wait in stages:
            try:
                action()
            except Exception:  # pragma: no cover - defensive
                log.exception("sidecar %s: stop stage failed", self.name)
            try:
                await asyncio.wait_for(self._exited.wait(), wait)
                break
            except asyncio.TimeoutError:
                continue
        if not self._exited.is_set():  # SIGKILLed and still not reaped: (D state) give up
            log.error("sidecar %s (pid %s) did not exit after SIGKILL", self.name, self._proc.pid)
            self._teardown(exitcode=None)
        self.state = "stopped"

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "crashes_in_window": self.policy.crashes_in_window(),
            "last_exit": self.last_exit,
            "fatal_reason": self.fatal_reason,
        }

    # -- process handling -------------------------------------------------------------------

    def _spawn(self) -> None:
        if self.start_method == "fork":
            self._spawn_child()
            return
        # While the child is prepared, __main__ is an empty module: "spawn" would otherwise re-run
        # the parent's main script (the `fn-supervise` console script: CLI, runner, ssl, argparse,
        # ~6 MB and ~70 ms) in every sidecar only to rebuild a __main__ no sidecar uses. Targets
        # are importable functions (sidecars.entry.run_named), pickled by reference.
        # And no resource tracker: "spawn" would start multiprocess's tracker process (a third
        # interpreter with dill, ~14 MB) for resources no sidecar creates (named semaphores,
        # shared memory); the child gets /dev/null as its tracker pipe instead.
        from multiprocess import resource_tracker

        main, getfd = sys.modules.get("__main__"), resource_tracker.getfd
        sys.modules["__main__"] = types.ModuleType("__main__")
        resource_tracker.getfd = _no_tracker_fd
        try:
            self._spawn_child()
        finally:
            resource_tracker.getfd = getfd
            if main is not None:
                sys.modules["__main__"] = main

    def _spawn_child(self) -> None:
        loop = self.loop
        self._exited = asyncio.Event()
        if self.start_method == "fork":
            from .entry import preload, run_named  # noqa: PLC0415
            from .forked import ForkedSidecar  # noqa: PLC0415

            if self.target is run_named and self.args:
                preload(self.args[0])
            proc = ForkedSidecar(self.target, self.args, self.kwargs, name=self.name)
            child_conn = None
        else:
            import multiprocess  # noqa: PLC0415

            ctx = multiprocess.get_context("spawn")
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=self.target, args=(child_conn, *self.args),
                               kwargs=self.kwargs, daemon=True,
                               name=f"fn-supervise-sidecar-{self.name}")
        try:
            if child_conn is None:
                parent_conn = proc.start()
            else:
                proc.start()
        except Exception as exc:
            if child_conn is not None:
                parent_conn.close()
                child_conn.close()
            log.exception("sidecar %s: failed to start", self.name)
            self._proc = None
            self._exited.set()
            self.last_exit = {"code": None, "signal": None, "at": time.time(),
                              "error": f"start failed: {exc}"}
            self._after_exit()
            return
        if child_conn is not None:
            child_conn.close()  # the child's end lives only in the child: its death = our EOF
        _live_hosts.add(self)
        self._proc = proc
        self._conn = parent_conn
        self.state = "running"
        loop.add_reader(parent_conn.fileno(), self._on_readable)
        loop.add_reader(proc.sentinel, self._on_sentinel)
        log.info("sidecar %s started, pid %s", self.name, proc.pid)

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll(0):
                msg = conn.recv()
                self._dispatch(msg)
                if self._conn is not conn:
                    return
        except (EOFError, OSError):
            # The sidecar closed its end: it is exiting. The sentinel tells us when; if it
            # lingers without its pipe it is useless, so kill it after a grace period.
            self._close_conn()
            if self._exited is not None and not self._exited.is_set():
                self._eof_kill_handle = self.loop.call_later(2.0, self._kill)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, dict) and msg.get("type") == "pgroup":
            pgid = msg.get("pgid")
            if isinstance(pgid, int) and pgid > 1:
                if msg.get("op") == "add":
                    self.pgroups.add(pgid)
                elif msg.get("op") == "remove":
                    self.pgroups.discard(pgid)
            return
        if self.on_message is None:
            return
        try:
            result = self.on_message(self.name, msg)
            if asyncio.iscoroutine(result):
                self.loop.create_task(result)
        except Exception:
            log.exception("sidecar %s: on_message failed for %r", self.name, msg)

    def _on_sentinel(self, tries: int = 0) -> None:
        proc = self._proc
        if proc is None or self._exited is None or self._exited.is_set():
            return
        # The sentinel is the read end of a pipe only the child holds open: EOF = it exited.
        proc.join(0)  # reap
        code = proc.exitcode
        if code is None:
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped by someone else (e.g. a waitpid(-1) loop elsewhere in the supervisor):
                # dead, status unknown. Record it in multiprocess's Popen so nothing there ever
                # waits on or signals this (possibly reused) pid again.
                proc._popen.returncode = 255
                code = None
            else:
                if pid == 0 and tries < 500:
                    # Its files are closed but it is not a zombie yet (microseconds): look again
                    # shortly instead of spinning on a level-triggered readable fd.
                    self.loop.remove_reader(proc.sentinel)
                    self.loop.call_later(0.002, self._on_sentinel, tries + 1)
                    return
                code = os.waitstatus_to_exitcode(status) if pid else None
                proc._popen.returncode = code if code is not None else 255
        # drain anything it managed to say before dying
        if self._conn is not None:
            self._on_readable()
        self._teardown(code)

    def _teardown(self, exitcode: int | None) -> None:
        loop = self.loop
        proc = self._proc
        _live_hosts.discard(self)
        if proc is not None:
            try:
                loop.remove_reader(proc.sentinel)
            except Exception:
                pass
            try:
                proc.close()
            except Exception:
                pass
        self._close_conn()
        if self._eof_kill_handle is not None:
            self._eof_kill_handle.cancel()
            self._eof_kill_handle = None
        # Whatever it owned dies with it (after a clean exit it has removed its groups).
        kill_process_groups(self.pgroups)
        self.pgroups.clear()
        self.last_exit = _describe_exit(exitcode)
        if self._exited is not None:
            self._exited.set()
        log.info("sidecar %s exited: %s", self.name, self.last_exit)
        self._after_exit()

    def _after_exit(self) -> None:
        if self.state in ("stopping", "stopped"):
            return
        delay = self.policy.on_crash()
        if delay is None:
            self.state = "fatal"
            self.fatal_reason = (f"crashed {self.policy.budget + 1} times within "
                                 f"{self.policy.window:g}s")
            log.error("sidecar %s is FATAL: %s", self.name, self.fatal_reason)
            return
        self.state = "backoff"
        self._restart_handle = self.loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        self._restart_handle = None
        if self.state != "backoff":
            return
        self.restarts += 1
        self._spawn()

    def _cancel_restart(self) -> None:
        if self._restart_handle is not None:
            self._restart_handle.cancel()
            self._restart_handle = None

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            self.loop.remove_reader(conn.fileno())
        except Exception:
            pass
        conn.close()

    def _signal(self, sig: int) -> None:
        proc = self._proc
        if proc is None or self._exited is None or self._exited.is_set():
            return
        try:
            os.kill(proc.pid, sig)  # not yet reaped (we reap on the sentinel): pid is ours
        except ProcessLookupError:
            pass

    def _terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def _kill(self) -> None:
        self._eof_kill_handle = None
        self._signal(signal.SIGKILL)
