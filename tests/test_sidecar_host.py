"""SidecarKeeper: one-for-one restart on its own budget, FATAL beyond it, bounded stop."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import poll_until
from harness import FakeClock
from test_sidecars_support import Hosted, alive, crash_at_start, idle, stubborn

from sidecars.host import CrashBudget


def test_restart_policy_backoff_budget_and_window():
    clock = FakeClock()
    p = CrashBudget(budget=5, window=60.0, backoff_base=0.2, backoff_cap=1.0, clock=clock)
    delays = []
    for _ in range(5):
        delays.append(p.on_crash())
        clock.t += 1
    assert delays == [0.2, 0.4, 0.8, 1.0, 1.0]  # doubling, capped
    assert p.crashes_in_window() == 5
    assert p.on_crash() is None and p.fatal  # sixth crash within the window
    assert p.on_crash() is None  # fatal is sticky
    p.reset()
    assert p.on_crash() == 0.2


def test_restart_policy_old_crashes_leave_the_window():
    clock = FakeClock()
    p = CrashBudget(budget=2, window=10.0, backoff_base=0.5, backoff_cap=5.0, clock=clock)
    assert p.on_crash() == 0.5
    clock.t += 5
    assert p.on_crash() == 1.0
    clock.t += 6  # the first crash is now 11 s old
    assert p.crashes_in_window() == 1
    assert p.on_crash() == 1.0  # second in the window, not third: not fatal
    clock.t += 100
    assert p.on_crash() == 0.5


def test_restart_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        CrashBudget(budget=-1)
    with pytest.raises(ValueError):
        CrashBudget(window=0)


@pytest.fixture
def hosted():
    made = []

    def make(*a, **kw):
        h = Hosted(*a, **kw)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


def test_sigkilled_sidecar_is_restarted_with_a_new_pid(hosted):
    h = hosted("idle", idle, backoff_base=0.05)
    _, first = h.rec.wait(lambda m: m["type"] == "hello", 10, "first hello")
    pid1 = first["pid"]
    assert h.status()["pid"] == pid1 and h.status()["state"] == "running"
    assert h.send({"type": "ping"})
    h.rec.wait(lambda m: m["type"] == "echo", 5, "echo")

    t0 = time.monotonic()
    os.kill(pid1, signal.SIGKILL)
    _, second = h.rec.wait(lambda m: m["type"] == "hello" and m["pid"] != pid1, 10,
                           "hello from the restarted sidecar")
    took = time.monotonic() - t0
    print(f"\nsidecar SIGKILL -> restarted and talking: {took * 1000:.0f} ms")
    st = h.status()
    assert st["pid"] == second["pid"] != pid1
    assert st["state"] == "running" and st["restarts"] == 1
    assert st["last_exit"]["signal"] == "SIGKILL"
    assert not alive(pid1)
    assert took < 5


def test_sidecar_crashing_at_every_start_ends_fatal(hosted):
    h = hosted("crasher", crash_at_start, budget=2, window=60.0, backoff_base=0.05,
               backoff_cap=0.1)
    st = poll_until(lambda: (s := h.status())["state"] == "fatal" and s, 20, what="fatal")
    assert st["restarts"] == 2  # budget 2: two restarts, the third crash is fatal
    assert st["last_exit"]["code"] == 3
    assert "crashed 3 times" in st["fatal_reason"]
    assert st["pid"] is None
    # and it stays down: nothing restarts a fatal sidecar
    h.lt.call(h.host.start)
    assert h.status()["state"] == "fatal"


def test_stop_is_clean_for_a_cooperative_sidecar(hosted):
    h = hosted("idle", idle)
    _, hello = h.rec.wait(lambda m: m["type"] == "hello", 10)
    took = h.stop(timeout=5)
    assert took < 2
    st = h.status()
    assert st["state"] == "stopped" and st["pid"] is None and st["last_exit"]["code"] == 0
    assert not alive(hello["pid"])


def test_stop_is_bounded_for_a_stubborn_sidecar(hosted):
    h = hosted("stubborn", stubborn)
    _, hello = h.rec.wait(lambda m: m["type"] == "hello", 10)
    took = h.stop(timeout=1.0)
    print(f"\nstop(timeout=1.0) of a sidecar ignoring stop+SIGTERM: {took * 1000:.0f} ms")
    assert took < 2.0
    st = h.status()
    assert st["state"] == "stopped" and st["last_exit"]["signal"] == "SIGKILL"
    assert not alive(hello["pid"])
    assert st["restarts"] == 0  # a requested stop is not a crash


def test_sidecar_reaped_by_someone_else_is_still_seen_dead_and_restarted(hosted):
    """A waitpid(-1) loop elsewhere in the supervisor (a subreaper) may steal the exit status."""
    h = hosted("idle", idle, backoff_base=0.05)
    _, first = h.rec.wait(lambda m: m["type"] == "hello", 10)
    pid1 = first["pid"]

    def kill_and_reap():  # on the loop thread: the host's sentinel callback runs after this
        os.kill(pid1, signal.SIGKILL)
        return os.waitpid(pid1, 0)[0]
    assert h.lt.call(kill_and_reap) == pid1
    h.rec.wait(lambda m: m["type"] == "hello" and m["pid"] != pid1, 10, "restarted")
    st = h.status()
    assert st["restarts"] == 1 and st["last_exit"]["code"] is None
