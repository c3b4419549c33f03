"""Supervisor settings: the `supervisor` object in `worker_<uuid>.json`. Every timer is here.

Defaults (seconds unless stated):

  heartbeat_timeout  10.0   no heartbeat for this long (plus any declared busy_for) = hung
  start_timeout     120.0   a worker that is not ready this long after spawn = failed start
  stop_grace          5.0   in-band stop frame -> SIGTERM to the worker's process group
  term_timeout        3.0   SIGTERM -> SIGKILL to the group
  kill_timeout        2.0   SIGKILL -> give up waiting (logged; the zombie is reaped when it goes)
  eof_grace           1.0   channel EOF without an exit -> treat the worker as dead, kill it
  backoff_base        0.1   first restart delay after a stable run
  backoff_factor      2.0   growth per consecutive crash
  backoff_cap        30.0   upper bound of the delay
  backoff_jitter      0.2   +-20 % random spread (never above the cap)
  start_budget        5     consecutive failed starts of a worker that never reached ready -> FATAL
  min_uptime          1.0   a crash this long after ready is a healthy run: restart at once, no delay
  quarantine_after    3     crashes after ready with the same node in flight -> that node is quarantined
  run_window        600.0   how far back crashes count for quarantine_after
  fork_server      true     keep a warm fork server per worker (false = always a plain spawn)
  log_file         null     the log's location (relative: to the data folder); default <data>/worker.log
  log_level      "INFO"     DEBUG, INFO, WARNING or ERROR: what the worker and the supervisor log
  log_max_bytes  100000     rotating log
  log_backups         5     (all log settings take effect at `fn-supervise restart` too)
  log_tail_lines     30     lines of output kept in a crash record
  crash_history      20     crash records kept in the state file
  venv             true     false = run with the supervisor's own interpreter (--no-venv)
  python           null     explicit interpreter (overrides venv)
  worker_module  "worker"   module run as `<python> -m <module>` (tests use fault-injecting fakes)

The worker itself reads `heartbeat_interval` (default 1.0) from the top level of the config.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class SupervisorConfig:
    heartbeat_timeout: float = 10.0
    start_timeout: float = 120.0
    stop_grace: float = 5.0
    term_timeout: float = 3.0
    kill_timeout: float = 2.0
    eof_grace: float = 1.0
    backoff_base: float = 0.1
    backoff_factor: float = 2.0
    backoff_cap: float = 30.0
    backoff_jitter: float = 0.2
    start_budget: int = 5
    min_uptime: float = 1.0
    quarantine_after: int = 3
    run_window: float = 600.0
    fork_server: bool = True
    log_file: str | None = None
    log_level: str = "INFO"
    log_max_bytes: int = 100_000
    log_backups: int = 5
    log_tail_lines: int = 30
    crash_history: int = 20
    venv: bool = True
    memory_max: Any = None  # bytes or "512MB" (supervisor/memory.py); None: no limit
    memory_interval: float = 0.1  # seconds between samples of the worker's memory
    python: str | None = None
    worker_module: str = "worker"

    @classmethod
    def from_worker_config(cls, cfg: dict[str, Any]) -> "SupervisorConfig":
        raw = cfg.get("supervisor") or {}
        if not isinstance(raw, dict):
            raw = {}
        out = cls()
        for f in fields(cls):
            if f.name not in raw or raw[f.name] is None:
                continue
            v = raw[f.name]
            default = getattr(out, f.name)
            try:
                if isinstance(default, bool):
                    v = bool(v)
                elif isinstance(default, int):
                    v = int(v)
                elif isinstance(default, float):
                    v = float(v)
                elif f.name in ("python", "worker_module", "log_file"):
                    v = str(v)
                elif f.name == "log_level":
                    v = str(v).upper()
                    if v not in LOG_LEVELS:
                        continue
            except (TypeError, ValueError):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                continue
            setattr(out, f.name, v)
        return out

    def stop_deadline(self) -> float:
        """Worst case of a staged stop: what `fn-supervise stop` and systemd must wait."""
        return self.stop_grace + self.term_timeout + self.kill_timeout
