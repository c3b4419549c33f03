"""Crash records: what happened to a worker that went away without being asked to.

A record holds the wall time, the exit code or the signal, who sent the signal, the phase
(start or run), the reason (crashed, hung, start_failed, start_timeout), a suspected OOM
kill, the last lines of the worker's output and the node in flight (from the last heartbeat).

OOM: a SIGKILL the supervisor did not send is suspicious. If the cgroup's OOM counter is
readable (v2 `memory.events` oom_kill, v1 `memory.oom_control` oom_kill) it decides: the
counter grew -> OOM kill (evidence given), it did not -> not an OOM kill.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ExitStatus:
    code: int | None = None      # exit code when it exited
    signal: int | None = None    # terminating signal when killed

    @classmethod
    def from_wait_status(cls, status: int) -> "ExitStatus":
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        if os.WIFEXITED(status):
            return cls(code=os.WEXITSTATUS(status))
        return cls()

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        if self.code is not None:
            return f"exit code {self.code}"
        return "unknown exit"


@dataclass
class CrashRecord:
    time: float
    reason: str
    phase: str
    exit_code: int | None = None
    signal: int | None = None
    signal_name: str | None = None
    signal_by_supervisor: bool = False
    suspected_oom: bool = False
    oom_evidence: str | None = None
    uptime: float | None = None
    node: str | None = None          # the node in flight (the newest one when several ran)
    in_flight: list[str] = field(default_factory=list)  # every node running at the end, in start order
    pid: int | None = None
    detail: str = ""
    last_log_lines: list[str] = field(default_factory=list)
    # the restart that followed: launch ("fork"|"spawn") and seconds per phase (detect, delay,
    # launch, boot, graph_load, total), filled in once the next worker is ready
    restart: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        what = self.signal_name or (f"exit {self.exit_code}" if self.exit_code is not None else "?")
        s = f"{t} {self.reason} ({self.phase}, {what})"
        if self.suspected_oom:
            s += " suspected OOM"
        if self.node:
            s += f" node={self.node}"
        if self.detail:
            s += f": {self.detail}"
        r = self.restart
        if r:
            s += f" -> back in {r.get('total', 0):.3f}s by {r.get('launch')}"
        return s


def _cgroup_files() -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        path = path.lstrip("/")
        if ctrls == "":
            out.append((Path("/sys/fs/cgroup") / path / "memory.events", "v2"))
        elif "memory" in ctrls.split(","):
            out.append((Path("/sys/fs/cgroup/memory") / path / "memory.oom_control", "v1"))
    return out


def oom_kill_count() -> int | None:
    """The cgroup's OOM-kill counter (the worker shares our cgroup), None if unreadable."""
    for path, _ in _cgroup_files():
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill" and v.strip().isdigit():
                return int(v)
    return None


def make_record(*, status: ExitStatus, reason: str, phase: str, we_signalled: set[int],
                oom_before: int | None, oom_after: int | None, uptime: float | None,
                node: str | None, pid: int | None, last_lines: list[str], detail: str = "",
                in_flight: list[str] | None = None) -> CrashRecord:
    rec = CrashRecord(time=time.time(), reason=reason, phase=phase, exit_code=status.code,
                      signal=status.signal, uptime=uptime, node=node, pid=pid,
                      last_log_lines=list(last_lines), detail=detail, in_flight=list(in_flight or []))
    if status.signal is not None:
        try:
            rec.signal_name = signal.Signals(status.signal).name
        except ValueError:
            rec.signal_name = str(status.signal)
        rec.signal_by_supervisor = status.signal in we_signalled
    if oom_before is not None and oom_after is not None and oom_after > oom_before:
        rec.suspected_oom = True
        rec.oom_evidence = f"cgroup oom_kill {oom_before} -> {oom_after}"
    elif status.signal == signal.SIGKILL and not rec.signal_by_supervisor:
        if oom_before is None or oom_after is None:
            rec.suspected_oom = True
            rec.oom_evidence = "SIGKILL not sent by the supervisor (cgroup OOM counter unreadable)"
    return rec


def exit_record(w: Any, crash: Any, status: ExitStatus, oom_before: int | None, last_lines: list[str]) -> CrashRecord:
    """The record of one worker exit: `w` a WorkerProcess (None: it never started), `crash` an
    attempt.Crash (reason, detail, was_ready, node, suspects)."""
    uptime = None
    if w is not None and w.spawned_at is not None:
        uptime = time.monotonic() - w.spawned_at
    return make_record(status=status, reason=crash.reason, phase="run" if crash.was_ready else "start",
                       we_signalled=w.signalled if w is not None else set(), oom_before=oom_before,
                       oom_after=oom_kill_count(), uptime=uptime, node=crash.node,
                       pid=w.pid if w is not None else None, last_lines=last_lines, detail=crash.detail,
                       in_flight=crash.suspects)
