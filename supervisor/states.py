"""The supervisor's explicit state machine (supervisord style: every transition is named).

    STOPPED --start--> PREPARING --prepared--> STARTING --ready--> RUNNING
    STARTING --start_failed--> BACKOFF      RUNNING --crashed--> BACKOFF
    BACKOFF --retry--> STARTING             PREPARING --prepare_failed--> FATAL
    {STARTING, RUNNING, BACKOFF} --give_up--> FATAL
    {PREPARING, STARTING, RUNNING, BACKOFF, FATAL} --stop--> STOPPING --stopped--> STOPPED
    {STOPPING, BACKOFF, FATAL, STOPPED} --restart--> PREPARING   (SIGHUP, manual restart clears FATAL)

An illegal transition raises IllegalTransition: a bug, never silently ignored.
"""

from __future__ import annotations

import enum
import time
from typing import Callable


class State(str, enum.Enum):
    PREPARING = "PREPARING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"


S = State
TRANSITIONS: dict[str, tuple[frozenset[State], State]] = {
    "start": (frozenset({S.STOPPED}), S.PREPARING),
    "prepared": (frozenset({S.PREPARING}), S.STARTING),
    "prepare_failed": (frozenset({S.PREPARING}), S.FATAL),
    "ready": (frozenset({S.STARTING}), S.RUNNING),
    "start_failed": (frozenset({S.STARTING}), S.BACKOFF),
    "crashed": (frozenset({S.RUNNING}), S.BACKOFF),
    "retry": (frozenset({S.BACKOFF}), S.STARTING),
    "give_up": (frozenset({S.STARTING, S.RUNNING, S.BACKOFF}), S.FATAL),
    "stop": (frozenset({S.PREPARING, S.STARTING, S.RUNNING, S.BACKOFF, S.FATAL}), S.STOPPING),
    "stopped": (frozenset({S.STOPPING}), S.STOPPED),
    "restart": (frozenset({S.STOPPING, S.BACKOFF, S.FATAL, S.STOPPED}), S.PREPARING),
}

# What .runstate line 1 says in each state (the FuncNodes vocabulary).
RUNSTATE = {
    S.PREPARING: "starting",
    S.STARTING: "starting",
    S.RUNNING: "running",
    S.BACKOFF: "starting",
    S.FATAL: "stopped",
    S.STOPPING: "stopping",
    S.STOPPED: "stopped",
}


class IllegalTransition(RuntimeError):
    pass


class StateMachine:
    def __init__(self, initial: State = S.STOPPED, on_change: Callable[[State, State, str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.state = initial
        self.reason = ""
        self.since = clock()
        self._clock = clock
        # Listeners of every transition, in order (the owner's own first); they never change it.
        self.listeners: list[Callable[[State, State, str, str], None]] = [on_change] if on_change else []
        self.history: list[tuple[float, str, State, State, str]] = []

    def can(self, name: str) -> bool:
        src, _ = TRANSITIONS[name]
        return self.state in src

    def fire(self, name: str, reason: str = "") -> State:
        if name not in TRANSITIONS:
            raise IllegalTransition(f"unknown transition {name!r}")
        src, dst = TRANSITIONS[name]
        if self.state not in src:
            raise IllegalTransition(f"{name!r} is not allowed from {self.state.value}")
        old = self.state
        self.state, self.reason, self.since = dst, reason, self._clock()
        self.history.append((self.since, name, old, dst, reason))
        del self.history[:-50]
        for listener in self.listeners:
            listener(old, dst, name, reason)
        return dst

    def add_listener(self, listener: Callable[[State, State, str, str], None]) -> None:
        self.listeners.append(listener)
