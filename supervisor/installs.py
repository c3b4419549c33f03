"""Installs a running worker asks for (`install` frames), and update_on_startup's check.

One install at a time, each on top of every dependency installed so far (a second package must
not build a venv without the first); progress and the result go back to the worker as frames;
a failure is a result, never a crash. A worker with a venv of its own gets the venv rebuilt
(environment.install_into); one without (--no-venv, venv false, python=...) gets the packages
installed into the interpreter it runs in. Stopping sets `cancel`: uv is killed, not waited for.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any, Callable


def requested_deps(msg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{package: spec} of an install frame's `deps` (None values dropped, junk ignored)."""
    return {str(d["package"]): {k: v for k, v in d.items() if v is not None}
            for d in msg.get("deps") or [] if isinstance(d, dict) and d.get("package")}


class Installer:
    def __init__(self, env: Any, note: Callable[[str], None]):
        self.env = env          # runner.Environment: install() builds a venv with the deps
        self.note = note        # a line for the worker's log
        self.cancel = threading.Event()
        self.tasks: set[asyncio.Task] = set()
        self.lock: asyncio.Lock | None = None  # made in the loop that uses it
        self.update_task: asyncio.Future | None = None

    def start(self, w: Any, msg: dict[str, Any], *, in_place: bool, python: str, data_dir: Path,
              deps: Callable[[], dict[str, Any]],
              installed: Callable[[str | None, str | None, dict[str, Any]], None]) -> None:
        """deps(): the worker's dependencies now (read under the lock: after any earlier install).
        installed(python, fingerprint, deps) on success: python/fingerprint None when the
        packages went into the running interpreter (deps are then only the new ones)."""
        run = self._in_place(w, msg, python, installed) if in_place else \
            self._into_venv(w, msg, data_dir, deps, installed)
        t = asyncio.ensure_future(run)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------------ for a runner.Supervisor
    # (through its public attributes: env, cfg, python, fingerprint, paths, worker_cfg, launcher,
    # preparer, files)
    def start_for(self, sup: Any, w: Any, msg: dict[str, Any]) -> None:
        """An `install` frame of sup's worker: into its venv, or in place when it has none."""
        in_place = sup.env.no_venv or not sup.cfg.venv or bool(sup.cfg.python)
        self.start(w, msg, in_place=in_place, python=sup.python, data_dir=sup.paths.data_dir(sup.worker_cfg),
                   deps=lambda: dict(sup.worker_cfg.get("package_dependencies") or {}),
                   installed=lambda python, fingerprint, deps: self._installed(sup, python, fingerprint, deps))

    @staticmethod
    def _installed(sup: Any, python: str | None, fingerprint: str | None, deps: dict[str, Any]) -> None:
        if python is None:  # into the running interpreter: the environment is the same one
            sup.worker_cfg.setdefault("package_dependencies", {}).update(deps)
        else:
            sup.python, sup.fingerprint = python, fingerprint or ""
            sup.worker_cfg["package_dependencies"] = deps
            sup.launcher.prepare(sup.preparer.launch_spec(), "environment changed by an install")  # stale imports
        # Now, not soon: the worker hears "installed" right after this, and whoever it tells
        # must not read the fork server the install just replaced from the state file.
        sup.files.write_now()

    def check_update_for(self, sup: Any) -> None:
        """update_on_startup, after sup's worker is ready (only a venv of the supervisor's own)."""
        if sup.env.no_venv or not sup.cfg.venv or sup.cfg.python:
            return
        self.check_update(sup.worker_cfg.get("update_on_startup"), sup.paths.data_dir(sup.worker_cfg),
                          dict(sup.worker_cfg.get("package_dependencies") or {}))

    def stop(self) -> None:
        self.cancel.set()
        for t in list(self.tasks):
            t.cancel()

    def _progress(self, w: Any, rid: Any) -> Callable[[str, float | None], None]:
        loop = asyncio.get_running_loop()

        def progress(message: str, fraction: float | None = None) -> None:
            loop.call_soon_threadsafe(w.send, {"type": "install_progress", "id": rid, "message": message,
                                               "progress": fraction})
        return progress

    def _failed(self, w: Any, rid: Any, e: BaseException) -> None:
        self.note(f"install failed: {e}")
        w.send({"type": "install_result", "id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})

    async def _into_venv(self, w: Any, msg: dict[str, Any], data_dir: Path, deps: Callable[[], dict[str, Any]],
                         installed: Callable) -> None:
        rid = msg.get("id")
        progress = self._progress(w, rid)
        async with self._lock():
            want = {**deps(), **requested_deps(msg)}
            try:
                python, fingerprint = await asyncio.to_thread(self.env.install, data_dir, want, progress,
                                                              self.cancel)
            except Exception as e:  # noqa: BLE001  (InstallError and anything else: never a crash)
                self._failed(w, rid, e)
                return
            installed(python, fingerprint, want)
        w.send({"type": "install_result", "id": rid, "ok": True, "error": None})

    async def _in_place(self, w: Any, msg: dict[str, Any], python: str, installed: Callable) -> None:
        rid = msg.get("id")
        progress = self._progress(w, rid)
        deps = requested_deps(msg)
        async with self._lock():
            try:
                from . import environment  # noqa: PLC0415 (lazy, as in runner.Environment)

                done = await asyncio.to_thread(environment.install_into_interpreter, python or sys.executable,
                                               deps, progress=progress, cancel=self.cancel)
            except Exception as e:  # noqa: BLE001  (InstallError and anything else: never a crash)
                self._failed(w, rid, e)
                return
            self.note(f"installed into {python or sys.executable}: {', '.join(done) or 'nothing'}")
            installed(None, None, deps)
        w.send({"type": "install_result", "id": rid, "ok": True, "error": None})

    def _lock(self) -> asyncio.Lock:
        if self.lock is None:
            self.lock = asyncio.Lock()
        return self.lock

    def check_update(self, flags: Any, data_dir: Path, deps: dict[str, Any]) -> None:
        """update_on_startup: once per supervisor run, after ready, build an updated venv aside
        (environment.check_update); the next prepare takes it. Never delays or fails a start: it
        runs in a thread, and its outcome only goes to the log and the status."""
        if self.update_task is not None:
            return
        from . import environment  # noqa: PLC0415 (lazy, as in runner.Environment)

        if not environment.update_wanted(flags):
            return

        async def check() -> None:
            self.note("update_on_startup: checking for newer packages in the background")
            try:
                st = await asyncio.to_thread(environment.check_update, data_dir, deps, flags,
                                             python=sys.executable, cancel=self.cancel)
            except Exception as e:  # noqa: BLE001 (never a crash)
                st = {"state": "failed", "error": f"{type(e).__name__}: {e}"}
            if self.cancel.is_set():
                return  # stopping: the log may be closed already
            self.note(f"update_on_startup: {environment.describe_update(data_dir) or st.get('state')}")

        self.update_task = asyncio.ensure_future(check())
