"""Atomic file writes and PID identity checks, shared by the worker (standalone) and the supervisor."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: Path | str, data: bytes | str, mode: int = 0o644) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old or the new file, never half."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path | str, obj: Any, indent: int | None = 2, mode: int = 0o644) -> None:
    atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=True), mode=mode)


def read_json(path: Path | str) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def read_pid(path: Path | str) -> int | None:
    """The decimal PID in a .p file, or None when absent, empty or not a PID."""
    try:
        text = Path(path).read_text().strip()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid > 0 else None


def process_start_time(pid: int) -> float | None:
    """Start time of pid in seconds since boot (from /proc), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: fields start after the last ')'.
    rest = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(rest[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return None


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited: it is not "alive" for us.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"
    except OSError:
        return False


def same_process(pid: int, start_time: float | None, boot: str | None = None) -> bool:
    """True only if pid is alive and is the very process recorded (start time and boot id match)."""
    if not pid or start_time is None:
        return False
    if boot and boot != boot_id():
        return False
    if not pid_alive(pid):
        return False
    st = process_start_time(pid)
    return st is not None and abs(st - start_time) < 0.05
