"""One worker start as a value, and the typed events of the supervisor's queue. Pure.

An `Attempt` is one worker process from launch to exit: whether it became ready, when it must
answer by (start_timeout, heartbeats, eof_grace, the kill that did not work), the nodes in
flight, the stop it announced, and what its exit means. It decides; runner.py does the awaits and
the side effects. A fake clock tests every rule here without a process (tests/test_attempt.py).

Events (frozen): `Signal(sig)` from the one signal handler, `Frame(worker, msg)` / `Eof(worker)` /
`Exit(worker)` from a WorkerProcess, `SidecarMsg(msg)` from a sidecar thread. Frame, Eof and Exit
carry their worker: an event of an earlier worker is stale and dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import SupervisorConfig
from .crash import ExitStatus
from .health import HeartbeatMonitor

WORKER_START_FAILURE = 3  # the worker's own "cannot start" exit code (bad config, port busy)


# ---------------------------------------------------------------------- events
@dataclass(frozen=True)
class Signal:
    sig: int


@dataclass(frozen=True)
class Frame:
    worker: Any
    msg: dict[str, Any]


@dataclass(frozen=True)
class Eof:
    worker: Any


@dataclass(frozen=True)
class Exit:
    worker: Any


@dataclass(frozen=True)
class SidecarMsg:
    msg: dict[str, Any]


@dataclass(frozen=True)
class MemoryOver:
    """The worker's process group passed memory_max (supervisor/memory.py)."""
    worker: Any
    detail: str


Event = Signal | Frame | Eof | Exit | SidecarMsg | MemoryOver


# ---------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Kill:
    """SIGKILL the worker: it is hung, never got ready, or lost its channel without exiting."""
    reason: str
    detail: str


@dataclass(frozen=True)
class Abandon:
    """SIGKILL did not end it within kill_timeout (uninterruptible sleep?): give up waiting."""
    reason: str
    detail: str


@dataclass(frozen=True)
class Stopped:
    """It announced a stop (stop_worker from a client) and exited 0: a deliberate stop."""
    why: str


@dataclass(frozen=True)
class Crash:
    """Anything else: the policy decides (restart, backoff, quarantine, FATAL)."""
    reason: str  # crashed | start_failed | hung | start_timeout
    detail: str
    was_ready: bool
    node: str | None = None
    suspects: list[str] = field(default_factory=list)
    first_sign: float | None = None  # monotonic time of the first sign of the death (EOF)


# Frames the attempt takes in itself; the rest are effects the runner performs (its table).
EFFECTS = ("heartbeat", "ready", "runstate", "lift_quarantine", "stopping", "install", "journal")


class Attempt:
    def __init__(self, cfg: SupervisorConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.health = HeartbeatMonitor(cfg.heartbeat_timeout, clock)
        self.ready = False
        self.ready_at: float | None = None
        self.start_deadline = clock() + cfg.start_timeout
        self.eof_at: float | None = None          # the channel closed; the exit should follow
        self.kill: Kill | None = None             # we sent SIGKILL, for this reason
        self.killed_at: float | None = None
        self.deliberate: str | None = None        # the worker said it is stopping (why)
        self.stable_noted = False                 # min_uptime past ready was reported to the policy
        self.in_flight: list[str] = []            # nodes running now, in start order
        self.oom_before: int | None = None        # the kernel's oom_kill count at launch (crash.py)

    # ------------------------------------------------------------------ time
    def deadline(self) -> float:
        """When the loop must look again if no event arrives."""
        if self.kill is not None:
            return (self.killed_at or self.clock()) + self.cfg.kill_timeout + 1.0
        d = self.health.deadline() if self.ready else self.start_deadline
        if self.eof_at is not None:
            d = min(d, self.eof_at + self.cfg.eof_grace)
        if self.ready and not self.stable_noted and self.ready_at is not None:
            d = min(d, self.ready_at + self.cfg.min_uptime + 0.01)
        return d

    def on_timeout(self) -> Kill | Abandon | None:
        """The deadline passed with no event: kill, abandon, or nothing (look again)."""
        now = self.clock()
        if self.kill is not None:
            return Abandon(self.kill.reason, self.kill.detail + "; unkillable")
        if self.eof_at is not None and now >= self.eof_at + self.cfg.eof_grace:
            k = Kill("crashed", "control channel closed without exit")
        elif self.ready and now >= self.health.deadline():
            k = Kill("hung", self.health.describe())
        elif not self.ready and now >= self.start_deadline:
            k = Kill("start_timeout", f"not ready within {self.cfg.start_timeout:g}s")
        else:
            return None
        self.kill, self.killed_at = k, now
        return k

    def stable_due(self) -> bool:
        """min_uptime has passed since ready and the policy has not been told yet."""
        return (self.ready and not self.stable_noted and self.ready_at is not None
                and self.clock() >= self.ready_at + self.cfg.min_uptime)

    # ------------------------------------------------------------------ events
    def on_frame(self, msg: dict[str, Any]) -> str | None:
        """Take a control frame in; -> the effect the runner performs (one of EFFECTS), or None."""
        t = msg.get("type")
        if t == "heartbeat":
            self.health.beat(msg)
            return "heartbeat" if self.ready else None
        if t == "ready":
            return None if self.ready else "ready"
        if t == "in_flight":  # at once when a node starts or ends, not at the next beat
            nodes = msg.get("nodes")
            self.in_flight = [str(n) for n in nodes] if isinstance(nodes, list) else []
            return None
        if t == "runstate":
            return None if self.ready else "runstate"
        if t == "stopping":
            self.deliberate = str(msg.get("reason") or "stopping")
            return "stopping"
        if t in ("lift_quarantine", "install", "journal"):
            return t
        return None

    def on_memory(self, detail: str) -> Kill | None:
        """Over memory_max: kill (once; a kill already under way keeps its reason)."""
        if self.kill is not None:
            return None
        self.kill, self.killed_at = Kill("memory_limit", detail), self.clock()
        return self.kill

    def mark_ready(self, at: float) -> None:
        """Ready at `at` (the policy's clock reading of the same moment); heartbeats count now."""
        self.ready, self.ready_at = True, at
        self.health.arm()

    def on_eof(self, alive: bool) -> None:
        if alive and self.eof_at is None:
            self.eof_at = self.clock()

    @property
    def node(self) -> str | None:
        """The node to blame: the newest in flight, else the one of the last heartbeat."""
        return self.in_flight[-1] if self.in_flight else self.health.node

    def outcome(self, status: ExitStatus) -> Stopped | Crash:
        """What the worker's exit means."""
        if self.deliberate is not None and status.code == 0:
            return Stopped(self.deliberate)
        if self.kill is not None:
            reason, detail = self.kill.reason, self.kill.detail
        else:
            reason = "crashed" if self.ready else "start_failed"
            detail = status.describe()
            if not self.ready and status.code == WORKER_START_FAILURE:
                detail += " (worker start failure)"
        return Crash(reason, detail, self.ready, self.node, list(self.in_flight), self.eof_at)

    def abandoned(self, a: Abandon) -> Crash:
        return Crash(a.reason, a.detail, self.ready, self.node, list(self.in_flight))


class RestartPhases:
    """Seconds per phase of a restart, from the first sign of the death to the new worker's ready:
    detect (first sign -> handled), delay (handled -> launch: the backoff the policy chose,
    `backoff`, plus bookkeeping), fork|spawn (-> a pid), boot (pid -> graph load starts: imports,
    packages), graph_load (-> ready), total (first sign -> ready)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.marks: dict[str, float] = {}  # monotonic marks of the restart in progress
        self.backoff = 0.0
        self.last: dict[str, Any] | None = None  # the last restart's phases (the state file shows it)

    def exited(self, first_sign: float | None) -> None:
        now = self.clock()
        self.marks, self.backoff = {"first": min(first_sign or now, now), "handled": now}, 0.0

    def mark(self, name: str) -> None:
        """"launch" (the launcher is asked) or "graph" (the worker starts loading its graph)."""
        self.marks[name] = self.clock()

    def ready(self, w: Any) -> dict[str, Any] | None:
        """The worker w (launch, launch_time, spawned_at, pid) is ready: -> its restart's phases,
        or None when it was no restart (the first start)."""
        rc, self.marks = self.marks, {}
        if "first" not in rc or w.spawned_at is None:
            return None
        now = self.clock()
        graph = rc.get("graph", now)
        launch = rc.get("launch", w.spawned_at)
        self.last = {"launch": w.launch, "detect": round(rc["handled"] - rc["first"], 4),
                     "delay": round(max(0.0, launch - rc["handled"]), 4), "backoff": round(self.backoff, 4),
                     str(w.launch): round(w.launch_time or 0.0, 4),
                     "boot": round(max(0.0, graph - w.spawned_at), 4), "graph_load": round(max(0.0, now - graph), 4),
                     "total": round(now - rc["first"], 4), "pid": w.pid}
        return self.last
