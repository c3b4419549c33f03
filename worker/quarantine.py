"""Safe mode, worker side: quarantined nodes are loaded with the graph but never run.

The supervisor quarantines a node after repeated crashes with it in flight (supervisor/
policy.py) and starts the worker with `--quarantine '{"<node id>": "<reason>"}'`. Here:

- Every path into a node's run in funcnodes-core ends in `Node.trigger()` (request_trigger,
  trigger_if_requested, await_trigger, an input set with does_trigger, an upstream output):
  a quarantined node gets an instance-level `trigger` that refuses. A trigger task created
  while the node was being built (trigger_on_create, in `__init__`/`deserialize`, before the
  loop ever ran it) is cancelled as the node is added to the nodespace, so its function never
  starts.
- Clients get a `node_quarantined` worker event naming the node and why (at start and when a
  refused trigger is asked for), `get_quarantine` lists them and `lift_quarantine(nid)` lifts
  one: the node is restored, triggered at once if ready (so a real poison comes straight back),
  and the supervisor is told (it forgets the node and keeps it out of the next start).
- The nodes in flight reach the supervisor the moment one starts or ends (an `in_flight`
  frame), not at the next heartbeat: a node that kills the process at once is still named.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from . import codec, control
from .health import HEALTH


log = logging.getLogger("fn_supervise.worker.quarantine")

QUARANTINED: dict[str, str] = {}  # node id -> reason; set from the command line before run()
NOTICE_EVERY = 1.0  # seconds between two refused-trigger events for one node
_rt: Any = None  # the runtime (nodespace, commands, loop, broadcast, server): wired by install()
_last_notice: dict[str, float] = {}


def parse_arg(text: str | None) -> dict[str, str]:
    """--quarantine value: a JSON object {node id: reason} (or a list of ids)."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--quarantine is not JSON: {e}") from None
    if isinstance(data, list):
        return {str(n): "quarantined" for n in data}
    if isinstance(data, dict):
        return {str(k): str(v) for k, v in data.items()}
    raise ValueError("--quarantine must be a JSON object {node id: reason}")


class _InFlight(dict):
    """HEALTH.in_flight that tells the supervisor at once which nodes are running (in start
    order): a node that kills the process the moment it starts is the newest one in flight."""

    def _changed(self) -> None:
        if control.CURRENT is not None:
            nodes = list(self)
            control.CURRENT.send({"type": "in_flight", "node": nodes[-1] if nodes else None, "nodes": nodes})

    def __setitem__(self, k: str, v: float) -> None:
        super().__setitem__(k, v)
        self._changed()

    def pop(self, k: str, *default: Any) -> Any:
        had = k in self
        out = super().pop(k, *default)
        if had:
            self._changed()
        return out


def install(rt: Any) -> None:
    """Hook into a runtime whose nodespace and commands exist, before the graph is loaded."""
    global _rt
    _rt = rt
    HEALTH.in_flight = _InFlight(HEALTH.in_flight)
    ns = rt.nodespace
    add = ns.add_node_instance

    def add_node_instance(node: Any) -> Any:
        if node.uuid in QUARANTINED:
            _block(node)
        return add(node)

    ns.add_node_instance = add_node_instance  # every node of a load or an add_node passes here
    rt.commands.registry["lift_quarantine"] = lift
    rt.commands.registry["get_quarantine"] = get_quarantine
    control.HANDLERS["quarantine"] = _on_frame
    if rt.loop is not None and QUARANTINED:
        rt.loop.call_soon(announce)  # runs once the start yields to the loop


def announce() -> None:
    """Tell clients which nodes are quarantined (called once the worker is ready)."""
    for nid, reason in QUARANTINED.items():
        _notify(nid, reason)


def _notify(nid: str, reason: str) -> None:
    if _rt is not None:
        _rt.broadcast(codec.workerevent("node_quarantined", node=nid, reason=reason,
                                        lift=f"lift_quarantine(nid={nid!r})"))


def _block(node: Any) -> None:
    nid = node.uuid

    def refused_trigger(triggerstack: Any = None) -> Any:
        from funcnodes_core.triggerstack import TriggerStack  # noqa: PLC0415

        node._requests_trigger = False
        now = time.monotonic()
        listening = _rt is not None and bool(getattr(_rt.server, "clients", None))
        if listening and now - _last_notice.get(nid, 0.0) >= NOTICE_EVERY:
            _last_notice[nid] = now
            _notify(nid, QUARANTINED.get(nid, "quarantined"))
        return triggerstack if triggerstack is not None else TriggerStack()

    node.trigger = refused_trigger
    task = getattr(node, "_trigger_task", None)
    if task is not None and not task.done():
        task.cancel()  # created by trigger_on_create; the loop has not run it yet
    node._trigger_task = None
    node._triggerstack = None
    node._trigger_open = False
    node._requests_trigger = False
    log.warning("node %s is quarantined: %s", nid, QUARANTINED.get(nid))


def _unblock(node: Any) -> None:
    if "trigger" in vars(node):
        del node.trigger
    try:
        if node.ready_to_trigger():
            node.request_trigger()
    except Exception:  # noqa: BLE001
        log.exception("trigger of lifted node %s failed", node.uuid)


def _node(nid: str) -> Any:
    try:
        return _rt.nodespace.get_node_by_id(nid) if _rt is not None else None
    except Exception:  # noqa: BLE001
        return None


def get_quarantine() -> dict[str, str]:
    return dict(QUARANTINED)


def lift(nid: str, tell_supervisor: bool = True) -> dict[str, str]:
    """Client command: lift one node's quarantine. Returns the nodes still quarantined."""
    if nid not in QUARANTINED:
        raise ValueError(f"node {nid} is not quarantined (quarantined: {sorted(QUARANTINED) or 'none'})")
    del QUARANTINED[nid]
    if tell_supervisor and control.CURRENT is not None:
        control.CURRENT.send({"type": "lift_quarantine", "node": nid})
    if _rt is not None:
        _rt.broadcast(codec.workerevent("node_quarantine_lifted", node=nid))
    node = _node(nid)
    if node is not None:
        _unblock(node)
    return dict(QUARANTINED)


def _on_frame(msg: dict) -> None:
    """Supervisor -> worker {"type": "quarantine", "nodes": {...}} (from the channel thread)."""
    nodes = msg.get("nodes")
    if _rt is None or _rt.loop is None or not isinstance(nodes, dict):
        return
    _rt.loop.call_soon_threadsafe(_apply, {str(k): str(v) for k, v in nodes.items()})


def _apply(nodes: dict[str, str]) -> None:
    for nid in [n for n in QUARANTINED if n not in nodes]:
        lift(nid, tell_supervisor=False)
    for nid, reason in nodes.items():
        if nid not in QUARANTINED:
            QUARANTINED[nid] = reason
            node = _node(nid)
            if node is not None:
                _block(node)
            _notify(nid, reason)
