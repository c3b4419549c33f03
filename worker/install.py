"""Installs for add_package_dependency, as the stock worker does them.

A package that is already importable (at a version that fits, when one is asked for) is not
installed again: its shelf is simply added, whatever the mode. Anything else is installed:
supervised, by the supervisor (it owns installs: a venv built aside, or with --no-venv the
interpreter the worker runs in); standalone, with uv into this interpreter. Installs run one at
a time, uv's output is shown as progress, and a failure is an error that says why.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

from .packages import DependencyError

INSTALL_TIMEOUT = 900.0
_lock: asyncio.Lock | None = None  # standalone installs, one at a time (made in the running loop)


def _version_fits(installed: str, spec: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(installed) in SpecifierSet(spec)
    except ImportError:  # no packaging here: only an exact pin can be checked
        return spec.startswith("==") and spec[2:].strip() == installed
    except ValueError:
        return False


def already_importable(spec: dict[str, Any]) -> bool:
    """True when importing the package by name would work now (nothing is imported here)."""
    if spec.get("path"):
        return False
    name = spec["package"]
    importlib.invalidate_caches()
    mods = dict.fromkeys([spec.get("module") or name.replace("-", "_"), name.replace("-", "_").lower()])
    try:
        found = any(m and importlib.util.find_spec(m) is not None for m in mods)
    except (ImportError, ValueError):
        found = False
    if not found:
        return False
    version = spec.get("version")
    if not version:
        return True
    try:
        return _version_fits(importlib.metadata.version(name), version)
    except importlib.metadata.PackageNotFoundError:
        return False  # importable, but nothing says which version: let the installer decide


def find_uv() -> str:
    """uv for a standalone worker's own installs: the uv package if installed here, else PATH."""
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    exe = shutil.which("uv")
    if exe is None:
        raise DependencyError("no uv to install with: put uv on PATH, or run the worker under fn-supervise")
    return exe


async def install(rt: Any, spec: dict[str, Any]) -> None:
    """Make `spec` importable in this worker (see the module docstring)."""
    global _lock
    req = spec["package"] + (spec.get("version") or "")
    if already_importable(spec):
        return
    if rt.channel is not None:
        res = await rt.request_install([spec])  # serialized by the supervisor
        if not res.get("ok"):
            raise DependencyError(f"install of {req} failed: {res.get('error')}")
        return
    if spec.get("path"):
        req = str(Path(spec["path"]).resolve())  # a local project: install it from its folder
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        if already_importable(spec):  # the install we waited for brought it
            return
        await _uv_install(rt, spec["package"], req)


async def _uv_install(rt: Any, name: str, req: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        find_uv(), "pip", "install", "--python", sys.executable, "--", req,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
    )
    lines: list[str] = []

    async def pump() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line:
                lines.append(line)
                rt.set_progress(f"Install {name}: {line}", "info", 0.4, True)

    try:
        await asyncio.wait_for(asyncio.gather(pump(), proc.wait()), INSTALL_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise DependencyError(f"install of {req} timed out after {INSTALL_TIMEOUT:g}s") from None
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise DependencyError(f"install of {req} failed: {' | '.join(lines[-5:])}")
