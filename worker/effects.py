"""Journal records: the effect of an edit, built after the verb ran, and how a replay applies it.

A record says what the graph now holds (the node as added, the value as set, the groups as they
are), not what a client asked, so replay never depends on node code or on a client's defaults.
Values that fail the snapshot's JSON rule (`persistence.json_safe`) are left out of a record, as
they are left out of nodespace.json: such a value is recomputed (or lost) after a crash either way.

Each `op` has one builder (used by the commands) and one `apply_*` (used by the replay).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import funcnodes_core as fn
from funcnodes_core import NoValue
from funcnodes_core.utils.saving import serialize_node_for_saving

from .persistence import json_safe

log = logging.getLogger("fn_supervise.worker.effects")


# region builders
def node_added(node: fn.Node) -> dict:
    values = {}
    for ioid, inp in node.inputs.items():
        v = inp.value
        if ioid == "_triggerinput" or v is NoValue or inp.connections or not json_safe(v):
            continue
        if inp.default is not NoValue and json_safe(inp.default) and v == inp.default:
            continue  # the class gives it back
        values[ioid] = v
    ser = serialize_node_for_saving(node)
    return {"op": "node", "node": _plain(ser), "values": values}


def node_removed(nid: str) -> dict:
    return {"op": "rm_node", "id": nid}


def io_edges(*ios: fn.NodeIO) -> set[tuple[str, str, str, str]]:
    """The edges at these IOs, as (output node, output, input node, input)."""
    out = set()
    for io in ios:
        for other in io.connections:
            o, i = (other, io) if io.is_input() else (io, other)
            if o.node is not None and i.node is not None:
                out.add((o.node.uuid, o.uuid, i.node.uuid, i.uuid))
    return out


def edge_added(src: tuple[str, str], trg: tuple[str, str], removed: set) -> dict:
    # `removed`: what replace=True took away (funcnodes-core drops every edge of the output when
    # the input was taken), so a replay does exactly this, whatever connect() would decide.
    return {"op": "edge", "src": list(src), "trg": list(trg), "removed": sorted(list(e) for e in removed)}


def edge_removed(src: tuple[str, str], trg: tuple[str, str]) -> dict:
    return {"op": "rm_edge", "src": list(src), "trg": list(trg)}


def cleared() -> dict:
    return {"op": "clear"}


def node_attrs(node: fn.Node, props: dict, fields: tuple[str, ...]) -> dict:
    rec: dict[str, Any] = {"op": "attrs", "id": node.uuid, "props": {k: node.get_property(k) for k in props}}
    for f in fields:
        rec[f] = getattr(node, f)
    return rec


def io_options(io: fn.NodeIO) -> dict:
    return {"op": "io", "id": io.node.uuid, "io": io.uuid, "name": io.name, "hidden": bool(io.hidden)}


def value_options(io: fn.NodeIO, options: dict) -> dict:
    return {"op": "value_options", "id": io.node.uuid, "io": io.uuid, "options": options}


def value(io: fn.NodeInput, default: bool) -> dict | None:
    """The input's value (and default) as it now is; None when neither can be written as JSON."""
    rec: dict[str, Any] = {"op": "value", "id": io.node.uuid, "io": io.uuid}
    v = io.value
    if v is not NoValue and json_safe(v):
        rec["value"] = v
    if default and io.default is not NoValue and json_safe(io.default):
        rec["default"] = io.default
    return rec if len(rec) > 3 else None


def nodes_of(rec: dict) -> list[str]:
    """The nodes whose inputs a record changed (their readiness may have changed with them).
    Names, positions, sizes, properties, IO options and groups leave readiness as it was."""
    op = rec["op"]
    if op == "value":
        return [rec["id"]]
    if op == "edge" or op == "rm_edge":
        return [rec["src"][0], rec["trg"][0]]
    return []


def groups(ns: fn.NodeSpace) -> dict:
    return {"op": "groups", "groups": _plain(ns.groups.serialize())}


def _plain(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, cls=fn.JSONEncoder))
# endregion


# region replay
class Skip(Exception):
    """A valid record that no longer applies (its node is gone, its class is missing)."""


def _node(ns: fn.NodeSpace, nid: Any) -> fn.Node:
    try:
        return ns.get_node_by_id(nid)
    except Exception:
        raise Skip(f"node {nid!r} not found") from None


def apply_node(ns: fn.NodeSpace, rec: dict) -> None:
    ser = rec["node"]
    if ser.get("id") in {n.uuid for n in ns.nodes}:
        raise Skip(f"node {ser.get('id')!r} already exists")
    try:
        cls = ns.lib.get_node_by_id(ser["node_id"])
    except fn.NodeClassNotFoundError:
        from funcnodes_core.nodespace import PlaceHolderNode

        cls = PlaceHolderNode  # what nodespace.json loading does with a missing class
    node = cls()
    node.deserialize(ser)
    ns.add_node_instance(node)
    for ioid, v in (rec.get("values") or {}).items():
        try:
            node.get_input(ioid).set_value(v)
        except Exception:
            log.warning("replay: could not restore %s.%s", node.uuid, ioid)


def apply_rm_node(ns: fn.NodeSpace, rec: dict) -> None:
    if ns.remove_node_by_id(rec["id"]) is None:
        raise Skip(f"node {rec['id']!r} not found")


def _ios(ns: fn.NodeSpace, rec: dict):
    (snid, sio), (tnid, tio) = rec["src"], rec["trg"]
    try:
        return _node(ns, snid).get_input_or_output(sio), _node(ns, tnid).get_input_or_output(tio)
    except (KeyError, ValueError) as e:
        raise Skip(str(e)) from None


def apply_edge(ns: fn.NodeSpace, rec: dict) -> None:
    for onid, oio, inid, iio in rec.get("removed") or []:
        try:
            _ios(ns, {"src": [onid, oio], "trg": [inid, iio]})[0].disconnect(
                _node(ns, inid).get_input_or_output(iio))
        except Skip:
            pass
    src, trg = _ios(ns, rec)
    src.connect(trg, replace=True)  # only edges the record names were in the way


def apply_rm_edge(ns: fn.NodeSpace, rec: dict) -> None:
    src, trg = _ios(ns, rec)
    src.disconnect(trg)


def apply_clear(ns: fn.NodeSpace, rec: dict) -> None:
    ns.clear()


def apply_attrs(ns: fn.NodeSpace, rec: dict) -> None:
    node = _node(ns, rec["id"])
    for k, v in (rec.get("props") or {}).items():
        node.set_property(k, v)
    for f in ("name", "description", "reset_inputs_on_trigger"):
        if f in rec:
            setattr(node, f, rec[f])


def apply_io(ns: fn.NodeSpace, rec: dict) -> None:
    io = _io(ns, rec)
    io.name = rec["name"]
    io.hidden = bool(rec["hidden"])


def apply_value_options(ns: fn.NodeSpace, rec: dict) -> None:
    _io(ns, rec).update_value_options(**rec["options"])


def apply_value(ns: fn.NodeSpace, rec: dict) -> None:
    node = _node(ns, rec["id"])
    try:
        io = node.get_input(rec["io"])
    except (KeyError, ValueError) as e:
        raise Skip(str(e)) from None
    if "default" in rec:
        io.set_default(rec["default"])
    if "value" in rec:
        io.set_value(rec["value"])


def apply_groups(ns: fn.NodeSpace, rec: dict) -> None:
    ns.groups.deserialize(rec["groups"])


def _io(ns: fn.NodeSpace, rec: dict) -> fn.NodeIO:
    try:
        return _node(ns, rec["id"]).get_input_or_output(rec["io"])
    except (KeyError, ValueError) as e:
        raise Skip(str(e)) from None


APPLY: dict[str, Callable[[fn.NodeSpace, dict], None]] = {
    "node": apply_node, "rm_node": apply_rm_node, "edge": apply_edge, "rm_edge": apply_rm_edge,
    "clear": apply_clear, "attrs": apply_attrs, "io": apply_io, "value_options": apply_value_options,
    "value": apply_value, "groups": apply_groups,
}
OPS = frozenset(APPLY)


def apply(ns: fn.NodeSpace, rec: dict) -> None:
    """Apply one record; raises Skip when it no longer applies, anything else when it is bad."""
    APPLY[rec["op"]](ns, rec)
# endregion
