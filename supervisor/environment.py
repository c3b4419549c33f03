"""The worker's venv in its data folder: made with uv, built beside the old one, swapped in by rename.

Layout inside ``<data>``::

    .venv/                    the venv in use; valid only with its marker file
    .venv/fn-supervise-env.json   marker, written LAST after build + import check
    .venv.new-<rand>/         a build in progress (or left by a killed run: removed)
    .venv.old-<rand>/         the previous venv during a swap (removed)
    .venv.lock                flock: one builder per data folder

The hot path (``ensure_environment`` with nothing to do) hashes the worker package, reads the
marker, stats two files and lists the data folder: no subprocess, no lock, well under 1 ms.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

MARKER_NAME = "fn-supervise-env.json"
MARKER_SCHEMA = 1
# The worker's runtime deps (/metrics; orjson speeds the edit path, and a venv without it works).
CORE_PACKAGES = ("funcnodes-core", "aiohttp", "prometheus-client", "orjson")
VERIFY_IMPORTS = "import worker, funcnodes_core, aiohttp, prometheus_client"
BUILD_FILES = ("pyproject.toml", "setup.py")

# Default time bounds; every uv call is killed (with its process group) past its bound.
VENV_TIMEOUT = 120.0
INSTALL_TIMEOUT = 900.0
VERIFY_TIMEOUT = 120.0

Progress = Callable[[str, "float | None"], None]


class Cancel(Protocol):  # threading.Event fits: set it from another thread to stop a build
    def is_set(self) -> bool: ...


# PEP 508 name; a version clause is an operator and a version made of version characters only.
_NAME_RE = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
_CLAUSE_RE = re.compile(r"^\s*(===|~=|==|!=|<=|>=|<|>)\s*([A-Za-z0-9][A-Za-z0-9.*+!_-]*)\s*$")
_BARE_VERSION_RE = re.compile(r"^\s*([0-9][A-Za-z0-9.*+!_-]*)\s*$")
_REQ_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class InstallError(RuntimeError):
    """Creating or installing into a worker venv failed. The venv in use (if any) is untouched."""

    def __init__(
        self, message: str, *, stage: str = "install", output: str = "", timed_out: bool = False, cancelled: bool = False
    ) -> None:
        super().__init__(message)
        self.stage = stage  # validate | venv | install | worker | verify
        self.output = output  # uv's (or the interpreter's) combined output, for logs
        self.timed_out = timed_out
        self.cancelled = cancelled


class InvalidDependency(InstallError, ValueError):
    """A dependency name, version or path that is not acceptable; raised before any subprocess."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stage="validate")


@dataclass(frozen=True)
class EnvInfo:
    python: Path
    venv: Path
    fingerprint: str


@dataclass(frozen=True)
class Dep:
    name: str  # canonical (PEP 503)
    spec: str  # "" or normalized specifier, e.g. "==1.2" or ">=1.0,<2"
    kind: str  # "index" | "project" (local dir with a build file) | "local" (imported directly)
    path: str | None = None
    build_hash: str | None = None  # hash of the project's build file: a change reinstalls

    @property
    def installed(self) -> bool:
        return self.kind in ("index", "project")

    def requirement(self) -> str:
        # Absolute paths only: an argv item can never be read as an option.
        return self.path if self.kind == "project" else f"{self.name}{self.spec}"  # type: ignore[return-value]

    def key(self) -> list:
        return [self.name, self.spec, self.kind, self.path, self.build_hash]


# --------------------------------------------------------------------------- validation


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _normalize_spec(name: str, version: Any) -> str:
    if version is None:
        return ""
    if not isinstance(version, str):
        raise InvalidDependency(f"{name}: version must be a string, not {type(version).__name__}")
    v = version.strip()
    if v in ("", "*", "latest"):
        return ""
    m = _BARE_VERSION_RE.match(v)
    if m:  # FuncNodes writes a bare "1.2" for ==1.2
        return "==" + m.group(1)
    clauses = []
    for part in v.split(","):
        m = _CLAUSE_RE.match(part)
        if not m:
            raise InvalidDependency(f"{name}: invalid version specifier {version!r}")
        clauses.append(m.group(1) + m.group(2))
    return ",".join(clauses)


def _hash_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def normalize_deps(deps: dict | Iterable | None) -> list[Dep]:
    """Validate ``package_dependencies`` (FuncNodes config format) into sorted, canonical Deps.

    Accepts ``{name: {"package", "version", "path"}}`` or a list of such dicts.
    """
    if not deps:
        return []
    if isinstance(deps, dict):
        items = [(k, v) for k, v in deps.items()]
    else:
        items = [(None, v) for v in deps]
    out: dict[str, Dep] = {}
    for key, entry in items:
        if isinstance(entry, Dep):  # already normalized
            out[entry.name] = entry
            continue
        if isinstance(entry, str):  # {"name": "1.2"} shorthand
            entry = {"package": key, "version": entry}
        if entry is None:
            entry = {"package": key}
        if not isinstance(entry, dict):
            raise InvalidDependency(f"dependency {key!r}: expected a dict, got {type(entry).__name__}")
        raw = entry.get("package") or key
        if not isinstance(raw, str) or not _NAME_RE.match(raw):
            raise InvalidDependency(f"invalid package name {raw!r}")
        name = canonical_name(raw)
        spec = _normalize_spec(raw, entry.get("version"))
        path = entry.get("path")
        if path:
            if not isinstance(path, str) or "\x00" in path:
                raise InvalidDependency(f"{raw}: invalid path {path!r}")
            p = Path(os.path.abspath(os.path.expanduser(path)))
            build = next((p / f for f in BUILD_FILES if p.is_dir() and (p / f).is_file()), None)
            if build is not None:
                dep = Dep(name, "", "project", str(p), _hash_file(build))
            else:  # a .py file or a module dir: the worker imports it from there
                dep = Dep(name, spec, "local", str(p))
        else:
            dep = Dep(name, spec, "index")
        out[name] = dep
    return [out[k] for k in sorted(out)]


# --------------------------------------------------------------------------- fingerprint


@functools.lru_cache(maxsize=None)
def core_versions() -> dict[str, str]:
    """The versions of funcnodes-core and aiohttp in the supervisor's own environment."""
    found = {}
    for name in CORE_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


@functools.lru_cache(maxsize=None)
def core_closure() -> dict[str, str]:
    """Core packages and their installed requirements (transitively), with the supervisor's versions.

    Used as constraints for the offline first try: the exact wheels the supervisor env was made
    from are the ones most likely to be in the uv cache.
    """
    seen: dict[str, str] = {}
    stack = list(CORE_PACKAGES)
    while stack:
        name = canonical_name(stack.pop())
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for req in dist.requires or ():
            if ";" in req and "extra" in req.split(";", 1)[1]:
                continue  # optional extras are not installed by a plain requirement
            m = _REQ_NAME_RE.match(req)
            if m:
                stack.append(m.group(1))
    return seen


def worker_source() -> Path:
    """The project's own ``worker`` package directory, as the supervisor's env sees it."""
    spec = importlib.util.find_spec("worker")
    if spec is None or not spec.submodule_search_locations:
        raise InstallError("the fn-supervise 'worker' package is not importable", stage="worker")
    return Path(list(spec.submodule_search_locations)[0])


def _worker_files(src: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for n in sorted(names):
            if not n.endswith((".pyc", ".pyo")) and not n.startswith("."):
                files.append(Path(root) / n)
    return files


def worker_hash(src: Path | None = None) -> str:
    src = src or worker_source()
    h = hashlib.sha256()
    for f in _worker_files(src):
        h.update(f.relative_to(src).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _python_identity(python: str) -> str:
    real = os.path.realpath(python)
    if real == os.path.realpath(sys.executable):
        return f"{real}|{sys.version.split()[0]}|{sys.implementation.cache_tag}"
    st = os.stat(real)  # another interpreter: its file identity stands for its version
    return f"{real}|{st.st_size}|{st.st_mtime_ns}"


def _env_key(deps: list[Dep], python: str) -> str:
    doc = {
        "schema": MARKER_SCHEMA,
        "python": _python_identity(python),
        "core": core_versions(),
        "deps": [d.key() for d in deps],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _combine(env_key: str, whash: str) -> str:
    return hashlib.sha256(f"{env_key}:{whash}".encode()).hexdigest()[:16]


def fingerprint(deps: dict | Iterable | None, python: str = sys.executable, *, worker_src: Path | None = None) -> str:
    """Python version + pinned core versions + worker code hash + normalized deps."""
    return _combine(_env_key(normalize_deps(deps), python), worker_hash(worker_src))


# --------------------------------------------------------------------------- venv files


def venv_python(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def read_marker(venv: Path) -> dict | None:
    """The marker of a complete venv, or None when missing, unreadable or the venv is broken."""
    try:
        with open(venv / MARKER_NAME, "r", encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("schema") != MARKER_SCHEMA:
        return None
    sp = m.get("site_packages")
    if not isinstance(sp, str) or not venv_python(venv).exists():
        return None
    if not (venv / sp / "worker" / "__init__.py").is_file():
        return None
    return m


def _site_packages(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Lib" / "site-packages"
    found = sorted(venv.glob("lib/python*/site-packages"))
    if not found:
        raise InstallError(f"no site-packages in {venv}", stage="venv")
    return found[0]


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_marker(venv: Path, marker: dict) -> None:
    tmp = venv / f".{MARKER_NAME}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, venv / MARKER_NAME)
    _fsync_dir(venv)


def copy_worker(site_packages: Path, src: Path) -> None:
    """Copy the worker package into site-packages: into a temp dir beside, then rename in."""
    for left in site_packages.glob(".fn-worker-*"):  # from a killed copy
        _rmtree(left)
    tmp = site_packages / f".fn-worker-new-{secrets.token_hex(4)}"
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*"))
    dest = site_packages / "worker"
    old = site_packages / f".fn-worker-old-{secrets.token_hex(4)}"
    if dest.exists() or dest.is_symlink():
        os.rename(dest, old)
    os.rename(tmp, dest)
    _rmtree(old)


class _Lock:
    """flock on ``<data>/.venv.lock``: one builder per data folder (released if we die)."""

    def __init__(self, path: Path, block: bool = True) -> None:
        self.path = path
        self.block = block
        self.fd: int | None = None
        self.held = False

    def __enter__(self) -> "_Lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # no flock (Windows): a single builder is the caller's job
            self.held = True
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.block else fcntl.LOCK_NB))
            self.held = True
        except BlockingIOError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


# --------------------------------------------------------------------------- subprocesses


def _uv_bin() -> str:
    import uv

    return uv.find_uv_bin()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The target is always given with --python; an activated env of the caller must not leak in.
    for k in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME", "UV_SYSTEM_PYTHON", "UV_PYTHON"):
        env.pop(k, None)
    env["UV_PYTHON_DOWNLOADS"] = "never"  # the supervisor's own Python, never a download
    env.setdefault("UV_NO_PROGRESS", "1")
    return env  # UV_CACHE_DIR passes through only if the caller set it: share the user's cache


def _set_pdeathsig() -> None:
    # Runs in the child between fork and exec. The signal fires when the forking *thread*
    # exits; that thread waits in communicate() for the child, so it outlives it.
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the supervisor


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _run(
    argv: list[str], *, stage: str, timeout: float, cwd: Path, env: dict[str, str], cancel: Cancel | None = None
) -> str:
    """Run argv (never a shell) in its own process group; kill the group past the timeout or on cancel."""
    if cancel is not None and cancel.is_set():
        raise InstallError(f"{stage}: cancelled", stage=stage, cancelled=True)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            process_group=0,
            preexec_fn=_set_pdeathsig if _PRCTL is not None else None,
        )
    except OSError as e:
        raise InstallError(f"{stage}: cannot run {argv[0]}: {e}", stage=stage) from e
    deadline = time.monotonic() + timeout
    try:
        while True:  # short slices so a cancel is seen; communicate() keeps what it read
            try:
                out, _ = proc.communicate(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    _killpg(proc)
                    out = _drain(proc)
                    raise InstallError(f"{stage}: cancelled", stage=stage, output=out, cancelled=True) from None
                if time.monotonic() >= deadline:
                    raise
    except subprocess.TimeoutExpired:
        _killpg(proc)
        out = _drain(proc)
        raise InstallError(
            f"{stage}: timed out after {timeout:g}s\n{_tail(out)}", stage=stage, output=out, timed_out=True
        ) from None
    except BaseException:  # interrupted: leave nothing running
        _killpg(proc)
        _drain(proc)
        raise
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise InstallError(
            f"{stage} failed (exit {proc.returncode}):\n{_tail(text)}", stage=stage, output=text
        )
    return text


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _drain(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a grandchild left its own group holding the pipe
        proc.kill()
        proc.wait()
        return ""
    return (out or b"").decode("utf-8", "replace")


# --------------------------------------------------------------------------- build


def _report(progress: Progress | None, message: str, fraction: float | None) -> None:
    if progress is not None:
        try:
            progress(message, fraction)
        except Exception:  # a broken progress sink must not fail an install
            pass


def _install(uv: str, py: Path, venv: Path, deps: list[Dep], *, timeout: float, env, cwd, cancel,
             upgrade: bool = False) -> None:
    if upgrade:
        return _install_newest(uv, py, deps, timeout=timeout, env=env, cwd=cwd, cancel=cancel)
    pins = core_versions()
    core = [f"{n}=={pins[n]}" if n in pins else n for n in CORE_PACKAGES]
    reqs = core + [d.requirement() for d in deps if d.installed]
    # Constraints keep user deps from moving the core; the closure (supervisor's exact
    # versions) lets a warm cache serve the whole set offline.
    closure = venv / "fn-supervise-constraints.txt"
    closure.write_text("".join(f"{n}=={v}\n" for n, v in sorted(core_closure().items())))
    top = venv / "fn-supervise-core.txt"
    top.write_text("".join(r + "\n" for r in core))
    base = [uv, "pip", "install", "--python", str(py), "--no-progress"]
    online = [*base, "-c", str(top)]
    offline = [*base, "--offline", "-c", str(closure)]
    if any(d.kind == "index" for d in deps):
        # The user asked for packages from the index: resolve fresh; cache only without network.
        attempts = [online, offline]
    else:
        # Only the core (and local projects): the warm cache has it all, no network round trips.
        attempts = [offline, online]
    failed: InstallError | None = None
    deadline = time.monotonic() + timeout  # one bound for both tries
    for argv in attempts:
        left = max(1.0, deadline - time.monotonic())
        try:
            _run([*argv, "--", *reqs], stage="install", timeout=left, cwd=cwd, env=env, cancel=cancel)
            return
        except InstallError as e:
            if e.timed_out or e.cancelled:
                raise  # not retried: the time bound is the caller's
            if argv is online or failed is None:
                failed = e  # the online answer says what is really wrong (not "not in cache")
    assert failed is not None
    raise InstallError(
        f"installing {', '.join(reqs)} failed:\n{_tail(failed.output)}", stage="install", output=failed.output
    )


def _build(
    data_dir: Path,
    deps: list[Dep],
    python: str,
    marker: dict,
    worker_src: Path,
    progress: Progress | None,
    timeout: float,
    cancel: Cancel | None,
    upgrade: bool = False,
    prefix: str = ".venv.new-",
) -> Path:
    """Build a complete venv in ``<prefix><rand>``; return it (marker written) or raise."""
    for d in deps:
        if d.kind == "local" and not os.path.exists(d.path or ""):
            raise InvalidDependency(f"{d.name}: path {d.path} does not exist")
    uv = _uv_bin()
    env = _child_env()
    new = data_dir / f"{prefix}{secrets.token_hex(4)}"
    try:
        _report(progress, "creating venv", 0.05)
        _run(
            [uv, "venv", str(new), "--python", python, "--no-project", "--relocatable", "--quiet"],
            stage="venv",
            timeout=VENV_TIMEOUT,
            cwd=data_dir,
            env=env,
            cancel=cancel,
        )
        py = venv_python(new)
        n = len(CORE_PACKAGES) + sum(d.installed for d in deps)
        _report(progress, f"installing {n} packages", 0.15)
        _install(uv, py, new, deps, timeout=timeout, env=env, cwd=data_dir, cancel=cancel, upgrade=upgrade)
        _report(progress, "copying worker code", 0.8)
        sp = _site_packages(new)
        copy_worker(sp, worker_src)
        _report(progress, "verifying", 0.9)
        _run(
            [str(py), "-I", "-c", VERIFY_IMPORTS],
            stage="verify",
            timeout=VERIFY_TIMEOUT,
            cwd=data_dir,
            env=env,
            cancel=cancel,
        )
        _write_marker(new, {**marker, "site_packages": sp.relative_to(new).as_posix(), "created": time.time()})
        return new
    except BaseException:
        _rmtree(new)
        raise


def _swap(data_dir: Path, new: Path) -> None:
    venv = data_dir / ".venv"
    old = data_dir / f".venv.old-{secrets.token_hex(4)}"
    if venv.exists() or venv.is_symlink():
        os.rename(venv, old)
    os.rename(new, venv)
    _fsync_dir(data_dir)
    _rmtree(old)


def _recover_and_clean(data_dir: Path, wanted: str) -> None:
    """Under the lock: adopt a complete venv stranded between the two renames, drop leftovers."""
    venv = data_dir / ".venv"
    leftovers = sorted(data_dir.glob(".venv.new-*")) + sorted(data_dir.glob(".venv.old-*"))
    if not venv.exists():
        for cand in leftovers:
            m = read_marker(cand)
            if m is not None and m.get("fingerprint") == wanted:
                os.rename(cand, venv)
                _fsync_dir(data_dir)
                break
    for left in leftovers:
        if left.exists():
            _rmtree(left)


def _clean_if_idle(data_dir: Path) -> None:
    """Hot path: drop leftovers of a killed run, but only if no builder holds the lock now."""
    try:
        names = os.listdir(data_dir)
    except OSError:
        return
    if not any(n.startswith((".venv.new-", ".venv.old-")) for n in names):
        return
    try:
        with _Lock(data_dir / ".venv.lock", block=False) as lock:
            if lock.held:
                for n in names:
                    if n.startswith((".venv.new-", ".venv.old-")):
                        _rmtree(data_dir / n)
    except OSError:  # a read-only data folder: the venv is still usable
        pass


def _ensure(
    data_dir: Path,
    deps: dict | Iterable | None,
    *,
    python: str,
    progress: Progress | None,
    worker_src: Path | None,
    timeout: float,
    recopy: bool,
    cancel: Cancel | None,
) -> EnvInfo:
    data_dir = Path(os.path.abspath(data_dir))  # absolute: argv paths never look like options
    venv = data_dir / ".venv"
    norm = normalize_deps(deps)  # validation first: a bad name never reaches a subprocess
    src = worker_src or worker_source()
    env_key = _env_key(norm, python)
    whash = worker_hash(src)
    wanted = _combine(env_key, whash)

    if recopy and os.path.isdir(data_dir / PENDING):  # a prepare (not a live install): take an update
        _take_pending(data_dir, wanted)
    # Hot path: no lock, no subprocess. The swap is by rename, so what we read is whole.
    m = read_marker(venv)
    if m is not None and m.get("fingerprint") == wanted:
        _clean_if_idle(data_dir)
        return EnvInfo(venv_python(venv), venv, wanted)

    data_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(data_dir / ".venv.lock"):
        _recover_and_clean(data_dir, wanted)
        m = read_marker(venv)  # another builder may have finished while we waited
        if m is not None and m.get("fingerprint") == wanted:
            return EnvInfo(venv_python(venv), venv, wanted)
        marker = {
            "schema": MARKER_SCHEMA,
            "fingerprint": wanted,
            "env_key": env_key,
            "worker_hash": whash,
            "python": os.path.realpath(python),
            "core": core_versions(),
            "deps": [d.key() for d in norm],
        }
        if recopy and m is not None and m.get("env_key") == env_key:
            # Only the worker code changed (fn-supervise upgraded): re-copy, keep the venv.
            _report(progress, "updating worker code", 0.5)
            copy_worker(venv / m["site_packages"], src)
            _write_marker(venv, {**m, **marker, "updated": time.time()})
            _report(progress, "done", 1.0)
            return EnvInfo(venv_python(venv), venv, wanted)
        new = _build(data_dir, norm, python, marker, src, progress, timeout, cancel)
        _swap(data_dir, new)
    _report(progress, "done", 1.0)
    return EnvInfo(venv_python(venv), venv, wanted)


def ensure_environment(
    data_dir: Path,
    deps: dict | Iterable | None,
    *,
    python: str = sys.executable,
    progress: Progress | None = None,
    worker_src: Path | None = None,
    timeout: float = INSTALL_TIMEOUT,
    cancel: Cancel | None = None,
) -> EnvInfo:
    """Return the worker venv for these deps, building (beside, then swapping) only if needed.

    Raises InstallError (InvalidDependency for bad input, before any subprocess). ``timeout``
    bounds the package install; setting ``cancel`` (a threading.Event) from another thread
    kills the running uv and raises InstallError(cancelled=True); nothing half-built is kept.
    """
    return _ensure(
        data_dir, deps, python=python, progress=progress, worker_src=worker_src, timeout=timeout, recopy=True,
        cancel=cancel,
    )


def install_into(
    data_dir: Path,
    deps: dict | Iterable | None,
    *,
    python: str = sys.executable,
    progress: Progress | None = None,
    worker_src: Path | None = None,
    timeout: float = INSTALL_TIMEOUT,
    cancel: Cancel | None = None,
) -> EnvInfo:
    """For a live worker: build a new venv with the full dep set beside, verify, swap.

    Nothing is changed in place: on InstallError the old ``.venv`` stays as it was, in use.
    """
    return _ensure(
        data_dir, deps, python=python, progress=progress, worker_src=worker_src, timeout=timeout, recopy=False,
        cancel=cancel,
    )


# --------------------------------------------------------------------------- --no-venv


def install_into_interpreter(
    python: str,
    deps: dict | Iterable | None,
    *,
    progress: Progress | None = None,
    timeout: float = INSTALL_TIMEOUT,
    cancel: Cancel | None = None,
) -> list[str]:
    """--no-venv: install what is asked into the interpreter the worker runs in, as the stock
    worker with --not-in-venv does. Returns the requirements installed (local modules need none).

    There is no venv to build aside, so this changes the interpreter in place; uv installs
    each package whole or not at all. When that interpreter is ours, funcnodes-core and
    aiohttp are held at their versions (a user package must not move them under a running
    worker and this supervisor).
    """
    import tempfile

    norm = normalize_deps(deps)  # validation first: a bad name never reaches a subprocess
    reqs = [d.requirement() for d in norm if d.installed]
    if not reqs:
        return []
    uv = _uv_bin()
    env = _child_env()
    _report(progress, f"installing {', '.join(d.name for d in norm if d.installed)}", 0.2)
    with tempfile.TemporaryDirectory(prefix="fn-supervise-install-") as tmp:
        base = [uv, "pip", "install", "--python", str(python), "--no-progress"]
        if os.path.abspath(python) == os.path.abspath(sys.executable):  # not realpath: venvs share one
            pins = Path(tmp) / "core-constraints.txt"
            pins.write_text("".join(f"{n}=={v}\n" for n, v in sorted(core_versions().items())))
            base += ["-c", str(pins)]
        online, offline = base, [*base, "--offline"]
        # Index packages: resolve fresh, the cache only without network; local projects: cache first.
        attempts = [online, offline] if any(d.kind == "index" for d in norm) else [offline, online]
        deadline = time.monotonic() + timeout
        failed: InstallError | None = None
        for argv in attempts:
            try:
                _run([*argv, "--", *reqs], stage="install", timeout=max(1.0, deadline - time.monotonic()),
                     cwd=Path(tmp), env=env, cancel=cancel)
                _report(progress, "done", 1.0)
                return reqs
            except InstallError as e:
                if e.timed_out or e.cancelled:
                    raise
                if argv is online or failed is None:
                    failed = e
    assert failed is not None
    raise InstallError(f"installing {', '.join(reqs)} into {python} failed:\n{_tail(failed.output)}",
                       stage="install", output=failed.output)


# --------------------------------------------------------------------------- update_on_startup
#
# The FuncNodes config's `update_on_startup` ({"funcnodes": .., "funcnodes-core": ..,
# "funcnodes-worker": ..}): any flag set means "pick up newer FuncNodes and package
# dependencies". Never at the cost of a start: after the worker is ready, the supervisor builds
# a venv aside (`.venv.update-<rand>`) with the newest versions that resolve, keeps it as
# `.venv.pending` only if something is newer, and the next prepare (restart) swaps it in.
# Offline or failing, nothing changes. `.venv.update.json` says what the last check found.

PENDING = ".venv.pending"
UPDATE_STATUS = ".venv.update.json"


def update_wanted(flags: Any) -> bool:
    return isinstance(flags, dict) and any(bool(v) for v in flags.values())


def _install_newest(uv: str, py: Path, deps: list[Dep], *, timeout: float, env, cwd, cancel) -> None:
    """A fresh venv with the newest core and dependencies that resolve: the network first,
    then the cache alone (offline that finds what the cache has, usually nothing newer)."""
    reqs = list(CORE_PACKAGES) + [d.requirement() for d in deps if d.installed]
    base = [uv, "pip", "install", "--python", str(py), "--no-progress"]
    failed: InstallError | None = None
    deadline = time.monotonic() + timeout
    for argv in (base, [*base, "--offline"]):
        try:
            _run([*argv, "--", *reqs], stage="install", timeout=max(1.0, deadline - time.monotonic()),
                 cwd=cwd, env=env, cancel=cancel)
            return
        except InstallError as e:
            if e.timed_out or e.cancelled:
                raise
            failed = failed or e
    assert failed is not None
    raise InstallError(f"updating {', '.join(reqs)} failed:\n{_tail(failed.output)}", stage="install",
                       output=failed.output)


def installed_versions(venv: Path) -> dict[str, str]:
    """Distribution versions in a venv, by canonical name, from its *.dist-info folders."""
    out: dict[str, str] = {}
    try:
        sp = _site_packages(venv)
    except InstallError:
        return out
    for d in sp.glob("*.dist-info"):
        name, _, version = d.name[: -len(".dist-info")].partition("-")
        if version:
            out[canonical_name(name)] = version
    return out


def _write_update_status(data_dir: Path, status: dict) -> None:
    tmp = data_dir / f".{UPDATE_STATUS}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.write_text(json.dumps(status, indent=2, sort_keys=True))
        os.replace(tmp, data_dir / UPDATE_STATUS)
    except OSError:
        _rmtree(tmp)


def read_update_status(data_dir: Path) -> dict | None:
    try:
        st = json.loads((Path(data_dir) / UPDATE_STATUS).read_text())
    except (OSError, ValueError):
        return None
    return st if isinstance(st, dict) else None


def check_update(
    data_dir: Path,
    deps: dict | Iterable | None,
    flags: Any,
    *,
    python: str = sys.executable,
    worker_src: Path | None = None,
    timeout: float = INSTALL_TIMEOUT,
    cancel: Cancel | None = None,
) -> dict:
    """Build an updated venv aside; keep it as .venv.pending when anything in it is newer.
    Never raises, never touches the venv in use. Returns (and records) what it found."""
    data_dir = Path(os.path.abspath(data_dir))
    if not update_wanted(flags):
        return {"state": "off"}
    now = time.time()
    try:
        norm = normalize_deps(deps)
        src = worker_src or worker_source()
        wanted = _combine(_env_key(norm, python), worker_hash(src))
        venv = data_dir / ".venv"
        for left in data_dir.glob(".venv.update-*"):  # a check killed with its supervisor
            _rmtree(left)
        current = read_marker(venv)
        if current is None or current.get("fingerprint") != wanted:
            return {"state": "skipped", "reason": "the venv in use is not the current one"}
        new = _build(data_dir, norm, python, {**current, "fingerprint": wanted}, src, None, timeout, cancel,
                     upgrade=True, prefix=".venv.update-")
    except InstallError as e:
        if e.cancelled:
            return {"state": "cancelled"}
        status = {"state": "failed", "checked": now, "error": str(e)[:2000]}
        _write_update_status(data_dir, status)
        return status
    watched = set(CORE_PACKAGES) | {d.name for d in norm if d.installed}
    before, after = installed_versions(venv), installed_versions(new)
    changes = {n: [before.get(n), after.get(n)] for n in sorted(watched) if before.get(n) != after.get(n)}
    if not changes:
        _rmtree(new)
        status = {"state": "current", "checked": now}
    else:
        m = read_marker(new) or {}
        _write_marker(new, {**m, "update": changes, "core": {n: after.get(canonical_name(n)) for n in CORE_PACKAGES}})
        with _Lock(data_dir / ".venv.lock"):
            _rmtree(data_dir / PENDING)
            os.rename(new, data_dir / PENDING)
            _fsync_dir(data_dir)
        status = {"state": "pending", "checked": now, "changes": changes}
    _write_update_status(data_dir, status)
    return status


def _take_pending(data_dir: Path, wanted: str) -> None:
    """At a prepare: swap the pending update in if it was built for this very request (same
    deps, Python and worker code); a stale one (the deps changed since) is dropped."""
    pending = data_dir / PENDING
    with _Lock(data_dir / ".venv.lock"):
        m = read_marker(pending)
        if m is None or m.get("fingerprint") != wanted:
            _rmtree(pending)
            if m is not None:
                _write_update_status(data_dir, {"state": "dropped", "checked": time.time(),
                                                "reason": "the dependencies changed after the check"})
            return
        _swap(data_dir, pending)
    _write_update_status(data_dir, {"state": "applied", "applied": time.time(), "changes": m.get("update") or {}})


def describe_update(data_dir: Path) -> str | None:
    """One line for `fn-supervise status`."""
    st = read_update_status(data_dir)
    if not st:
        return None
    changes = ", ".join(f"{n} {a or '-'} -> {b or '-'}" for n, (a, b) in (st.get("changes") or {}).items())
    state = st.get("state")
    if state == "pending":
        return f"pending ({changes}), used at the next restart"
    if state == "applied":
        return f"applied ({changes})"
    if state == "current":
        return "up to date"
    if state == "failed":
        first = (st.get("error") or "").strip().splitlines()[:1]
        return "check failed, nothing changed" + (f": {first[0]}" if first else "")
    return str(state)
