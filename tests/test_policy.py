"""Pure unit tests of the supervisor's decisions: restart policy, state machine, hang
detection, crash classification, config, progress, log rotation. A fake monotonic clock
drives everything; nothing sleeps."""

from __future__ import annotations

import io
import signal

import pytest

from harness import FakeClock
from supervisor.config import SupervisorConfig
from supervisor.crash import ExitStatus, make_record
from supervisor.health import HeartbeatMonitor
from supervisor.policy import RestartPolicy
from supervisor.process import RotatingLog
from supervisor.progress import Progress
from supervisor.states import TRANSITIONS, IllegalTransition, State, StateMachine


def cfg(**kw) -> SupervisorConfig:
    c = SupervisorConfig(backoff_base=1.0, backoff_factor=2.0, backoff_cap=10.0, backoff_jitter=0.0,
                         start_budget=3, min_uptime=1.0, quarantine_after=3, run_window=100.0)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def run_and_crash(p: RestartPolicy, clock: FakeClock, up: float, node: str | None = None, quarantined=frozenset()):
    p.on_spawn()
    p.on_ready()
    clock.advance(up)
    return p.on_exit(was_ready=True, reason="crash", node=node, quarantined=quarantined)


# ------------------------------------------------------------------ policy
def test_early_crashes_back_off_exponentially_and_capped():
    clock = FakeClock()
    p = RestartPolicy(cfg(), clock=clock, rng=lambda: 0.5)
    delays = [run_and_crash(p, clock, 0.2).delay for _ in range(7)]  # each within min_uptime of ready
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_crashes_after_healthy_runs_restart_at_once_every_time():
    """Issue 9: SIGKILL after 1-1.5 s of healthy running must not grow the delay."""
    clock = FakeClock()
    p = RestartPolicy(cfg(), clock=clock, rng=lambda: 0.5)
    decisions = [run_and_crash(p, clock, 1.0 + 0.05 * i) for i in range(50)]
    assert all(d.action == "restart" and d.delay == 0.0 and d.healthy_run for d in decisions)
    assert p.total_restarts == 50 and p.consecutive == 0


def test_healthy_run_forgets_earlier_failures():
    clock = FakeClock()
    p = RestartPolicy(cfg(), clock=clock, rng=lambda: 0.5)
    assert [run_and_crash(p, clock, 0.1).delay for _ in range(3)] == [1.0, 2.0, 4.0]
    assert run_and_crash(p, clock, 5.0).delay == 0.0
    assert run_and_crash(p, clock, 0.1).delay == 1.0  # the count started again


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.999])
def test_jitter_bounds_and_never_above_cap(r):
    p = RestartPolicy(cfg(backoff_jitter=0.2), clock=FakeClock(), rng=lambda: r)
    for n, raw in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 10.0)]:
        d = p.delay_for(n)
        assert raw * 0.8 - 1e-9 <= d <= min(10.0, raw * 1.2) + 1e-9


def test_never_ready_worker_goes_fatal_after_start_budget():
    clock = FakeClock()
    p = RestartPolicy(cfg(start_budget=3), clock=clock, rng=lambda: 0.5)
    decisions = []
    for _ in range(3):
        p.on_spawn(); clock.advance(0.1)
        decisions.append(p.on_exit(was_ready=False, reason="exit code 1"))
    assert [d.action for d in decisions] == ["restart", "restart", "fatal"]
    assert [d.delay for d in decisions[:2]] == [1.0, 2.0]
    assert "start_budget 3" in decisions[-1].reason and "exit code 1" in decisions[-1].reason


def test_a_worker_that_was_ever_ready_is_never_fatal():
    clock = FakeClock()
    p = RestartPolicy(cfg(start_budget=2), clock=clock, rng=lambda: 0.5)
    run_and_crash(p, clock, 0.1)
    delays = []
    for _ in range(50):  # e.g. an install broke an import: starts fail from now on
        p.on_spawn(); clock.advance(0.1)
        d = p.on_exit(was_ready=False, reason="exit code 1")
        assert d.action == "restart"
        delays.append(d.delay)
    assert max(delays) == 10.0 and delays[-1] == 10.0
    for _ in range(200):  # a crash loop after ready without a node in flight: backs off, never FATAL
        d = run_and_crash(p, clock, 0.01)
        assert d.action == "restart" and d.quarantine is None and d.delay <= 10.0


def test_repeated_crashes_with_the_same_node_quarantine_it():
    clock = FakeClock()
    p = RestartPolicy(cfg(quarantine_after=3), clock=clock, rng=lambda: 0.5)
    d1 = run_and_crash(p, clock, 0.05, node="n1")
    d2 = run_and_crash(p, clock, 0.05, node="n1")
    assert d1.quarantine is None and d2.quarantine is None
    d3 = run_and_crash(p, clock, 0.05, node="n1")
    assert d3.action == "restart" and d3.quarantine == "n1" and "n1 quarantined" in d3.reason
    # already quarantined: never asked for again
    q = frozenset({"n1"})
    assert all(run_and_crash(p, clock, 0.05, node="n1", quarantined=q).quarantine is None for _ in range(5))


def test_mixed_nodes_or_no_node_do_not_quarantine():
    clock = FakeClock()
    p = RestartPolicy(cfg(quarantine_after=2), clock=clock, rng=lambda: 0.5)
    for node in ["a", "b", None, "a", None, "b", "a"]:
        assert run_and_crash(p, clock, 0.05, node=node).quarantine is None
    assert run_and_crash(p, clock, 5.0, node="a").quarantine == "a"  # healthy runs count too


def test_with_several_nodes_in_flight_the_one_in_every_crash_is_quarantined():
    clock = FakeClock()
    p = RestartPolicy(cfg(quarantine_after=3), clock=clock, rng=lambda: 0.5)
    for suspects in (["bad"], ["sq", "bad"], ["other", "sq", "bad"]):
        p.on_spawn(); p.on_ready(); clock.advance(0.05)
        d = p.on_exit(was_ready=True, reason="x", node=suspects[0], suspects=suspects)
    assert d.quarantine == "bad"
    # always together: the newest of the last crash
    p2 = RestartPolicy(cfg(quarantine_after=2), clock=clock, rng=lambda: 0.5)
    for _ in range(2):
        p2.on_spawn(); p2.on_ready(); clock.advance(0.05)
        d = p2.on_exit(was_ready=True, reason="x", node="b", suspects=["a", "b"])
    assert d.quarantine == "b"
    p2.on_spawn(); p2.on_ready(); clock.advance(0.05)
    d = p2.on_exit(was_ready=True, reason="x", node="b", suspects=["a", "b"], quarantined={"b"})
    assert d.quarantine is None  # "a" has only one crash since "b" was quarantined


def test_quarantine_counts_only_inside_run_window():
    clock = FakeClock()
    p = RestartPolicy(cfg(quarantine_after=2, run_window=100.0), clock=clock, rng=lambda: 0.5)
    run_and_crash(p, clock, 5.0, node="a")
    clock.advance(200)
    assert run_and_crash(p, clock, 5.0, node="a").quarantine is None
    assert run_and_crash(p, clock, 5.0, node="a").quarantine == "a"


def test_lift_forgets_the_node_so_the_crash_has_to_repeat_again():
    clock = FakeClock()
    p = RestartPolicy(cfg(quarantine_after=2), clock=clock, rng=lambda: 0.5)
    run_and_crash(p, clock, 0.05, node="a")
    assert run_and_crash(p, clock, 0.05, node="a").quarantine == "a"
    p.lift("a")
    assert run_and_crash(p, clock, 0.05, node="a").quarantine is None
    assert run_and_crash(p, clock, 0.05, node="a").quarantine == "a"


def test_manual_reset_clears_budgets():
    clock = FakeClock()
    p = RestartPolicy(cfg(start_budget=2), clock=clock, rng=lambda: 0.5)
    p.on_spawn(); p.on_exit(was_ready=False, reason="a")
    p.reset()
    p.on_spawn(); assert p.on_exit(was_ready=False, reason="b").action == "restart"


def test_policy_uses_only_the_injected_monotonic_clock(monkeypatch):
    import time as _time
    clock = FakeClock()
    p = RestartPolicy(cfg(), clock=clock, rng=lambda: 0.5)
    monkeypatch.setattr(_time, "time", lambda: 0.0)  # a wall-clock jump changes nothing
    monkeypatch.setattr(_time, "monotonic", lambda: 0.0)
    assert run_and_crash(p, clock, 0.5).delay == 1.0
    assert run_and_crash(p, clock, 1.0).delay == 0.0


# ------------------------------------------------------------------ states
def test_happy_path_transitions_and_callback():
    seen = []
    sm = StateMachine(on_change=lambda o, n, name, r: seen.append((o, n, name)))
    for name in ["start", "prepared", "ready", "crashed", "retry", "ready", "stop", "stopped"]:
        sm.fire(name)
    assert sm.state == State.STOPPED
    assert [s[2] for s in seen] == ["start", "prepared", "ready", "crashed", "retry", "ready", "stop", "stopped"]


def test_every_transition_and_every_illegal_one():
    for name, (srcs, dst) in TRANSITIONS.items():
        for st in State:
            sm = StateMachine(initial=st)
            if st in srcs:
                assert sm.fire(name) == dst
            else:
                with pytest.raises(IllegalTransition):
                    sm.fire(name)
                assert sm.state == st  # unchanged


def test_fatal_is_left_only_by_stop_or_restart():
    sm = StateMachine(initial=State.FATAL)
    assert not sm.can("retry") and not sm.can("ready")
    assert sm.fire("restart") == State.PREPARING


def test_unknown_transition_raises():
    with pytest.raises(IllegalTransition):
        StateMachine().fire("explode")


# ------------------------------------------------------------------ health
def test_heartbeat_deadline_and_busy_for():
    clock = FakeClock()
    h = HeartbeatMonitor(2.0, clock=clock)
    h.beat({"seq": 1, "lag": 0.01, "busy_for": None, "node": None})
    clock.advance(1.9)
    assert h.overdue() is None
    clock.advance(0.2)
    assert h.overdue() == pytest.approx(2.1)
    h.beat({"seq": 2, "busy_for": 5.0, "node": "n1"})
    clock.advance(6.9)
    assert h.overdue() is None  # declared busy: 2 + 5 s
    clock.advance(0.2)
    assert h.overdue() is not None
    assert h.node == "n1" and "declared busy 5s" in h.describe()


def test_heartbeat_ignores_bad_busy_values():
    clock = FakeClock()
    h = HeartbeatMonitor(1.0, clock=clock)
    h.beat({"busy_for": "lots"})
    h.beat({"busy_for": -3})
    assert h.deadline() == clock() + 1.0


# ------------------------------------------------------------------ crash records
def test_sigkill_not_sent_by_us_with_oom_counter_growth_is_oom():
    rec = make_record(status=ExitStatus(signal=signal.SIGKILL), reason="crashed", phase="run", we_signalled=set(),
                      oom_before=3, oom_after=4, uptime=5.0, node="n", pid=1, last_lines=["a", "b"])
    assert rec.suspected_oom and "3 -> 4" in rec.oom_evidence
    assert rec.signal_name == "SIGKILL" and not rec.signal_by_supervisor
    assert rec.last_log_lines == ["a", "b"] and rec.node == "n"


def test_sigkill_without_oom_counter_growth_is_not_oom():
    rec = make_record(status=ExitStatus(signal=signal.SIGKILL), reason="crashed", phase="run", we_signalled=set(),
                      oom_before=3, oom_after=3, uptime=1.0, node=None, pid=1, last_lines=[])
    assert not rec.suspected_oom


def test_sigkill_with_unreadable_counter_is_suspected_unless_ours():
    rec = make_record(status=ExitStatus(signal=signal.SIGKILL), reason="crashed", phase="run", we_signalled=set(),
                      oom_before=None, oom_after=None, uptime=1.0, node=None, pid=1, last_lines=[])
    assert rec.suspected_oom
    rec = make_record(status=ExitStatus(signal=signal.SIGKILL), reason="hung", phase="run",
                      we_signalled={signal.SIGKILL}, oom_before=None, oom_after=None, uptime=1.0, node=None,
                      pid=1, last_lines=[])
    assert not rec.suspected_oom and rec.signal_by_supervisor


def test_exit_status_decoding():
    assert ExitStatus.from_wait_status(3 << 8).code == 3
    assert ExitStatus.from_wait_status(signal.SIGSEGV).signal == signal.SIGSEGV
    assert ExitStatus(code=3).describe() == "exit code 3"
    assert ExitStatus(signal=9).describe() == "killed by SIGKILL"


# ------------------------------------------------------------------ config
def test_config_defaults_and_overrides():
    c = SupervisorConfig.from_worker_config({"supervisor": {"heartbeat_timeout": "2.5", "start_budget": 7,
                                                            "venv": False, "stop_grace": -1, "bogus": 1,
                                                            "backoff_cap": "nonsense"}})
    assert c.heartbeat_timeout == 2.5 and c.start_budget == 7 and c.venv is False
    assert c.stop_grace == SupervisorConfig.stop_grace  # negative rejected
    assert c.backoff_cap == SupervisorConfig.backoff_cap  # unparsable rejected
    assert SupervisorConfig.from_worker_config({"supervisor": "junk"}) == SupervisorConfig()
    assert c.stop_deadline() == c.stop_grace + c.term_timeout + c.kill_timeout


# ------------------------------------------------------------------ progress, log
def test_progress_plain_lines_vs_terminal():
    s = io.StringIO()
    p = Progress(s, tty=False)
    p("creating venv", 0.1); p("creating venv", 0.1); p("installing")
    assert s.getvalue().splitlines() == ["[ 10%] creating venv", "installing"]
    t = io.StringIO()
    p = Progress(t, tty=True)
    p("a long message"); p("short"); p.done("ok")
    assert "\n" not in t.getvalue().split("ok")[0] and t.getvalue().count("\r") >= 2
    assert t.getvalue().endswith("ok\n")


def test_rotating_log_rotates_and_keeps_tail(tmp_path):
    path = tmp_path / "worker.log"
    lg = RotatingLog(path, max_bytes=2000, backups=2, tail=3)
    for i in range(300):
        lg.write(f"line {i:04d} " + "x" * 40)
    lg.event("supervisor says hi")
    lg.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["worker.log", "worker.log.1", "worker.log.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert list(lg.tail)[-1].startswith("line 0299")  # supervisor lines are not worker tail
    # no line is ever split across files
    for p in tmp_path.iterdir():
        for ln in p.read_text().splitlines():
            assert ln.startswith("line ") or ln.startswith("[fn-supervise")
