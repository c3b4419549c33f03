"""The files a Supervisor keeps in step with its state: .runstate (the FuncNodes vocabulary) and
the state file (everything `fn-supervise status` shows), written soon rather than now.
`supervisor_record` builds the state file's content from a Supervisor's public attributes.

The transitions of one turn of the loop (RUNNING -> BACKOFF -> STARTING on a crash) cost one
write each of .runstate and the state file, done while the next worker is being forked instead
of before: `soon()` schedules one flush on the loop (last one wins), `flush()` writes at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

from . import listener
from .files import WorkerPaths, process_identity
from .states import State

log = logging.getLogger("fn-supervise")


class StateFiles:
    def __init__(self, paths: WorkerPaths, record: Callable[[], dict[str, Any]]):
        self.paths = paths
        self.record = record  # the state file's content now
        self.loop: asyncio.AbstractEventLoop | None = None  # None: every write is immediate
        self._due: dict[str, Any] = {}  # .runstate / state file writes of this turn
        self._handle: asyncio.Handle | None = None

    def runstate(self, state: str, detail: str = "") -> None:
        """.runstate, in the same deferred, last-one-wins write as the state file."""
        self._due["runstate"] = (state, detail)
        self.soon()

    def soon(self) -> None:
        self._due["state"] = True
        if self.loop is None:
            self.flush()
        elif self._handle is None:
            self._handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._handle = None
        due, self._due = self._due, {}
        if "runstate" in due:
            try:
                self.paths.write_runstate(*due["runstate"])
            except OSError as e:
                log.warning("cannot write runstate: %s", e)
        if due.get("state"):
            self.write_now()

    def write_now(self) -> None:
        try:
            self.paths.write_state(self.record())
        except OSError as e:
            log.warning("cannot write state file: %s", e)


def supervisor_record(sup: Any) -> dict[str, Any]:
    """The state file's content for a runner.Supervisor: everything `fn-supervise status` shows."""
    w = sup.worker
    alive = w is not None and w.alive
    lsock = sup.listen_sock
    return {
        "uuid": sup.paths.uuid, "state": sup.sm.state.value, "reason": sup.sm.reason,
        "since": time.time() - (time.monotonic() - sup.sm.since),
        "supervisor": process_identity(os.getpid()), "supervisor_started": sup.started_wall,
        "worker": process_identity(w.pid) if alive else None,
        "ready_at": sup.ready_wall if (alive and sup.sm.state == State.RUNNING) else None,
        "host": sup.host, "port": sup.port,
        "restarts": sup.policy.total_restarts, "consecutive_crashes": sup.policy.consecutive,
        "start_failures": sup.policy.start_failures, "crashes": sup.crashes[-sup.cfg.crash_history:],
        "env": {"python": sup.python, "fingerprint": sup.fingerprint},
        "backoff_until": (time.time() + max(0.0, sup.backoff_until - time.monotonic()))
        if sup.backoff_until else None,
        "stop_deadline": sup.cfg.stop_deadline(), "exit_code": sup.exit_code,
        "log": str(sup.paths.log_file(sup.worker_cfg)),
        "sidecars": sup.sidecars.status() if sup.sidecars is not None else [],
        "safe_mode": bool(sup.quarantine.nodes), "quarantine": sup.quarantine.nodes,
        "listen": {"fd_from": "systemd" if sup.listen_systemd else "supervisor",
                   "address": list(listener.address(lsock))} if lsock is not None else None,
        "fork_server": sup.launcher.status(), "launches": dict(sup.launches), "last_restart": sup.phases.last,
        "journal": sup.journal,
    }
