"""Moving a worker: the export ZIP (the stock format, plus what a path dependency needs) and
its import, all or nothing.

The archive: `config` (without machine-local keys), `state`, `files/...`, `pyproject.toml`, and,
beyond the stock worker, `modules/<path>` for each path dependency that lives in the data folder,
its config entry naming it by that path relative to the data folder. The stock worker ignores
`modules/` (it reads config, state, files/ and pyproject.toml only).

An import is planned first (every entry and dependency checked, nothing touched), then staged
(files/ and modules/ as hidden temp files beside their targets: fsutil.ConfinedWriter), then
applied: module files renamed into place, packages installed, dependencies loaded, the state
applied. Only when all of that worked are the files renamed into place; on any failure the
module files, the dependencies and the graph are put back as they were and the staged files
removed, so a refused import leaves nothing behind. Packages an installer already put into the
venv stay there (unused: the config does not name them).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Awaitable, Callable

from .fsutil import (ConfinedWriter, PathEscape, atomic_write, open_confined, open_confined_dir, safe_relative,
                     walk_confined)
from .packages import DependencyError, is_project, normalize, path_allowed

log = logging.getLogger("fn_supervise.worker.transfer")

# Keys that describe this machine or this run, not the worker: never exported. The stock worker
# drops the first five; the rest are the source's monitor address, its supervision settings, its
# debug switch (full tracebacks to clients) and the browser origins it trusts.
EXPORT_EXCLUDE = ("pid", "python_path", "env_path", "data_path", "uuid", "host", "port", "ssl", "auth_token",
                  "subprocess_monitor", "supervisor", "debug", "cors_origins")
MODULES = "modules/"
# Top-level names in the data folder a bundled module may never land on.
RESERVED = {"files", "local_scripts", "nodespace.json", "nodespace.journal", "pyproject.toml", "quarantine.json",
            "worker.log"}


class ExportError(ValueError):
    pass


def _reserved(rel: PurePosixPath) -> bool:
    top = rel.parts[0]
    return top in RESERVED or top.startswith((".", "nodespace.", "worker.log"))


def _skipped(rel: PurePosixPath) -> bool:
    """Build leftovers inside a bundled folder: caches, hidden folders, egg-info."""
    return any(p == "__pycache__" or p.startswith(".") or p.endswith(".egg-info") for p in rel.parts)


def bundled_path(path: str, data_dir: Path) -> PurePosixPath | None:
    """The data-folder-relative path of a path dependency an export carries, else None."""
    if not path_allowed(path, data_dir):
        return None
    rel = PurePosixPath(Path(path).expanduser().resolve().relative_to(Path(data_dir).resolve()).as_posix())
    if not rel.parts or _reserved(rel):
        return None
    return rel


# region export
def export_config(config: dict, data_dir: Path) -> tuple[dict, list[PurePosixPath]]:
    """The config an export carries, and the data-folder paths of the modules it bundles."""
    cfg = {k: v for k, v in config.items() if k not in EXPORT_EXCLUDE}
    bundles: list[PurePosixPath] = []
    if isinstance(config.get("package_dependencies"), dict):
        deps = {}
        for name, dep in config["package_dependencies"].items():
            if isinstance(dep, dict) and isinstance(dep.get("path"), str):
                rel = bundled_path(dep["path"], data_dir)
                if rel is not None:
                    dep = dict(dep, path=rel.as_posix())
                    bundles.append(rel)
            deps[name] = dep
        cfg["package_dependencies"] = deps
    return cfg, bundles


def build_export(config: dict, state: dict, data_dir: Path, with_files: bool) -> bytes:
    import funcnodes_core as fn

    data_dir = Path(data_dir)
    cfg, bundles = export_config(config, data_dir)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("config", json.dumps(cfg, indent=2, cls=fn.JSONEncoder))
        zf.writestr("state", json.dumps(state, indent=2, cls=fn.JSONEncoder))
        pyproject = data_dir / "pyproject.toml"
        if pyproject.is_file() and not pyproject.is_symlink():
            zf.write(pyproject, "pyproject.toml")
        if with_files:
            # Opened with O_NOFOLLOW component by component: a symlink in files/ (to a folder or a
            # file outside) is skipped, even one swapped in while the archive is written.
            for rel, fd in walk_confined(data_dir, "files"):
                with os.fdopen(fd, "rb") as src:
                    if rel.name.startswith(ConfinedWriter.PREFIX) or not _utf8_name(rel):
                        continue  # a staged upload, or a name (made by a node) no ZIP can hold
                    _copy(src, zf, "files/" + rel.as_posix())
        for rel in bundles:
            for sub, src in _bundle_files(data_dir, rel):
                with src:
                    _copy(src, zf, MODULES + (rel / sub).as_posix())
    return buf.getvalue()


def _bundle_files(data_dir: Path, rel: PurePosixPath):
    """(path below rel, open file) of a bundled module: the file itself, or a folder's files."""
    try:
        os.close(open_confined_dir(data_dir, rel))
    except (PathEscape, OSError):  # not a folder: a .py file (or gone, or a symlink)
        try:
            yield PurePosixPath(), open_confined(data_dir, rel)
        except (PathEscape, OSError):
            log.warning("path dependency %s cannot be read; the export does not carry it", rel)
        return
    for sub, fd in walk_confined(data_dir, rel.as_posix()):
        if _skipped(sub):
            os.close(fd)
            continue
        yield sub, os.fdopen(fd, "rb")


def _copy(src, zf: zipfile.ZipFile, name: str) -> None:
    with zf.open(name, "w") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _utf8_name(rel: PurePosixPath) -> bool:
    try:
        str(rel).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
# endregion


# region import: plan
def read_export(data: bytes | str, max_size: int = 1 << 30) -> zipfile.ZipFile:
    import base64

    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (ValueError, TypeError):
            raise ExportError("data is not valid base64") from None
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise ExportError(f"data is not a ZIP archive: {e}") from None
    names = set(zf.namelist())
    for required in ("config", "state"):
        if required not in names:
            raise ExportError(f"export archive has no '{required}' entry")
    # Refuse, don't strip: an entry that escapes the data folder means the archive is hostile.
    from .config import max_data_size

    max_size = min(max_size, max_data_size())  # the stock variable bounds imports too
    total = sum(i.file_size for i in zf.infolist())
    if total > max_size:  # a zip bomb is refused before anything is decompressed
        raise ExportError(f"export archive unpacks to {total} bytes, over the limit of {max_size}")
    for name in names:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or "\\" in name or "\x00" in name:
            raise ExportError(f"export archive entry {name!r} escapes the data folder")
    return zf


@dataclass
class ImportPlan:
    """What an import will do, checked before anything is touched."""

    deps: dict[str, dict] = field(default_factory=dict)  # package -> normalized spec (absolute paths)
    bundled: set[str] = field(default_factory=set)  # packages whose module the archive carries
    outside: set[str] = field(default_factory=set)  # path dependencies outside this data folder
    state: dict | None = None
    zf: zipfile.ZipFile | None = None
    files: list[tuple[zipfile.ZipInfo, PurePosixPath]] = field(default_factory=list)  # below files/
    modules: list[tuple[zipfile.ZipInfo, PurePosixPath]] = field(default_factory=list)  # below the data folder


def _json_entry(zf: zipfile.ZipFile, name: str) -> dict:
    try:
        value = json.loads(zf.read(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"export archive entry '{name}' is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ExportError(f"export archive entry '{name}' is not a JSON object")
    return value


def plan_export(zf: zipfile.ZipFile, data_dir: Path) -> ImportPlan:
    plan = ImportPlan(zf=zf, state=_json_entry(zf, "state"))
    carried: dict[PurePosixPath, list] = {}
    for info in zf.infolist():
        if info.is_dir():
            continue
        try:
            if info.filename.startswith("files/"):
                plan.files.append((info, safe_relative(info.filename[len("files/"):])))
            elif info.filename.startswith(MODULES):
                rel = safe_relative(info.filename[len(MODULES):])
                if _reserved(rel):
                    raise ExportError(f"export archive entry {info.filename!r} would overwrite the worker's own files")
                plan.modules.append((info, rel))
        except PathEscape as e:
            raise ExportError(f"export archive entry {info.filename!r}: {e}") from None
    roots = _plan_deps(plan, _json_entry(zf, "config"), Path(data_dir))
    for info, rel in plan.modules:
        if not any(rel == r or r in rel.parents for r in roots):
            raise ExportError(f"export archive entry {info.filename!r} belongs to no path dependency")
    for r in roots:
        if not any(rel == r or r in rel.parents for _info, rel in plan.modules):
            raise ExportError(f"the export does not carry the path dependency {r.as_posix()!r}")
    return plan


def plan_update(config: dict | None, state: dict | None, data_dir: Path) -> ImportPlan:
    plan = ImportPlan(state=state)
    roots = _plan_deps(plan, config or {}, Path(data_dir))
    if roots:
        raise DependencyError(f"a relative path dependency ({roots[0].as_posix()}) needs an export that carries it")
    return plan


def _plan_deps(plan: ImportPlan, config: dict, data_dir: Path) -> list[PurePosixPath]:
    raw = config.get("package_dependencies") or {}
    if isinstance(raw, list):  # the legacy list form
        raw = {d["package"]: d for d in raw if isinstance(d, dict) and "package" in d}
    if not isinstance(raw, dict):
        raise ExportError("config.package_dependencies must be an object")
    roots = []
    for name, dep in raw.items():
        dep = dep if isinstance(dep, dict) else {}
        path = dep.get("path")
        if path is not None:
            if not isinstance(path, str) or not path:
                raise DependencyError(f"path dependency {name}: invalid path {path!r}")
            if not os.path.isabs(os.path.expanduser(path)):
                try:
                    rel = safe_relative(path)
                except PathEscape as e:
                    raise ExportError(f"path dependency {name}: {e}") from None
                if _reserved(rel):
                    raise ExportError(f"path dependency {name}: {path!r} would overwrite the worker's own files")
                roots.append(rel)
                path = str(data_dir / rel)
                plan.bundled.add(str(dep.get("package", name)))
        spec = normalize(dep.get("package", name), dep.get("version"), path)
        plan.deps[spec["package"]] = spec
        if path is not None and spec["package"] not in plan.bundled and not path_allowed(path, data_dir):
            plan.outside.add(spec["package"])  # fine only if this worker has it loaded already
    return roots
# endregion


# region import: apply
class _ModuleUndo:
    """What the module files were before they were replaced, to put them back."""

    def __init__(self, data_dir: Path, rels: list[PurePosixPath]):
        self.data_dir = data_dir
        self.old: dict[PurePosixPath, bytes | None] = {}
        for rel in rels:
            try:
                with open_confined(data_dir, rel) as f:
                    self.old[rel] = f.read()
            except (FileNotFoundError, NotADirectoryError):
                self.old[rel] = None

    def restore(self, created: list[PurePosixPath]) -> None:
        for rel, data in self.old.items():
            path = self.data_dir / rel
            try:
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write(path, data)
            except OSError as e:
                log.error("could not put %s back after a failed import: %s", rel, e)
        for rel in sorted(created, key=lambda r: len(r.parts), reverse=True):
            try:
                (self.data_dir / rel).rmdir()
            except OSError:
                pass


async def apply(plan: ImportPlan, data_dir: Path, graph: Any, install: Callable[[dict], Awaitable[None]],
                durable: Callable[[], Any] | None = None) -> dict[str, dict]:
    """Carry out the plan, all or nothing; return the dependencies to save (added or replaced).
    `durable` (the snapshot) runs after the new graph is in place and before files/ are
    committed: if it fails, the rollback undoes everything."""
    data_dir = Path(data_dir)
    for name in sorted(plan.outside - set(graph.dependencies)):
        raise DependencyError(f"path dependency {name} ({plan.deps[name]['path']}) lies outside this worker's "
                              f"data folder and the export does not carry it")
    with ConfinedWriter(data_dir, "files") as fw, ConfinedWriter(data_dir, ".") as mw:
        try:
            for info, rel in plan.files:
                with plan.zf.open(info) as src, fw.open(rel) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            for info, rel in plan.modules:
                with plan.zf.open(info) as src, mw.open(rel) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (PathEscape, ValueError) as e:  # a symlink or a folder where a file must go
            raise ExportError(f"export archive: {e}") from None
        undo = _ModuleUndo(data_dir, [rel for _info, rel in plan.modules])
        created = mw.commit()
        added: list[str] = []
        replaced: dict[str, dict] = {}
        old_state = graph.state() if plan.state is not None else None
        try:
            for name, spec in plan.deps.items():
                old = graph.dependencies.get(name)
                if old is not None and name not in plan.bundled:
                    continue  # loaded already (a bundled module is loaded again: its file may be new)
                if spec.get("path") is None or is_project(spec["path"]):
                    await install(spec)
                graph.add_dependency(spec)
                if old is None:
                    added.append(name)
                else:
                    replaced[name] = old
            if plan.state is not None:
                graph.replace_state(plan.state)
            if durable is not None:
                durable()
            fw.commit()
        except BaseException:
            for name in reversed(added):
                graph.remove_dependency(name)
            undo.restore(created)
            for name, old in replaced.items():
                try:
                    graph.add_dependency(old["dep"])
                except Exception as e:  # noqa: BLE001
                    log.error("could not reload %s after a failed import: %s", name, e)
            if old_state is not None:
                graph.apply_state(old_state)
            raise
    return {name: plan.deps[name] for name in (*added, *replaced)}
# endregion
