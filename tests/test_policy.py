"""Pure unit tests of the supervisor's decisions: restart policy, state machine, hang
detection, crash classification, config, progress, log rotation. A fake monotonic clock
drives everything; nothing sleeps."""

from __future__ import annotations

import io
import signal

import pytest

from supervisor.config import SupervisorConfig
from supervisor.crash import ExitStatus, make_record
from supervisor.health import HeartbeatMonitor
from supervisor.policy import RestartPolicy
from supervisor.process import RotatingLog
from supervisor.progress import Progress
from supervisor.states import TRANSITIONS, IllegalTransition, State, StateMachine


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def cfg(**kw) -> SupervisorConfig:
    c = SupervisorConfig(backoff_base=1.0, backoff_factor=2.0, backoff_cap=10.0, backoff_jitter=0.0,
                         start_budget=3, run_budget=4, run_window=100.0, stable_after=30.0)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


# ------------------------------------------------------------------ policy
def test_backoff_schedule_is_exponential_and_capped():
    clock = FakeClock()
    p = RestartPolicy(cfg(run_budget=100), clock=clock, rng=lambda: 0.5)
    delays = []
    for _ in range(7):
        p.on_spawn()
        p.on_ready()
        clock.advance(1.0)  # crash well before stable_after
        d = p.on_exit(was_ready=True, reason="crash")
        assert d.action == "restart"
        delays.append(d.delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.999])
def test_jitter_bounds_and_never_above_cap(r):
    p = RestartPolicy(cfg(backoff_jitter=0.2), clock=FakeClock(), rng=lambda: r)
    for n, raw in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 10.0)]:
        d = p.delay_for(n)
        assert raw * 0.8 - 1e-9 <= d <= min(10.0, raw * 1.2) + 1e-9


def test_stable_period_resets_backoff():
    clock = FakeClock()
    p = RestartPolicy(cfg(run_budget=10), clock=clock, rng=lambda: 0.5)
    for _ in range(3):
        p.on_spawn(); p.on_ready(); clock.advance(1)
        last = p.on_exit(was_ready=True, reason="x")
    assert last.delay == 4.0
    p.on_spawn(); p.on_ready(); clock.advance(31)  # stable
    assert p.on_exit(was_ready=True, reason="x").delay == 1.0


def test_start_budget_goes_fatal_after_consecutive_failures():
    clock = FakeClock()
    p = RestartPolicy(cfg(start_budget=3), clock=clock, rng=lambda: 0.5)
    decisions = []
    for _ in range(3):
        p.on_spawn(); clock.advance(0.1)
        decisions.append(p.on_exit(was_ready=False, reason="exit code 1"))
    assert [d.action for d in decisions] == ["restart", "restart", "fatal"]
    assert "start_budget 3" in decisions[-1].reason and "exit code 1" in decisions[-1].reason


def test_ready_resets_start_failures_but_not_run_window():
    clock = FakeClock()
    p = RestartPolicy(cfg(start_budget=2), clock=clock, rng=lambda: 0.5)
    p.on_spawn(); assert p.on_exit(was_ready=False, reason="a").action == "restart"
    p.on_spawn(); p.on_ready(); clock.advance(1)
    assert p.on_exit(was_ready=True, reason="b").action == "restart"
    p.on_spawn(); assert p.on_exit(was_ready=False, reason="c").action == "restart"  # count restarted


def test_run_budget_in_sliding_window():
    clock = FakeClock()
    p = RestartPolicy(cfg(run_budget=3, run_window=100, stable_after=5), clock=clock, rng=lambda: 0.5)
    # crashes after long (stable) runs still count against the long-run budget (supervisord #1285)
    p.on_spawn(); p.on_ready(); clock.advance(60)
    assert p.on_exit(was_ready=True, reason="r1").action == "restart"
    p.on_spawn(); p.on_ready(); clock.advance(60)
    assert p.on_exit(was_ready=True, reason="r2").action == "restart"
    p.on_spawn(); p.on_ready(); clock.advance(60)  # the first crash (t+60) is out of the window now (t+180)
    assert p.on_exit(was_ready=True, reason="r3").action == "restart"
    p.on_spawn(); p.on_ready(); clock.advance(5)
    d = p.on_exit(was_ready=True, reason="r4")
    assert d.action == "fatal" and "run_budget 3" in d.reason


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
    p.on_spawn(); p.on_ready(); clock.advance(1)
    assert p.on_exit(was_ready=True, reason="x").delay == 1.0


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
