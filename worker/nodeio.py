"""funcnodes-core's per-node IO lookup, once per node class instead of once per node.

`Node.__init__` finds its class's NodeInput/NodeOutput attributes by `dir()` + `getattr()` on the
*instance* (funcnodes_core.node._get_nodeclass_inputs/_outputs), which runs every property of the
node, twice. py-spy on a worker loading a 1000-node chain: `_parse_nodeclass_io` was ~75 % of
graph load (0.5 ms of 0.7 ms per node). The attributes it finds are class attributes (the instance
has only private ones when it runs), so the answer is the class's, cached per class; a fresh dict
each call, as before. If funcnodes-core changes these functions' names, nothing is patched.
"""

from __future__ import annotations

import weakref

_installed = False


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
    _installed = True
