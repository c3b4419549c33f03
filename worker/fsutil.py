"""Atomic file writes, confined writes under a data folder, and PID identity checks, shared by
the worker (standalone) and the supervisor."""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator


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


# region confinement
# A folder under the data folder (files/) is written by clients and read by nodes; a node (or a
# user) may leave a symlink in it. Every path component below the data folder is opened with
# O_NOFOLLOW relative to its parent's descriptor, so no symlink, even one swapped in between a
# check and the write, can lead a write or a read outside.

class PathEscape(ValueError):
    """A client path that would leave its folder (a '..', an absolute path, a symlink on the way)."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def safe_relative(name: str) -> PurePosixPath:
    """A client path as a plain relative path inside files/, or ValueError."""
    if "\x00" in name or "\\" in name:
        raise PathEscape(f"filename {name!r} contains forbidden characters")
    try:
        name.encode("utf-8")  # a lone surrogate would become a name no archive can hold
    except UnicodeEncodeError:
        raise PathEscape(f"filename {name!r} is not valid Unicode") from None
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts):
        raise PathEscape(f"filename {name!r} must be a relative path inside files/")
    parts = [x for x in p.parts if x != "."]
    if not parts:
        raise PathEscape(f"filename {name!r} names no file")
    return PurePosixPath(*parts)


def _open_subdir(parent_fd: int, part: str, shown: str, create: bool) -> tuple[int, bool]:
    """(descriptor of parent/part, whether we made it)."""
    made = False
    for _ in range(3):  # a concurrent mkdir or rmdir: try again
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=parent_fd), made
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(part, 0o755, dir_fd=parent_fd)
                made = True
            except FileExistsError:
                pass
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                kind = "a symbolic link" if _is_link(parent_fd, part) else "not a folder"
                raise PathEscape(f"{shown} is {kind}; files are only written and read inside the data folder") from None
            raise
    raise FileNotFoundError(errno.ENOENT, "folder vanished while opening", shown)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_confined_dir(base: Path | str, rel: PurePosixPath | str, create: bool = False,
                      created: list[PurePosixPath] | None = None) -> int:
    """A descriptor of base/rel, reached without following a symlink below base (base itself is
    trusted). With create, missing folders are made, and appended to created (relative to base)."""
    fd = os.open(str(base), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    done = PurePosixPath()
    try:
        for part in PurePosixPath(rel).parts:
            if part in ("", ".", "..", "/"):
                raise PathEscape(f"{rel} is not a plain relative path")
            done = done / part
            nfd, made = _open_subdir(fd, part, str(done), create)
            os.close(fd)
            fd = nfd
            if made and created is not None:
                created.append(done)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_confined(base: Path | str, rel: PurePosixPath | str) -> BinaryIO:
    """Open base/rel for reading; no component below base (the file included) may be a symlink."""
    rel = PurePosixPath(rel)
    dfd = open_confined_dir(base, rel.parent)
    try:
        try:
            fd = os.open(rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PathEscape(f"{rel} is a symbolic link; files are only read inside the data folder") from None
            raise
    finally:
        os.close(dfd)
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise PathEscape(f"{rel} is not a regular file")
    return f


class ConfinedWriter:
    """All-or-nothing writes of files under base/<sub>: each file is staged as a hidden temp file
    in its own folder and renamed into place only by commit(); abort() (or leaving the `with`
    without commit) removes the temp files and the folders this writer made.

    No write follows a symlink: folders are opened component by component with O_NOFOLLOW, and
    the final rename replaces a symlink of the target's name instead of writing through it."""

    PREFIX = ".upload-"

    def __init__(self, base: Path | str, sub: str = "files", mode: int = 0o644):
        self.base, self.sub, self.mode = Path(base), sub, mode
        self._staged: list[tuple[int, str, str]] = []  # (dir fd, temp name, final name)
        self._dirs: dict[PurePosixPath, int] = {}
        self._created: list[PurePosixPath] = []

    def __enter__(self) -> "ConfinedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def _dir(self, rel_parent: PurePosixPath) -> int:
        fd = self._dirs.get(rel_parent)
        if fd is None:
            fd = open_confined_dir(self.base, PurePosixPath(self.sub) / rel_parent, create=True, created=self._created)
            self._dirs[rel_parent] = fd
        return fd

    def open(self, rel: PurePosixPath | str) -> BinaryIO:
        """A file object to write rel's content to; visible at <sub>/rel only after commit()."""
        rel = safe_relative(str(rel))
        dfd = self._dir(rel.parent)
        try:
            if stat.S_ISDIR(os.lstat(rel.name, dir_fd=dfd).st_mode):
                raise ValueError(f"{rel} is a folder, not a file")
        except FileNotFoundError:
            pass
        while True:
            tmp = f"{self.PREFIX}{secrets.token_hex(6)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             self.mode, dir_fd=dfd)
                break
            except FileExistsError:
                continue
        self._staged.append((dfd, tmp, rel.name))
        return os.fdopen(fd, "wb")

    def write(self, rel: PurePosixPath | str, data: bytes) -> None:
        with self.open(rel) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> list[PurePosixPath]:
        """Rename every staged file into place; return the folders this writer made (base-relative)."""
        for dfd, tmp, name in self._staged:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        self._staged = []
        created, self._created = self._created, []  # they hold committed files now
        self._close()
        return created

    def abort(self) -> None:
        for dfd, tmp, _ in self._staged:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
        self._staged = []
        self._close()
        for rel in reversed(self._created):
            try:
                dfd = open_confined_dir(self.base, rel.parent)
            except OSError:
                continue
            try:
                os.rmdir(rel.name, dir_fd=dfd)
            except OSError:
                pass  # not empty: someone else wrote there meanwhile
            finally:
                os.close(dfd)
        self._created = []

    def _close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs = {}


def write_confined(base: Path | str, sub: str, rel: str, data: bytes) -> PurePosixPath:
    """Write base/sub/rel atomically, confined as ConfinedWriter is; the cleaned relative path."""
    if not isinstance(rel, str):
        raise TypeError(f"filename must be a string, got {type(rel).__name__}")
    clean = safe_relative(rel)
    with ConfinedWriter(base, sub) as w:
        w.write(clean, data)
        w.commit()
    return clean


def walk_confined(base: Path | str, sub: str = "files") -> Iterator[tuple[PurePosixPath, int]]:
    """(relative path, open descriptor) of every regular file under base/sub, never entering a
    symlinked folder nor opening a symlinked file. The caller closes each descriptor."""
    try:
        root = open_confined_dir(base, sub)
    except (FileNotFoundError, PathEscape):
        return
    try:
        for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=root, follow_symlinks=False):
            for name in sorted(files):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
                except OSError:
                    continue  # a symlink (ELOOP), or gone
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    continue
                yield PurePosixPath(dirpath) / name, fd
    finally:
        os.close(root)
# endregion
