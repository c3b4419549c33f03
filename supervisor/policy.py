"""Restart policy: capped exponential backoff with jitter and two crash budgets. Pure.

A failed start (the worker exits, or is not ready within start_timeout, before it ever said
ready) counts against `start_budget` *consecutive* failures: the supervisord STARTING budget.
A crash after ready (exit, signal, hang) counts against `run_budget` crashes inside a
sliding `run_window`: the budget supervisord (#1285) and PM2 (#718) lack, so a worker that
crashes an hour after every start still ends FATAL instead of looping forever.
Delay of the n-th consecutive crash: min(cap, base * factor**(n-1)) with +-jitter, never
above cap. Running `stable_after` seconds resets the consecutive count (PM2's reset).
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


class RestartPolicy:
    def __init__(self, cfg: SupervisorConfig, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random):
        self.cfg = cfg
        self.clock = clock
        self.rng = rng
        self.consecutive = 0          # crashes since the last stable period
        self.start_failures = 0       # consecutive failed starts
        self.run_crashes: deque[float] = deque()
        self.total_restarts = 0
        self.started_at: float | None = None
        self.ready_at: float | None = None

    # lifecycle notifications -------------------------------------------------
    def on_spawn(self) -> None:
        self.started_at = self.clock()
        self.ready_at = None

    def on_ready(self) -> None:
        self.ready_at = self.clock()

    def check_stable(self) -> bool:
        """Call now and then (and at every exit): resets counters once RUNNING long enough."""
        if self.ready_at is not None and self.clock() - self.ready_at >= self.cfg.stable_after:
            if self.consecutive or self.start_failures:
                self.consecutive = 0
                self.start_failures = 0
            return True
        return False

    def reset(self) -> None:
        """A manual restart clears FATAL and all budgets."""
        self.consecutive = 0
        self.start_failures = 0
        self.run_crashes.clear()

    # decisions -----------------------------------------------------------------
    def delay_for(self, n: int) -> float:
        c = self.cfg
        raw = min(c.backoff_cap, c.backoff_base * (c.backoff_factor ** max(0, n - 1)))
        spread = raw * c.backoff_jitter * (2.0 * self.rng() - 1.0)
        return max(0.0, min(c.backoff_cap, raw + spread))

    def on_exit(self, *, was_ready: bool, reason: str) -> Decision:
        now = self.clock()
        self.check_stable()
        self.consecutive += 1
        if not was_ready:
            self.start_failures += 1
            if self.start_failures >= self.cfg.start_budget:
                return Decision("fatal", reason=f"{self.start_failures} failed starts in a row "
                                                 f"(start_budget {self.cfg.start_budget}); last: {reason}")
        else:
            self.start_failures = 0
            self.run_crashes.append(now)
            while self.run_crashes and now - self.run_crashes[0] > self.cfg.run_window:
                self.run_crashes.popleft()
            if len(self.run_crashes) >= self.cfg.run_budget:
                return Decision("fatal", reason=f"{len(self.run_crashes)} crashes within "
                                                 f"{self.cfg.run_window:g}s (run_budget {self.cfg.run_budget}); "
                                                 f"last: {reason}")
        self.total_restarts += 1
        return Decision("restart", delay=self.delay_for(self.consecutive), reason=reason)
