"""The files a Supervisor keeps in step with its state: .runstate (the FuncNodes vocabulary) and
the state file (everything `fn-supervise status` shows), written soon rather than now.

The transitions of one turn of the loop (RUNNING -> BACKOFF -> STARTING on a crash) cost one
write each of .runstate and the state file, done while the next worker is being forked instead
of before: `soon()` schedules one flush on the loop (last one wins), `flush()` writes at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from .files import WorkerPaths

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
