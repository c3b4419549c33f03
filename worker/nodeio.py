"""funcnodes-core's per-node IO lookup, once per node class instead of once per node.

`Node.__init__` finds its class's NodeInput/NodeOutput attributes by `dir()` + `getattr()` on the
*instance* (funcnodes_core.node._get_nodeclass_inputs/_outputs), which runs every property of the
node, twice. py-spy on a worker loading a 1000-node chain: `_parse_nodeclass_io` was ~75 % of
graph load (0.5 ms of 0.7 ms per node). The attributes it finds are class attributes (the instance
has only private ones when it runs), so the answer is the class's, cached per class; a fresh dict
each call, as before. If funcnodes-core changes these functions' names, nothing is patched.

`quiet_load()`: while the worker loads its graph at start, NodeSpace.add_node_instance skips the
`node_added` event, for which funcnodes-core full-serializes every node (~19 % of a 1000-node load
in py-spy): nobody needs those, the worker broadcasts `fullsync` once the graph is loaded.
Everything else add_node_instance does is done the same (Graph's admit wrapper still runs).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

_installed = False
_quiet = False


@contextlib.contextmanager
def quiet_load() -> Iterator[None]:
    """Nodes added meanwhile send no `node_added` event (see the module doc)."""
    global _quiet
    _quiet = True
    try:
        yield
    finally:
        _quiet = False


def install() -> None:
    global _installed
    if _installed:
        return
    try:
        from funcnodes_core import node as core_node  # noqa: PLC0415 (funcnodes-core loads lazily)
        orig_in, orig_out = core_node._get_nodeclass_inputs, core_node._get_nodeclass_outputs
    except (ImportError, AttributeError):
        return

    def per_class(orig):
        cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

        def lookup(node):
            if isinstance(node, type):  # class creation and serialize_cls: as before (rare)
                return orig(node)
            cls = node.__class__  # first instance: the class is complete by now
            found = cache.get(cls)
            if found is None:
                found = cache[cls] = orig(cls)
            return dict(found)
        lookup.__wrapped__ = orig
        return lookup

    core_node._get_nodeclass_inputs = per_class(orig_in)
    core_node._get_nodeclass_outputs = per_class(orig_out)
    _quiet_adds()
    _installed = True


def _quiet_adds() -> None:
    # On the class, before the worker's Graph takes its bound add_node_instance to wrap.
    from funcnodes_core.nodespace import NodeSpace  # noqa: PLC0415

    orig = NodeSpace.add_node_instance
    if not all(hasattr(NodeSpace, a) for a in ("on_node_event", "on_node_error")):
        return

    def add_node_instance(self, node):
        if not _quiet or not isinstance(getattr(self, "_nodes", None), dict):
            return orig(self, node)
        # funcnodes-core's add_node_instance without the node_added event and its serialization
        if node.uuid in self._nodes:
            raise ValueError(f"node with uuid '{node.uuid}' already exists")
        self._nodes[node.uuid] = node
        node.nodespace = self
        node.on("*", self.on_node_event)
        node.on_error(self.on_node_error)
        return node
    add_node_instance.__wrapped__ = orig
    NodeSpace.add_node_instance = add_node_instance
