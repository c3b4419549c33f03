"""nodespace.json (WorkerState), in the stock format (the export ZIP: transfer.py).

Beyond the stock worker: input values set by clients are saved too, as the IO's `value` key
(which the stock loader reads as well), and only when they survive a JSON round trip.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Generator

import funcnodes_core as fn
from funcnodes_core import NoValue
from funcnodes_core.utils.saving import serialize_node_for_saving

from . import codec


def json_safe(value: Any) -> bool:
    """True if value is plain JSON that comes back equal (no NaN, no custom objects)."""
    text = codec.plain_dumps(value)  # orjson's round trip where it is the stdlib's (an edit's value)
    if text is not None:
        return codec.plain_loads(text) == value
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return json.loads(text) == value


_json_safe = json_safe


def _plain(obj: Any) -> Any:
    # A JSON round trip as a member of an object, where funcnodes-core's decoders apply to every
    # leaf (codec.loads leaves a bare top-level list's strings alone, as core's decoder does).
    return codec.loads(codec.dumps({"v": obj}))["v"]


def backend_steps(nodespace: fn.NodeSpace, chunk: int = 0) -> Generator[None, None, dict]:
    """funcnodes-core's serialize_nodespace_for_saving, the same value (tests/test_codec.py), made
    of its parts, `chunk` nodes per step (0: all in one). Its two JSON round trips decode with
    codec.loads instead of core's decoder, whose object_hook re-walks every subtree (13.3 -> 8.9
    ms for 200 nodes); a round trip of an object is one of each member, so parts can go apart."""
    nodes = list(nodespace.nodes)
    chunk = chunk or len(nodes) or 1
    ser: list = []
    for i in range(0, len(nodes), chunk):
        ser += _plain(_plain([serialize_node_for_saving(node) for node in nodes[i:i + chunk]]))
        if i + chunk < len(nodes):
            yield
    return {"nodes": ser, "edges": _plain(nodespace.serialize_edges()), "prop": _plain(nodespace._properties),
            "groups": _plain(nodespace.serialize_groups())}


def worker_state_steps(nodespace: fn.NodeSpace, view: dict, meta: dict, external_workers: dict,
                       chunk: int = 0) -> Generator[None, None, dict]:
    """The WorkerState, in steps of `chunk` nodes: a caller that runs one step per loop turn keeps
    the loop free meanwhile, and must start again if the graph changed between steps."""
    backend = yield from backend_steps(nodespace, chunk)
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


def run_steps(steps: Generator[None, None, Any]) -> Any:
    """Every step at once; the generator's value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def worker_state(nodespace: fn.NodeSpace, view: dict, meta: dict, external_workers: dict) -> dict:
    return run_steps(worker_state_steps(nodespace, view, meta, external_workers))


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
