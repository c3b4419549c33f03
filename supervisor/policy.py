"""Restart policy for production: never give up on a worker that ran. Pure.

The anchors users trust never stop restarting a process that ran (supervisord restarts a
process past `startsecs` at once and without limit; Kubernetes backs off to 5 min and never
stops). So:

- A crash `min_uptime` or more after ready is a healthy run: restart at once (delay 0) and
  forget earlier failures (supervisord's RUNNING -> EXITED -> STARTING, PM2's min_uptime).
- A failed start, or a crash within `min_uptime` of ready, backs off: the n-th such failure in
  a row waits min(cap, base * factor**(n-1)) with +-jitter, never above cap.
- FATAL only for what can never work: `start_budget` failed starts in a row of a worker that
  has *never* been ready (it cannot import, its config is bad). A worker that was ever ready
  is never FATAL; a failing start after that keeps backing off at the cap.
- Safe mode: when `quarantine_after` crashes after ready within `run_window` all had the same
  node in flight, that node is quarantined (Decision.quarantine): the next worker loads the
  graph but never runs that node. With several nodes in flight at a crash (`suspects`), the
  node in flight at every one of those crashes counts; among several, the newest one of the
  last crash (a node that kills the process at once is the last one started). Lifting
  (`lift`) forgets that node's crashes.

Time comes from an injectable monotonic clock, so a wall-clock jump changes nothing.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .config import SupervisorConfig


@dataclass
class Decision:
    action: str  # "restart" | "fatal"
    delay: float = 0.0
    reason: str = ""
    quarantine: str | None = None  # node id to quarantine before the restart
    healthy_run: bool = False      # the crash followed a run of min_uptime or more


class RestartPolicy:
    def __init__(self, cfg: SupervisorConfig, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random):
        self.cfg = cfg
        self.clock = clock
        self.rng = rng
        self.consecutive = 0          # failures (failed starts, early crashes) in a row
        self.start_failures = 0       # consecutive failed starts
        self.ever_ready = False       # once true, never FATAL
        self.run_crashes: deque[tuple[float, tuple[str, ...]]] = deque()  # (time, nodes in flight, newest last)
        self.total_restarts = 0
        self.started_at: float | None = None
        self.ready_at: float | None = None

    # lifecycle notifications -------------------------------------------------
    def reconfigure(self, cfg: SupervisorConfig) -> None:
        self.cfg = cfg

    def on_spawn(self) -> None:
        self.started_at = self.clock()
        self.ready_at = None

    def on_ready(self) -> None:
        self.ready_at = self.clock()
        self.ever_ready = True

    def uptime(self) -> float | None:
        """Seconds since ready of the current worker, None before ready."""
        return None if self.ready_at is None else self.clock() - self.ready_at

    def check_stable(self) -> bool:
        """True (and failures forgotten) once the current worker ran min_uptime past ready."""
        up = self.uptime()
        if up is not None and up >= self.cfg.min_uptime:
            self.consecutive = 0
            self.start_failures = 0
            return True
        return False

    def reset(self) -> None:
        """A manual restart clears FATAL and all counters (quarantine history included)."""
        self.consecutive = 0
        self.start_failures = 0
        self.run_crashes.clear()

    def lift(self, node: str) -> None:
        """The user lifted a quarantine: that node's earlier crashes no longer count."""
        self.run_crashes = deque((t, tuple(x for x in ns if x != node)) for t, ns in self.run_crashes)

    # decisions -----------------------------------------------------------------
    def delay_for(self, n: int) -> float:
        c = self.cfg
        raw = min(c.backoff_cap, c.backoff_base * (c.backoff_factor ** max(0, n - 1)))
        spread = raw * c.backoff_jitter * (2.0 * self.rng() - 1.0)
        return max(0.0, min(c.backoff_cap, raw + spread))

    def on_exit(self, *, was_ready: bool, reason: str, node: str | None = None,
                suspects: list[str] | tuple[str, ...] | None = None,
                quarantined: frozenset[str] | set[str] = frozenset()) -> Decision:
        now = self.clock()
        healthy = was_ready and self.check_stable()
        if not was_ready:
            self.consecutive += 1
            self.start_failures += 1
            if not self.ever_ready and self.start_failures >= self.cfg.start_budget:
                return Decision("fatal", reason=f"{self.start_failures} failed starts in a row and never ready "
                                                 f"(start_budget {self.cfg.start_budget}); last: {reason}")
            return self._restart(reason)
        self.start_failures = 0
        nodes = tuple(suspects or ())
        if node is not None and node not in nodes:
            nodes += (node,)
        self.run_crashes.append((now, nodes))
        while self.run_crashes and now - self.run_crashes[0][0] > self.cfg.run_window:
            self.run_crashes.popleft()
        poison = self._poison_node(quarantined)
        if poison is not None:
            # A new situation: the next worker runs without that node, so start counting afresh.
            self.run_crashes.clear()
            self.consecutive = 0
            d = self._restart(f"{reason}; node {poison} quarantined after {self.cfg.quarantine_after} crashes "
                              f"with it in flight")
            d.quarantine = poison
            return d
        if healthy:
            self.total_restarts += 1
            return Decision("restart", delay=0.0, reason=reason, healthy_run=True)
        self.consecutive += 1
        return self._restart(reason)

    def _restart(self, reason: str) -> Decision:
        self.total_restarts += 1
        return Decision("restart", delay=self.delay_for(max(1, self.consecutive)), reason=reason)

    def _poison_node(self, quarantined: frozenset[str] | set[str]) -> str | None:
        k = max(1, self.cfg.quarantine_after)
        last = [ns for _, ns in list(self.run_crashes)[-k:]]
        if len(last) < k:
            return None
        common = set(last[0]).intersection(*last[1:]) - set(quarantined)
        for n in reversed(last[-1]):  # newest first
            if n in common:
                return n
        return None
