"""memory_max: a worker over its memory limit is stopped and recorded, not left to take the
machine down (dask's Nanny is the model: watch, warn, terminate, let the restart policy act).

`MemoryPolicy` is the decision (thresholds, hysteresis), driven by samples in tests; the
sampler (`tree_rss`, `MemoryWatch`) is the thin I/O around it. The supervisor sums the RSS of
the worker and all its descendants (separate_process children, commands it started) every
`memory_interval` seconds (0.1 by default: a node that allocates 1 GB/s overshoots by about
100 MB before the kill). At `warn_at` (80 %) the worker is told (it sends clients a
`memory_warning` worker event and counts it in /metrics); at 100 % the supervisor SIGKILLs the
worker's process group and records the crash as "memory limit exceeded" with the figure and the
node in flight. The restart policy treats it like any crash: three with the same node in
flight quarantine that node.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from dataclasses import dataclass
from typing import Any, Callable

WARN_AT = 0.8
CLEAR_AT = 0.7  # hysteresis: warned again only after dropping below this
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int | None:
    """Bytes from 536870912, "512MB", "512M", "0.5GiB"; None (or 0) is no limit. ValueError
    says what is wrong."""
    if value is None or value == 0 or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory_max must be bytes or a size like \"512MB\", not {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"memory_max must not be negative: {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory_max must be bytes or a size like \"512MB\", \"2GiB\"; got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()]) or None


def config_error(value: Any) -> str | None:
    try:
        parse_size(value)
    except ValueError as e:
        return str(e)
    return None


def fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@dataclass(frozen=True)
class MemoryDecision:
    action: str  # "ok" | "warn" | "clear" | "kill"
    rss: int
    limit: int
    detail: str = ""


class MemoryPolicy:
    """One worker process's memory against its limit; every sample gives a decision."""

    def __init__(self, limit: int, warn_at: float = WARN_AT, clear_at: float = CLEAR_AT):
        self.limit = limit
        self.warn_bytes = int(limit * warn_at)
        self.clear_bytes = int(limit * min(clear_at, warn_at))
        self.warned = False
        self.killed = False
        self.peak = 0

    def observe(self, rss: int) -> MemoryDecision:
        self.peak = max(self.peak, rss)
        if self.killed:
            return MemoryDecision("ok", rss, self.limit)  # one kill per process; the exit does the rest
        if rss >= self.limit:
            self.killed = True
            return MemoryDecision("kill", rss, self.limit,
                                  f"memory limit exceeded: {fmt(rss)} of memory_max {fmt(self.limit)}")
        if not self.warned and rss >= self.warn_bytes:
            self.warned = True
            return MemoryDecision("warn", rss, self.limit,
                                  f"memory at {rss / self.limit:.0%} of memory_max {fmt(self.limit)}")
        if self.warned and rss < self.clear_bytes:
            self.warned = False
            return MemoryDecision("clear", rss, self.limit)
        return MemoryDecision("ok", rss, self.limit)


# region sampling (thin I/O)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_HAS_PROC = os.path.isdir("/proc/self")  # else psutil (imported only then: ~4 MB the supervisor spares)


def _children(pid: int) -> list[int]:
    if not _HAS_PROC:
        import psutil  # noqa: PLC0415

        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass  # gone meanwhile (a separate_process child ends all the time): nothing more to count
    return out


def _rss(pid: int) -> int:
    if not _HAS_PROC:
        import psutil  # noqa: PLC0415

        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _pss(pid: int) -> int:
    """Proportional set size: a page shared by n processes counts 1/n in each."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _rss(pid) if not _HAS_PROC else 0


def tree_pids(pid: int) -> list[int]:
    """pid and every descendant (a few small /proc files, no full /proc scan)."""
    out, todo, seen = [], [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        todo.extend(_children(p))
    return out


def tree_memory(pids: list[int]) -> int:
    """The tree's memory: RSS for a lone process (cheap: statm); PSS summed once it has children,
    since a forked child (separate_process) shares the worker's pages and RSS would count them twice."""
    if len(pids) == 1:
        return _rss(pids[0])
    return sum(_pss(p) for p in pids)


def tree_rss(pid: int) -> int:
    """The memory of pid's whole tree (see tree_memory)."""
    return tree_memory(tree_pids(pid))


def kill_all(pids: list[int]) -> None:
    """SIGKILL what the last sample counted: descendants that left the worker's process group
    (a new session) would otherwise outlive the kill and keep their memory."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class MemoryWatch:
    """Samples one worker on the supervisor's loop until it is gone or stopped."""

    def __init__(self, pid: int, policy: MemoryPolicy, interval: float,
                 on_decision: Callable[[MemoryDecision], None], alive: Callable[[], bool],
                 sample: Callable[[list[int]], int] = tree_memory):
        self.pid, self.policy, self.interval = pid, policy, interval
        self.on_decision, self.alive, self.sample = on_decision, alive, sample
        self.last: MemoryDecision | None = None
        self.pids: list[int] = []  # what the last sample walked (kill_all's list)
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.alive():
            self.pids = tree_pids(self.pid)
            d = self.last = self.policy.observe(self.sample(self.pids))
            if d.action != "ok":
                self.on_decision(d)
            if self.policy.killed:
                return
            await asyncio.sleep(self.interval)

    def stop(self) -> None:
        self.task.cancel()


def watch_worker(w: Any, memory_max: Any, interval: float, on_over: Callable[[str], None],
                 note: Callable[[str], None]) -> MemoryWatch | None:
    """memory_max for one WorkerProcess: tell the worker at 80 %, on_over(detail) at 100 % (the
    runner kills it); None when there is no limit."""
    limit = parse_size(memory_max)
    if limit is None:
        return None

    def on_decision(d: MemoryDecision) -> None:
        if d.action == "kill":
            on_over(d.detail)
        else:
            note(d.detail or f"memory back to {fmt(d.rss)}")
            if w.alive:
                w.send({"type": "memory", "level": d.action, "rss": d.rss, "limit": d.limit})
    return MemoryWatch(w.pid, MemoryPolicy(limit), interval, on_decision, alive=lambda: w.alive)
# endregion
