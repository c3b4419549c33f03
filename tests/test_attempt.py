"""One worker start (supervisor/attempt.py) without a process: a fake clock drives the deadlines,
frames and exits are plain values. Until now "silence after ready -> hung", "EOF with no exit ->
crashed after eof_grace" and "SIGKILL that does not work -> abandon" were tested only with real
processes (test_supervisor.py keeps those)."""

from __future__ import annotations

import dataclasses
import signal

import pytest

from harness import FakeClock
from supervisor.attempt import (WORKER_START_FAILURE, Abandon, Attempt, Crash, Eof, Exit, Frame, Kill, SidecarMsg,
                                Signal, Stopped)
from supervisor.config import SupervisorConfig
from supervisor.crash import ExitStatus


def attempt(clock: FakeClock, **cfg) -> Attempt:
    c = SupervisorConfig(start_timeout=20.0, heartbeat_timeout=2.0, eof_grace=0.5, kill_timeout=1.0, min_uptime=1.0)
    for k, v in cfg.items():
        setattr(c, k, v)
    return Attempt(c, clock)


def ready(a: Attempt, clock: FakeClock) -> None:
    assert a.on_frame({"type": "ready", "port": 1}) == "ready"
    a.mark_ready(clock())


def test_events_are_frozen_values():
    ev = Frame(worker=object(), msg={"type": "heartbeat"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.msg = {}  # type: ignore[misc]
    assert Signal(signal.SIGHUP) == Signal(signal.SIGHUP) and Signal(signal.SIGHUP) != Signal(signal.SIGTERM)
    w = object()
    assert Exit(w) == Exit(w) and Eof(w) != Exit(w) and SidecarMsg({"type": "x"}).msg == {"type": "x"}


def test_not_ready_within_start_timeout_is_killed_then_abandoned_if_sigkill_does_not_work():
    clock = FakeClock()
    a = attempt(clock)
    assert a.deadline() == clock() + 20.0
    clock.advance(19.9)
    assert a.on_timeout() is None
    clock.advance(0.2)
    k = a.on_timeout()
    assert k == Kill("start_timeout", "not ready within 20s")
    assert a.deadline() == clock() + 1.0 + 1.0  # kill_timeout + 1 from the kill, not from now
    clock.advance(0.5)
    assert a.deadline() == clock() - 0.5 + 2.0
    clock.advance(1.6)
    ab = a.on_timeout()
    assert ab == Abandon("start_timeout", "not ready within 20s; unkillable")
    c = a.abandoned(ab)
    assert c.reason == "start_timeout" and not c.was_ready


def test_silence_after_ready_is_hung_and_a_declared_busy_node_moves_the_deadline():
    clock = FakeClock()
    a = attempt(clock)
    clock.advance(3.0)
    ready(a, clock)
    assert a.deadline() == min(clock() + 2.0, clock() + 1.0 + 0.01)  # the stable mark comes first
    clock.advance(1.5)
    assert a.stable_due()
    a.stable_noted = True
    assert a.on_frame({"type": "heartbeat", "seq": 1, "busy_for": 10, "node": "n1"}) == "heartbeat"
    assert a.deadline() == clock() + 2.0 + 10.0
    clock.advance(11.9)
    assert a.on_timeout() is None
    clock.advance(0.2)
    k = a.on_timeout()
    assert isinstance(k, Kill) and k.reason == "hung" and "declared busy 10s" in k.detail
    assert a.outcome(ExitStatus(signal=signal.SIGKILL)) == Crash("hung", k.detail, True, "n1", [], None)


def test_eof_without_exit_is_a_crash_after_eof_grace():
    clock = FakeClock()
    a = attempt(clock)
    ready(a, clock)
    a.stable_noted = True
    clock.advance(0.3)
    a.on_eof(alive=True)
    assert a.deadline() == clock() + 0.5
    clock.advance(0.2)
    a.on_eof(alive=True)  # a second EOF does not move the first sign
    assert a.eof_at == clock() - 0.2
    clock.advance(0.31)
    assert a.on_timeout() == Kill("crashed", "control channel closed without exit")
    c = a.outcome(ExitStatus(signal=signal.SIGKILL))
    assert c.reason == "crashed" and c.first_sign == a.eof_at


def test_eof_of_a_dead_worker_starts_no_grace():
    clock = FakeClock()
    a = attempt(clock)
    a.on_eof(alive=False)
    assert a.eof_at is None and a.deadline() == clock() + 20.0


def test_exit_before_ready_is_a_failed_start_and_the_start_failure_code_is_named():
    clock = FakeClock()
    a = attempt(clock)
    c = a.outcome(ExitStatus(code=WORKER_START_FAILURE))
    assert c == Crash("start_failed", "exit code 3 (worker start failure)", False, None, [], None)
    assert a.outcome(ExitStatus(code=1)).detail == "exit code 1"


def test_announced_stop_then_exit_0_is_deliberate_but_a_crash_after_it_is_not():
    clock = FakeClock()
    a = attempt(clock)
    ready(a, clock)
    assert a.on_frame({"type": "stopping", "reason": "stop_worker"}) == "stopping"
    assert a.outcome(ExitStatus(code=0)) == Stopped("stop_worker")
    c = a.outcome(ExitStatus(signal=signal.SIGSEGV))
    assert isinstance(c, Crash) and c.reason == "crashed" and c.detail == "killed by SIGSEGV"


def test_the_node_to_blame_is_the_newest_in_flight_else_the_last_heartbeat():
    clock = FakeClock()
    a = attempt(clock)
    ready(a, clock)
    a.on_frame({"type": "heartbeat", "node": "beat"})
    assert a.node == "beat"
    assert a.on_frame({"type": "in_flight", "nodes": ["a", "b"]}) is None
    assert a.node == "b"
    c = a.outcome(ExitStatus(signal=signal.SIGKILL))
    assert c.node == "b" and c.suspects == ["a", "b"]
    a.on_frame({"type": "in_flight", "nodes": "garbage"})
    assert a.in_flight == [] and a.node == "beat"


def test_frames_map_to_the_runners_effects():
    clock = FakeClock()
    a = attempt(clock)
    assert a.on_frame({"type": "heartbeat"}) is None  # before ready: nothing to keep (no pidfile yet)
    assert a.on_frame({"type": "runstate", "detail": "Loading nodespace"}) == "runstate"
    assert a.on_frame({"type": "install", "deps": []}) == "install"
    assert a.on_frame({"type": "lift_quarantine", "node": "x"}) == "lift_quarantine"
    assert a.on_frame({"type": "no such frame"}) is None
    ready(a, clock)
    assert a.on_frame({"type": "ready"}) is None  # only once
    assert a.on_frame({"type": "runstate", "detail": "x"}) is None  # after ready the state is RUNNING


def test_heartbeats_before_ready_do_not_count_toward_the_hang_deadline():
    clock = FakeClock()
    a = attempt(clock)
    a.on_frame({"type": "heartbeat"})
    clock.advance(10.0)  # longer than heartbeat_timeout, still starting
    assert a.on_timeout() is None
    ready(a, clock)  # arms the monitor now
    assert a.health.deadline() == clock() + 2.0
