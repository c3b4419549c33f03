"""Paths and files of one worker. Every write is atomic (worker.fsutil.atomic_write).

<base>/workers/worker_<uuid>.json              config (FuncNodes fields + `supervisor`); unknown keys kept
<base>/workers/worker_<uuid>.p                 worker PID, written only once it is ready, removed when it goes
<base>/workers/worker_<uuid>.runstate          line 1 starting|running|stopping|stopped, line 2 detail
<base>/workers/worker_<uuid>.supervisor        our state file (JSON, schema STATE_SCHEMA), read by `status`.
                                               Not named *.json on purpose: the stock Workermanager
                                               takes every worker_*.json for a worker config.
<base>/workers/worker_<uuid>.lock              flock held by the live supervisor (one per worker)
<data>/worker.log (+ .1 .. .N)                 worker output and supervisor events, rotating

<base> = --dir, else $FUNCNODES_CONFIG_DIR, else ~/.funcnodes. <data> = config `data_path`,
else <base>/workers/worker_<uuid>/.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from worker.fsutil import atomic_write, atomic_write_json, boot_id, process_start_time, same_process

log = logging.getLogger("fn-supervise")

STATE_SCHEMA = 1


# One definition of the base folder and of a valid worker id for both halves (worker.config is
# dependency-free): an id the supervisor accepts is one the worker will start with.
from worker.config import base_dir  # noqa: E402,F401
from worker.config import parse_worker_name as parse_worker_id  # noqa: E402,F401


class WorkerPaths:
    def __init__(self, base: Path, uuid: str):
        self.base = Path(base)
        self.uuid = uuid
        self.workers = self.base / "workers"
        stem = self.workers / f"worker_{uuid}"
        self.config = self.workers / f"worker_{uuid}.json"
        self.pidfile = self.workers / f"worker_{uuid}.p"
        self.runstate = self.workers / f"worker_{uuid}.runstate"
        self.state = self.workers / f"worker_{uuid}.supervisor"
        self.lock = self.workers / f"worker_{uuid}.lock"
        self.default_data = stem

    @property
    def name(self) -> str:
        return f"worker_{self.uuid}"

    def data_dir(self, cfg: dict[str, Any] | None = None) -> Path:
        if cfg is None:
            cfg = self.read_config_or_empty()
        dp = cfg.get("data_path")
        return Path(dp) if dp else self.default_data

    def log_file(self, cfg: dict[str, Any] | None = None) -> Path:
        """`supervisor.log_file` of the config (relative: to the data folder), else <data>/worker.log."""
        if cfg is None:
            cfg = self.read_config_or_empty()
        sup = cfg.get("supervisor")
        custom = sup.get("log_file") if isinstance(sup, dict) else None
        return self.data_dir(cfg) / Path(str(custom)).expanduser() if custom else self.data_dir(cfg) / "worker.log"

    # config -------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        with open(self.config, "r", encoding="utf-8") as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError(f"{self.config}: not a JSON object")
        return cfg

    def read_config_or_empty(self) -> dict[str, Any]:
        try:
            return self.read_config()
        except (OSError, ValueError):
            return {}

    def write_config(self, cfg: dict[str, Any]) -> None:
        atomic_write_json(self.config, cfg)

    def update_config(self, **changes: Any) -> dict[str, Any]:
        """Read-modify-write that keeps every key it does not know."""
        cfg = self.read_config_or_empty()
        cfg.update(changes)
        self.write_config(cfg)
        return cfg

    # .p / .runstate -------------------------------------------------------------
    def write_pid(self, pid: int) -> None:
        atomic_write(self.pidfile, f"{pid}")

    def keep_pid(self, pid: int) -> None:
        """The Workermanager deletes .p whenever one of its probes fails (e.g. while a node is
        busy); like the stock worker, put it back while the worker runs."""
        try:
            if self.pidfile.read_text().strip() == str(pid):
                return
        except OSError:
            pass
        try:
            self.write_pid(pid)
        except OSError as e:
            log.warning("cannot rewrite %s: %s", self.pidfile, e)

    def remove_pid(self) -> None:
        _unlink(self.pidfile)

    def write_runstate(self, state: str, detail: str = "") -> None:
        atomic_write(self.runstate, state + ("\n" + detail.replace("\n", " ") if detail else ""))

    def remove_runstate(self) -> None:
        _unlink(self.runstate)

    # safe mode ----------------------------------------------------------------------
    def quarantine_file(self, cfg: dict[str, Any] | None = None) -> Path:
        """{node id: {"reason", "since", "crashes"}}: kept across supervisor restarts."""
        return self.data_dir(cfg) / "quarantine.json"

    def read_quarantine(self, cfg: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        try:
            with open(self.quarantine_file(cfg), "r", encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): (v if isinstance(v, dict) else {"reason": str(v)}) for k, v in data.items()}

    def write_quarantine(self, q: dict[str, dict[str, Any]], cfg: dict[str, Any] | None = None) -> None:
        path = self.quarantine_file(cfg)
        if not q:
            _unlink(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, q)

    @property
    def lift_requests(self) -> Path:
        """Node ids to lift, one a line: written by `fn-supervise lift`, read on SIGUSR1."""
        return self.workers / f"worker_{self.uuid}.lift"

    # state file -------------------------------------------------------------------
    def write_state(self, data: dict[str, Any]) -> None:
        data = dict(data)
        data["schema"] = STATE_SCHEMA
        data["updated"] = time.time()
        atomic_write_json(self.state, data)

    def read_state(self) -> dict[str, Any] | None:
        try:
            with open(self.state, "r", encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA:
            return None
        return data


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def process_identity(pid: int) -> dict[str, Any]:
    return {"pid": pid, "start_time": process_start_time(pid), "boot_id": boot_id()}


def identity_alive(ident: dict[str, Any] | None) -> bool:
    """True only for the very process recorded (PID + start time + boot id): reuse-proof."""
    if not ident or not ident.get("pid"):
        return False
    return same_process(int(ident["pid"]), ident.get("start_time"), ident.get("boot_id"))


class AlreadyRunning(RuntimeError):
    pass


class SupervisorLock:
    """flock on worker_<uuid>.lock: held for the supervisor's life, released by the kernel on death."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(str(self.path)) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_held(path: Path) -> bool:
    """Is some live supervisor holding this lock? (Tries it and lets go at once.)"""
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def list_workers(base: Path) -> list[WorkerPaths]:
    wd = base / "workers"
    out = []
    if not wd.is_dir():
        return out
    for p in sorted(wd.glob("worker_*.json")):
        if p.name.endswith(".supervisor.json"):
            continue
        try:
            uuid = parse_worker_id(p.stem)
        except ValueError:
            continue
        out.append(WorkerPaths(base, uuid))
    return out


async def clear_leftovers(paths: "WorkerPaths") -> None:
    """A previous supervisor that was SIGKILLed may have left a worker that has not yet
    noticed the lifeline EOF. Only the very process recorded (PID + start time + boot id)
    is touched; stale .p / .runstate are simply replaced."""
    old = paths.read_state()
    ident = (old or {}).get("worker")
    if ident and identity_alive(ident):
        deadline = time.monotonic() + 2.0
        while identity_alive(ident) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if identity_alive(ident):
            log.warning("killing leftover worker %s of a dead supervisor", ident["pid"])
            try:
                os.killpg(int(ident["pid"]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    paths.remove_pid()
