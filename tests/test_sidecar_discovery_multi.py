"""The host's one discovery sidecar for many workers (sidecars.discovery.run_discovery_multi):
each change reaches the supervisor tagged with its worker's key, roots come and go at run time,
a restarted sidecar resyncs every root it was given."""

from __future__ import annotations

import os
import signal
import time

from conftest import poll_until
from test_sidecars_support import Hosted

from sidecars.discovery import run_discovery_multi


def keyed(h, key: str, since: float = 0.0, initial: bool | None = None) -> list[dict]:
    out = []
    for t, m in h.rec.timed("local_scripts"):
        if t >= since and m.get("key") == key and (initial is None or bool(m.get("initial")) == initial):
            out.extend(m["changes"])
    return out


def test_changes_are_routed_by_key_and_roots_come_and_go(config_dir):
    a, b, c = (config_dir / n / "local_scripts" for n in ("a", "b", "c"))
    b.mkdir(parents=True)
    (b / "old.py").write_text("X = 0\n")
    h = Hosted("discovery", run_discovery_multi, ({"a": str(a), "b": str(b)},), backoff_base=0.05)
    try:
        h.rec.wait(lambda m: m.get("initial") and m.get("key") == "a", 10, "a's initial listing")
        _, init_b = h.rec.wait(lambda m: m.get("initial") and m.get("key") == "b", 10, "b's initial listing")
        assert init_b["changes"] == [{"change": "added", "path": str(b / "old.py")}]
        assert a.is_dir()  # created if missing

        t0 = time.monotonic()
        (a / "one.py").write_text("X = 1\n")
        poll_until(lambda: {"change": "added", "path": str(a / "one.py")} in keyed(h, "a", t0), 3, what="a's add")
        assert not keyed(h, "b", t0, initial=False)  # b heard nothing of a's file

        # a root added at run time gets its snapshot; one removed is no longer reported
        (c.mkdir(parents=True), (c / "pre.py").write_text("Y = 1\n"))
        assert h.send({"type": "watch", "key": "c", "dir": str(c)})
        h.rec.wait(lambda m: m.get("initial") and m.get("key") == "c"
                   and m["changes"] == [{"change": "added", "path": str(c / "pre.py")}], 10, "c's initial listing")
        assert h.send({"type": "unwatch", "key": "a"})
        t1 = time.monotonic()
        time.sleep(0.3)  # the watcher restarts on the new set
        (c / "two.py").write_text("Z = 2\n")
        (a / "ignored.py").write_text("Q = 1\n")
        poll_until(lambda: {"change": "added", "path": str(c / "two.py")} in keyed(h, "c", t1), 3, what="c's add")
        time.sleep(0.5)
        assert not keyed(h, "a", t1), "an unwatched root is still reported"

        # a restarted sidecar resyncs from its arguments
        pid = h.status()["pid"]
        os.kill(pid, signal.SIGKILL)
        t2 = time.monotonic()
        poll_until(lambda: (s := h.status())["pid"] not in (None, pid) and s["state"] == "running", 10,
                   what="restarted")
        poll_until(lambda: {"change": "added", "path": str(b / "old.py")} in keyed(h, "b", t2, initial=True), 10,
                   what="b resynced after the restart")
    finally:
        h.close()
