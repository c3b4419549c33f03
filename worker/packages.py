"""Package dependencies: how a dependency becomes a shelf in the worker's library.

A dependency is FuncNodes' `{"package": name, "version": spec|None}`, or ours with a `path`:
a `.py` file or a module folder imported directly (no install), so tests and local work need
no network. Installs are not done here: the supervisor owns them (or, standalone, uv).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import funcnodes_core as fn

NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
VERSION_RE = re.compile(r"^(latest|[A-Za-z0-9.*+!_-]+|(\s*(==|!=|<=|>=|<|>|~=|===)\s*[A-Za-z0-9.*+!_-]+\s*,?)+)$")


class DependencyError(ValueError):
    pass


def normalize(name: str, version: str | None = None, path: str | None = None) -> dict[str, Any]:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DependencyError(f"invalid package name {name!r}")
    if version is not None:
        if not isinstance(version, str) or not VERSION_RE.match(version.strip()):
            raise DependencyError(f"invalid version {version!r} for {name}")
        version = version.strip()
        if version == "latest":
            version = None
        elif version[0].isalnum():
            version = "==" + version  # FuncNodes passes bare versions
    dep: dict[str, Any] = {"package": name, "version": version}
    if path is not None:
        dep["path"] = str(path)
    return dep


def module_name(dep: dict[str, Any]) -> str:
    if dep.get("module"):
        return dep["module"]
    if dep.get("path"):
        p = Path(dep["path"])
        return p.stem if p.suffix == ".py" else p.name
    return dep["package"].replace("-", "_").lower()


def is_project(path: str | Path) -> bool:
    """A folder with a build file is installed into the venv; a plain file or module is imported."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "pyproject.toml").is_file() or (p / "setup.py").is_file())


def import_dependency(dep: dict[str, Any]):
    """Import the dependency's module (fresh for path modules) and return it."""
    if dep.get("path") and is_project(dep["path"]):
        dep = {k: v for k, v in dep.items() if k != "path"}  # installed: import it by name
        dep.setdefault("module", dep["package"].replace("-", "_").lower())
    name = module_name(dep)
    if dep.get("path"):
        path = Path(dep["path"]).expanduser()
        init = path if path.suffix == ".py" else path / "__init__.py"
        if not init.is_file():
            raise DependencyError(f"dependency path {path} is not a .py file or a package folder")
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=None if path.suffix == ".py" else [str(path)]
        )
        if spec is None or spec.loader is None:
            raise DependencyError(f"cannot import {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return mod
    importlib.invalidate_caches()  # the supervisor may have just swapped in a new venv
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        raise DependencyError(f"Package {dep['package']} is not installed (module {name} not found)") from None


def shelf_of(mod) -> fn.Shelf | None:
    """The module's node shelf: its funcnodes entry point, else NODE_SHELF."""
    shelf = None
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="funcnodes.module"):
            if ep.module == mod.__name__ and ep.name == "shelf":
                shelf = ep.load()
                break
    except Exception:
        shelf = None
    if shelf is None:
        shelf = getattr(mod, "NODE_SHELF", None) or getattr(mod, "NODE_SHELFE", None)
    if shelf is None:
        return None
    if isinstance(shelf, dict):
        shelf = fn.Shelf.from_dict(shelf)
    return shelf


def path_allowed(path: str, data_dir: Path) -> bool:
    """Clients may only name path dependencies inside the data folder, and never in uploads."""
    try:
        p = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    data = data_dir.resolve()
    return p.is_relative_to(data) and not p.is_relative_to(data / "files")
