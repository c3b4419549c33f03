"""The graph a worker serves: its NodeSpace, the view, external workers and package shelves.

Everything here needs funcnodes-core, so the runtime imports this module only after the server
listens (that is the one lazy import of the worker, and why it exists).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import funcnodes_core as fn

from . import effects, persistence, separate

log = logging.getLogger("fn_supervise.worker.graph")
separate.install()  # before any node module loads: separate_process=True nodes then run in a child


class Graph:
    def __init__(self, on_event: Callable[..., None], files_dir: str | None = None,
                 admit: Callable[[Any], None] | None = None):
        self.files_dir = files_dir
        self.nodespace = fn.NodeSpace()
        self.pin_files_dir()  # before any node arrives: file nodes read it when they are added
        self.nodespace.on("*", on_event)
        if admit is not None:
            # The one wrapper of add_node_instance: every node of a load or an add_node passes
            # here before it is in the graph (safe mode blocks quarantined ones).
            add = self.nodespace.add_node_instance

            def add_node_instance(node: Any) -> Any:
                admit(node)
                return add(node)

            self.nodespace.add_node_instance = add_node_instance
        self.view: dict[str, Any] = {"renderoptions": {"typemap": {}, "inputconverter": {}}}
        self.external_workers: dict = {}
        self.dependencies: dict[str, dict] = {}  # package -> {dep, module, shelf, worker_classes}

    def pin_files_dir(self) -> None:
        """File nodes (funcnodes-files) find uploads through the NodeSpace's `files_dir`, as in the
        stock worker: a secret property (never saved), and no saved public one may shadow it."""
        if self.files_dir is not None:
            self.nodespace.remove_property("files_dir", ignore_secret=True)
            self.nodespace.set_secret_property("files_dir", self.files_dir)

    def meta(self) -> dict:
        return {"id": self.nodespace.id, "version": fn.__version__}

    def state(self) -> dict:
        return persistence.worker_state(self.nodespace, self.view, self.meta(), self.external_workers)

    def state_steps(self, chunk: int):
        """state() in steps of `chunk` nodes (persistence.worker_state_steps)."""
        return persistence.worker_state_steps(self.nodespace, self.view, self.meta(), self.external_workers, chunk)

    def replace_state(self, state: dict) -> None:
        """Apply a client's WorkerState all or nothing: if it fails, the old graph comes back."""
        old = self.state()
        try:
            self.apply_state(state)
        except Exception:
            self.apply_state(old)
            raise

    def apply_state(self, state: dict) -> None:
        backend = state.get("backend") or {}
        meta = state.get("meta") or {}
        nsid = meta.get("id")
        if isinstance(nsid, str) and nsid:
            # funcnodes-core has no setter: the id must survive a reload (clients key on it).
            self.nodespace._id = nsid
        view = state.get("view") or {}
        legacy_nodes = view.get("nodes") or {}
        self.view = {k: v for k, v in view.items() if k != "nodes"} or self.view
        self.view.setdefault("renderoptions", {"typemap": {}, "inputconverter": {}})
        self.external_workers = state.get("external_workers") or {}
        prop = backend.get("prop")
        if isinstance(prop, dict) and "files_dir" in prop:  # another machine's folder: never ours
            backend = dict(backend, prop={k: v for k, v in prop.items() if k != "files_dir"})
        for node in self.nodespace.nodes:
            # A run of a node about to be replaced would write into its removed outputs.
            task = getattr(node, "_trigger_task", None)
            if task is not None and not task.done():
                task.cancel()
        self.nodespace.deserialize(backend)
        self.pin_files_dir()
        for nid, vs in legacy_nodes.items():
            try:
                node = self.nodespace.get_node_by_id(nid)
            except ValueError:
                continue
            if vs.get("pos"):
                node.set_property("frontend:pos", vs["pos"])
            if vs.get("size"):
                node.set_property("frontend:size", vs["size"])
        for nid, values in persistence.saved_values(state).items():
            try:
                node = self.nodespace.get_node_by_id(nid)
            except ValueError:
                continue
            for ioid, value in values.items():
                try:
                    node.get_input(ioid).set_value(value)
                except Exception:
                    log.warning("could not restore %s.%s", nid, ioid)

    def apply_record(self, rec: dict) -> None:
        effects.apply(self.nodespace, rec)
        if rec.get("op") == "clear":
            self.pin_files_dir()

    # region dependencies
    def load_dependencies(self, config: dict) -> None:
        for name, dep in list((config.get("package_dependencies") or {}).items()):
            dep = dict(dep)
            dep.setdefault("package", name)
            try:
                self.add_dependency(dep)
            except Exception as e:
                # A broken dependency must not keep the worker (and its graph) down.
                log.error("dependency %s failed to load: %s", name, e)
                print(f"fn-supervise worker: dependency {name} failed to load: {e}", file=sys.stderr, flush=True)

    def add_dependency(self, dep: dict) -> Any:
        from .packages import import_dependency, module_name, shelf_of

        mod = import_dependency(dep)
        shelf = shelf_of(mod)
        old = self.dependencies.get(dep["package"])
        if old and old.get("shelf") is not None:
            try:
                self.nodespace.remove_shelf(old["shelf"], with_nodes=False)
            except Exception:
                pass
        if shelf is not None:
            self.nodespace.add_shelf(shelf)
        classes = getattr(mod, "FUNCNODES_WORKER_CLASSES", None) or []
        self.dependencies[dep["package"]] = {"dep": dep, "module": module_name(dep), "shelf": shelf,
                                             "worker_classes": list(classes)}
        return shelf

    def remove_dependency(self, name: str) -> dict | None:
        """Forget the dependency; its shelf leaves the library (the shelf event sends lib_update)."""
        info = self.dependencies.pop(name, None)
        if info and info.get("shelf") is not None:
            self.nodespace.remove_shelf(info["shelf"])
        return info
    # endregion
