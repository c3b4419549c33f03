"""The supervisor's one asyncio loop (gunicorn arbiter style: signals are queued, never
handled inside the handler; every child is accounted for).

Events reach one queue: signals (loop.add_signal_handler), control frames from the worker,
channel EOF, and the worker's exit (pidfd readable, no polling). The main loop walks the
state machine (states.py), asks the restart policy (policy.py) and the hang detector
(health.py) for decisions, and keeps .p, .runstate and the state file (files.py) in step.
Its parts, each in its own module: the PREPARING phase and the launch argv (preparer.py), the
queue and the signal handler (inbox.py), one start (attempt.py), how it is launched
(launcher.py), the state files and their record (statefile.py), observers (observers.py).

Restarts are a blink: the supervisor holds the worker's listening socket (listener.py) and
hands it to every worker, so clients wait in the backlog while a worker is replaced; new
workers come from a warm fork server (forkclient.py, worker/forkserver.py), or a plain spawn
when it cannot deliver. Safe mode: a node the policy quarantines is passed to the next worker
(`--quarantine`), kept in <data>/quarantine.json, lifted by a client (`lift_quarantine`) or
`fn-supervise lift` (SIGUSR1 + <workers>/worker_<uuid>.lift).

Exit codes of `fn-supervise run` (also in cli.py):
  0  stopped gracefully (SIGTERM/SIGINT, or the worker was stopped with stop_worker)
  1  unexpected error
  2  usage error / unknown worker
  3  another supervisor already runs this worker
  4  FATAL: the worker can never work (it failed start_budget starts in a row, never ready)
  5  the worker's environment could not be prepared (venv / install failure)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from worker.tls import scheme as tls_scheme

from . import listener, memory
from .attempt import (WORKER_START_FAILURE, Abandon, Attempt, Crash, Eof, Event, Exit, Frame, Kill, RestartPhases,
                      MemoryOver, SidecarMsg, Signal, Stopped)
from .config import SupervisorConfig
from .crash import CrashRecord, ExitStatus, exit_record, oom_kill_count
from .files import AlreadyRunning, SupervisorLock, WorkerPaths, clear_leftovers
from .health import HeartbeatMonitor
from .inbox import Inbox
from .installs import Installer
from .launcher import ForkLauncher, Launcher
from .observers import Observer, Observers
from .policy import RestartPolicy
from .preparer import Preparer, PrepareError
from .safemode import Quarantine
from .statefile import StateFiles, supervisor_record
from .process import GroupReaper, RotatingLog, WorkerLog, WorkerProcess, reap_orphans, set_child_subreaper
from .states import RUNSTATE, IllegalTransition, State, StateMachine
from .systemd import Notifier, keepalive, supervisor_probe

log = logging.getLogger("fn-supervise")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_RUNNING = 3
EXIT_FATAL = 4
EXIT_ENV = 5



class Environment:
    """Seam around supervisor.environment (imported lazily; it may not be installed)."""

    def __init__(self, no_venv: bool = False):
        self.no_venv = no_venv

    def prepare(self, data_dir: Path, cfg: dict[str, Any], scfg: SupervisorConfig,
                progress: Callable[[str, float | None], None] | None = None,
                cancel: threading.Event | None = None) -> tuple[str, str]:
        """-> (python, fingerprint). Runs in a thread."""
        if scfg.python:
            return scfg.python, f"python:{scfg.python}"
        if self.no_venv or not scfg.venv:
            return sys.executable, f"system:{sys.executable}"
        deps = cfg.get("package_dependencies") or {}
        try:
            from . import environment  # noqa: PLC0415 (lazy on purpose)
        except ImportError as e:
            raise PrepareError(f"venv support is not available ({e}); use --no-venv") from None
        try:
            info = environment.ensure_environment(data_dir, deps, python=sys.executable, progress=progress,
                                                  cancel=cancel)
        except environment.InstallError as e:
            if getattr(e, "cancelled", False):
                raise PrepareError("cancelled") from None
            old = data_dir / ".venv" / "bin" / "python"
            if environment.read_marker(data_dir / ".venv") is not None and old.exists():
                log.warning("install failed, keeping the old environment: %s", e)
                return str(old), f"stale:{e}"
            raise PrepareError(f"environment could not be built: {e}") from None
        return str(info.python), str(info.fingerprint)

    def install(self, data_dir: Path, deps: dict[str, Any],
                progress: Callable[[str, float | None], None] | None = None,
                cancel: threading.Event | None = None) -> tuple[str, str]:
        from . import environment  # noqa: PLC0415
        info = environment.install_into(data_dir, deps, python=sys.executable, progress=progress, cancel=cancel)
        return str(info.python), str(info.fingerprint)


class Supervisor:
    def __init__(self, paths: WorkerPaths, *, no_venv: bool = False, environment: Environment | None = None,
                 on_ready: Callable[[str, int], None] | None = None, install_signals: bool = True,
                 sidecar_factory: Callable[["Supervisor"], Any] | None = None,
                 reaper: GroupReaper | None = None, launcher: Launcher | None = None,
                 observers: list[Observer] = ()):
        self.paths = paths
        self.env = environment or Environment(no_venv=no_venv)
        self.on_ready_cb = on_ready
        self.install_signals = install_signals
        self.sidecar_factory = sidecar_factory
        self.sidecars: Any = None
        self.sm = StateMachine(on_change=self._on_transition)
        self.observers = Observers(self, observers)  # observers.py
        self.observers.attach(self.sm)
        self.cfg = SupervisorConfig()
        self.policy = RestartPolicy(self.cfg)
        self.lock = SupervisorLock(paths.lock)
        self.inbox = Inbox(on_sigchld=self.reap)  # the one event queue; signals queue into it
        self.worker: WorkerProcess | None = None
        self.logs = WorkerLog()  # the worker's log under the config's settings (process.py)
        self.logfile: RotatingLog | None = None  # self.logs.file
        self.python = sys.executable
        self.fingerprint = ""
        self.worker_cfg: dict[str, Any] = {}
        self.crashes: list[dict[str, Any]] = []
        self.pgids: set[int] = set()
        self.host: str | None = None
        self.port: int | None = None
        self.ready_wall: float | None = None
        self.started_wall = time.time()
        self.backoff_until: float | None = None
        self.exit_code: int | None = None
        self.ready_once = False
        self.installs = Installer(self.env, self._note)
        self.reaper = reaper if reaper is not None else GroupReaper()
        self.notify = Notifier()  # silent until run() reads (and scrubs) NOTIFY_SOCKET; see systemd.py
        self.health: HeartbeatMonitor | None = None  # the current worker's (read by the watchdog)
        self.attempt: Attempt | None = None  # the current worker start (attempt.py)
        self.restarting = False  # a SIGHUP restart passes STOPPING: no STOPPING=1 for it
        self.listen_sock: Any = None  # the worker's listening socket, held across restarts
        self.listen_systemd = False  # it came from systemd socket activation
        self.launcher: Launcher = launcher if launcher is not None else ForkLauncher()
        self.launcher.attach(self._note, self.write_state)
        self.quarantine = Quarantine(paths, self._note, lambda: self.worker_cfg)  # safe mode's nodes
        self.phases = RestartPhases()  # seconds per phase of the restart in progress (attempt.py)
        self.memory_watch: memory.MemoryWatch | None = None  # the current worker's, when memory_max is set
        self.journal: dict[str, Any] | None = None  # the worker's journal cannot be written (disk full)
        self.launches = {"fork": 0, "spawn": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.files = StateFiles(paths, self.state_record)  # .runstate and the state file
        self.preparer = Preparer(self, self._on_signal, self._apply_log_settings)  # PREPARING; argv and env

    # ------------------------------------------------------------------ public verbs
    def request_stop(self) -> None:
        """Stop the worker and end run() (as SIGTERM does)."""
        self._queue(Signal(signal.SIGTERM))

    def request_restart(self) -> None:
        """Restart with the re-read config (as SIGHUP does)."""
        self._queue(Signal(signal.SIGHUP))

    def deliver(self, msg: dict[str, Any]) -> None:
        """A frame for the current worker (sidecar events, the monitor address); dropped when no
        worker runs (the next one gets the current state from its sidecars at ready)."""
        if self.worker is not None and self.worker.alive and isinstance(msg, dict) and "type" in msg:
            self.worker.send(msg)

    def reap(self) -> None:
        """Reap exited orphans of this supervisor's worker groups (on SIGCHLD); never waitpid(-1)."""
        w = self.worker
        for pid, status in reap_orphans(self.pgids, exclude={w.pid} if w is not None and w.pid else set()):
            log.info("reaped orphan %d of a worker group (%s)", pid, ExitStatus.from_wait_status(status).describe())

    # ------------------------------------------------------------------ plumbing
    def _queue(self, ev: Event) -> None:
        self.inbox.put(ev)

    def _on_transition(self, old: State, new: State, name: str, reason: str) -> None:
        msg = f"{old.value} -> {new.value} ({name})" + (f": {reason}" if reason else "")
        log.info("%s: %s", self.paths.name, msg)
        if self.logfile is not None:
            self.logfile.event(msg)
        detail = reason if new in (State.PREPARING, State.STARTING, State.BACKOFF, State.FATAL) else ""
        self.files.runstate(RUNSTATE[new], detail)
        self.write_state()
        self.notify.transition(new.value, reason, stopping=new == State.STOPPING and not self.restarting,
                               preparing=new == State.PREPARING)

    def write_state(self) -> None:
        """Soon, not now (statefile.py): one write per turn of the loop."""
        self.files.soon()

    def state_record(self) -> dict[str, Any]:
        """The state file's content: everything `fn-supervise status` shows (statefile.py)."""
        return supervisor_record(self)

    # ------------------------------------------------------------------ main
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = self.files.loop = loop
        # Only this process notifies systemd: read NOTIFY_SOCKET/WATCHDOG_* and drop them from
        # os.environ before any child (worker env, sidecars) is made from it.
        self.notify = Notifier.from_environ()
        # Same for socket activation: take fd 3 and drop LISTEN_* before any child exists.
        self.listen_sock = listener.from_systemd()
        self.listen_systemd = self.listen_sock is not None
        self.lock.acquire()  # raises AlreadyRunning
        try:
            return await self._run(loop)
        finally:
            self.lock.release()
            self.notify.close()

    async def _run(self, loop: asyncio.AbstractEventLoop) -> int:
        set_child_subreaper()
        self.reaper.start()
        if self.install_signals:
            self.inbox.install_signal_handlers(loop)
        try:
            try:
                self.worker_cfg = self.paths.read_config()
            except (OSError, ValueError) as e:
                log.error("cannot read %s: %s", self.paths.config, e)
                return EXIT_USAGE
            self.cfg = SupervisorConfig.from_worker_config(self.worker_cfg)
            self.policy.reconfigure(self.cfg)
            self.quarantine.load()
            self.logfile = self.logs.open(self.paths.log_file(self.worker_cfg), self.cfg)
            await clear_leftovers(self.paths)
            if self.sidecar_factory is not None:
                # Sidecars (sidecars/host.py SidecarKeeper): started here, messages are routed
                # through self.on_sidecar_message, stopped in the finally below.
                self.sidecars = self.sidecar_factory(self)
                await _maybe_await(self.sidecars.start())
            self.sm.fire("start")
            sd_task = asyncio.ensure_future(keepalive(self.notify, lambda: supervisor_probe(self)))
            try:
                return await self._main()
            finally:
                sd_task.cancel()
        finally:
            await self._shutdown(loop)

    async def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        """Whatever ended run(): nothing is left behind, the files say so last."""
        if self.sidecars is not None:
            try:
                await _maybe_await(self.sidecars.stop())
            except Exception as e:  # noqa: BLE001
                log.warning("sidecar stop failed: %s", e)
        self.installs.stop()
        if self.install_signals:
            self.inbox.remove_signal_handlers(loop)
        if self.worker is not None and self.worker.alive:  # never leave it behind
            await self.worker.kill(self.cfg.kill_timeout)
        if self.worker is not None:
            self.worker.close()
        self.launcher.close()
        if self.listen_sock is not None:
            self.listen_sock.close()
            self.listen_sock = None
        self.reaper.close()
        self.files.flush()  # nothing may be written after the removals below
        self.paths.remove_pid()
        if self.sm.state in (State.STOPPED, State.STOPPING):
            self.paths.remove_runstate()
        self.files.write_now()
        if self.logfile is not None:
            self.logfile.close()

    def _apply_log_settings(self) -> None:
        self.logfile = self.logs.apply(self.paths.log_file(self.worker_cfg), self.cfg)

    async def _main(self) -> int:
        while True:
            st = self.sm.state
            if st == State.PREPARING:
                await self.preparer.prepare()
            elif st == State.STARTING:
                await self._run_worker()
            elif st == State.BACKOFF:
                await self._backoff()
            elif st == State.STOPPING:
                if self.worker is not None and self.worker.alive:
                    await self._stop_worker("stop")
                self.sm.fire("stopped")
            elif st == State.STOPPED:
                self.exit_code = EXIT_OK
                return EXIT_OK
            elif st == State.FATAL:
                if self.exit_code is None:
                    self.exit_code = EXIT_FATAL
                log.error("%s: FATAL: %s", self.paths.name, self.sm.reason)
                return self.exit_code

    async def _on_signal(self, sig: int) -> bool:
        """What each signal does, in every state, in one place (gunicorn's handle_*). -> True when
        the current phase ends. SIGUSR1: lift what `fn-supervise lift` asked for. SIGHUP: restart
        with the re-read config (while preparing: that is under way already). SIGTERM, SIGINT:
        stop (the STOPPING state stops a running worker)."""
        name = signal.Signals(sig).name
        st = self.sm.state
        if sig == signal.SIGUSR1:
            self.quarantine.lift_requested_for(self)
            return False
        if sig == signal.SIGHUP:
            self.policy.reset()
            if st == State.PREPARING:
                return False
            if st in (State.STARTING, State.RUNNING):
                await self._restart_worker(f"{name}: restart with re-read config")
            else:
                self.sm.fire("restart", f"{name}: restart with re-read config")
            return True
        self.sm.fire("stop", f"{name} received" + (" while preparing" if st == State.PREPARING else ""))
        return True

    async def _restart_worker(self, reason: str) -> None:
        self.restarting = True  # no STOPPING=1 to systemd for a restart
        try:
            self.sm.fire("stop", reason)
            await self._stop_worker("restart")
            self.policy.reset()
            self.sm.fire("restart", reason)
        finally:
            self.restarting = False

    async def _run_worker(self) -> None:
        """One attempt (attempt.py decides): launch, then events until the worker is gone."""
        w = await self._start_worker()
        if w is None:
            return
        a = self.attempt
        while True:
            ev = await self.inbox.next(a.deadline() - time.monotonic())
            match ev:
                case None:
                    if self._on_attempt_timeout(w, a):
                        return
                case Signal(sig):
                    if await self._on_signal(sig):
                        return
                case SidecarMsg(msg):
                    self.deliver(msg)
                case Frame(worker, msg) if worker is w:
                    effect = a.on_frame(msg)
                    if effect is not None:
                        self._frame_effect(effect, w, msg)
                case MemoryOver(worker, detail) if worker is w:  # over memory_max (memory.watch_worker)
                    if a.on_memory(detail) is not None:
                        self.logfile.event(f"killing worker {w.pid}: {detail}")
                        w.signal(signal.SIGKILL)
                        if self.memory_watch is not None:  # counted, so killed: also outside the group
                            memory.kill_all(self.memory_watch.pids)
                case Eof(worker) if worker is w:
                    a.on_eof(w.alive)
                case Exit(worker) if worker is w:
                    self._on_worker_exit(w, a)
                    return
                # anything else is an event of an earlier worker: stale

    async def _start_worker(self) -> WorkerProcess | None:
        argv, env = self.preparer.worker_argv()
        w = WorkerProcess(argv, env=env, cwd=str(self.paths.data_dir(self.worker_cfg)), logfile=self.logfile,
                          on_frame=lambda m: None, on_exit=lambda wp: self._queue(Exit(wp)),
                          on_eof=lambda wp: self._queue(Eof(wp)), reaper=self.reaper,
                          listen_fd=self.listen_sock.fileno() if self.listen_sock is not None else None)
        w.on_frame = lambda m: self._queue(Frame(w, m))
        oom_before = oom_kill_count()
        self.phases.mark("launch")
        try:
            kind = await self.launcher.launch(w, not self.ready_once, min(self.cfg.start_timeout, 60.0))
        except OSError as e:
            self.logfile.event(f"spawn failed: {e}")
            self._after_exit(None, Crash("start_failed", f"spawn failed: {e}", False), ExitStatus(code=127), None)
            return None
        self.launches[kind] += 1
        self.worker = w
        self.pgids.add(w.pgid)
        self.policy.on_spawn()
        watch = memory.watch_worker(w, self.cfg.memory_max, self.cfg.memory_interval,  # memory_max: memory.py
                                    lambda detail: self._queue(MemoryOver(w, detail)), self.logfile.event)
        self.memory_watch = watch or self.memory_watch
        self.logfile.event(f"worker {'forked' if w.launch == 'fork' else 'spawned'} in {w.launch_time:.3f}s: "
                           f"pid {w.pid}: {' '.join(argv)}")
        self.files.runstate("starting", f"worker process {w.pid} started")
        self.write_state()
        self.attempt = Attempt(self.cfg)
        self.attempt.oom_before = oom_before
        self.health = self.attempt.health
        return w

    def _on_attempt_timeout(self, w: WorkerProcess, a: Attempt) -> bool:
        """No event before the attempt's deadline. -> True when the attempt is over."""
        match a.on_timeout():
            case Abandon() as ab:
                log.error("worker %s did not die after SIGKILL; abandoning it", w.pid)
                w.close()
                self._after_exit(w, a.abandoned(ab), ExitStatus(), a.oom_before)
                return True
            case Kill(_, detail):
                self.logfile.event(f"killing worker {w.pid}: {detail}")
                w.signal(signal.SIGKILL)
            case None:
                if a.stable_due() and self.policy.check_stable():
                    a.stable_noted = True
                    self.write_state()  # counters were reset after a stable period
        return False

    def _frame_effect(self, effect: str, w: WorkerProcess, msg: dict[str, Any]) -> None:
        """What a control frame makes the supervisor do (the attempt took its part in already)."""
        if effect == "heartbeat":
            self.paths.keep_pid(w.pid)
        elif effect == "ready":
            self._on_worker_ready(w, msg)
        elif effect == "runstate":
            detail = str(msg.get("detail") or "")
            if detail == "Loading nodespace":
                self.phases.mark("graph")
            self.files.runstate("starting", detail)
        elif effect == "lift_quarantine":
            self.quarantine.lift_for(self, str(msg.get("node")), "a client")
        elif effect == "stopping":
            self.logfile.event(f"worker is stopping on its own: {self.attempt.deliberate}")
        elif effect == "install":
            self.installs.start_for(self, w, msg)
        elif effect == "journal":  # a full disk: edits refused until it has room (worker/store.py)
            self.journal = None if msg.get("writable") else msg
            self.logfile.event(f"journal: {msg.get('reason') or 'writable again'}")
            self.write_state()

    def _on_worker_exit(self, w: WorkerProcess, a: Attempt) -> None:
        status: ExitStatus = w.status  # type: ignore[assignment]
        self.paths.remove_pid()
        match a.outcome(status):
            case Stopped(why):
                self.logfile.event(f"worker exited 0 after a deliberate stop ({why})")
                self.sm.fire("stop", f"worker stopped: {why}")
                self.worker = None
            case Crash() as c:
                self._after_exit(w, c, status, a.oom_before)

    def _on_worker_ready(self, w: WorkerProcess, msg: dict[str, Any]) -> None:
        host, port = msg.get("host"), msg.get("port")
        self.host, self.port = str(host) if host else self.host, port if isinstance(port, int) else self.port
        self.ready_wall = time.time()
        self.journal = None  # a new worker reports its own
        self.policy.on_ready()
        if self.attempt is not None:
            self.attempt.mark_ready(self.policy.ready_at or time.monotonic())
        r = self.phases.ready(w)
        if r is not None:
            if self.crashes:
                self.crashes[-1]["restart"] = r
            self._note("restart phases: " + ", ".join(f"{k} {v}" for k, v in r.items()))
        self.paths.write_pid(w.pid)
        self.sm.fire("ready", f"pid {w.pid} listening on {tls_scheme(self.worker_cfg)}://{self.host}:{self.port}/")
        if self.sidecars is not None and hasattr(self.sidecars, "on_worker_ready"):
            self.sidecars.on_worker_ready()
        self.installs.check_update_for(self)
        if not self.ready_once:
            self.notify.ready()
        self.ready_once = True
        if self.on_ready_cb is not None:
            try:
                self.on_ready_cb(self.host or "127.0.0.1", self.port or 0)
            except Exception as e:  # noqa: BLE001
                log.warning("on_ready callback failed: %s", e)

    # ------------------------------------------------------------------ launching
    def _note(self, line: str) -> None:
        """A line for the worker's log (the launcher's, the installs')."""
        if self.logfile is not None:
            self.logfile.event(line)

    # ------------------------------------------------------------------ safe mode
    def _after_exit(self, w: WorkerProcess | None, crash: Crash, status: ExitStatus, oom_before: int | None) -> None:
        """A worker exit the policy counts: record it, tell the observers, act on the decision."""
        self.phases.exited(crash.first_sign)
        self.paths.remove_pid()
        rec = self._record_exit(w, crash, status, oom_before)
        self.worker = None
        self.observers.tell_exit(rec)
        decision = self.policy.on_exit(was_ready=crash.was_ready, reason=f"{crash.reason}: {crash.detail}",
                                       node=crash.node, suspects=crash.suspects,
                                       quarantined=frozenset(self.quarantine.nodes))
        self.phases.backoff = decision.delay
        if decision.quarantine is not None:
            self.quarantine.add(decision.quarantine, rec, self.cfg.quarantine_after)
        if decision.action == "fatal":
            self.exit_code = EXIT_FATAL
            self.sm.fire("give_up", decision.reason)
            return
        if not crash.was_ready and status.code == WORKER_START_FAILURE:
            # The worker could not start (its config?): an unreadable config can never work.
            try:
                self.paths.read_config()
            except (OSError, ValueError) as e:
                self.exit_code = EXIT_USAGE
                self.sm.fire("give_up", f"cannot read {self.paths.config}: {e}")
                return
        self.backoff_until = time.monotonic() + decision.delay
        self.sm.fire("crashed" if crash.was_ready else "start_failed",
                     f"{crash.reason}: {crash.detail}; restart in {decision.delay:.2f}s")

    def _record_exit(self, w: WorkerProcess | None, crash: Crash, status: ExitStatus,
                     oom_before: int | None) -> CrashRecord:
        rec = exit_record(w, crash, status, oom_before, list(self.logfile.tail) if self.logfile else [])
        self.crashes.append(rec.to_json())
        del self.crashes[:-max(1, self.cfg.crash_history)]
        self.logfile.event(f"worker {rec.pid} {rec.summary()}")
        return rec

    async def _backoff(self) -> None:
        while True:
            remaining = (self.backoff_until or 0) - time.monotonic()
            ev = await self.inbox.next(remaining)
            if ev is None:
                self.backoff_until = None
                self.sm.fire("retry", f"restart #{self.policy.total_restarts}")
                return
            if isinstance(ev, Signal) and await self._on_signal(ev.sig):
                self.backoff_until = None
                return

    async def _stop_worker(self, why: str) -> str:
        w = self.worker
        if w is None or not w.alive:
            return "exited"
        self.logfile.event(f"stopping worker {w.pid} ({why})")
        stage = await w.stop(self.cfg.stop_grace, self.cfg.term_timeout, self.cfg.kill_timeout, reason=why)
        self.logfile.event(f"worker {w.pid} stopped at stage {stage}"
                           + (f" ({w.status.describe()})" if w.status else ""))
        if stage == "unkillable":
            log.error("worker %s survived SIGKILL for %ss; abandoning", w.pid, self.cfg.kill_timeout)
            w.close()
        self.paths.remove_pid()
        self.worker = None
        return stage

    # ------------------------------------------------------------------ sidecars
    def on_sidecar_message(self, msg: dict[str, Any]) -> None:
        """Callback for SidecarKeeper (any thread): queued, handled in the loop (deliver)."""
        self._loop.call_soon_threadsafe(self._queue, SidecarMsg(msg))


async def _maybe_await(x: Any) -> Any:
    if asyncio.iscoroutine(x) or isinstance(x, asyncio.Future):
        return await x
    return x


def run_supervisor(paths: WorkerPaths, **kw: Any) -> int:
    sup = Supervisor(paths, **kw)
    try:
        return asyncio.run(sup.run())
    except AlreadyRunning:
        raise
    except IllegalTransition:
        log.exception("internal state error")
        return EXIT_ERROR
