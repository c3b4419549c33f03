"""The journal file: an append-only log of graph edits beside nodespace.json.

Format (one JSON object a line, UTF-8):

    {"fnjournal": 1, "base": 41}                 header: this segment follows snapshot seq 41
    {"seq": 42, "op": "props", "id": "a", ...}   a record: the effect of one mutating command

Records are effects (the node, value, edge or group as it now is), never requests, so a replay
never re-runs node code (Redis turns EXPIRE into PEXPIREAT for the same reason). `seq` grows by
one per record across segments; the snapshot stores the last seq it holds (meta.journal_seq), so
a replay skips what the snapshot already has and a crash between a snapshot and the cut of the
journal loses nothing.

This module is the file and nothing else: open, append, sync, rewrite, and a pure parser that
says what is good, what is torn and what is corrupt. It imports nothing of ours.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import codec

VERSION = 1

# Fault injection for the crash tests: "journal:N" kills this process (SIGKILL) halfway through
# the Nth append; "snapshot:N" halfway through writing the Nth snapshot's temp file; "cut:N"
# after the Nth snapshot is renamed into place but before the journal is cut; "diskfull:PATH"
# makes every journal and snapshot write fail with ENOSPC while the file PATH exists (a full
# disk on any filesystem, for tests where no small tmpfs can be mounted); "syncfail:PATH" makes
# every fsync/fdatasync of a journal or snapshot fail with EIO while PATH exists (the disk took
# the write(2) but cannot make it durable). Read once.
_FAULT = os.environ.get("FN_SUPERVISE_FAULT", "")
_counts: dict[str, int] = {}


def disk_fault() -> None:
    """Raise ENOSPC while the "diskfull:PATH" fault's file exists."""
    if _FAULT.startswith("diskfull:") and os.path.exists(_FAULT.split(":", 1)[1]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def sync_fault() -> None:
    """Raise EIO while the "syncfail:PATH" fault's file exists."""
    if _FAULT.startswith("syncfail:") and os.path.exists(_FAULT.split(":", 1)[1]):
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def fdatasync(fd: int) -> None:
    sync_fault()
    os.fdatasync(fd)


def fault_point(kind: str) -> bool:
    """True when the configured fault is due at this call of `kind`."""
    if not _FAULT.startswith(kind + ":"):
        return False
    _counts[kind] = _counts.get(kind, 0) + 1
    try:
        return _counts[kind] == int(_FAULT.split(":", 1)[1])
    except ValueError:
        return False


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = 0o600, fault: str | None = "snapshot") -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder (fsutil.atomic_write plus
    the folder's fsync and the crash tests' fault point)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            disk_fault()
            if fault is not None and fault_point(fault):
                f.write(data[: len(data) // 2])
                f.flush()
                die()
            f.write(data)
            f.flush()
            sync_fault()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def header(base: int) -> bytes:
    return json.dumps({"fnjournal": VERSION, "base": base}, separators=(",", ":")).encode() + b"\n"


# allow_nan=False: a record must be readable by any JSON reader, as the snapshot is. One encoder
# instance: json.dumps with options builds a new JSONEncoder per call (py-spy: `encode` was the
# largest of the worker's own items per edit, 2.6 % of samples); encode() keeps no state.
_RECORD = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def encode(rec: dict) -> bytes:
    # Records hold client JSON and json_safe values: orjson writes almost all of them (2.5 ->
    # 0.2 us per edit); the same text but for float spelling (1e16, not 1e+16), read back equal.
    out = codec.plain_dumps(rec)
    if out is not None:
        return out + b"\n"
    return _RECORD.encode(rec).encode() + b"\n"


class JournalFile:
    """The open segment. `append` is one write(2) per batch (looped only on a short write)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        if fault_point("journal"):
            os.write(self.fd, view[: max(1, len(view) // 2)])
            die()
        try:
            disk_fault()
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError:
            # A full disk can take part of a record: drop it, so the segment still ends with a
            # whole record and the next append (once there is room) follows it.
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass  # the load drops a torn last record anyway
            raise
        self.size += len(data)

    def sync(self) -> None:
        fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        """Drop what follows `size` (records whose fdatasync failed): appends go on from there."""
        os.ftruncate(self.fd, size)
        self.size = size

    def rewrite(self, content: bytes) -> None:
        """Replace the segment atomically (the cut after a snapshot), durably: a reader finds the
        old segment or the new one, and the new one is on disk before it replaces the old."""
        write_durably(self.path, content, fault=None)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.size = len(content)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Parsed:
    """What a segment holds. `good` are the records to replay; everything else is for the log."""

    base: int = 0
    good: list[dict[str, Any]] = field(default_factory=list)
    valid_bytes: int = 0  # bytes up to the end of the last good line
    torn: bytes = b""  # a partial last line (no newline): a kill mid-write
    corrupt_at: int | None = None  # line number (1-based) of the first unreadable record
    corrupt_reason: str = ""
    rest: bytes = b""  # the bytes from the corrupt record on, kept aside for inspection
    newer: int | None = None  # the header's version when it is newer than ours


def parse(data: bytes, known_ops: frozenset[str] | set[str]) -> Parsed:
    out = Parsed()
    if not data:
        return out
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    pos = 0
    last_seq: int | None = None
    for i, raw in enumerate(lines, 1):
        line_end = pos + len(raw) + 1
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return _corrupt(out, data, pos, i, f"unreadable JSON ({e})")
        if i == 1 and "fnjournal" in rec:
            version = rec.get("fnjournal")
            if not isinstance(version, int):
                return _corrupt(out, data, pos, i, "bad header")
            if version > VERSION:
                out.newer = version
                out.corrupt_at, out.rest = i, data
                return out
            base = rec.get("base", 0)
            out.base = base if isinstance(base, int) and base >= 0 else 0
            out.valid_bytes = pos = line_end
            continue
        seq, op = rec.get("seq"), rec.get("op")
        if not isinstance(seq, int) or isinstance(seq, bool) or op not in known_ops:
            return _corrupt(out, data, pos, i, f"not a record we know (op {op!r}, seq {seq!r})")
        if last_seq is not None and seq <= last_seq:
            return _corrupt(out, data, pos, i, f"seq {seq} after {last_seq}")
        last_seq = seq
        out.good.append(rec)
        out.valid_bytes = pos = line_end
    out.torn = tail
    return out


def _corrupt(out: Parsed, data: bytes, pos: int, line: int, reason: str) -> Parsed:
    out.corrupt_at, out.corrupt_reason, out.rest = line, reason, data[pos:]
    return out
