"""The RPC commands, with the stock names, kwargs and result shapes (spec section 2.3).

Each public coroutine or function registered below is one command. Arguments are checked
against the signature before the call, so a bad kwarg is a clear error, never a crash.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import funcnodes_core as fn
from funcnodes_core import NoValue

from . import codec, persistence
from .packages import DependencyError, is_project, normalize, path_allowed

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

log = logging.getLogger("fn_supervise.worker.commands")

ADD_NODE_KWARGS = {
    "uuid", "name", "reset_inputs_on_trigger", "render_options", "io_options",
    "trigger_on_create", "pretrigger_delay", "properties",
}


def _find_uv() -> str:
    """uv for a standalone worker's own installs: the uv package if installed here, else PATH."""
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    import shutil

    exe = shutil.which("uv")
    if exe is None:
        raise DependencyError("no uv to install with: put uv on PATH, or run the worker under fn-supervise")
    return exe


def command(name: str | None = None, saves: bool = False):
    def deco(f):
        f._fn_command = name or f.__name__
        f._fn_saves = saves
        return f
    return deco


class Commands:
    def __init__(self, rt: "WorkerRuntime"):
        self.rt = rt
        self.registry: dict[str, Callable] = {}
        self._signatures: dict[str, inspect.Signature] = {}
        for attr in dir(type(self)):
            f = getattr(type(self), attr)
            if callable(f) and hasattr(f, "_fn_command"):
                self.registry[f._fn_command] = getattr(self, attr)
        self.local_classes: dict[str, dict] = {}  # NODECLASSID -> {cls, file}
        self.local_instances: dict[str, dict[str, Any]] = {}  # NODECLASSID -> {uuid: instance}
        self.local_tasks: dict[str, Any] = {}  # instance uuid -> task running a stock-style loop
        self.loaded_stamps: dict[str, tuple | None] = {}  # script file -> (mtime_ns, size) loaded

    async def run(self, name: str, kwargs: dict) -> Any:
        func = self.registry.get(name)
        if func is None:
            raise ValueError(f"Unknown command {name} , available commands: {', '.join(sorted(self.registry))}")
        sig = self._signatures.get(name)
        if sig is None:
            sig = self._signatures[name] = inspect.signature(func)
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise TypeError(f"bad arguments for '{name}': {e}") from None
        res = func(**kwargs)
        if inspect.iscoroutine(res):  # not isawaitable: a Node is awaitable and would run
            res = await res
        if getattr(func, "_fn_saves", False):
            self.rt.request_save()
        return res

    # helpers
    @property
    def ns(self) -> fn.NodeSpace:
        return self.rt.nodespace

    def node(self, nid: str) -> fn.Node:
        if not isinstance(nid, str):
            raise TypeError(f"node id must be a string, got {type(nid).__name__}")
        return self.ns.get_node_by_id(nid)

    # region identity and state
    @command()
    def uuid(self):
        return self.rt.uuid

    @command()
    def name(self):
        return self.rt.config.get("name") or self.rt.uuid

    @command()
    def get_meta(self):
        return self.rt.meta()

    @command()
    def get_runstate(self):
        return self.rt.runstate

    @command()
    def heartbeat(self):
        import time
        self.rt.last_heartbeat_cmd = time.monotonic()
        return None

    @command()
    def view_state(self):
        view = dict(self.rt.view)
        view["renderoptions"] = fn.config.FUNCNODES_RENDER_OPTIONS
        view["nodes"] = {
            n.uuid: {"pos": n.get_property("frontend:pos") or [0, 0], "size": n.get_property("frontend:size") or [200, 250]}
            for n in self.ns.nodes
        }
        return view

    @command()
    def full_state(self):
        backend = self.ns.full_serialize(with_io_values=False)
        return {
            "backend": backend,  # includes groups, which the React fullsync reads
            "view": self.view_state(),
            "worker": {cid: list(inst) for cid, inst in self.local_instances.items()},
            "worker_dependencies": self.get_worker_dependencies(),
            "progress_state": self.rt.progress_state,
            "meta": self.rt.meta(),
        }

    @command()
    def get_config(self):
        cfg = {k: v for k, v in self.rt.config.items() if k != "auth_token"}
        cfg["data_path"] = str(self.rt.paths.data)
        cfg["pid"] = os.getpid()
        return cfg

    @command()
    def get_save_state(self, export: bool = False):
        return self.rt.state(export=export)
    # endregion

    # region graph reading
    @command()
    def get_library(self):
        return self.ns.lib.full_serialize()

    @command()
    def get_nodes(self, with_frontend: bool = False):
        nodes = []
        for data in self.ns.full_nodes_serialize():
            data = dict(data)
            data["frontend"] = None
            if with_frontend:
                props = data.get("properties", {})
                data["frontend"] = {"pos": props.get("frontend:pos", [0, 0]), "size": props.get("frontend:size", [200, 250])}
            nodes.append(data)
        return nodes

    @command()
    def get_node(self, id: str):
        return self.node(id)

    @command()
    def get_node_state(self, nid: str):
        return self.node(nid)

    @command()
    def get_node_status(self, nid: str):
        return self.node(nid).status()

    @command()
    def get_edges(self):
        return self.ns.serialize_edges()

    @command()
    def get_groups(self):
        return self.ns.groups.serialize()
    # endregion

    # region graph editing
    @command(saves=True)
    def add_node(self, id: str, **kwargs):
        bad = set(kwargs) - ADD_NODE_KWARGS
        if bad:
            raise TypeError(f"bad arguments for 'add_node': unexpected {sorted(bad)}; allowed: {sorted(ADD_NODE_KWARGS)}")
        if "uuid" in kwargs and kwargs["uuid"] in {n.uuid for n in self.ns.nodes}:
            raise ValueError(f"node with uuid '{kwargs['uuid']}' already exists")
        try:
            cls = self.ns.lib.get_node_by_id(id)
        except fn.NodeClassNotFoundError:
            raise ValueError(f"Node with id '{id}' not found") from None
        for k in ("io_options", "render_options", "properties"):
            if kwargs.get(k) is not None and not isinstance(kwargs[k], dict):
                raise TypeError(f"bad arguments for 'add_node': {k} must be an object")
        try:
            node = cls(**kwargs)
        except (AttributeError, KeyError, TypeError) as e:  # options of the wrong shape, deeper in
            raise TypeError(f"bad arguments for 'add_node': {type(e).__name__}: {e}") from None
        self.ns.add_node_instance(node)
        return node

    @command(saves=True)
    def remove_node(self, id: str):
        return self.ns.remove_node_by_id(id)

    @command(saves=True)
    def add_edge(self, src_nid: str, src_ioid: str, trg_nid: str, trg_ioid: str, replace: bool = False):
        src = self.node(src_nid).get_input_or_output(src_ioid)
        trg = self.node(trg_nid).get_input_or_output(trg_ioid)
        src.connect(trg, replace=replace)
        if isinstance(src, fn.NodeInput) and isinstance(trg, fn.NodeOutput):
            src, trg = trg, src
        return [src.node.uuid, src.uuid, trg.node.uuid, trg.uuid]

    @command(saves=True)
    def remove_edge(self, src_nid: str, src_ioid: str, trg_nid: str, trg_ioid: str):
        src = self.node(src_nid).get_input_or_output(src_ioid)
        trg = self.node(trg_nid).get_input_or_output(trg_ioid)
        src.disconnect(trg)
        return True

    @command(saves=True)
    def clear(self):
        self.ns.clear()
        return None

    @command(saves=True)
    def update_node(self, nid: str, data: dict):
        if not isinstance(data, dict):
            raise TypeError("data must be an object")
        try:
            node = self.node(nid)
        except ValueError:
            return {"error": f"Node with id {nid} not found"}  # the stock worker's (successful) shape
        ans = {}
        for k, v in (data.get("properties") or {}).items():
            node.set_property(k, v)
        if "name" in data:
            node.name = data["name"]
            ans["name"] = node.name
        if "description" in data:
            node.description = str(data["description"])
            ans["description"] = node.description
        if "reset_inputs_on_trigger" in data:
            node.reset_inputs_on_trigger = bool(data["reset_inputs_on_trigger"])
            ans["reset_inputs_on_trigger"] = node.reset_inputs_on_trigger
        return ans

    @command(saves=True)
    def update_node_view(self, nid: str, data: dict):
        if not isinstance(data, dict):
            raise TypeError("data must be an object")
        node = self.node(nid)
        if data.get("pos"):
            node.set_property("frontend:pos", data["pos"])
        if data.get("size"):
            node.set_property("frontend:size", data["size"])
        return None

    @command(saves=True)
    def update_io_options(self, nid: str, ioid: str, name: str | None = None, hidden: bool | None = None):
        io = self.node(nid).get_input_or_output(ioid)
        if name is not None:
            io.name = name or io.uuid
        if hidden is not None:
            io.hidden = False if io.connections else bool(hidden)
        return io

    @command(saves=True)
    def update_io_value_options(self, nid: str, ioid: str, options: dict):
        if not isinstance(options, dict):
            raise TypeError("options must be an object")
        io = self.node(nid).get_input_or_output(ioid)
        io.update_value_options(**options)
        return io

    @command(saves=True)
    def group_nodes(self, node_ids: list, group_ids: list | None = None):
        known = {n.uuid for n in self.ns.nodes}
        missing = [n for n in node_ids or [] if n not in known]
        if missing:
            raise ValueError(f"nodes not found: {missing}")
        self.ns.groups.group_together(node_ids=node_ids or [], group_ids=group_ids or [])
        return self.ns.groups.serialize()

    @command(saves=True)
    def update_group(self, gid: str, data: dict):
        group = self.ns.groups.get_group(gid)
        if group is None:
            raise ValueError(f"Group with id {gid} not found")
        if "position" in data:
            group["position"] = data["position"]
        if "meta" in data and isinstance(data["meta"], dict):
            self.ns.groups.set_group_meta(gid, data["meta"])
        return {k: group[k] for k in ("position",) if k in group}

    @command(saves=True)
    def remove_group(self, gid: str):
        if self.ns.groups.get_group(gid) is not None:
            self.ns.groups.remove_group(gid)
        return True
    # endregion

    # region values and execution
    @command(saves=True)
    def set_io_value(self, nid: str, ioid: str, value: Any = NoValue, set_default: bool = False):
        io = self.node(nid).get_input(ioid)
        if set_default:
            io.set_default(value)
        io.set_value(value)
        return io.value

    @command(saves=True)
    def set_default_value(self, nid: str, ioid: str, value: Any = NoValue):
        self.node(nid).get_input(ioid).set_default(value)
        return True

    @command()
    def get_io_value(self, nid: str, ioid: str):
        return codec.preview(self.node(nid).get_input_or_output(ioid).value)

    @command()
    def get_ios_values(self, nid: str):
        node = self.node(nid)
        out = {k: codec.preview(io.value) for k, io in node.inputs.items()}
        out.update({k: codec.preview(io.value) for k, io in node.outputs.items()})
        return out

    @command()
    def get_io_full_value(self, nid: str, ioid: str):
        return fn.ByteEncoder.encode(self.node(nid).get_input_or_output(ioid).value, preview=False)

    @command()
    def trigger_node(self, nid: str):
        self.node(nid).request_trigger()
        return True

    @command()
    def request_trigger(self, nid: str):
        self.node(nid).request_trigger()
        return True
    # endregion

    # region persistence and config
    @command()
    def save(self):
        if not self.rt.saving_enabled:
            return None
        return self.rt.save()

    @command()
    def load_data(self, data: dict):
        if not isinstance(data, dict):
            raise TypeError("data must be a WorkerState object")
        self.rt.replace_state(data)
        self.rt.request_save()
        self.rt.broadcast(codec.workerevent("fullsync"))
        return None

    @command()
    async def update(self, config: dict | str | None = None, state: dict | str | None = None):
        if isinstance(config, str):
            config = json.loads(config)
        if isinstance(state, str):
            state = json.loads(state)
        if config is not None and not isinstance(config, dict):
            raise TypeError("config must be a dict or a json string")
        if state is not None and not isinstance(state, dict):
            raise TypeError("state must be a dict or a json string")
        for name, dep in ((config or {}).get("package_dependencies") or {}).items():
            if name not in self.rt.dependencies:
                await self.add_package_dependency(name, dep=dep if isinstance(dep, dict) else None, sync=False)
        if state is not None:
            self.rt.replace_state(state)
            self.rt.request_save()
        self.rt.broadcast(codec.workerevent("fullsync"))
        return None

    @command()
    def export_worker(self, with_files: bool = True):
        state = self.rt.save() if self.rt.saving_enabled else self.rt.state()
        return persistence.build_export(self.rt.config, state, self.rt.paths.files, bool(with_files), self.rt.paths.data / "pyproject.toml")

    @command()
    async def update_from_export(self, data: str | bytes):
        zf = persistence.read_export(data, int(self.rt.config.get("max_upload_size") or (1 << 30)))
        config = json.loads(zf.read("config"))
        state = json.loads(zf.read("state"))
        persistence.extract_files(zf, self.rt.paths.data)
        await self.update(config=config, state=state)
        return None

    @command()
    async def import_worker(self, data: str | bytes):
        return await self.update_from_export(data)

    @command()
    def update_worker_config(self, name: str | None = None, autostart: Any = None, update_on_startup: dict | None = None):
        cfg = self.rt.config
        if name is not None:
            cfg["name"] = str(name).strip() or self.rt.uuid
        if autostart is not None:
            if isinstance(autostart, bool):
                autostart = "unless-stopped" if autostart else "never"
            if autostart not in ("never", "always", "unless-stopped"):
                raise ValueError("autostart must be never, always or unless-stopped")
            cfg["autostart"] = autostart
        if update_on_startup is not None:
            if not isinstance(update_on_startup, dict):
                raise TypeError("update_on_startup must be an object")
            cfg.setdefault("update_on_startup", {}).update({k: bool(v) for k, v in update_on_startup.items()})
        return {k: v for k, v in self.rt.write_config().items() if k != "auth_token"}

    @command()
    def upload(self, data: str | bytes, filename: str):
        from .fsutil import write_confined

        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError:
                raise ValueError("data must be base64") from None
        write_confined(self.rt.paths.data, "files", str(filename), data)
        self.ns.set_secret_property("files_dir", str(self.rt.paths.files))
        return str(filename)
    # endregion

    # region library and packages
    @command()
    def get_worker_dependencies(self):
        # Like the stock worker: only packages that provide external worker classes are listed.
        out = []
        for info in self.rt.dependencies.values():
            classes = info.get("worker_classes") or []
            if classes:
                out.append({"module": info["module"], "worker_classes": [
                    {"module": c.__module__, "class_name": c.__name__,
                     "name": getattr(c, "NAME", "") or c.__name__} for c in classes]})
        return out

    @command()
    def get_plugin_keys(self, type: str = "react"):
        # Frontend plugins come from installed packages only; nothing is installed on request.
        return []

    @command()
    def get_plugin(self, key: str, type: str = "react"):
        raise ValueError(f"plugin {key!r} not found")

    @command()
    def get_available_modules(self):
        installed = [
            {"name": name, "description": "", "version": (info["dep"].get("version") or ""), "homepage": "", "source": "", "releases": []}
            for name, info in self.rt.dependencies.items()
        ]
        return {"installed": installed, "active": installed, "available": []}

    @command()
    def on_repo_refresh(self):
        return None

    @command()
    async def add_package_dependency(self, name: str, dep: dict | None = None, save: bool = True,
                                     version: str | None = None, sync: bool = True, do_reload_base: bool = True):
        dep = dep or {}
        if not isinstance(dep, dict):
            raise TypeError("dep must be an object")
        path = dep.get("path")
        if path is not None and not path_allowed(path, self.rt.paths.data):
            raise DependencyError("a path dependency must lie inside the worker's data folder (not files/)")
        spec = normalize(dep.get("package", name), version or dep.get("version"), path)
        self.rt.set_progress(f"Add package dependency {name}", "info", 0.0, True)
        try:
            if path is None or is_project(path):
                await self._install(spec)
                self.rt.set_progress(f"Add package dependency {name}", "info", 0.8, True)
            self.rt.add_dependency(spec)
        except Exception as e:
            self.rt.set_progress(f"Could not install {name}({spec.get('version')}): {e}", "error", 0.0, True)
            raise
        if save:
            self.rt.config.setdefault("package_dependencies", {})[spec["package"]] = spec
            self.rt.write_config()
        self.rt.set_progress(f"Add package dependency {name}", "success", 1.0, False)
        if self.rt.dependencies.get(spec["package"], {}).get("shelf") is None:
            self.rt.broadcast(codec.workerevent("lib_update"))  # no shelf event to carry it
        if sync:
            self.rt.broadcast(codec.workerevent("fullsync"))
        return None

    async def _install(self, spec: dict) -> None:
        req = spec["package"] + (spec.get("version") or "")
        if self.rt.channel is not None:
            # The supervisor owns installs: it builds a new env beside the old one and swaps it in.
            res = await self.rt.request_install([spec])
            if not res.get("ok"):
                raise DependencyError(f"install of {req} failed: {res.get('error')}")
            return
        if spec.get("path"):
            req = str(Path(spec["path"]).resolve())  # a local project: install it from its folder
        else:
            try:
                __import__(spec["package"].replace("-", "_"))
                return
            except ImportError:
                pass
        proc = await asyncio.create_subprocess_exec(
            _find_uv(), "pip", "install", "--python", sys.executable, req,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 900)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise DependencyError(f"install of {req} timed out") from None
        if proc.returncode != 0:
            tail = out.decode(errors="replace").strip().splitlines()[-5:]
            raise DependencyError(f"install of {req} failed: {' | '.join(tail)}")

    @command()
    def remove_package_dependency(self, name: str, dep: dict | None = None, save: bool = True):
        info = self.rt.dependencies.pop(name, None)
        if info and info.get("shelf") is not None:
            self.ns.remove_shelf(info["shelf"])  # its after_remove_shelf event sends lib_update
        else:
            self.rt.broadcast(codec.workerevent("lib_update"))
        if save:
            self.rt.config.get("package_dependencies", {}).pop(name, None)
            self.rt.write_config()
        return None

    @command()
    async def add_shelf(self, src: Any, save: bool = True):
        # Deprecated in FuncNodes; here only an installed module name, never pip:// or file://.
        if isinstance(src, dict):
            src = src.get("module") or src.get("package")
        if not isinstance(src, str) or "://" in src:
            raise ValueError("add_shelf accepts an installed module name only")
        await self.add_package_dependency(src, save=save)
        return True

    @command()
    def remove_shelf(self, src: Any, save: bool = True):
        if isinstance(src, dict):
            src = src.get("module") or src.get("package")
        if src not in self.rt.dependencies:
            return {"error": f"shelf {src} not found"}
        self.remove_package_dependency(src, save=save)
        return None
    # endregion

    # region external and local workers
    def on_local_scripts(self, changes: list[dict], initial: bool = False) -> None:
        from .localworkers import apply_changes

        apply_changes(self, changes, initial=initial)

    @command()
    def list_local_workers(self):
        from .localworkers import describe

        return describe(self)

    @command()
    def start_local_worker(self, worker_id: str, name: str | None = None, config: dict | None = None):
        from .localworkers import start

        return start(self, worker_id, name=name, config=config)

    @command()
    async def stop_local_worker(self, worker_id: str, instance_id: str):
        from .localworkers import stop

        return await stop(self, worker_id, instance_id)

    @command()
    def add_external_worker(self, module: str, cls_module: str, cls_name: str):
        for cid, info in self.local_classes.items():
            if info["cls"].__name__ == cls_name and info["cls"].__module__ == cls_module:
                return self.start_local_worker(cid)
        raise ValueError(f"Worker {cls_name}({cls_module}) not found in {module}")

    @command()
    def update_external_worker(self, worker_id: str, class_id: str, name: str | None = None, config: dict | None = None):
        inst = self.local_instances.get(class_id, {}).get(worker_id)
        if inst is None:
            raise ValueError(f"external worker {class_id}/{worker_id} not found")
        if name is not None:
            inst.name = name
        if config is not None and hasattr(inst, "update_config"):
            inst.update_config(config)
        self.rt.broadcast(codec.workerevent("external_worker_update"))
        return None

    @command()
    async def remove_external_worker(self, worker_id: str, class_id: str):
        return await self.stop_local_worker(class_id, worker_id)

    @command()
    def get_external_worker_config(self, worker_id: str, class_id: str):
        inst = self.local_instances.get(class_id, {}).get(worker_id)
        if inst is None:
            raise ValueError(f"external worker {class_id}/{worker_id} not found")
        return {"jsonSchema": {}, "uiSchema": None, "formData": dict(getattr(inst, "config", {}) or {})}
    # endregion

    # region lifecycle
    @command()
    async def stop_worker(self):
        # Reply first, then stop: the caller learns that it worked (the stock reply never arrives).
        if self.rt.channel is not None:
            self.rt.channel.send({"type": "stopping", "reason": "stop_worker"})
        self.rt.loop.call_later(0.05, self.rt.request_stop, "stop_worker")
        return True
    # endregion
