"""Parent-death plumbing shared by the sidecars (Linux prctl via ctypes; no-ops elsewhere).

A sidecar has two lifelines to the supervisor: EOF on its pipe (the primary one, handled by
each sidecar's own loop) and PR_SET_PDEATHSIG (a second line that also fires when the sidecar
is stuck and not reading its pipe). PR_SET_PDEATHSIG is tied to the *thread* that created the
child: the supervisor must start sidecars from a long-lived thread (its event-loop thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = None
FORK_PARENT: int | None = None  # set in a sidecar forked by sidecars/forked.py: the supervisor's pid
_ARMED_IN: int | None = None  # the pid arm_sidecar ran in: two roles of one process (pair.py) arm it once


def set_fork_parent(pid: int) -> None:
    """In a sidecar just forked from the supervisor: the parent whose death ends it."""
    global FORK_PARENT
    FORK_PARENT = pid


def _prctl(option: int, arg: int) -> bool:
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        # The symbols of the running program (libc included); ctypes.util.find_library would
        # run `ldconfig -p` in every sidecar for the same answer.
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) == 0


def set_parent_death_signal(sig: int = signal.SIGTERM, expected_parent: int | None = None) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) dies.

    If the parent is already gone (we were reparented before the prctl took effect), exit at
    once: the signal would never come. Returns whether the prctl is in force.
    """
    ok = _prctl(PR_SET_PDEATHSIG, int(sig))
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)
    return ok


def set_child_subreaper() -> bool:
    """Orphaned descendants get reparented to this process instead of init."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def arm_sidecar() -> None:
    """Common start-up for a sidecar process: parent-death signal, and ignore SIGINT.

    SIGINT from a terminal reaches the whole foreground process group; the supervisor handles
    it and stops its sidecars in order, so a sidecar must not die of it on its own.
    Once per process: a role running in a thread of a shared sidecar (pair.py) finds it done
    by the main thread (signal.signal works only there).
    """
    global _ARMED_IN
    if _ARMED_IN == os.getpid():
        return
    expected = FORK_PARENT
    mp = sys.modules.get("multiprocess")  # a spawned sidecar's bootstrap imported it already
    if expected is None and mp is not None:
        try:
            parent = mp.parent_process()
            expected = parent.pid if parent is not None else None
        except Exception:  # pragma: no cover - run outside multiprocess
            expected = None
    set_parent_death_signal(signal.SIGTERM, expected)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _ARMED_IN = os.getpid()
