"""Safe mode's record: the nodes the policy quarantined, kept in <data>/quarantine.json.

The policy (policy.py) decides which node; this keeps the list, writes it, and takes lift
requests: from a client of the worker (a `lift_quarantine` frame) or from `fn-supervise lift`
(the node ids in <workers>/worker_<uuid>.lift, then SIGUSR1). The next worker gets the list as
`--quarantine`; a running one gets a `quarantine` frame when the CLI lifts a node.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from .crash import CrashRecord
from .files import WorkerPaths

log = logging.getLogger("fn-supervise")


class Quarantine:
    def __init__(self, paths: WorkerPaths, note: Callable[[str], None], config: Callable[[], dict[str, Any]]):
        self.paths = paths
        self.note = note      # a line for the worker's log
        self.config = config  # the worker config now (its data folder holds the file)
        self.nodes: dict[str, dict[str, Any]] = {}  # node id -> {reason, since, crashes}

    def load(self) -> None:
        self.nodes = self.paths.read_quarantine(self.config())

    def reasons(self) -> dict[str, str]:
        """{node: reason}: what the worker is told (`--quarantine`, a `quarantine` frame)."""
        return {k: str(v.get("reason") or "quarantined") for k, v in self.nodes.items()}

    def add(self, node: str, rec: CrashRecord, crashes: int) -> None:
        reason = (f"{crashes} crashes with this node in flight (last: {rec.reason}, "
                  f"{rec.signal_name or f'exit code {rec.exit_code}'})")
        self.nodes[node] = {"reason": reason, "since": time.time(), "crashes": crashes}
        self._save()
        log.warning("%s: SAFE MODE: node %s quarantined: %s", self.paths.name, node, reason)
        self.note(f"safe mode: node {node} quarantined: {reason}; "
                  f"lift with `fn-supervise lift {self.paths.name} {node}`")

    def lift(self, node: str, who: str) -> bool:
        """-> True when the node was quarantined (and is not any more)."""
        if node not in self.nodes:
            self.note(f"{who} asked to lift node {node}, which is not quarantined")
            return False
        del self.nodes[node]
        self._save()
        self.note(f"{who} lifted the quarantine of node {node}")
        log.info("%s: quarantine of node %s lifted by %s", self.paths.name, node, who)
        return True

    def lift_for(self, sup: Any, node: str, who: str) -> None:
        """Lift for a runner.Supervisor: its policy forgets the node; a worker that did not ask
        itself (a client's request comes through it) hears the new list."""
        if not self.lift(node, who):
            return
        sup.policy.lift(node)
        if who != "a client" and sup.worker is not None and sup.worker.alive:
            sup.worker.send({"type": "quarantine", "nodes": self.reasons()})
        sup.write_state()

    def lift_requested_for(self, sup: Any) -> None:
        """SIGUSR1 from `fn-supervise lift`: the node ids are in <workers>/worker_<uuid>.lift."""
        for node in self.take_lift_requests():
            self.lift_for(sup, node, "fn-supervise lift")

    def take_lift_requests(self) -> list[str]:
        """The node ids `fn-supervise lift` left for us (taken: the file is gone afterwards)."""
        taken = self.paths.lift_requests.with_name(self.paths.lift_requests.name + ".taken")
        try:
            os.replace(self.paths.lift_requests, taken)
            nodes = taken.read_text().split()
            taken.unlink()
        except OSError:
            return []
        return nodes

    def _save(self) -> None:
        try:
            self.paths.write_quarantine(self.nodes, self.config())
        except OSError as e:
            log.warning("cannot write %s: %s", self.paths.quarantine_file(self.config()), e)
