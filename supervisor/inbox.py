"""The Supervisor's one event queue, and the one signal handler that feeds it.

gunicorn's arbiter: a signal handler decides nothing, it queues `Signal(sig)` and the loop reads
it in its own time (runner.Supervisor._on_signal says what each signal does in each state).
SIGCHLD is bookkeeping, not a decision: it reaps at once, without waiting for a loop that reads
the queue. Everything else (frames, EOF, exits, sidecar messages) is put here by its source.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Callable

from .attempt import Event, Signal

# The signals a per-worker supervisor handles, all through Inbox.signal_received.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)


class Inbox:
    def __init__(self, on_sigchld: Callable[[], None]):
        self.q: asyncio.Queue = asyncio.Queue()
        self.on_sigchld = on_sigchld

    def put(self, ev: Event) -> None:
        self.q.put_nowait(ev)

    async def get(self) -> Event:
        return await self.q.get()

    async def next(self, timeout: float | None) -> Event | None:
        """The next event, or None when `timeout` seconds pass first (<= 0: only what is there)."""
        if timeout is not None and timeout <= 0:
            try:
                return self.q.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self.q.get(), timeout)
        except asyncio.TimeoutError:
            return None

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.signal_received, sig)

    def signal_received(self, sig: int) -> None:
        """The one handler: no decision here (gunicorn's "just queue the signal")."""
        if sig == signal.SIGCHLD:
            self.on_sigchld()
        else:
            self.put(Signal(sig))

    def remove_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in SIGNALS:
            try:
                loop.remove_signal_handler(sig)
            except (ValueError, RuntimeError):
                pass
