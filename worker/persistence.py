"""nodespace.json (WorkerState), in the stock format (the export ZIP: transfer.py).

Beyond the stock worker: input values set by clients are saved too, as the IO's `value` key
(which the stock loader reads as well), and only when they survive a JSON round trip.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import funcnodes_core as fn
from funcnodes_core import NoValue
from funcnodes_core.utils.saving import serialize_node_for_saving

from . import codec


def json_safe(value: Any) -> bool:
    """True if value is plain JSON that comes back equal (no NaN, no custom objects)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return json.loads(text) == value


_json_safe = json_safe


def _plain(obj: Any) -> Any:
    return codec.loads(codec.dumps(obj))


def serialize_backend(nodespace: fn.NodeSpace) -> dict:
    """funcnodes-core's serialize_nodespace_for_saving, the same value (tests/test_codec.py), made
    of its parts: its two JSON round trips decode with codec.loads instead of core's decoder,
    whose object_hook re-walks every subtree (13.3 -> 8.9 ms for 200 nodes: a snapshot holds the
    main loop that long, and one that lands as a run starts delays the run by as much)."""
    nodes = _plain([serialize_node_for_saving(node) for node in nodespace.nodes])
    return _plain({"nodes": nodes, "edges": nodespace.serialize_edges(), "prop": nodespace._properties,
                   "groups": nodespace.serialize_groups()})


def worker_state(nodespace: fn.NodeSpace, view: dict, meta: dict, external_workers: dict) -> dict:
    backend = serialize_backend(nodespace)
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


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v))
