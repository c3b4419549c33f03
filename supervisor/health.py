"""Hang detection from the worker's heartbeats. Pure: the runner asks for the deadline.

The heartbeat comes from inside the worker's event loop, so a blocked loop stops it (the
uvicorn thread-pong mistake is avoided by construction). A node that knowingly blocks
declares `busy_for` seconds in its last heartbeat; the deadline then moves by that much.
Before the first heartbeat the deadline counts from the spawn (or ready) time.
"""

from __future__ import annotations

import time
from typing import Any, Callable


class HeartbeatMonitor:
    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic):
        self.timeout = timeout
        self.clock = clock
        self.last: float = clock()
        self.busy_for: float = 0.0
        self.seq: int | None = None
        self.lag: float | None = None
        self.node: str | None = None
        self.count = 0

    def arm(self) -> None:
        """Start counting now (on ready): the startup itself is under start_timeout."""
        self.last = self.clock()
        self.busy_for = 0.0

    def beat(self, msg: dict[str, Any]) -> None:
        self.last = self.clock()
        self.count += 1
        self.seq = msg.get("seq")
        lag = msg.get("lag")
        self.lag = float(lag) if isinstance(lag, (int, float)) else None
        busy = msg.get("busy_for")
        self.busy_for = float(busy) if isinstance(busy, (int, float)) and busy > 0 else 0.0
        node = msg.get("node")
        self.node = str(node) if node else None

    def deadline(self) -> float:
        return self.last + self.timeout + self.busy_for

    def overdue(self) -> float | None:
        """Seconds since the last heartbeat when past the deadline, else None."""
        now = self.clock()
        if now >= self.deadline():
            return now - self.last
        return None

    def describe(self) -> str:
        quiet = self.clock() - self.last
        s = f"no heartbeat for {quiet:.1f}s (timeout {self.timeout:g}s"
        if self.busy_for:
            s += f", declared busy {self.busy_for:g}s"
        return s + ")"
