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
  frame from Health's on_in_flight callback), not at the next heartbeat: a node that kills the
  process at once is still named.

`SafeMode` is built by the runtime from its arguments and wired through declared seams: the
graph admits every node through `admit` (Graph(admit=...)), the verbs are registered with
`Commands.register`, the supervisor's `quarantine` frame reaches `apply` through the runtime's
one control table on the main loop. No module state.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from . import codec

log = logging.getLogger("fn_supervise.worker.quarantine")

NOTICE_EVERY = 1.0  # seconds between two refused-trigger events for one node


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


class SafeMode:
    def __init__(self, nodes: dict[str, str], *, broadcast: Callable[[Any], None],
                 to_supervisor: Callable[[dict], None], find_node: Callable[[str], Any],
                 has_clients: Callable[[], bool]):
        self.nodes = dict(nodes)            # node id -> reason
        self.broadcast = broadcast          # a worker event to every client
        self.to_supervisor = to_supervisor  # a frame on the control channel (no-op unsupervised)
        self.find_node = find_node          # node id -> the node in the graph, or None
        self.has_clients = has_clients      # anyone to tell about a refused trigger?
        self._last_notice: dict[str, float] = {}

    def register(self, commands: Any) -> None:
        commands.register("lift_quarantine", self.lift)
        commands.register("get_quarantine", self.get_quarantine)

    # the graph's admit hook: every node of a load or an add_node passes here
    def admit(self, node: Any) -> None:
        if node.uuid in self.nodes:
            self._block(node)

    def announce(self) -> None:
        """Tell clients which nodes are quarantined (called once the worker is ready)."""
        for nid, reason in self.nodes.items():
            self._notify(nid, reason)

    def get_quarantine(self) -> dict[str, str]:
        return dict(self.nodes)

    def lift(self, nid: str, tell_supervisor: bool = True) -> dict[str, str]:
        """Client command: lift one node's quarantine. Returns the nodes still quarantined."""
        if nid not in self.nodes:
            raise ValueError(f"node {nid} is not quarantined (quarantined: {sorted(self.nodes) or 'none'})")
        del self.nodes[nid]
        if tell_supervisor:
            self.to_supervisor({"type": "lift_quarantine", "node": nid})
        self.broadcast(codec.workerevent("node_quarantine_lifted", node=nid))
        node = self.find_node(nid)
        if node is not None:
            _unblock(node)
        return dict(self.nodes)

    def apply(self, msg: dict) -> None:
        """Supervisor -> worker {"type": "quarantine", "nodes": {...}} (on the main loop)."""
        nodes = msg.get("nodes")
        if not isinstance(nodes, dict):
            return
        nodes = {str(k): str(v) for k, v in nodes.items()}
        for nid in [n for n in self.nodes if n not in nodes]:
            self.lift(nid, tell_supervisor=False)
        for nid, reason in nodes.items():
            if nid not in self.nodes:
                self.nodes[nid] = reason
                node = self.find_node(nid)
                if node is not None:
                    self._block(node)
                self._notify(nid, reason)

    def _notify(self, nid: str, reason: str) -> None:
        self.broadcast(codec.workerevent("node_quarantined", node=nid, reason=reason,
                                         lift=f"lift_quarantine(nid={nid!r})"))

    def _block(self, node: Any) -> None:
        nid = node.uuid

        def refused_trigger(triggerstack: Any = None) -> Any:
            from funcnodes_core.triggerstack import TriggerStack  # noqa: PLC0415

            node._requests_trigger = False
            now = time.monotonic()
            if self.has_clients() and now - self._last_notice.get(nid, 0.0) >= NOTICE_EVERY:
                self._last_notice[nid] = now
                self._notify(nid, self.nodes.get(nid, "quarantined"))
            return triggerstack if triggerstack is not None else TriggerStack()

        node.trigger = refused_trigger
        task = getattr(node, "_trigger_task", None)
        if task is not None and not task.done():
            task.cancel()  # created by trigger_on_create; the loop has not run it yet
        node._trigger_task = None
        node._triggerstack = None
        node._trigger_open = False
        node._requests_trigger = False
        log.warning("node %s is quarantined: %s", nid, self.nodes.get(nid))


def _unblock(node: Any) -> None:
    if "trigger" in vars(node):
        del node.trigger
    try:
        if node.ready_to_trigger():
            node.request_trigger()
    except Exception:  # noqa: BLE001
        log.exception("trigger of lifted node %s failed", node.uuid)
