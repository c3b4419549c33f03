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
IDLE_TICK_MS = 1000
# watchfiles' loop wakes every `step` (it polls its stop_event under the GIL), also when
# nothing changes: 50 ms was 20 wake-ups a second in every per-worker sidecar (4.2 % idle CPU
# at 20 units against stock's 2.6 %). A script saved reaches its worker ~200 ms later instead.
STEP_MS = 200


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


def run_discovery(conn, scripts_dir: str, debounce_ms: int = STEP_MS) -> None:
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


# region one discovery for many workers (fn-supervise host)
# Host mode shares one discovery process across every worker of a base folder. The roots come
# and go at run time ({"type": "watch", "key": k, "dir": d} / {"type": "unwatch", "key": k});
# each change of the set restarts the watcher on the new set. Every message out carries the
# worker's key. Idle, it wakes every HOST_STEP_MS (not 50 ms): one process for N workers, and
# a script edit reaching the worker a few hundred ms later is harmless.
HOST_STEP_MS = 200
HOST_IDLE_TICK_MS = 2000


def _owner(roots: dict[str, Path], path: str) -> str | None:
    best = None
    for key, root in roots.items():
        r = str(root).rstrip(os.sep) + os.sep
        if (path + os.sep).startswith(r) and (best is None or len(r) > len(str(roots[best]))):
            best = key
    return best


def _multi_reader(conn, wanted: dict[str, Path], lock: threading.Lock, wake: threading.Event,
                  stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            msg = conn.recv()
            if not isinstance(msg, dict):
                continue
            t = msg.get("type")
            if t == "stop":
                break
            if t == "watch" and msg.get("key") and msg.get("dir"):
                with lock:
                    wanted[str(msg["key"])] = Path(str(msg["dir"])).resolve()
                wake.set()
            elif t == "unwatch" and msg.get("key"):
                with lock:
                    wanted.pop(str(msg["key"]), None)
                wake.set()
    except (EOFError, OSError):
        pass
    finally:
        stop.set()
        wake.set()


def run_discovery_multi(conn, roots: dict[str, str] | None = None, debounce_ms: int = HOST_STEP_MS) -> None:
    """Sidecar entry point for host mode: one watcher over every worker's local_scripts/."""
    arm_sidecar()
    lock = threading.Lock()
    wanted: dict[str, Path] = {k: Path(v).resolve() for k, v in (roots or {}).items()}
    stop, wake = threading.Event(), threading.Event()
    threading.Thread(target=_multi_reader, args=(conn, wanted, lock, wake, stop), daemon=True,
                     name="discovery-pipe").start()
    known: dict[str, set[str]] = {}
    current: dict[str, Path] = {}

    def send(key: str, changes: list[dict], **extra) -> None:
        try:
            conn.send({"type": "local_scripts", "key": key, "changes": changes, **extra})
        except (OSError, EOFError, ValueError):
            stop.set()
            wake.set()

    step = max(1, int(debounce_ms))
    while not stop.is_set():
        wake.clear()
        with lock:
            target = dict(wanted)
        for key in list(known):
            if key not in target or target[key] != current.get(key):
                known.pop(key, None)
        for key, root in target.items():
            root.mkdir(parents=True, exist_ok=True)
            if key not in known:
                known[key] = scan(root)
                send(key, [{"change": "added", "path": p} for p in sorted(known[key])], initial=True)
        current = target
        if not current:
            wake.wait()
            continue
        reconciled = False
        try:
            for batch in watch(*current.values(), watch_filter=DefaultFilter(),
                               debounce=max(MAX_BATCH_MS, step), step=step, stop_event=wake,
                               rust_timeout=HOST_IDLE_TICK_MS, yield_on_timeout=True,
                               raise_interrupt=False, recursive=True):
                gone = [k for k, r in current.items() if not r.is_dir()]
                if batch:
                    touched: dict[str, set[str]] = {}
                    for _, p in batch:
                        k = _owner(current, p)
                        if k is not None:
                            touched.setdefault(k, set()).add(p)
                    for k, ps in touched.items():
                        ch = diff(known[k], ps, current[k])
                        if ch:
                            send(k, ch)
                elif not reconciled or gone:
                    reconciled = True
                    for k, r in current.items():
                        ch = reconcile(known[k], r)
                        if ch:
                            send(k, ch)
                if gone:
                    break  # a watch on a removed folder is dead: recreate it, watch again
        except FileNotFoundError:
            continue
    try:
        conn.close()
    except OSError:
        pass
# endregion
