"""Which role of a shared sidecar process gets a message, and what ends when a role ends.

Per-worker mode runs discovery and the subprocess monitor as two roles of one process
(sidecars/pair.py): one forked child instead of two, each Python process costs its own copy of
every page the interpreter writes. Pure decisions, no I/O, so they are tested alone:

  - supervisor -> roles: a stop goes to every live role; the answer to a worker start
    (spawn_worker_result) goes to the monitor; anything else to none.
  - a role that ends uninvited (a crash, an exception) ends the others too: the process then
    exits, and the supervisor's SidecarKeeper restarts the whole process on its one crash
    budget, so both roles come back together and no half-working process lingers.
  - the supervisor gone (pipe EOF): every live role ends (the monitor kills its commands).
"""

from __future__ import annotations

from typing import Any, Iterable

DISCOVERY = "discovery"
MONITOR = "monitor"


class RoleSet:
    def __init__(self, roles: Iterable[str]):
        self.live: list[str] = list(roles)
        self.stopping = False

    def route_down(self, msg: Any) -> list[str]:
        """The roles a message from the supervisor goes to."""
        t = msg.get("type") if isinstance(msg, dict) else None
        if t == "stop":
            self.stopping = True
            return list(self.live)
        if t == "spawn_worker_result":
            return [MONITOR] if MONITOR in self.live else []
        return []

    def supervisor_gone(self) -> list[str]:
        """The pipe to the supervisor closed: the roles to end (all of them)."""
        self.stopping = True
        return list(self.live)

    def ended(self, role: str) -> list[str]:
        """`role` has ended; the roles to end because of it (none during a stop)."""
        if role in self.live:
            self.live.remove(role)
        if self.stopping:
            return []
        self.stopping = True  # uninvited: the whole process goes, and comes back whole
        return list(self.live)
