"""The RPC commands, with the stock names, kwargs and result shapes (spec section 2.3).

Each public coroutine or function registered below is one command. Arguments are checked
against the signature before the call, so a bad kwarg is a clear error, never a crash.

A verb marked `mutates=True` changes the graph and states its effect with `self.effect(record)`
(builders in effects.py); `run` hands those records to the store, the one feed site. A verb that
replaces the whole graph takes a snapshot instead. Nothing here writes nodespace.json itself.

The verbs know the worker through `WorkerSide` (below), the graph, the store and the local scripts.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import os
import sys
from typing import Any, Callable, Protocol

import funcnodes_core as fn
from funcnodes_core import NoValue

from . import codec, effects, localworkers, plugins, pyproject, transfer
from .graph import Graph
from .packages import DependencyError, is_project, normalize, path_allowed
from .store import Store


class WorkerSide(Protocol):
    """What the verbs need from the worker process (the runtime provides it)."""

    uuid: str
    base: Any
    config: dict
    paths: Any
    runstate: str
    progress_state: dict
    channel: Any  # the supervisor channel, None when standalone
    loop: asyncio.AbstractEventLoop

    def broadcast(self, msg: dict) -> None: ...
    def set_progress(self, message: str, status: str, progress: float, blocking: bool) -> None: ...
    async def request_install(self, deps: list[dict]) -> dict: ...
    def request_stop(self, reason: str = "") -> None: ...
    def fast_command(self, cmd: str, kwargs: dict) -> Any: ...
    def save(self) -> dict: ...
    def write_config(self) -> dict: ...

log = logging.getLogger("fn_supervise.worker.commands")

ADD_NODE_KWARGS = {
    "uuid", "name", "reset_inputs_on_trigger", "render_options", "io_options",
    "trigger_on_create", "pretrigger_delay", "properties",
}


# Verbs that replace the whole graph (a snapshot, not records): refused like edits while the
# journal cannot be written (a full disk), since their result could not be kept either.
WHOLE_GRAPH = frozenset({"load_data", "update", "update_from_export", "import_worker", "remove_package_dependency"})


def _shape(func: Callable) -> tuple:
    """(signature, keyword names it accepts or None when it takes **kwargs, names it requires)."""
    sig = inspect.signature(func)
    P = inspect.Parameter
    params = [p for p in sig.parameters.values() if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
    if any(p.kind in (P.VAR_KEYWORD, P.POSITIONAL_ONLY) for p in sig.parameters.values()):
        return sig, None, frozenset()
    return (sig, frozenset(p.name for p in params),
            frozenset(p.name for p in params if p.default is P.empty))


def command(name: str | None = None, mutates: bool = False):
    def deco(f):
        f._fn_command = name or f.__name__
        f._fn_mutates = mutates
        return f
    return deco


class Commands:
    def __init__(self, graph: Graph, store: Store, host: WorkerSide, local: localworkers.LocalScripts):
        self.graph, self.store, self.host, self.local = graph, store, host, local
        self._effects: list[dict] = []
        self._modules: Any = None
        self._importing: asyncio.Lock | None = None  # imports wait on installs: one at a time
        self.registry: dict[str, Callable] = {}
        self._signatures: dict[str, tuple] = {}  # name -> _shape(verb)
        for attr in dir(type(self)):
            f = getattr(type(self), attr)
            if callable(f) and hasattr(f, "_fn_command"):
                self.registry[f._fn_command] = getattr(self, attr)

    def register(self, name: str, fn: Callable) -> None:
        """A verb of another part of the worker (safe mode's lift_quarantine, get_quarantine):
        plain, it never feeds the journal."""
        if name in self.registry:
            raise ValueError(f"command {name} exists already")
        self.registry[name] = fn
        self._signatures.pop(name, None)

    async def run(self, name: str, kwargs: dict) -> Any:
        res = self.call(name, kwargs)
        if inspect.iscoroutine(res):  # not isawaitable: a Node is awaitable and would run
            res = await res
        return res

    def call(self, name: str, kwargs: dict) -> Any:
        """Run a verb up to its first wait: the result, or the coroutine of an async verb (the
        caller awaits it). Most verbs are plain functions, so most commands finish here."""
        func = self.registry.get(name)
        if func is None:
            raise ValueError(f"Unknown command {name} , available commands: {', '.join(sorted(self.registry))}")
        shape = self._signatures.get(name)
        if shape is None:
            shape = self._signatures[name] = _shape(func)
        sig, accepted, required = shape
        # Keyword names alone decide most calls (Signature.bind costs ~4 us per command);
        # anything else gets bind's own words for what is wrong.
        if accepted is None or not (required <= kwargs.keys() <= accepted):
            try:
                sig.bind(**kwargs)
            except TypeError as e:
                raise TypeError(f"bad arguments for '{name}': {e}") from None
        mutates = getattr(func, "_fn_mutates", False)
        if mutates or name in WHOLE_GRAPH:
            self.store.check_writable()  # a full disk: refused before anything changes
        if not mutates:  # verbs others register (quarantine) are plain
            return func(**kwargs)
        # Mutating verbs are plain functions: nothing interleaves between the change and its
        # records, and the graph's own events during the call are covered by them.
        self._effects.clear()
        self.store.covered += 1
        try:
            res = func(**kwargs)
        except BaseException:
            self.store.covered -= 1  # first: touch() does nothing while covered
            self.store.touch()  # a verb that failed half-way: not acknowledged, saved soon anyway
            raise
        self.store.covered -= 1
        touched: set[str] = set()
        for rec in self._effects:
            self.store.feed(rec)  # the one feed site
            touched.update(effects.nodes_of(rec))
        self._effects.clear()
        if touched:  # a view-only edit (position, name) makes nothing ready: no callback per drag step
            if isinstance(kwargs.get("nid"), str):
                touched.add(kwargs["nid"])
            # An edit can make a node ready without an event (set_default_value on its missing
            # input): a trigger requested meanwhile starts now, not at the safety sweep.
            asyncio.get_running_loop().call_soon(self._trigger_requested, touched)
        return res

    def _trigger_requested(self, nids: set[str]) -> None:
        for nid in nids:
            try:
                node = self.ns.get_node_by_id(nid)
                if node._requests_trigger:  # funcnodes-core's flag: a cheap test per edit
                    node.trigger_if_requested()
            except Exception:  # noqa: BLE001 (removed since, or a trigger that failed)
                log.debug("trigger of %s after an edit", nid, exc_info=True)

    def effect(self, rec: dict | None) -> None:
        if rec is not None:
            self._effects.append(rec)

    # helpers
    @property
    def ns(self) -> fn.NodeSpace:
        return self.graph.nodespace

    def node(self, nid: str) -> fn.Node:
        if not isinstance(nid, str):
            raise TypeError(f"node id must be a string, got {type(nid).__name__}")
        return self.ns.get_node_by_id(nid)

    # region identity and state
    # uuid, name, get_runstate and heartbeat are answered on the I/O thread (host.fast_command);
    # these entries serve the rare request that takes the slow path (as_bytes).
    @command()
    def uuid(self):
        return self.host.fast_command("uuid", {})

    @command()
    def name(self):
        return self.host.fast_command("name", {})

    @command()
    def get_meta(self):
        return self.graph.meta()

    @command()
    def get_runstate(self):
        return self.host.fast_command("get_runstate", {})

    @command()
    def heartbeat(self):
        return self.host.fast_command("heartbeat", {})

    @command()
    def view_state(self):
        view = dict(self.graph.view)
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
            "worker": {cid: list(inst) for cid, inst in self.local.local_instances.items()},
            "worker_dependencies": self.get_worker_dependencies(),
            "progress_state": self.host.progress_state,
            "meta": self.graph.meta(),
        }

    @command()
    def get_config(self):
        cfg = {k: v for k, v in self.host.config.items() if k != "auth_token"}
        cfg["data_path"] = str(self.host.paths.data)
        cfg["pid"] = os.getpid()
        return cfg

    @command()
    def get_save_state(self, export: bool = False):
        return self.graph.state()
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
    @command(mutates=True)
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
        self.effect(effects.node_added(node))
        return node

    @command(mutates=True)
    def remove_node(self, id: str):
        res = self.ns.remove_node_by_id(id)
        if res is not None:
            self.effect(effects.node_removed(id))
        return res

    @command(mutates=True)
    def add_edge(self, src_nid: str, src_ioid: str, trg_nid: str, trg_ioid: str, replace: bool = False):
        src = self.node(src_nid).get_input_or_output(src_ioid)
        trg = self.node(trg_nid).get_input_or_output(trg_ioid)
        before = effects.io_edges(src, trg)
        src.connect(trg, replace=replace)
        self.effect(effects.edge_added((src_nid, src.uuid), (trg_nid, trg.uuid), before - effects.io_edges(src, trg)))
        if isinstance(src, fn.NodeInput) and isinstance(trg, fn.NodeOutput):
            src, trg = trg, src
        return [src.node.uuid, src.uuid, trg.node.uuid, trg.uuid]

    @command(mutates=True)
    def remove_edge(self, src_nid: str, src_ioid: str, trg_nid: str, trg_ioid: str):
        src = self.node(src_nid).get_input_or_output(src_ioid)
        trg = self.node(trg_nid).get_input_or_output(trg_ioid)
        src.disconnect(trg)
        self.effect(effects.edge_removed((src_nid, src.uuid), (trg_nid, trg.uuid)))
        return True

    @command(mutates=True)
    def clear(self):
        self.ns.clear()
        self.graph.pin_files_dir()  # as the stock worker does after clear
        self.effect(effects.cleared())
        return None

    @command(mutates=True)
    def update_node(self, nid: str, data: dict):
        if not isinstance(data, dict):
            raise TypeError("data must be an object")
        try:
            node = self.node(nid)
        except ValueError:
            return {"error": f"Node with id {nid} not found"}  # the stock worker's (successful) shape
        ans = {}
        props = data.get("properties") or {}
        if not isinstance(props, dict):
            raise TypeError("data.properties must be an object")
        for k, v in props.items():
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
        fields = tuple(f for f in ("name", "description", "reset_inputs_on_trigger") if f in data)
        self.effect(effects.node_attrs(node, props, fields))
        return ans

    @command(mutates=True)
    def update_node_view(self, nid: str, data: dict):
        if not isinstance(data, dict):
            raise TypeError("data must be an object")
        node = self.node(nid)
        props = {}
        if data.get("pos"):
            node.set_property("frontend:pos", data["pos"])
            props["frontend:pos"] = True
        if data.get("size"):
            node.set_property("frontend:size", data["size"])
            props["frontend:size"] = True
        if props:
            self.effect(effects.node_attrs(node, props, ()))
        return None

    @command(mutates=True)
    def update_io_options(self, nid: str, ioid: str, name: str | None = None, hidden: bool | None = None):
        io = self.node(nid).get_input_or_output(ioid)
        if name is not None:
            io.name = name or io.uuid
        if hidden is not None:
            io.hidden = False if io.connections else bool(hidden)
        self.effect(effects.io_options(io))
        return io

    @command(mutates=True)
    def update_io_value_options(self, nid: str, ioid: str, options: dict):
        if not isinstance(options, dict):
            raise TypeError("options must be an object")
        io = self.node(nid).get_input_or_output(ioid)
        io.update_value_options(**options)
        self.effect(effects.value_options(io, options))
        return io

    @command(mutates=True)
    def group_nodes(self, node_ids: list, group_ids: list | None = None):
        known = {n.uuid for n in self.ns.nodes}
        missing = [n for n in node_ids or [] if n not in known]
        if missing:
            raise ValueError(f"nodes not found: {missing}")
        self.ns.groups.group_together(node_ids=node_ids or [], group_ids=group_ids or [])
        self.effect(effects.groups(self.ns))
        return self.ns.groups.serialize()

    @command(mutates=True)
    def update_group(self, gid: str, data: dict):
        group = self.ns.groups.get_group(gid)
        if group is None:
            raise ValueError(f"Group with id {gid} not found")
        if "position" in data:
            group["position"] = data["position"]
        if "meta" in data and isinstance(data["meta"], dict):
            self.ns.groups.set_group_meta(gid, data["meta"])
        self.effect(effects.groups(self.ns))
        return {k: group[k] for k in ("position",) if k in group}

    @command(mutates=True)
    def remove_group(self, gid: str):
        if self.ns.groups.get_group(gid) is not None:
            self.ns.groups.remove_group(gid)
            self.effect(effects.groups(self.ns))
        return True
    # endregion

    # region values and execution
    @command(mutates=True)
    def set_io_value(self, nid: str, ioid: str, value: Any = NoValue, set_default: bool = False):
        io = self.node(nid).get_input(ioid)
        if set_default:
            io.set_default(value)
        io.set_value(value)
        self.effect(effects.value(io, bool(set_default)))
        return io.value

    @command(mutates=True)
    def set_default_value(self, nid: str, ioid: str, value: Any = NoValue):
        io = self.node(nid).get_input(ioid)
        io.set_default(value)
        self.effect(effects.value(io, True))
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
        if not self.store.enabled:
            return None
        return self.host.save()

    @command()
    def load_data(self, data: dict):
        if not isinstance(data, dict):
            raise TypeError("data must be a WorkerState object")
        self.graph.replace_state(data)
        self.store.snapshot()  # a whole new graph: a snapshot, not a record
        self.host.broadcast(codec.workerevent("fullsync"))
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
        await self._import(transfer.plan_update(config, state, self.host.paths.data))
        return None

    async def _import(self, plan: transfer.ImportPlan) -> None:
        """update, update_from_export and import_worker: all or nothing (worker/transfer.py)."""
        if self._importing is None:
            self._importing = asyncio.Lock()
        async with self._importing:
            # The snapshot is taken before files/ are committed, inside apply's rollback: a full
            # disk refuses the whole import. Config and pyproject follow (they name what is loaded).
            saved = await transfer.apply(plan, self.host.paths.data, self.graph, self._install,
                                         durable=self.store.snapshot if plan.state is not None else None)
        if saved:
            self.host.config.setdefault("package_dependencies", {}).update(saved)
            self._save_dependencies()
        self.host.broadcast(codec.workerevent("fullsync"))

    def _save_dependencies(self) -> None:
        """The config names the dependencies; pyproject.toml says the same for Python tools."""
        self.host.write_config()
        pyproject.sync(self.host.paths.data, f"worker-{self.host.uuid}",
                       self.host.config.get("package_dependencies") or {})

    @command()
    def export_worker(self, with_files: bool = True):
        state = self.host.save() if self.store.enabled else self.graph.state()
        return transfer.build_export(self.host.config, state, self.host.paths.data, bool(with_files))

    @command()
    async def update_from_export(self, data: str | bytes):
        zf = transfer.read_export(data, int(self.host.config.get("max_upload_size") or (1 << 30)))
        await self._import(transfer.plan_export(zf, self.host.paths.data))
        return None

    @command()
    async def import_worker(self, data: str | bytes):
        return await self.update_from_export(data)

    @command()
    def update_worker_config(self, name: str | None = None, autostart: Any = None, update_on_startup: dict | None = None):
        cfg = self.host.config
        if name is not None:
            cfg["name"] = str(name).strip() or self.host.uuid
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
        return {k: v for k, v in self.host.write_config().items() if k != "auth_token"}

    @command()
    def upload(self, data: str | bytes, filename: str):
        from .fsutil import write_confined

        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError:
                raise ValueError("data must be base64") from None
        write_confined(self.host.paths.data, "files", str(filename), data)
        return str(filename)
    # endregion

    # region library and packages
    @command()
    def get_worker_dependencies(self):
        # Like the stock worker: only packages that provide external worker classes are listed.
        out = []
        for info in self.graph.dependencies.values():
            classes = info.get("worker_classes") or []
            if classes:
                out.append({"module": info["module"], "worker_classes": [
                    {"module": c.__module__, "class_name": c.__name__,
                     "name": getattr(c, "NAME", "") or c.__name__} for c in classes]})
        return out

    def _loaded_modules(self) -> list:
        return [m for m in (sys.modules.get(info["module"]) for info in self.graph.dependencies.values()) if m]

    @command()
    async def get_plugin_keys(self, type: str = "react"):
        # From the installed packages' entry points (worker/plugins.py); nothing is installed here.
        # In a thread: the first call imports every module that offers a plugin.
        return await asyncio.to_thread(plugins.keys, type, self._loaded_modules())

    @command()
    async def get_plugin(self, key: str, type: str = "react"):
        return await asyncio.to_thread(plugins.content, key, type, self._loaded_modules())

    @command()
    def get_available_modules(self):
        return self.modules.available()  # the FuncNodes module list (cache + background refresh)

    @command()
    def on_repo_refresh(self):
        self.modules.list.refresh(force=True)
        return None

    @property
    def modules(self):
        if self._modules is None:
            from .modules import WorkerModules

            self._modules = WorkerModules(self.host.base, self.host.config, lambda: self.graph.dependencies,
                                          self.host.broadcast)
        return self._modules

    @command()
    async def add_package_dependency(self, name: str, dep: dict | None = None, save: bool = True,
                                     version: str | None = None, sync: bool = True, do_reload_base: bool = True):
        dep = dep or {}
        if not isinstance(dep, dict):
            raise TypeError("dep must be an object")
        path = dep.get("path")
        if path is not None and not path_allowed(path, self.host.paths.data):
            raise DependencyError("a path dependency must lie inside the worker's data folder (not files/)")
        spec = normalize(dep.get("package", name), version or dep.get("version"), path)
        self.host.set_progress(f"Add package dependency {name}", "info", 0.0, True)
        try:
            if path is None or is_project(path):
                await self._install(spec)
                self.host.set_progress(f"Add package dependency {name}", "info", 0.8, True)
            self.graph.add_dependency(spec)
        except Exception as e:
            self.host.set_progress(f"Could not install {name}({spec.get('version')}): {e}", "error", 0.0, True)
            raise
        if save:
            self.host.config.setdefault("package_dependencies", {})[spec["package"]] = spec
            self._save_dependencies()
        self.host.set_progress(f"Add package dependency {name}", "success", 1.0, False)
        if self.graph.dependencies.get(spec["package"], {}).get("shelf") is None:
            self.host.broadcast(codec.workerevent("lib_update"))  # no shelf event to carry it
        if sync:
            self.host.broadcast(codec.workerevent("fullsync"))
        return None

    async def _install(self, spec: dict) -> None:
        from .install import install  # skips what is importable; else supervisor or uv, one at a time

        await install(self.host, spec)

    @command()
    def remove_package_dependency(self, name: str, dep: dict | None = None, save: bool = True):
        info = self.graph.remove_dependency(name)  # a shelf's after_remove_shelf event sends lib_update
        if info and info.get("shelf") is not None:
            if self.store.enabled:
                self.store.snapshot()  # the shelf's nodes went with it
        else:
            self.host.broadcast(codec.workerevent("lib_update"))
        if save:
            self.host.config.get("package_dependencies", {}).pop(name, None)
            self._save_dependencies()
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
        if src not in self.graph.dependencies:
            return {"error": f"shelf {src} not found"}
        self.remove_package_dependency(src, save=save)
        return None
    # endregion

    # region external and local workers
    def on_local_scripts(self, changes: list[dict], initial: bool = False) -> None:
        localworkers.apply_changes(self.local, changes, initial=initial)

    @command()
    def list_local_workers(self):
        return localworkers.describe(self.local)

    @command()
    def start_local_worker(self, worker_id: str, name: str | None = None, config: dict | None = None):
        return localworkers.start(self.local, worker_id, name=name, config=config)

    @command()
    async def stop_local_worker(self, worker_id: str, instance_id: str):
        return await localworkers.stop(self.local, worker_id, instance_id)

    @command()
    def add_external_worker(self, module: str, cls_module: str, cls_name: str):
        for cid, info in self.local.local_classes.items():
            if info["cls"].__name__ == cls_name and info["cls"].__module__ == cls_module:
                return self.start_local_worker(cid)
        raise ValueError(f"Worker {cls_name}({cls_module}) not found in {module}")

    @command()
    def update_external_worker(self, worker_id: str, class_id: str, name: str | None = None, config: dict | None = None):
        inst = self.local.local_instances.get(class_id, {}).get(worker_id)
        if inst is None:
            raise ValueError(f"external worker {class_id}/{worker_id} not found")
        if name is not None:
            inst.name = name
        if config is not None and hasattr(inst, "update_config"):
            inst.update_config(config)
        self.host.broadcast(codec.workerevent("external_worker_update"))
        return None

    @command()
    async def remove_external_worker(self, worker_id: str, class_id: str):
        return await self.stop_local_worker(class_id, worker_id)

    @command()
    def get_external_worker_config(self, worker_id: str, class_id: str):
        inst = self.local.local_instances.get(class_id, {}).get(worker_id)
        if inst is None:
            raise ValueError(f"external worker {class_id}/{worker_id} not found")
        return {"jsonSchema": {}, "uiSchema": None, "formData": dict(getattr(inst, "config", {}) or {})}
    # endregion

    # region lifecycle
    @command()
    async def stop_worker(self):
        # Reply first, then stop: the caller learns that it worked (the stock reply never arrives).
        if self.host.channel is not None:
            self.host.channel.send({"type": "stopping", "reason": "stop_worker"})
        self.host.loop.call_later(0.05, self.host.request_stop, "stop_worker")
        return True
    # endregion
