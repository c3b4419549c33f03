"""Two sidecar roles in one process (sidecars/pair.py, per-worker mode): the routing decisions
alone, then a real process under a SidecarKeeper: both roles talk through the one pipe, a stop
reaches both, and a role that dies uninvited takes the process down so it comes back whole."""

from __future__ import annotations

import pytest

from conftest import poll_until
from test_sidecars_support import Hosted, alive

from sidecars.entry import run_named
from sidecars.roles import RoleSet

PAIR = "sidecars.pair:run_pair"


def test_a_stop_goes_to_every_role_and_a_workers_answer_to_the_monitor():
    r = RoleSet(["discovery", "monitor"])
    assert r.route_down({"type": "spawn_worker_result", "request_id": 1}) == ["monitor"]
    assert r.route_down({"type": "other"}) == [] and r.route_down("junk") == []
    assert not r.stopping
    assert r.route_down({"type": "stop"}) == ["discovery", "monitor"] and r.stopping
    assert r.ended("discovery") == []  # invited: the monitor finishes its own stop
    assert r.route_down({"type": "spawn_worker_result"}) == ["monitor"]
    assert r.ended("monitor") == [] and r.live == []


def test_a_role_that_ends_uninvited_ends_the_others_once():
    r = RoleSet(["discovery", "monitor"])
    assert r.ended("discovery") == ["monitor"]
    assert r.ended("monitor") == []  # the one it ended: nothing more
    assert RoleSet(["discovery"]).route_down({"type": "spawn_worker_result"}) == []


def test_the_supervisor_gone_ends_every_live_role():
    r = RoleSet(["discovery", "monitor"])
    r.ended("monitor")  # ends discovery as a consequence; live is what remains
    assert r.supervisor_gone() == ["discovery"]


@pytest.fixture
def pair(tmp_path, port):
    roles = {"discovery": ("sidecars.discovery:run_discovery", (str(tmp_path / "scripts"),), {}),
             "monitor": ("sidecars.monitor:run_monitor", ("127.0.0.1", port), {"kill_timeout": 1.0})}
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "a.py").write_text("x = 1\n")
    h = Hosted("discovery+monitor", run_named, (PAIR, roles), backoff_base=0.05)
    yield h
    h.close()


def test_both_roles_speak_through_one_pipe_and_a_stop_ends_both(pair, tmp_path, port):
    _, mon = pair.rec.wait(lambda m: m["type"] == "monitor", 10, "monitor listening")
    _, scripts = pair.rec.wait(lambda m: m["type"] == "local_scripts" and m.get("initial"), 10, "listing")
    assert mon["port"] == port and mon["pid"] == pair.status()["pid"]
    assert [c["path"] for c in scripts["changes"]] == [str((tmp_path / "scripts" / "a.py").resolve())]
    pid = pair.status()["pid"]
    pair.stop(5.0)
    st = pair.status()
    assert st["state"] == "stopped" and st["last_exit"]["code"] == 0  # a clean exit, not a kill
    assert not alive(pid)


def test_a_role_that_dies_takes_the_process_and_both_come_back(tmp_path):
    roles = {"idle": ("test_sidecars_support:idle", (), {}),
             "crash": ("test_sidecars_support:crash_after_hello", (), {})}
    h = Hosted("idle+crash", run_named, (PAIR, roles), budget=2, backoff_base=0.05)
    try:
        first = h.rec.wait(lambda m: m["type"] == "hello", 10, "first hello")[1]["pid"]
        # the thread role's crash closes the main role's pipe: idle returns, the process exits
        again = h.rec.wait(lambda m: m["type"] == "hello" and m["pid"] != first, 10, "restarted whole")
        assert again[1]["pid"] != first
        st = poll_until(lambda: (s := h.status())["state"] == "fatal" and s, 15, what="budget spent")
        assert st["restarts"] == 2
    finally:
        h.close()


def test_an_idle_monitor_ends_cleanly_on_sigterm_and_serves_its_first_client(port):
    """Until its first connection the monitor sleeps in select() with no asyncio loop: SIGTERM
    there is a clean exit (nothing was spawned), and a first client is served from that state."""
    import os
    import signal
    import urllib.request

    from sidecars.monitor import run_monitor

    h = Hosted("monitor", run_monitor, ("127.0.0.1", port), backoff_base=0.05)
    try:
        h.rec.wait(lambda m: m["type"] == "monitor", 10, "monitor listening")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:  # the loop starts here
            assert r.status == 200 and r.read() == b"[]"
        h2 = Hosted("monitor2", run_monitor, ("127.0.0.1", 0), backoff_base=0.05)
        try:
            _, mon = h2.rec.wait(lambda m: m["type"] == "monitor", 10, "second monitor listening")
            os.kill(mon["pid"], signal.SIGTERM)
            st = poll_until(lambda: (s := h2.status())["last_exit"] and s, 10, what="idle monitor exit")
            assert st["last_exit"]["code"] == 0 and st["last_exit"]["signal"] is None
        finally:
            h2.close()
    finally:
        h.close()


def test_one_role_alone_runs_in_the_main_thread(tmp_path):
    """`{"monitor": false}`: discovery alone runs in the main thread of the sidecar process."""
    roles = {"discovery": ("sidecars.discovery:run_discovery", (str(tmp_path),), {})}
    h = Hosted("discovery", run_named, (PAIR, roles), backoff_base=0.05)
    try:
        h.rec.wait(lambda m: m["type"] == "local_scripts" and m.get("initial"), 10, "listing")
        (tmp_path / "b.py").write_text("")
        h.rec.wait(lambda m: m["type"] == "local_scripts" and not m.get("initial"), 10, "a change")
        h.stop(5.0)
        assert h.status()["last_exit"]["code"] == 0
    finally:
        h.close()
