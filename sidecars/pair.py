"""Several sidecar roles in one process: per-worker mode's discovery and monitor.

Each extra Python process copies several MB of the pages it shares with the supervisor (the
interpreter writes refcounts and caches into every object it touches), so per-worker mode runs
discovery and the subprocess monitor as two roles of one forked sidecar. Each role runs its
usual entry point (run_discovery, run_monitor) unchanged, on a pipe of its own inside the
process; a relay thread joins those pipes to the one pipe to the supervisor:
  - role -> supervisor: every message as it is (the supervisor routes them by type);
  - supervisor -> roles: as sidecars/roles.py decides (a stop to all, a worker start's answer
    to the monitor); EOF (the supervisor is gone) closes every role's pipe, which each role
    already reads as "supervisor gone" (the monitor kills its commands);
  - a role that ends uninvited ends the others (roles.py): the process exits and SidecarKeeper
    restarts it whole, on its one crash budget.
The monitor (asyncio, signal handlers) runs in the main thread, the others in threads.
"""

from __future__ import annotations

import threading
import traceback
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

from ._lifeline import arm_sidecar
from .entry import run_named
from .roles import MONITOR, RoleSet

JOIN_TIMEOUT = 5.0  # a thread role's own stop is one watcher step; this bounds the exit


def run_pair(conn: Connection, roles: dict[str, tuple[str, tuple, dict]]) -> int:
    """Sidecar entry point: roles maps a role name to (target "module:function", args, kwargs)."""
    arm_sidecar()  # once, in the main thread: the roles' own calls then do nothing
    main = MONITOR if MONITOR in roles else next(iter(roles))
    ends: dict[str, Connection] = {}
    theirs: dict[str, Connection] = {}
    for role in roles:
        ends[role], theirs[role] = Pipe(duplex=True)
    threading.Thread(target=_relay, args=(conn, ends, RoleSet(roles)), daemon=True,
                     name="sidecar-relay").start()
    others = [threading.Thread(target=_run_role, args=(theirs[r], *roles[r]), daemon=True,
                               name=f"sidecar-{r}") for r in roles if r != main]
    for t in others:
        t.start()
    _run_role(theirs[main], *roles[main], reraise=True)
    for t in others:
        t.join(JOIN_TIMEOUT)
    return 0


def _run_role(conn: Connection, target: str, args: tuple, kwargs: dict, reraise: bool = False) -> None:
    try:
        run_named(conn, target, *args, **kwargs)
    except BaseException:
        if reraise:
            raise
        traceback.print_exc()
    finally:
        conn.close()  # the relay reads EOF: this role has ended


def _relay(conn: Connection, ends: dict[str, Connection], roles: RoleSet) -> None:
    by_end = {id(c): r for r, c in ends.items()}
    live = dict(ends)

    def close(names: list[str]) -> None:
        for r in names:
            c = live.pop(r, None)
            if c is not None:
                c.close()

    while live:
        for ready in wait([conn, *live.values()]):
            if ready is conn:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    close(roles.supervisor_gone())
                    return
                for r in roles.route_down(msg):
                    _send(live.get(r), msg)
                continue
            role = by_end[id(ready)]
            if role not in live:
                continue  # closed by an earlier decision in this round
            try:
                msg = ready.recv()
            except (EOFError, OSError):
                ending = roles.ended(role)
                _forward_pending(conn, [live[r] for r in ending if r in live])  # said before the end
                close([role, *ending])
                continue
            if not _send(conn, msg):
                close(roles.supervisor_gone())
                return


def _forward_pending(conn: Connection, ends: list[Connection]) -> None:
    """What roles about to be ended have already sent still reaches the supervisor (a role's
    hello and its crash can be ready in the same round; the crash's EOF may come first)."""
    for c in ends:
        try:
            while c.poll(0):
                if not _send(conn, c.recv()):
                    return
        except (EOFError, OSError):
            continue


def _send(c: Connection | None, msg: Any) -> bool:
    if c is None:
        return False
    try:
        c.send(msg)
        return True
    except (OSError, ValueError):
        return False
