"""Local scripts: external worker classes defined in <data>/local_scripts/*.py.

The discovery sidecar reports file changes; here a changed file is (re)imported under a
name derived from its relative path, its external worker classes replace the old ones, and
clients hear `lib_update`. A script that fails to import is reported and harms nothing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable
from uuid import uuid4

from . import codec
from .external import ExternalWorker

log = logging.getLogger("fn_supervise.worker.local")


class LocalScripts:
    """What the local scripts of one worker have loaded and started. The functions below take it
    as their first argument; it knows the worker only through what it is handed."""

    def __init__(self, paths: Any, config: dict, nodespace: Callable[[], Any], emit: Callable[[dict], None]):
        self.paths, self.config, self._ns, self.emit = paths, config, nodespace, emit
        self.local_classes: dict[str, dict] = {}  # NODECLASSID -> {cls, file}
        self.local_instances: dict[str, dict[str, Any]] = {}  # NODECLASSID -> {uuid: instance}
        self.local_tasks: dict[str, Any] = {}  # instance uuid -> task running a stock-style loop
        self.loaded_stamps: dict[str, tuple | None] = {}  # script file -> (mtime_ns, size) loaded

    @property
    def ns(self) -> Any:
        return self._ns()


def _base_classes() -> tuple[type, ...]:
    bases: list[type] = [ExternalWorker]
    try:  # scripts written for the stock worker keep working where it is installed
        from funcnodes_worker import FuncNodesExternalWorker  # type: ignore

        bases.append(FuncNodesExternalWorker)
    except Exception:
        pass
    return tuple(bases)


def _module_name(scripts: Path, path: Path) -> str:
    rel = path.relative_to(scripts).with_suffix("")
    return "fn_local_scripts." + ".".join(p.replace("-", "_") for p in rel.parts)


def _forget(cmds: "LocalScripts", file: str) -> None:
    for cid in [cid for cid, info in cmds.local_classes.items() if info["file"] == file]:
        cmds.local_classes.pop(cid, None)


IMPORT_TIMEOUT = 10.0  # a script still importing after this is reported and left behind


def _exec_bounded(spec, mod, timeout: float = IMPORT_TIMEOUT) -> BaseException | None:
    """Run the script's module code in a thread, so a script that never finishes importing
    (a loop at module level) is reported instead of hanging the worker into a restart loop."""
    from .health import busy

    box: list[BaseException | None] = [None]

    def run():
        try:
            spec.loader.exec_module(mod)
        except BaseException as exc:  # noqa: BLE001 (SystemExit from a script included)
            box[0] = exc

    busy(timeout + 2)  # the main loop waits below: not a hang
    t = threading.Thread(target=run, name=f"import {spec.name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return TimeoutError(f"did not finish importing within {timeout:g} s (a loop at module level?)")
    return box[0]


def load_file(cmds: "LocalScripts", path: Path) -> list[str]:
    scripts = cmds.paths.local_scripts
    name = _module_name(scripts, path)
    _forget(cmds, str(path))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    e = _exec_bounded(spec, mod, float(cmds.config.get("script_import_timeout") or IMPORT_TIMEOUT))
    if e is not None:
        line = getattr(e, "lineno", None)
        if line is None:
            tb = traceback.extract_tb(e.__traceback__)
            frames = [f for f in tb if f.filename == str(path)]
            line = frames[-1].lineno if frames else None
        rel = str(path.relative_to(scripts))
        msg = f"{rel}:{line}: {type(e).__name__}: {e}"
        log.error("local script failed: %s", msg)
        cmds.emit({"type": "error_event", "error": msg, "tb": [msg], "file": rel, "line": line})
        return []
    sys.modules[name] = mod
    bases = _base_classes()
    found = []
    for obj in vars(mod).values():
        if inspect.isclass(obj) and issubclass(obj, bases) and obj not in bases and obj.__module__ == name:
            cid = getattr(obj, "NODECLASSID", None) or obj.__name__
            cmds.local_classes[cid] = {"cls": obj, "file": str(path)}
            found.append(cid)
    return found


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def apply_changes(cmds: "LocalScripts", changes: list[dict], initial: bool = False) -> None:
    """Load what changed. An `initial` listing is complete: what it lacks is forgotten."""
    scripts = cmds.paths.local_scripts.resolve()
    touched = False
    if initial:
        listed = {str(Path(ch.get("path", "")).resolve()) for ch in changes}
        for f in {info["file"] for info in cmds.local_classes.values()} - listed:
            _forget(cmds, f)
            cmds.loaded_stamps.pop(f, None)
            touched = True
    for ch in changes:
        try:
            path = Path(ch.get("path", "")).resolve()
        except (OSError, TypeError):
            continue
        if path.suffix != ".py" or not path.is_relative_to(scripts):
            continue
        if ch.get("change") == "deleted" or not path.exists():
            _forget(cmds, str(path))
            cmds.loaded_stamps.pop(str(path), None)
        else:
            stamp = _stamp(path)
            if ch.get("change") == "added" and stamp is not None and cmds.loaded_stamps.get(str(path)) == stamp:
                continue  # already loaded, unchanged (a resync after a sidecar or worker restart)
            load_file(cmds, path)
            cmds.loaded_stamps[str(path)] = stamp
        touched = True
    if touched:
        cmds.emit(codec.workerevent("lib_update"))


def scan(cmds: "LocalScripts") -> None:
    scripts = cmds.paths.local_scripts
    scripts.mkdir(parents=True, exist_ok=True)
    apply_changes(cmds, [{"change": "added", "path": str(p)} for p in sorted(scripts.rglob("*.py"))])


def describe(cmds: "LocalScripts") -> list[dict[str, Any]]:
    out = []
    scripts = cmds.paths.local_scripts.resolve()
    for cid, info in sorted(cmds.local_classes.items()):
        cls = info["cls"]
        out.append({
            "nodeclassid": cid,
            "name": getattr(cls, "NAME", "") or cls.__name__,
            "class_name": cls.__name__,
            "file": str(Path(info["file"]).relative_to(scripts)) if Path(info["file"]).is_relative_to(scripts) else info["file"],
            "instances": [serialize_instance(i, cid) for i in cmds.local_instances.get(cid, {}).values()],
        })
    return out


EXTERNAL_LIB = "_external_worker"


def serialize_instance(inst: Any, class_id: str) -> dict[str, Any]:
    if isinstance(inst, ExternalWorker):
        return inst.serialize()
    return {"uuid": inst.uuid, "nodeclassid": class_id, "running": bool(getattr(inst, "running", True)),
            "name": getattr(inst, "name", None), "config": dict(getattr(inst, "config", None) or {})}


def start(cmds: "LocalScripts", worker_id: str, name: str | None = None, config: dict | None = None) -> dict:
    info = cmds.local_classes.get(worker_id)
    if info is None:
        raise ValueError(f"No worker with id {worker_id}")
    cls = info["cls"]
    iid = uuid4().hex
    data = cmds.paths.data / "external_workers" / iid
    inst = cls(workerid=iid, name=name, config=config, data_path=data)
    if isinstance(inst, ExternalWorker):
        inst.start()
    elif hasattr(inst, "continuous_run"):  # funcnodes-worker's base is a loop of its own
        cmds.local_tasks[iid] = asyncio.ensure_future(inst.continuous_run())
    cmds.local_instances.setdefault(worker_id, {})[iid] = inst
    nodes = inst.get_all_nodeclasses() if hasattr(inst, "get_all_nodeclasses") else []
    if nodes:
        cmds.ns.lib.add_nodes(nodes, [EXTERNAL_LIB, iid])
        cmds.emit(codec.workerevent("lib_update"))
    cmds.emit(codec.workerevent("external_worker_update"))
    return serialize_instance(inst, worker_id)


async def stop(cmds: "LocalScripts", worker_id: str, instance_id: str) -> bool:
    inst = cmds.local_instances.get(worker_id, {}).pop(instance_id, None)
    if inst is None:
        raise ValueError(f"no running instance {instance_id} of {worker_id}")
    try:
        cmds.ns.lib.remove_shelf_path([EXTERNAL_LIB, instance_id])
        cmds.emit(codec.workerevent("lib_update"))
    except (ValueError, KeyError):
        pass  # it offered no nodes
    if hasattr(inst, "stop"):
        try:
            res = inst.stop()
            if inspect.isawaitable(res):
                await asyncio.wait_for(res, 5.0)
        except Exception:  # noqa: BLE001 (a plugin's stop must not take the worker down)
            log.exception("stopping %s/%s failed", worker_id, instance_id)
    task = cmds.local_tasks.pop(instance_id, None)
    if task is not None:
        task.cancel()
    if hasattr(inst, "cleanup") and not isinstance(inst, ExternalWorker):
        try:
            inst.cleanup()
        except Exception:  # noqa: BLE001
            pass
    cmds.emit(codec.workerevent("external_worker_update"))
    return True
