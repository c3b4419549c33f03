"""The FuncNodes module list behind the UI's "Manage Libraries" (get_available_modules).

The list is the funcnodes_repositories project's CSV, cached at
`<config_dir>/cache/funcnodes_modules.csv` (the stock worker's path and format, so both read the
same file). A reply is built from the cache at once; a refresh from `url` runs in the background
(one at a time), replaces the cache only with a list that parses, and then calls `on_update`
(the worker sends `repos_update`). Offline, or with a broken download, the cache stays as it was.

The URL: worker config key `modules_url`, else $FN_SUPERVISE_MODULES_URL, else the stock URL;
an empty string turns the refresh off.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .fsutil import atomic_write

log = logging.getLogger("fn_supervise.worker.modules")

DEFAULT_URL = "https://raw.githubusercontent.com/Linkdlab/funcnodes_repositories/refs/heads/main/funcnodes_modules.csv"
URL_ENV = "FN_SUPERVISE_MODULES_URL"
FETCH_TIMEOUT = 30.0
MAX_CSV = 16 * 1024 * 1024  # a module list is kilobytes; anything this big is not one
REFRESH_INTERVAL = 60.0  # after a successful refresh, the next request within this uses the cache

# The fields of a row as the stock worker hands them out (its AvailableRepo, minus moduledata).
FIELDS = ("package_name", "version", "description", "entry_point__module", "entry_point__shelf",
          "entry_point__external_worker", "last_updated", "homepage", "source", "summary")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", str(name)).lower()


def modules_url(config: dict) -> str:
    url = config.get("modules_url")
    if url is None:
        url = os.environ.get(URL_ENV, DEFAULT_URL)
    return str(url).strip()


def parse_csv(text: str) -> dict[str, dict[str, Any]]:
    """Rows by package name, in file order (a later row of the same name replaces the earlier)."""
    repos: dict[str, dict[str, Any]] = {}
    for row in csv.DictReader(text.splitlines()):
        name = (row.get("package_name") or "").strip()
        if not name:
            continue
        repo = {k: (row.get(k) or None) for k in FIELDS}
        repo["package_name"] = name
        repo["version"] = (row.get("version") or "").strip()
        repo["description"] = row.get("description") or ""
        repo["releases"] = [v.strip() for v in (row.get("releases") or "").split(",") if v.strip()]
        repos[name] = repo
    return repos


def _installed_version(name: str, module: str | None) -> tuple[bool, str | None]:
    """(importable, distribution version) without importing anything."""
    try:
        return True, importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    mod = (module or name.replace("-", "_")).split(":")[0].split(".")[0]
    try:
        return importlib.util.find_spec(mod) is not None, None
    except (ImportError, ValueError):
        return False, None


def entry(name: str, repo: dict[str, Any] | None, version: str | None) -> dict[str, Any]:
    repo = repo or {}
    return {
        "name": name,
        "description": repo.get("description") or "No description available",
        "version": version or repo.get("version") or "latest",
        "homepage": repo.get("homepage") or "",
        "source": repo.get("source") or "",
        "releases": list(repo.get("releases") or []),
    }


def split(repos: dict[str, dict[str, Any]], active: dict[str, str | None],
          installed_version: Callable[[str, str | None], tuple[bool, str | None]] = _installed_version) -> dict:
    """The stock reply: active (in the worker's dependencies), installed (importable, not
    active), available (the rest). `active` maps dependency names to their module (or None)."""
    out: dict[str, list] = {"installed": [], "active": [], "available": []}
    act = {canonical(k): k for k in active}
    seen = set()
    for name, repo in repos.items():
        seen.add(canonical(name))
        ok, ver = installed_version(name, repo.get("entry_point__module"))
        e = entry(name, repo, ver)
        if canonical(name) in act:
            out["active"].append(e)
        elif ok:
            out["installed"].append(e)
        else:
            out["available"].append(e)
    # Installed FuncNodes plugins the list does not know yet.
    try:
        plugins = importlib.metadata.entry_points(group="funcnodes.module")
    except Exception:  # noqa: BLE001 (broken metadata of some distribution)
        plugins = []
    for ep in plugins:
        dist = getattr(ep, "dist", None)
        name = canonical(dist.name if dist is not None else ep.module)
        if name in seen:
            continue
        seen.add(name)
        e = entry(name, None, dist.version if dist is not None else None)
        (out["active"] if name in act else out["installed"]).append(e)
    # Active dependencies that are in neither (local modules, path dependencies).
    for c, name in act.items():
        if c not in seen:
            seen.add(c)
            out["active"].append(entry(name, None, installed_version(name, active[name])[1]))
    return out


def repos_event(repos: dict[str, dict[str, Any]], active: dict[str, str | None]) -> dict[str, Any]:
    """The `repos` of a repos_update event, in the stock shape (AvailableRepo as JSON)."""
    act = {canonical(k) for k in active}
    out = {}
    for name, repo in repos.items():
        ok, ver = _installed_version(name, repo.get("entry_point__module"))
        r = dict(repo)
        r["installed"] = ok or canonical(name) in act
        if ver:
            r["version"] = ver
        r["moduledata"] = None
        out[name] = r
    return out


class ModuleList:
    """The cached list plus its single-flight background refresh."""

    def __init__(self, cache_dir: Path, url: str, on_update: Callable[[dict], None] | None = None):
        self.path = Path(cache_dir) / "funcnodes_modules.csv"
        self.url = url
        self.on_update = on_update
        self.repos: dict[str, dict[str, Any]] = {}
        self._mtime: int | None = None
        self._task: asyncio.Task | None = None
        self._last_ok = float("-inf")

    def load(self) -> dict[str, dict[str, Any]]:
        """The cache as it is on disk now (re-read only when it changed)."""
        try:
            st = self.path.stat()
        except OSError:
            return self.repos
        if st.st_mtime_ns != self._mtime:
            try:
                self.repos = parse_csv(self.path.read_text(encoding="utf-8", errors="replace"))
                self._mtime = st.st_mtime_ns
            except (OSError, csv.Error) as e:
                log.warning("cannot read %s: %s", self.path, e)
        return self.repos

    def refresh(self, force: bool = False) -> asyncio.Task | None:
        """Start a background refresh unless one runs or one succeeded a moment ago."""
        if not self.url or (self._task is not None and not self._task.done()):
            return self._task
        if not force and time.monotonic() - self._last_ok < REFRESH_INTERVAL:
            return None
        self._task = asyncio.ensure_future(self._refresh())
        return self._task

    async def _refresh(self) -> bool:
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as s, s.get(self.url) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
                body = await r.content.read(MAX_CSV + 1)
            if len(body) > MAX_CSV:
                raise OSError("the module list is too large")
            text = body.decode("utf-8")
            repos = parse_csv(text)
            if not repos:
                raise ValueError("no package_name rows in the module list")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 (offline, DNS, HTTP, garbage: keep the cache)
            log.info("module list refresh from %s failed: %s", self.url, e)
            return False
        try:
            await asyncio.to_thread(self._write_cache, text)
        except OSError as e:
            log.warning("cannot write the module list cache %s: %s", self.path, e)
        self.repos = repos
        self._last_ok = time.monotonic()
        if self.on_update is not None:
            try:
                self.on_update(repos)
            except Exception:  # noqa: BLE001
                log.exception("repos_update failed")
        return True

    def _write_cache(self, text: str) -> None:
        atomic_write(self.path, text)
        meta = {"last_updated": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                "source_url": self.url}
        atomic_write(self.path.with_suffix(self.path.suffix + ".meta.json"), json.dumps(meta))
        self._mtime = self.path.stat().st_mtime_ns

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class WorkerModules:
    """The module list of one worker: its cache folder, URL and active dependencies."""

    def __init__(self, base: Path, config: dict, dependencies: Callable[[], dict], emit: Callable[[dict], None]):
        self.dependencies, self.emit = dependencies, emit
        self.list = ModuleList(Path(base) / "cache", modules_url(config), self._updated)

    def _active(self) -> dict[str, str | None]:
        return {name: info.get("module") for name, info in self.dependencies().items()}

    def _updated(self, repos: dict) -> None:
        from . import codec

        self.emit(codec.workerevent("repos_update", repos=repos_event(repos, self._active())))

    def available(self) -> dict:
        """The reply from the cache as it is; a refresh runs behind it."""
        self.list.refresh()
        return split(self.list.load(), self._active())
