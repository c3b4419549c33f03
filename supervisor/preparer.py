"""The PREPARING phase of one Supervisor: re-read the config, hold the worker's port, build (or
check) the environment in a thread while signals are still read, and say how a worker is
launched (argv, env, the launcher's spec).

Moved out of runner.py as it was; it reaches the Supervisor only through public attributes
(paths, cfg, worker_cfg, policy, env, inbox, sm, launcher, the listening socket, host and port)
and the two callables it is given, so runner.py stays the one owner of Supervisor's privates.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any, Awaitable, Callable

from worker.tls import config_error as tls_config_error

from . import listener, memory
from .attempt import Signal
from .config import SupervisorConfig
from .launcher import LaunchSpec, worker_command, worker_env
from .systemd import EXTEND_STEP

log = logging.getLogger("fn-supervise")

# Exit codes of `fn-supervise run` the preparing phase can end with (runner.py lists them all).
EXIT_USAGE = 2
EXIT_ENV = 5


class PrepareError(Exception):
    """The environment could not be prepared (its own error class: never a crash)."""


class Preparer:
    def __init__(self, sup: Any, on_signal: Callable[[int], Awaitable[bool]],
                 apply_log_settings: Callable[[], None]):
        self.sup = sup
        self.on_signal = on_signal  # -> True when the phase ends (runner's per-state signal table)
        self.apply_log_settings = apply_log_settings

    async def prepare(self) -> None:
        sup = self.sup
        try:
            sup.worker_cfg = sup.paths.read_config()
        except (OSError, ValueError) as e:
            self._failed(EXIT_USAGE, f"cannot read config: {e}")
            return
        sup.cfg = SupervisorConfig.from_worker_config(sup.worker_cfg)
        sup.policy.reconfigure(sup.cfg)
        self.apply_log_settings()  # a SIGHUP restart takes changed log settings too
        problem = tls_config_error(sup.worker_cfg) or memory.config_error(sup.cfg.memory_max)
        if problem is not None:  # a bad cert or memory_max can never work: FATAL, not a crash loop
            self._failed(EXIT_USAGE, problem)
            return
        try:
            self.ensure_listener()
        except OSError as e:
            self._failed(EXIT_ENV, f"cannot listen: {e}")
            return
        data_dir = sup.paths.data_dir(sup.worker_cfg)
        data_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()

        def progress(message: str, fraction: float | None = None) -> None:
            loop.call_soon_threadsafe(self.progress, message, fraction)

        cancel = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(sup.env.prepare, data_dir, sup.worker_cfg, sup.cfg,
                                                       progress, cancel))
        if await self._signals_until(task, cancel):
            return
        try:
            sup.python, sup.fingerprint = task.result()
        except PrepareError as e:
            self._failed(EXIT_ENV, str(e))
            return
        except Exception as e:  # noqa: BLE001
            self._failed(EXIT_ENV, f"environment error: {type(e).__name__}: {e}")
            return
        sup.launcher.prepare(self.launch_spec())
        sup.sm.fire("prepared", f"python {sup.python}")

    async def _signals_until(self, task: asyncio.Future, cancel: threading.Event) -> bool:
        """Read signals while the environment is built. -> True when one ended the phase."""
        while not task.done():
            getter = asyncio.ensure_future(self.sup.inbox.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                ev = getter.result()
                if isinstance(ev, Signal) and ev.sig in (signal.SIGTERM, signal.SIGINT):
                    # environment.py kills its uv on cancel and builds beside the live venv,
                    # so nothing half-built is ever used. Bounded wait for it to unwind.
                    cancel.set()
                    await asyncio.wait({task}, timeout=self.sup.cfg.stop_grace + self.sup.cfg.term_timeout)
                if isinstance(ev, Signal) and await self.on_signal(ev.sig):
                    return True
            else:
                getter.cancel()
        return False

    def _failed(self, code: int, reason: str) -> None:
        self.sup.exit_code = code
        self.sup.sm.fire("prepare_failed", reason)

    def progress(self, message: str, fraction: float | None) -> None:
        sup = self.sup
        detail = message if fraction is None else f"{message} ({fraction * 100:.0f}%)"
        try:
            sup.files.runstate("starting", detail)
        except OSError:
            pass
        if sup.logfile is not None:
            sup.logfile.event(detail)
        sup.notify.extend_timeout(EXTEND_STEP)  # a live venv build: systemd may wait longer

    # ------------------------------------------------------------------ listening socket
    def ensure_listener(self) -> None:
        """Bind (or keep) the worker's port (listener.hold); the port taken is written to the
        worker config before the worker (or a Workermanager) reads it."""
        sup = self.sup
        cfg = sup.worker_cfg
        if sup.listen_systemd:
            addr_host, sup.port = listener.address(sup.listen_sock)
            sup.host = str(cfg.get("host") or addr_host)
        else:
            host = str(cfg.get("host") or "127.0.0.1")
            want = listener.wanted_port(cfg.get("port"))
            sup.listen_sock = listener.hold(sup.listen_sock, host, want, same_host=sup.host == host)
            sup.host, sup.port = host, listener.address(sup.listen_sock)[1]
            if want != sup.port:
                log.warning("%s: port %s is busy, listening on %s instead", sup.paths.name, want, sup.port)
        if cfg.get("port") != sup.port:  # clients (a Workermanager) look it up there
            if sup.listen_systemd:
                log.info("%s: serving on port %s from systemd socket activation", sup.paths.name, sup.port)
            sup.worker_cfg = sup.paths.update_config(port=sup.port)

    # ------------------------------------------------------------------ launching
    def worker_argv(self) -> tuple[list[str], dict[str, str]]:
        sup = self.sup
        # no port in the config (the worker chose one): pin it, so a restart comes back on it
        pin = sup.port if sup.port and not isinstance(sup.worker_cfg.get("port"), int) else None
        argv = worker_command(sup.python, sup.cfg.worker_module, sup.paths.name, sup.paths.base, pin_port=pin,
                              quarantine=sup.quarantine.reasons())
        return argv, worker_env(sup.python, sup.paths.base)

    def launch_spec(self) -> LaunchSpec:
        sup = self.sup
        _, env = self.worker_argv()
        return LaunchSpec(python=sup.python, env=env, cwd=str(sup.paths.data_dir(sup.worker_cfg)),
                          deps=dict(sup.worker_cfg.get("package_dependencies") or {}), fingerprint=sup.fingerprint,
                          worker=sup.paths.name, log_path=str(sup.paths.log_file(sup.worker_cfg)),
                          forkable=sup.cfg.fork_server and sup.cfg.worker_module == "worker")
