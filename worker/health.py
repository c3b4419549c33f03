"""Heartbeat bookkeeping: loop lag, declared busy time, the node in flight.

Node code that knowingly blocks the event loop calls `worker.busy(seconds)` first, so the
supervisor does not take the silence for a hang.
"""

from __future__ import annotations

import time
from typing import Callable


class Health:
    def __init__(self) -> None:
        self.seq = 0
        self.busy_until = 0.0  # monotonic
        self.in_flight: dict[str, float] = {}  # node uuid -> start (monotonic), in start order
        self.lag = 0.0
        # Told at once when a node starts or ends (the nodes in start order): the supervisor
        # learns which node is running before the next heartbeat (set by the runtime).
        self.on_in_flight: Callable[[list[str]], None] | None = None

    def started(self, nid: str) -> None:
        self.in_flight[nid] = time.monotonic()
        self._in_flight_changed()

    def ended(self, nid: str) -> None:
        if self.in_flight.pop(nid, None) is not None:
            self._in_flight_changed()

    def _in_flight_changed(self) -> None:
        if self.on_in_flight is not None:
            self.on_in_flight(list(self.in_flight))

    MAX_BUSY = 3600.0  # a declaration cannot switch hang detection off for good

    def declare_busy(self, seconds: float) -> None:
        seconds = min(max(0.0, float(seconds)), self.MAX_BUSY)
        self.busy_until = max(self.busy_until, time.monotonic() + seconds)

    def busy_for(self) -> float | None:
        left = self.busy_until - time.monotonic()
        return round(left, 3) if left > 0 else None

    def node(self) -> str | None:
        items = list(self.in_flight.items())  # busy() may call this from a node's thread
        if not items:
            return None
        return min(items, key=lambda kv: kv[1])[0]

    def beat(self) -> dict:
        self.seq += 1
        return {"type": "heartbeat", "seq": self.seq, "lag": round(self.lag, 4), "busy_for": self.busy_for(), "node": self.node()}


HEALTH = Health()


def busy(seconds: float) -> None:
    """Declare that this worker will not answer for up to `seconds` (callable from any thread)."""
    from . import control

    HEALTH.declare_busy(seconds)
    if control.CURRENT is not None:
        control.CURRENT.send(HEALTH.beat())
