"""The supervisor's one asyncio loop (gunicorn arbiter style: signals are queued, never
handled inside the handler; every child is accounted for).

Events reach one queue: signals (loop.add_signal_handler), control frames from the worker,
channel EOF, and the worker's exit (pidfd readable, no polling). The main loop walks the
state machine (states.py), asks the restart policy (policy.py) and the hang detector
(health.py) for decisions, and keeps .p, .runstate and the state file (files.py) in step.

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
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from worker.tls import config_error as tls_config_error, scheme as tls_scheme

from .config import SupervisorConfig
from . import listener, memory
from .crash import CrashRecord, ExitStatus, make_record, oom_kill_count
from .files import AlreadyRunning, SupervisorLock, WorkerPaths, identity_alive, process_identity
from .forkclient import ForkError, ForkServer
from .health import HeartbeatMonitor
from .policy import RestartPolicy
from .process import GroupReaper, RotatingLog, WorkerProcess, reap_orphans, set_child_subreaper
from .states import RUNSTATE, IllegalTransition, State, StateMachine
from .systemd import EXTEND_STEP, Notifier, Probe, keepalive

log = logging.getLogger("fn-supervise")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_RUNNING = 3
EXIT_FATAL = 4
EXIT_ENV = 5

WORKER_START_FAILURE = 3  # the worker's own "cannot start" exit code (bad config, port busy)
FORK_GIVE_UP = 3  # fork servers in a row that die or fail before we stop replacing them


class PrepareError(Exception):
    """The environment could not be prepared (its own error class: never a crash)."""


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


def project_root() -> str:
    import worker  # the package our own `worker.channel` came from
    return str(Path(worker.__file__).resolve().parent.parent)


class Supervisor:
    def __init__(self, paths: WorkerPaths, *, no_venv: bool = False, environment: Environment | None = None,
                 on_ready: Callable[[str, int], None] | None = None, install_signals: bool = True,
                 sidecar_factory: Callable[["Supervisor"], Any] | None = None):
        self.paths = paths
        self.env = environment or Environment(no_venv=no_venv)
        self.on_ready_cb = on_ready
        self.install_signals = install_signals
        self.sidecar_factory = sidecar_factory
        self.sidecars: Any = None
        self.sm = StateMachine(on_change=self._on_transition)
        self.cfg = SupervisorConfig()
        self.policy = RestartPolicy(self.cfg)
        self.lock = SupervisorLock(paths.lock)
        self.q: asyncio.Queue = asyncio.Queue()
        self.worker: WorkerProcess | None = None
        self.logfile: RotatingLog | None = None
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
        self._installs: set[asyncio.Task] = set()
        self._install_lock = asyncio.Lock()
        self._install_cancel = threading.Event()  # set on stop: uv is killed, not waited for
        self.reaper = GroupReaper()
        self.notify = Notifier()  # silent until run() reads (and scrubs) NOTIFY_SOCKET; see systemd.py
        self.health: HeartbeatMonitor | None = None  # the current worker's (read by the watchdog)
        self.memory_watch: memory.MemoryWatch | None = None  # the current worker's, when memory_max is set
        self.restarting = False  # a SIGHUP restart passes STOPPING: no STOPPING=1 for it
        self.listen_sock: Any = None  # the worker's listening socket, held across restarts
        self.listen_systemd = False  # it came from systemd socket activation
        self.fork: ForkServer | None = None  # the warm fork server of the current environment
        self.quarantine: dict[str, dict[str, Any]] = {}  # node id -> {reason, since, crashes}
        self.restart_clock: dict[str, float] = {}  # monotonic marks of the restart in progress
        self.last_restart: dict[str, Any] | None = None
        self.journal: dict[str, Any] | None = None  # the worker's journal cannot be written (disk full)
        self.launches = {"fork": 0, "spawn": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._files_due: dict[str, Any] = {}  # .runstate / state file writes of this turn (write_state)
        self._flush_handle: asyncio.Handle | None = None
        self.fork_failures = 0  # fork servers in a row that died or failed; FORK_GIVE_UP -> spawn only
        self.fork_given_up_key: str | None = None

    # ------------------------------------------------------------------ plumbing
    def _event(self, *ev: Any) -> None:
        self.q.put_nowait(ev)

    def _on_transition(self, old: State, new: State, name: str, reason: str) -> None:
        msg = f"{old.value} -> {new.value} ({name})" + (f": {reason}" if reason else "")
        log.info("%s: %s", self.paths.name, msg)
        if self.logfile is not None:
            self.logfile.event(msg)
        detail = reason if new in (State.PREPARING, State.STARTING, State.BACKOFF, State.FATAL) else ""
        self._runstate(RUNSTATE[new], detail)
        self.write_state()
        status = f"{new.value}: {reason}" if reason else new.value
        if new == State.STOPPING and not self.restarting:
            self.notify.stopping(status)
        else:
            self.notify.status(status)
        if new == State.PREPARING:
            self.notify.extend_timeout(EXTEND_STEP)

    def _runstate(self, state: str, detail: str = "") -> None:
        """.runstate, in the same deferred, last-one-wins write as the state file."""
        self._files_due["runstate"] = (state, detail)
        self.write_state()

    def write_state(self) -> None:
        """Soon, not now: the transitions of one turn of the loop (RUNNING -> BACKOFF -> STARTING
        on a crash) cost one write each of .runstate and the state file, done while the next
        worker is being forked instead of before. `_flush_files` writes them at once."""
        self._files_due["state"] = True
        if self._loop is None:
            self._flush_files()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_files)

    def _flush_files(self) -> None:
        self._flush_handle = None
        due, self._files_due = self._files_due, {}
        if "runstate" in due:
            try:
                self.paths.write_runstate(*due["runstate"])
            except OSError as e:
                log.warning("cannot write runstate: %s", e)
        if due.get("state"):
            self._write_state_now()

    def _write_state_now(self) -> None:
        w = self.worker
        data = {
            "uuid": self.paths.uuid,
            "state": self.sm.state.value,
            "reason": self.sm.reason,
            "since": time.time() - (time.monotonic() - self.sm.since),
            "supervisor": process_identity(os.getpid()),
            "supervisor_started": self.started_wall,
            "worker": process_identity(w.pid) if (w is not None and w.alive) else None,
            "ready_at": self.ready_wall if (w is not None and w.alive and self.sm.state == State.RUNNING) else None,
            "host": self.host,
            "port": self.port,
            "restarts": self.policy.total_restarts,
            "consecutive_crashes": self.policy.consecutive,
            "start_failures": self.policy.start_failures,
            "crashes": self.crashes[-self.cfg.crash_history:],
            "env": {"python": self.python, "fingerprint": self.fingerprint},
            "backoff_until": (time.time() + max(0.0, self.backoff_until - time.monotonic()))
            if self.backoff_until else None,
            "stop_deadline": self.cfg.stop_deadline(),
            "exit_code": self.exit_code,
            "log": str(self.paths.log_file(self.worker_cfg)),
            "sidecars": self.sidecars.status() if self.sidecars is not None else [],
            "safe_mode": bool(self.quarantine),
            "quarantine": self.quarantine,
            "listen": {"fd_from": "systemd" if self.listen_systemd else "supervisor",
                       "address": list(listener.address(self.listen_sock))} if self.listen_sock is not None else None,
            "fork_server": self.fork.status() if self.fork is not None else None,
            "launches": dict(self.launches),
            "last_restart": self.last_restart,
            "journal": self.journal,
        }
        try:
            self.paths.write_state(data)
        except OSError as e:
            log.warning("cannot write state file: %s", e)

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._event, "signal", sig)
        loop.add_signal_handler(signal.SIGUSR1, self._lift_requested)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)

    def _remove_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            try:
                loop.remove_signal_handler(sig)
            except (ValueError, RuntimeError):
                pass

    def _reap(self) -> None:
        w = self.worker
        for pid, status in reap_orphans(self.pgids, exclude={w.pid} if w is not None and w.pid else set()):
            log.info("reaped orphan %d of a worker group (%s)", pid, ExitStatus.from_wait_status(status).describe())

    async def _next(self, timeout: float | None) -> tuple | None:
        if timeout is not None and timeout <= 0:
            try:
                return self.q.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self.q.get(), timeout)
        except asyncio.TimeoutError:
            return None

    # ------------------------------------------------------------------ startup checks
    async def _clear_leftovers(self) -> None:
        """A previous supervisor that was SIGKILLed may have left a worker that has not yet
        noticed the lifeline EOF. Only the very process recorded (PID + start time + boot id)
        is touched; stale .p / .runstate are simply replaced."""
        old = self.paths.read_state()
        ident = (old or {}).get("worker")
        if ident and identity_alive(ident):
            deadline = time.monotonic() + 2.0
            while identity_alive(ident) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if identity_alive(ident):
                log.warning("killing leftover worker %s of a dead supervisor", ident["pid"])
                try:
                    os.killpg(int(ident["pid"]), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.paths.remove_pid()

    # ------------------------------------------------------------------ main
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
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
            self._install_signal_handlers(loop)
        try:
            try:
                self.worker_cfg = self.paths.read_config()
            except (OSError, ValueError) as e:
                log.error("cannot read %s: %s", self.paths.config, e)
                return EXIT_USAGE
            self.cfg = SupervisorConfig.from_worker_config(self.worker_cfg)
            self.policy.reconfigure(self.cfg)
            self.quarantine = self.paths.read_quarantine(self.worker_cfg)
            self._open_log()
            await self._clear_leftovers()
            if self.sidecar_factory is not None:
                # Sidecars (sidecars/host.py SidecarHost): started here, messages are routed
                # through self.on_sidecar_message, stopped in the finally below.
                self.sidecars = self.sidecar_factory(self)
                await _maybe_await(self.sidecars.start())
            self.sm.fire("start")
            sd_task = asyncio.ensure_future(keepalive(self.notify, self._sd_probe))
            try:
                return await self._main()
            finally:
                sd_task.cancel()
        finally:
            if self.sidecars is not None:
                try:
                    await _maybe_await(self.sidecars.stop())
                except Exception as e:  # noqa: BLE001
                    log.warning("sidecar stop failed: %s", e)
            self._install_cancel.set()
            for t in list(self._installs):
                t.cancel()
            if self.install_signals:
                self._remove_signal_handlers(loop)
            if self.worker is not None and self.worker.alive:  # never leave it behind
                await self.worker.kill(self.cfg.kill_timeout)
            if self.worker is not None:
                self.worker.close()
            if self.fork is not None:
                self.fork.close()
                self.fork = None
            if self.listen_sock is not None:
                self.listen_sock.close()
                self.listen_sock = None
            self.reaper.close()
            self._flush_files()  # nothing may be written after the removals below
            self.paths.remove_pid()
            if self.sm.state in (State.STOPPED, State.STOPPING):
                self.paths.remove_runstate()
            self._write_state_now()
            if self.logfile is not None:
                self.logfile.close()

    def _sd_probe(self) -> Probe:
        h = self.health
        hb = self.worker_cfg.get("heartbeat_interval")
        return Probe(state=self.sm.state.value, heartbeat_last=h.last if h is not None else None,
                     busy_for=h.busy_for if h is not None else 0.0, heartbeat_timeout=self.cfg.heartbeat_timeout,
                     heartbeat_interval=float(hb) if isinstance(hb, (int, float)) and hb > 0 else 1.0)

    def _open_log(self) -> None:
        if self.logfile is not None:
            self.logfile.close()
        self.logfile = RotatingLog(self.paths.log_file(self.worker_cfg), self.cfg.log_max_bytes,
                                   self.cfg.log_backups, self.cfg.log_tail_lines)
        logging.getLogger("fn-supervise").setLevel(self.cfg.log_level)
        self._log_settings = (self.logfile.path, self.cfg.log_max_bytes, self.cfg.log_backups, self.cfg.log_level)

    def _apply_log_settings(self) -> None:
        want = (self.paths.log_file(self.worker_cfg), self.cfg.log_max_bytes, self.cfg.log_backups, self.cfg.log_level)
        if self.logfile is None or want == getattr(self, "_log_settings", None):
            return
        old = self.logfile.path
        try:
            self._open_log()
        except OSError as e:  # a bad location: keep the log we have, and say so there
            self.logfile = RotatingLog(old, self.cfg.log_max_bytes, self.cfg.log_backups, self.cfg.log_tail_lines)
            self.logfile.event(f"cannot open the log at {want[0]}: {e.strerror or e}; still logging here")
            return
        self.logfile.event(f"log settings applied: {want[0]}, level {want[3]}, {want[1]} bytes x {want[2]} backups"
                           + (f" (was {old})" if old != want[0] else ""))

    async def _main(self) -> int:
        while True:
            st = self.sm.state
            if st == State.PREPARING:
                await self._prepare()
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

    def _signal_intent(self, sig: int) -> str:
        return "restart" if sig == signal.SIGHUP else "stop"

    def _handle_control(self, ev: tuple) -> bool:
        """Signals outside a running worker. True if the state changed."""
        if ev[0] != "signal":
            return False
        intent = self._signal_intent(ev[1])
        name = signal.Signals(ev[1]).name
        if intent == "stop":
            self.sm.fire("stop", f"{name} received")
        else:
            self.policy.reset()
            if self.sm.state == State.PREPARING:
                return False  # already (re)preparing
            self.sm.fire("restart", f"{name}: restart with re-read config")
        return True

    async def _prepare(self) -> None:
        try:
            self.worker_cfg = self.paths.read_config()
        except (OSError, ValueError) as e:
            self.exit_code = EXIT_USAGE
            self.sm.fire("prepare_failed", f"cannot read config: {e}")
            return
        self.cfg = SupervisorConfig.from_worker_config(self.worker_cfg)
        self.policy.reconfigure(self.cfg)
        self._apply_log_settings()  # a SIGHUP restart takes changed log settings too
        problem = tls_config_error(self.worker_cfg) or memory.config_error(self.cfg.memory_max)
        if problem is not None:  # a bad cert or memory_max can never work: FATAL, not a crash loop
            self.exit_code = EXIT_USAGE
            self.sm.fire("prepare_failed", problem)
            return
        try:
            self._ensure_listener()
        except OSError as e:
            self.exit_code = EXIT_ENV
            self.sm.fire("prepare_failed", f"cannot listen: {e}")
            return
        data_dir = self.paths.data_dir(self.worker_cfg)
        data_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()

        def progress(message: str, fraction: float | None = None) -> None:
            loop.call_soon_threadsafe(self._prepare_progress, message, fraction)

        cancel = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(self.env.prepare, data_dir, self.worker_cfg, self.cfg,
                                                       progress, cancel))
        while not task.done():
            getter = asyncio.ensure_future(self.q.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                ev = getter.result()
                if ev[0] == "signal" and self._signal_intent(ev[1]) == "stop":
                    # environment.py kills its uv on cancel and builds beside the live venv,
                    # so nothing half-built is ever used. Bounded wait for it to unwind.
                    cancel.set()
                    await asyncio.wait({task}, timeout=self.cfg.stop_grace + self.cfg.term_timeout)
                    self.sm.fire("stop", f"{signal.Signals(ev[1]).name} received while preparing")
                    return
            else:
                getter.cancel()
        try:
            self.python, self.fingerprint = task.result()
        except PrepareError as e:
            self.exit_code = EXIT_ENV
            self.sm.fire("prepare_failed", str(e))
            return
        except Exception as e:  # noqa: BLE001
            self.exit_code = EXIT_ENV
            self.sm.fire("prepare_failed", f"environment error: {type(e).__name__}: {e}")
            return
        self._ensure_fork_server()
        self.sm.fire("prepared", f"python {self.python}")

    def _prepare_progress(self, message: str, fraction: float | None) -> None:
        detail = message if fraction is None else f"{message} ({fraction * 100:.0f}%)"
        try:
            self._runstate("starting", detail)
        except OSError:
            pass
        if self.logfile is not None:
            self.logfile.event(detail)
        self.notify.extend_timeout(EXTEND_STEP)  # a live venv build: systemd may wait longer

    def _worker_argv(self) -> tuple[list[str], dict[str, str]]:
        """`<python> -m <module> worker_<uuid> ...`; the fds (--control-fd, --listen-fd) are added
        by whoever starts it (WorkerProcess.spawn, or the fork server for its own fd numbers)."""
        argv = [self.python, "-m", self.cfg.worker_module, self.paths.name, "--dir", str(self.paths.base)]
        if self.port and not isinstance(self.worker_cfg.get("port"), int):
            # no port in the config (the worker chose one): pin it, so a restart comes back on it
            argv += ["--port", str(self.port)]
        if self.quarantine:
            argv += ["--quarantine", json.dumps({k: str(v.get("reason") or "quarantined")
                                                 for k, v in self.quarantine.items()})]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["FUNCNODES_CONFIG_DIR"] = str(self.paths.base)
        env["FN_SUPERVISE_PID"] = str(os.getpid())
        if os.path.realpath(self.python) == os.path.realpath(sys.executable):
            pp = env.get("PYTHONPATH")
            root = project_root()
            env["PYTHONPATH"] = root + (os.pathsep + pp if pp else "")
        return argv, env

    async def _run_worker(self) -> None:
        argv, env = self._worker_argv()
        w = WorkerProcess(argv, env=env, cwd=str(self.paths.data_dir(self.worker_cfg)), logfile=self.logfile,
                          on_frame=lambda m, _w=None: None, on_exit=lambda wp: self._event("exit", wp),
                          on_eof=lambda wp: self._event("eof", wp), reaper=self.reaper,
                          listen_fd=self.listen_sock.fileno() if self.listen_sock is not None else None)
        w.on_frame = lambda m: self._event("frame", w, m)
        oom_before = oom_kill_count()
        self.restart_clock["launch"] = time.monotonic()
        try:
            await self._launch(w)
        except OSError as e:
            self.logfile.event(f"spawn failed: {e}")
            self._after_exit(None, was_ready=False, reason="start_failed", detail=f"spawn failed: {e}",
                             status=ExitStatus(code=127), oom_before=None)
            return
        self.worker = w
        self.pgids.add(w.pgid)
        self.policy.on_spawn()
        self._watch_memory(w)
        self.logfile.event(f"worker {'forked' if w.launch == 'fork' else 'spawned'} in {w.launch_time:.3f}s: "
                           f"pid {w.pid}: {' '.join(argv)}")
        self._runstate("starting", f"worker process {w.pid} started")
        self.write_state()
        health = HeartbeatMonitor(self.cfg.heartbeat_timeout)
        self.health = health
        ready = False
        start_deadline = time.monotonic() + self.cfg.start_timeout
        eof_at: float | None = None
        kill_reason: tuple[str, str] | None = None
        deliberate: str | None = None
        stable_noted = False
        in_flight: list[str] = []  # nodes running now, in start order (worker/quarantine.py)
        while True:
            now = time.monotonic()
            if kill_reason is not None:
                deadline = now + self.cfg.kill_timeout + 1.0
            else:
                deadline = health.deadline() if ready else start_deadline
                if eof_at is not None:
                    deadline = min(deadline, eof_at + self.cfg.eof_grace)
                if ready and not stable_noted:
                    deadline = min(deadline, (self.policy.ready_at or now) + self.cfg.min_uptime + 0.01)
            ev = await self._next(deadline - now)
            if ev is None:
                now = time.monotonic()
                if kill_reason is not None:
                    # SIGKILL did not end it (uninterruptible sleep?): abandon, never hang here.
                    log.error("worker %s did not die after SIGKILL; abandoning it", w.pid)
                    w.close()
                    self._after_exit(w, was_ready=ready, reason=kill_reason[0], detail=kill_reason[1] + "; unkillable",
                                     status=ExitStatus(), oom_before=oom_before,
                                     node=in_flight[-1] if in_flight else health.node, suspects=in_flight)
                    return
                if eof_at is not None and now >= eof_at + self.cfg.eof_grace:
                    kill_reason = ("crashed", "control channel closed without exit")
                elif ready and now >= health.deadline():
                    kill_reason = ("hung", health.describe())
                elif not ready and now >= start_deadline:
                    kill_reason = ("start_timeout", f"not ready within {self.cfg.start_timeout:g}s")
                else:
                    if ready and self.policy.check_stable():
                        stable_noted = True
                        self.write_state()  # counters were reset after a stable period
                    continue
                self.logfile.event(f"killing worker {w.pid}: {kill_reason[1]}")
                w.signal(signal.SIGKILL)
                continue
            kind = ev[0]
            if kind == "signal":
                intent = self._signal_intent(ev[1])
                name = signal.Signals(ev[1]).name
                if intent == "stop":
                    self.sm.fire("stop", f"{name} received")
                    await self._stop_worker("stop")
                else:
                    self.restarting = True
                    try:
                        self.sm.fire("stop", f"{name}: restart with re-read config")
                        await self._stop_worker("restart")
                        self.policy.reset()
                        self.sm.fire("restart", f"{name}: restart with re-read config")
                    finally:
                        self.restarting = False
                return
            if kind == "sidecar":
                self._route_sidecar(ev[1])
                continue
            if len(ev) > 1 and ev[1] is not w:
                continue  # stale event of an earlier worker
            if kind == "frame":
                msg = ev[2]
                t = msg.get("type")
                if t == "heartbeat":
                    health.beat(msg)
                    if ready:
                        self._keep_pidfile(w.pid)
                elif t == "ready" and not ready:
                    ready = True
                    self._on_worker_ready(w, msg)
                    health.arm()
                elif t == "in_flight":  # at once when a node starts or ends, not at the next beat
                    nodes = msg.get("nodes")
                    in_flight = [str(n) for n in nodes] if isinstance(nodes, list) else []
                elif t == "runstate" and not ready:
                    detail = str(msg.get("detail") or "")
                    if detail == "Loading nodespace":
                        self.restart_clock["graph"] = time.monotonic()
                    self._runstate("starting", detail)
                elif t == "journal":  # a full disk: edits refused until it has room (worker/store.py)
                    self.journal = None if msg.get("writable") else msg
                    self.logfile.event(f"journal: {msg.get('reason') or 'writable again'}")
                    self.write_state()
                elif t == "lift_quarantine":
                    self._lift(str(msg.get("node")), "a client")
                elif t == "stopping":
                    deliberate = str(msg.get("reason") or "stopping")
                    self.logfile.event(f"worker is stopping on its own: {deliberate}")
                elif t == "install":
                    self._start_install(w, msg)
                else:
                    log.debug("unhandled frame %s", t)
            elif kind == "memory" and kill_reason is None:  # over memory_max: _watch_memory
                kill_reason = ("memory_limit", ev[2])
                self.logfile.event(f"killing worker {w.pid}: {ev[2]}")
                w.signal(signal.SIGKILL)
            elif kind == "eof":
                if w.alive and eof_at is None:
                    eof_at = time.monotonic()
            elif kind == "exit":
                status: ExitStatus = w.status  # type: ignore[assignment]
                self.paths.remove_pid()
                if deliberate is not None and status.code == 0:
                    self.logfile.event(f"worker exited 0 after a deliberate stop ({deliberate})")
                    self.sm.fire("stop", f"worker stopped: {deliberate}")
                    self.worker = None
                    return
                if kill_reason is not None:
                    reason, detail = kill_reason
                else:
                    reason = "crashed" if ready else "start_failed"
                    detail = status.describe()
                    if not ready and status.code == WORKER_START_FAILURE:
                        detail += " (worker start failure)"
                self._after_exit(w, was_ready=ready, reason=reason, detail=detail, status=status,
                                 oom_before=oom_before, node=in_flight[-1] if in_flight else health.node,
                                 first_sign=eof_at, suspects=in_flight)
                return

    def _watch_memory(self, w: WorkerProcess) -> None:
        """memory_max (supervisor/memory.py): tell the worker at 80 %, kill its group at 100 %."""
        limit = memory.parse_size(self.cfg.memory_max)
        if limit is None:
            return

        def on_decision(d: memory.MemoryDecision) -> None:
            if d.action == "kill":
                self._event("memory", w, d.detail)
            else:
                self.logfile.event(d.detail or f"memory back to {memory.fmt(d.rss)}")
                if w.alive:
                    w.send({"type": "memory", "level": d.action, "rss": d.rss, "limit": d.limit})
        self.memory_watch = memory.MemoryWatch(w.pid, memory.MemoryPolicy(limit), self.cfg.memory_interval,
                                               on_decision, alive=lambda: w.alive)

    def _keep_pidfile(self, pid: int) -> None:
        """The Workermanager deletes .p whenever one of its probes fails (e.g. while a node is
        busy); like the stock worker, put it back while the worker runs."""
        try:
            if self.paths.pidfile.read_text().strip() == str(pid):
                return
        except OSError:
            pass
        try:
            self.paths.write_pid(pid)
        except OSError as e:
            log.warning("cannot rewrite %s: %s", self.paths.pidfile, e)

    def _on_worker_ready(self, w: WorkerProcess, msg: dict[str, Any]) -> None:
        host = msg.get("host")
        port = msg.get("port")
        self.host = str(host) if host else self.host
        if isinstance(port, int):
            self.port = port
        self.ready_wall = time.time()
        self.journal = None  # a new worker reports its own
        self.policy.on_ready()
        self._note_restart_phases(w)
        self.paths.write_pid(w.pid)
        self.sm.fire("ready", f"pid {w.pid} listening on {tls_scheme(self.worker_cfg)}://{self.host}:{self.port}/")
        if self.sidecars is not None and hasattr(self.sidecars, "on_worker_ready"):
            self.sidecars.on_worker_ready()
        self._check_update_after_ready()
        if not self.ready_once:
            self.notify.ready()
        self.ready_once = True
        if self.on_ready_cb is not None:
            try:
                self.on_ready_cb(self.host or "127.0.0.1", self.port or 0)
            except Exception as e:  # noqa: BLE001
                log.warning("on_ready callback failed: %s", e)

    # ------------------------------------------------------------------ restart phases
    def _note_restart_phases(self, w: WorkerProcess) -> None:
        """Seconds per phase of the restart that just became ready: detect (first sign of the
        death -> handled), delay (handled -> launch: the backoff the policy chose, `backoff`, plus
        bookkeeping), fork|spawn (-> a pid), boot (pid -> graph load starts: imports, packages),
        graph_load (-> ready), total (first sign -> ready)."""
        rc, self.restart_clock = self.restart_clock, {}
        if "first" not in rc or w.spawned_at is None:
            return
        now = time.monotonic()
        graph = rc.get("graph", now)
        launch = rc.get("launch", w.spawned_at)
        r = {"launch": w.launch, "detect": round(rc["handled"] - rc["first"], 4),
             "delay": round(max(0.0, launch - rc["handled"]), 4), "backoff": round(rc.get("backoff", 0.0), 4),
             str(w.launch): round(w.launch_time or 0.0, 4),
             "boot": round(max(0.0, graph - w.spawned_at), 4), "graph_load": round(max(0.0, now - graph), 4),
             "total": round(now - rc["first"], 4), "pid": w.pid}
        self.last_restart = r
        if self.crashes:
            self.crashes[-1]["restart"] = r
        self.logfile.event("restart phases: " + ", ".join(f"{k} {v}" for k, v in r.items()))

    # ------------------------------------------------------------------ listening socket
    def _ensure_listener(self) -> None:
        """Bind (or keep) the worker's port. A busy port walks to the next free one up to
        FUNCNODES_WS_WORKER_ENDPORT; the port taken is written to the worker config before the
        worker (or a Workermanager) reads it."""
        if self.listen_systemd:
            addr_host, port = listener.address(self.listen_sock)
            self.host = str(self.worker_cfg.get("host") or addr_host)
            self.port = port
            if self.worker_cfg.get("port") != port:  # clients (a Workermanager) look it up there
                log.info("%s: serving on port %s from systemd socket activation", self.paths.name, port)
                self.worker_cfg = self.paths.update_config(port=port)
            return
        host = str(self.worker_cfg.get("host") or "127.0.0.1")
        want = self.worker_cfg.get("port")
        if not isinstance(want, int) or isinstance(want, bool) or want <= 0:
            want = int(os.environ.get("FUNCNODES_WS_WORKER_STARTPORT", 9382))
        if self.listen_sock is not None:
            if self.host == host and listener.address(self.listen_sock)[1] == want:
                return
            self.listen_sock.close()  # the config names another address now (SIGHUP)
            self.listen_sock = None
        self.listen_sock = listener.bind(host, want)
        port = listener.address(self.listen_sock)[1]
        self.host, self.port = host, port
        if self.worker_cfg.get("port") != port:
            log.warning("%s: port %s is busy, listening on %s instead", self.paths.name, want, port)
            self.worker_cfg = self.paths.update_config(port=port)

    # ------------------------------------------------------------------ fork server
    def _fork_key(self) -> str:
        return json.dumps([self.python, self.fingerprint, self.worker_cfg.get("package_dependencies") or {}],
                          sort_keys=True, default=str)

    def _ensure_fork_server(self) -> None:
        """A warm fork server for the current environment (replaced when it changed)."""
        if not self.cfg.fork_server or self.cfg.worker_module != "worker":
            if self.fork is not None:
                self.fork.close()
                self.fork = None
            return
        if self.fork is not None and self.fork.alive and self.fork.key == self._fork_key():
            return
        self.fork_failures = 0  # a new environment gets a fresh chance
        self.fork_given_up_key = None
        self._replace_fork_server("environment changed" if self.fork is not None else "first start")

    def _replace_fork_server(self, why: str) -> None:
        if self.fork is not None:
            self.fork.close()
            self.fork = None
        if not self.cfg.fork_server or self.cfg.worker_module != "worker":
            return
        if self.fork_given_up_key == self._fork_key():
            return  # this environment's fork servers keep dying: spawn until it changes
        _, env = self._worker_argv()
        fs = ForkServer(self.python, env=env, cwd=str(self.paths.data_dir(self.worker_cfg)),
                        deps=dict(self.worker_cfg.get("package_dependencies") or {}), key=self._fork_key(),
                        worker=self.paths.name,
                        log_path=str(self.paths.log_file(self.worker_cfg)))
        fs.on_ready = self.write_state
        try:
            fs.start()
        except OSError as e:
            log.warning("%s: cannot start a fork server (%s); workers are spawned", self.paths.name, e)
            return
        self.fork = fs
        if self.logfile is not None:
            self.logfile.event(f"fork server {fs.pid} started ({why})")

    async def _launch(self, w: WorkerProcess) -> None:
        """From the fork server when it can deliver, else a plain spawn (logged)."""
        fs = self.fork
        if fs is not None:
            if not fs.ready and fs.alive:
                # The first start waits for the preload (a spawn would import the same); a restart
                # never waits for a server that is still warming up.
                await fs.wait_ready(min(self.cfg.start_timeout, 60.0) if not self.ready_once else 0.0)
            if fs.ready:
                try:
                    await w.spawn_forked(fs)
                    self.launches["fork"] += 1
                    self.fork_failures = 0
                    return
                except ForkError as e:
                    why = f"fork server {fs.pid} failed: {e}"
            elif not fs.alive:
                why = f"fork server {fs.pid} is dead ({fs.proc.returncode if fs.proc else '?'})"
            else:
                why = f"fork server {fs.pid} is still preloading"
            log.warning("%s: %s; spawning instead", self.paths.name, why)
            self.logfile.event(f"{why}; spawning instead")
            if not fs.alive or fs.ready:  # ready but failed (e.g. its venv was swapped), or dead
                self.fork_failures += 1
                if self.fork_failures >= FORK_GIVE_UP:
                    self.fork_given_up_key = self._fork_key()
                    self.logfile.event(f"{self.fork_failures} fork servers in a row failed: workers are "
                                       "spawned until the environment changes")
                self._replace_fork_server(why)
        w.spawn()
        self.launches["spawn"] += 1

    # ------------------------------------------------------------------ safe mode
    def _quarantine(self, node: str, rec: CrashRecord) -> None:
        n = self.cfg.quarantine_after
        reason = (f"{n} crashes with this node in flight (last: {rec.reason}, "
                  f"{rec.signal_name or f'exit code {rec.exit_code}'})")
        self.quarantine[node] = {"reason": reason, "since": time.time(), "crashes": n}
        self._save_quarantine()
        log.warning("%s: SAFE MODE: node %s quarantined: %s", self.paths.name, node, reason)
        self.logfile.event(f"safe mode: node {node} quarantined: {reason}; "
                           f"lift with `fn-supervise lift {self.paths.name} {node}`")

    def _save_quarantine(self) -> None:
        try:
            self.paths.write_quarantine(self.quarantine, self.worker_cfg)
        except OSError as e:
            log.warning("cannot write %s: %s", self.paths.quarantine_file(self.worker_cfg), e)

    def _lift(self, node: str, who: str) -> None:
        if node not in self.quarantine:
            self.logfile.event(f"{who} asked to lift node {node}, which is not quarantined")
            return
        del self.quarantine[node]
        self.policy.lift(node)
        self._save_quarantine()
        self.logfile.event(f"{who} lifted the quarantine of node {node}")
        log.info("%s: quarantine of node %s lifted by %s", self.paths.name, node, who)
        if who != "a client" and self.worker is not None and self.worker.alive:
            self.worker.send({"type": "quarantine",
                              "nodes": {k: str(v.get("reason")) for k, v in self.quarantine.items()}})
        self.write_state()

    def _lift_requested(self) -> None:
        """SIGUSR1 from `fn-supervise lift`: the node ids are in <workers>/worker_<uuid>.lift."""
        taken = self.paths.lift_requests.with_name(self.paths.lift_requests.name + ".taken")
        try:
            os.replace(self.paths.lift_requests, taken)
            nodes = taken.read_text().split()
            taken.unlink()
        except OSError:
            return
        for node in nodes:
            self._lift(node, "fn-supervise lift")

    def _after_exit(self, w: WorkerProcess | None, *, was_ready: bool, reason: str, detail: str,
                    status: ExitStatus, oom_before: int | None, node: str | None = None,
                    first_sign: float | None = None, suspects: list[str] | None = None) -> None:
        now = time.monotonic()
        self.restart_clock = {"first": min(first_sign or now, now), "handled": now}
        self.paths.remove_pid()
        uptime = None
        if w is not None and w.spawned_at is not None:
            uptime = time.monotonic() - w.spawned_at
        rec: CrashRecord = make_record(
            status=status, reason=reason, phase="run" if was_ready else "start",
            we_signalled=w.signalled if w is not None else set(),
            oom_before=oom_before, oom_after=oom_kill_count(), uptime=uptime, node=node,
            pid=w.pid if w is not None else None,
            last_lines=list(self.logfile.tail) if self.logfile else [], detail=detail, in_flight=suspects)
        self.crashes.append(rec.to_json())
        del self.crashes[:-max(1, self.cfg.crash_history)]
        self.logfile.event(f"worker {rec.pid} {rec.summary()}")
        self.worker = None
        decision = self.policy.on_exit(was_ready=was_ready, reason=f"{reason}: {detail}", node=node,
                                       suspects=suspects, quarantined=frozenset(self.quarantine))
        self.restart_clock["backoff"] = decision.delay
        if decision.quarantine is not None:
            self._quarantine(decision.quarantine, rec)
        if decision.action == "fatal":
            self.exit_code = EXIT_FATAL
            self.sm.fire("give_up", decision.reason)
            return
        if not was_ready and status.code == WORKER_START_FAILURE:
            # The worker could not start (its config?): an unreadable config can never work.
            try:
                self.paths.read_config()
            except (OSError, ValueError) as e:
                self.exit_code = EXIT_USAGE
                self.sm.fire("give_up", f"cannot read {self.paths.config}: {e}")
                return
        self.backoff_until = time.monotonic() + decision.delay
        self.sm.fire("crashed" if was_ready else "start_failed",
                     f"{reason}: {detail}; restart in {decision.delay:.2f}s")

    async def _backoff(self) -> None:
        while True:
            remaining = (self.backoff_until or 0) - time.monotonic()
            ev = await self._next(remaining)
            if ev is None:
                self.backoff_until = None
                self.sm.fire("retry", f"restart #{self.policy.total_restarts}")
                return
            if self._handle_control(ev):
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
        self.last_stop_stage = stage
        return stage

    # ------------------------------------------------------------------ installs
    def _start_install(self, w: WorkerProcess, msg: dict[str, Any]) -> None:
        t = asyncio.ensure_future(self._install(w, msg))
        self._installs.add(t)
        t.add_done_callback(self._installs.discard)

    async def _install(self, w: WorkerProcess, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        if self.env.no_venv or not self.cfg.venv or self.cfg.python:
            await self._install_in_place(w, msg)
            return
        loop = asyncio.get_running_loop()

        def progress(message: str, fraction: float | None = None) -> None:
            loop.call_soon_threadsafe(w.send, {"type": "install_progress", "id": rid, "message": message,
                                               "progress": fraction})

        # One install at a time, each on top of every dependency installed so far: a second
        # package must not build a venv without the first.
        async with self._install_lock:
            deps = dict(self.worker_cfg.get("package_dependencies") or {})
            for d in msg.get("deps") or []:
                if isinstance(d, dict) and d.get("package"):
                    deps[str(d["package"])] = {k: v for k, v in d.items() if v is not None}
            try:
                self.python, self.fingerprint = await asyncio.to_thread(
                    self.env.install, self.paths.data_dir(self.worker_cfg), deps, progress, self._install_cancel)
            except Exception as e:  # noqa: BLE001  (InstallError and anything else: never a crash)
                self.logfile.event(f"install failed: {e}")
                w.send({"type": "install_result", "id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})
                return
            self.worker_cfg["package_dependencies"] = deps
        self._replace_fork_server("environment changed by an install")  # its imports are stale now
        self.write_state()
        w.send({"type": "install_result", "id": rid, "ok": True, "error": None})

    async def _install_in_place(self, w: WorkerProcess, msg: dict[str, Any]) -> None:
        """No venv of its own (--no-venv, venv=false, python=...): install into the interpreter
        the worker runs in, one install at a time, progress to the worker, failures as results."""
        rid = msg.get("id")
        loop = asyncio.get_running_loop()

        def progress(message: str, fraction: float | None = None) -> None:
            loop.call_soon_threadsafe(w.send, {"type": "install_progress", "id": rid, "message": message,
                                               "progress": fraction})

        deps = {str(d["package"]): {k: v for k, v in d.items() if v is not None}
                for d in msg.get("deps") or [] if isinstance(d, dict) and d.get("package")}
        async with self._install_lock:
            try:
                from . import environment  # noqa: PLC0415 (lazy, as in Environment)

                done = await asyncio.to_thread(environment.install_into_interpreter, self.python or sys.executable,
                                               deps, progress=progress, cancel=self._install_cancel)
            except Exception as e:  # noqa: BLE001  (InstallError and anything else: never a crash)
                self.logfile.event(f"install failed: {e}")
                w.send({"type": "install_result", "id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})
                return
            self.logfile.event(f"installed into {self.python or sys.executable}: {', '.join(done) or 'nothing'}")
            self.worker_cfg.setdefault("package_dependencies", {}).update(deps)
        self.write_state()
        w.send({"type": "install_result", "id": rid, "ok": True, "error": None})

    def _check_update_after_ready(self) -> None:
        """update_on_startup: once per supervisor run, after ready, build an updated venv aside
        (supervisor/environment.py check_update); the next prepare takes it. Never delays or
        fails a start: it runs in a thread, and its outcome only goes to the log and status."""
        if getattr(self, "_update_task", None) is not None or self.env.no_venv or not self.cfg.venv \
                or self.cfg.python:
            return
        flags = self.worker_cfg.get("update_on_startup")
        from . import environment  # noqa: PLC0415 (lazy, as in Environment)

        if not environment.update_wanted(flags):
            return
        data_dir = self.paths.data_dir(self.worker_cfg)
        deps = dict(self.worker_cfg.get("package_dependencies") or {})

        async def check() -> None:
            self.logfile.event("update_on_startup: checking for newer packages in the background")
            try:
                st = await asyncio.to_thread(environment.check_update, data_dir, deps, flags,
                                             python=sys.executable, cancel=self._install_cancel)
            except Exception as e:  # noqa: BLE001 (never a crash)
                st = {"state": "failed", "error": f"{type(e).__name__}: {e}"}
            if self._install_cancel.is_set():
                return  # stopping: the log may be closed already
            self.logfile.event(f"update_on_startup: {environment.describe_update(data_dir) or st.get('state')}")

        self._update_task = asyncio.ensure_future(check())

    # ------------------------------------------------------------------ sidecars
    def on_sidecar_message(self, msg: dict[str, Any]) -> None:
        """Callback for SidecarHost (any thread): queued, handled in the loop."""
        self._loop.call_soon_threadsafe(self._event, "sidecar", msg)

    def _route_sidecar(self, msg: dict[str, Any]) -> None:
        """Discovery events and the monitor address go to the worker as channel frames."""
        if self.worker is not None and self.worker.alive and isinstance(msg, dict) and "type" in msg:
            self.worker.send(msg)


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
