"""<data>/pyproject.toml: the worker's package dependencies as a Python project names them.

The FuncNodes documentation lists an optional pyproject.toml in each worker folder and in its
export. Ours is derived from `package_dependencies` in worker_<uuid>.json (the one source of
truth): rewritten when they change and at start, so `uv pip install -r pyproject.toml` (or any
tool that reads a project) installs what the worker installs. Plain-module path dependencies are
imported, never installed, so they are not listed; local projects are, through [tool.uv.sources],
with a path relative to the data folder when they live in it (the file then travels with an export).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .fsutil import atomic_write

FILENAME = "pyproject.toml"
HEADER = ("# Written by fn-supervise from package_dependencies in the worker's config;\n"
          "# it is rewritten when they change: edit them (add/remove_package_dependency), not this file.\n")


def _project_name(name: str) -> str:
    n = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")
    return n or "worker"


def _is_project(path: Path) -> bool:
    return path.is_dir() and ((path / "pyproject.toml").is_file() or (path / "setup.py").is_file())


def render(worker_name: str, deps: dict[str, Any], data_dir: Path) -> str:
    requires: list[str] = []
    sources: list[tuple[str, str]] = []
    for name in sorted(deps):
        dep = deps[name] if isinstance(deps[name], dict) else {}
        package = str(dep.get("package") or name)
        path = dep.get("path")
        if path:
            p = Path(os.path.abspath(Path(path).expanduser()))
            if not _is_project(p):
                continue  # a plain module: imported from its path, not installed
            try:
                where = p.relative_to(Path(os.path.abspath(data_dir))).as_posix()
            except ValueError:
                where = str(p)
            requires.append(package)
            sources.append((package, where))
            continue
        requires.append(package + (dep.get("version") or ""))
    lines = [HEADER, "[project]", f"name = {json.dumps(_project_name(worker_name))}", 'version = "0.1.0"',
             'requires-python = ">=3.11"', "dependencies = ["]
    lines += [f"    {json.dumps(r)}," for r in requires]
    lines.append("]")
    if sources:
        lines += ["", "[tool.uv.sources]"]
        lines += [f"{json.dumps(pkg)} = {{ path = {json.dumps(where)} }}" for pkg, where in sources]
    return "\n".join(lines) + "\n"


def sync(data_dir: Path, worker_name: str, deps: dict[str, Any]) -> bool:
    """Write <data>/pyproject.toml if its content would change; True when written."""
    path = Path(data_dir) / FILENAME
    text = render(worker_name, deps, Path(data_dir))
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write(path, text)
    return True
