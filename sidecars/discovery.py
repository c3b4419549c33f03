"""Local-script discovery sidecar: watches `<data>/local_scripts` and reports .py changes.

Runs as a `multiprocess` child of the supervisor (see sidecars.host). Main thread: the
watchfiles loop. A reader thread: the pipe; EOF (the supervisor is gone) or {"type": "stop"}
sets the watcher's stop_event, and watchfiles returns within one step.

Messages sent (see sidecars/__init__.py):
  {"type": "local_scripts", "initial": true, "changes": [{"change": "added", "path": p}, ...]}
      once at start: every existing .py file (a full snapshot, possibly empty list).
  {"type": "local_scripts", "changes": [{"change": "added"|"modified"|"deleted", "path": p}]}
      one message per debounced burst.

Changes are computed as state transitions against the set of .py files already reported, not
copied from raw events: an atomic-rename save of a known file is "modified", a file created and
removed inside one burst is not reported, a deleted or moved-away directory reports each .py
file that was under it as "deleted".
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from watchfiles import DefaultFilter, watch

from ._lifeline import arm_sidecar

# Quiet time that ends a burst is `debounce_ms`; a burst that never goes quiet is still cut at
# MAX_BATCH_MS so a continuous writer cannot delay other changes indefinitely.
MAX_BATCH_MS = 500
# With no change for this long, watchfiles returns to us: used once to reconcile after the
# watcher started (closes the scan/watch race) and to notice a deleted local_scripts folder.
IDLE_TICK_MS = 250


def scan(root: Path) -> set[str]:
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("."):
                out.add(os.path.join(dirpath, f))
    return out


def _is_script(path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(".py") and not name.startswith(".") and "__pycache__" not in path


def diff(known: set[str], touched: set[str], root: Path) -> list[dict]:
    """Turn touched paths into transitions, updating `known` in place."""
    candidates: set[str] = set()
    for p in touched:
        if _is_script(p):
            candidates.add(p)
        # A directory event (created, removed, renamed): everything under it may have changed.
        prefix = p.rstrip(os.sep) + os.sep
        under = {k for k in known if k.startswith(prefix)}
        if under or os.path.isdir(p):
            candidates |= under
            if os.path.isdir(p):
                candidates |= scan(Path(p))
    changes = []
    for p in sorted(candidates):
        exists = os.path.isfile(p)
        if exists and p in known:
            changes.append({"change": "modified", "path": p})
        elif exists:
            known.add(p)
            changes.append({"change": "added", "path": p})
        elif p in known:
            known.discard(p)
            changes.append({"change": "deleted", "path": p})
    return changes


def reconcile(known: set[str], root: Path) -> list[dict]:
    """Full rescan against `known`: report what appeared or vanished (not content changes)."""
    now = scan(root) if root.is_dir() else set()
    changes = [{"change": "added", "path": p} for p in sorted(now - known)]
    changes += [{"change": "deleted", "path": p} for p in sorted(known - now)]
    known.clear()
    known |= now
    return changes


def _reader(conn, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            msg = conn.recv()
            if isinstance(msg, dict) and msg.get("type") == "stop":
                break
    except (EOFError, OSError):
        pass
    finally:
        stop.set()


def run_discovery(conn, scripts_dir: str, debounce_ms: int = 50) -> None:
    """Sidecar entry point (runs in the child process)."""
    arm_sidecar()
    root = Path(scripts_dir).resolve()
    stop = threading.Event()
    threading.Thread(target=_reader, args=(conn, stop), daemon=True,
                     name="discovery-pipe").start()

    def send(changes: list[dict], **extra) -> None:
        try:
            conn.send({"type": "local_scripts", "changes": changes, **extra})
        except (OSError, EOFError, ValueError):
            stop.set()

    root.mkdir(parents=True, exist_ok=True)
    known = scan(root)
    send([{"change": "added", "path": p} for p in sorted(known)], initial=True)

    step = max(1, int(debounce_ms))
    while not stop.is_set():
        root.mkdir(parents=True, exist_ok=True)
        reconciled = False
        try:
            for batch in watch(root, watch_filter=DefaultFilter(),
                               debounce=max(MAX_BATCH_MS, step), step=step, stop_event=stop,
                               rust_timeout=IDLE_TICK_MS, yield_on_timeout=True,
                               raise_interrupt=False, recursive=True):
                if batch:
                    changes = diff(known, {p for _, p in batch}, root)
                elif not reconciled or not root.is_dir():
                    # First idle tick: the watcher is surely running now, so anything created
                    # between the initial scan and its start shows up here. Later ticks only
                    # check that the folder itself still exists.
                    reconciled = True
                    changes = reconcile(known, root)
                else:
                    continue
                if changes:
                    send(changes)
                if not root.is_dir():
                    break  # a watch on a removed folder is dead: recreate it, watch again
        except FileNotFoundError:
            continue  # removed between mkdir and the watcher's start: retry
    try:
        conn.close()
    except OSError:
        pass
