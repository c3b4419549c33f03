"""nodespace.json (WorkerState) and the export ZIP, in the stock formats.

Beyond the stock worker: input values set by clients are saved too, as the IO's `value` key
(which the stock loader reads as well), and only when they survive a JSON round trip.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import funcnodes_core as fn
from funcnodes_core import NoValue
from funcnodes_core.utils.saving import serialize_nodespace_for_saving

from . import codec


def json_safe(value: Any) -> bool:
    """True if value is plain JSON that comes back equal (no NaN, no custom objects)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return json.loads(text) == value


_json_safe = json_safe


def worker_state(nodespace: fn.NodeSpace, view: dict, meta: dict, external_workers: dict) -> dict:
    backend = serialize_nodespace_for_saving(nodespace)
    by_id = {n.uuid: n for n in nodespace.nodes}
    for nser in backend.get("nodes", []):
        node = by_id.get(nser.get("id"))
        if node is None:
            continue
        for ioid, ioser in nser.get("io", {}).items():
            if not ioser.get("is_input"):
                continue
            try:
                inp = node.get_input(ioid)
            except Exception:
                continue
            if inp.connections:
                continue  # a connected input gets its value from upstream
            value = inp.value
            if value is NoValue or not _json_safe(value):
                continue
            default = inp.default
            if default is not NoValue and _json_safe(default) and value == default:
                continue
            ioser["value"] = value
    return {
        "backend": backend,
        "view": {k: v for k, v in view.items() if k != "nodes"},
        "meta": meta,
        "external_workers": external_workers,
    }


def saved_values(state: dict) -> dict[str, dict[str, Any]]:
    """{node uuid: {input id: value}} of the values stored beside the defaults."""
    out: dict[str, dict[str, Any]] = {}
    for nser in (state.get("backend") or {}).get("nodes", []) or []:
        for ioid, ioser in (nser.get("io") or {}).items():
            if isinstance(ioser, dict) and ioser.get("is_input") and "value" in ioser:
                out.setdefault(nser.get("id"), {})[ioid] = ioser["value"]
    return out


def dumps_state(state: dict) -> str:
    # Compact like the stock worker; NaN is not valid JSON for other readers.
    return json.dumps(state, cls=fn.JSONEncoder, separators=(",", ":"))


def read_state(path: Path) -> dict | None:
    """The saved state, None if absent. A corrupt file raises ValueError (it is kept, not lost)."""
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return None
    data = codec.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


EXPORT_EXCLUDE = ("pid", "python_path", "env_path", "data_path", "uuid", "host", "port", "ssl", "auth_token")


def build_export(config: dict, state: dict, files_dir: Path, with_files: bool, pyproject: Path | None) -> bytes:
    from .fsutil import walk_confined

    buf = io.BytesIO()
    cfg = {k: v for k, v in config.items() if k not in EXPORT_EXCLUDE}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("config", json.dumps(cfg, indent=2, cls=fn.JSONEncoder))
        zf.writestr("state", json.dumps(state, indent=2, cls=fn.JSONEncoder))
        if pyproject is not None and pyproject.exists() and not pyproject.is_symlink():
            zf.write(pyproject, "pyproject.toml")
        if with_files:
            # Opened with O_NOFOLLOW component by component: a symlink in files/ (to a folder or a
            # file outside) is skipped, even one swapped in while the archive is written.
            for rel, fd in walk_confined(files_dir.parent, files_dir.name):
                with os.fdopen(fd, "rb") as src:
                    if rel.name.startswith(".upload-") or not _utf8_name(rel):
                        continue  # a staged upload, or a name (made by a node) no ZIP can hold
                    with zf.open("files/" + rel.as_posix(), "w") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
    return buf.getvalue()


def _utf8_name(rel: PurePosixPath) -> bool:
    try:
        str(rel).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class ExportError(ValueError):
    pass


def read_export(data: bytes | str, max_size: int = 1 << 30) -> zipfile.ZipFile:
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


def extract_files(zf: zipfile.ZipFile, data_dir: Path) -> list[Path]:
    """Write the archive's files/ entries, all or nothing, never through a symlink."""
    from .fsutil import ConfinedWriter, PathEscape, safe_relative

    written = []
    with ConfinedWriter(data_dir, "files") as w:
        for info in zf.infolist():
            if not info.filename.startswith("files/") or info.is_dir():
                continue
            try:
                rel = safe_relative(info.filename[len("files/"):])
                with zf.open(info) as src, w.open(rel) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except PathEscape as e:
                raise ExportError(f"export archive entry {info.filename!r}: {e}") from None
            written.append(data_dir / "files" / rel)
        w.commit()
    return written


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v))
