"""Who a Supervisor tells about its state changes and worker exits (constructor seam observers=).

jupyter_client's restarter callbacks: others register, nobody patches. A failing observer is
logged, never fatal. host mode's metrics (hostmetrics.py) is one.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Protocol

from .crash import CrashRecord
from .states import State, StateMachine

log = logging.getLogger("fn-supervise")


class Observer(Protocol):
    """What a Supervisor tells those who registered (observers=): every state change, and every
    worker exit the policy counts (with its crash record)."""

    def on_transition(self, sup: Any, old: State, new: State, name: str, reason: str) -> None: ...
    def on_exit(self, sup: Any, record: CrashRecord) -> None: ...


class Observers:
    def __init__(self, sup: Any, observers: Iterable[Observer]):
        self.sup = sup
        self.all = list(observers)

    def attach(self, sm: StateMachine) -> None:
        for o in self.all:
            sm.add_listener(self._listener(o))

    def _listener(self, o: Observer) -> Callable[[State, State, str, str], None]:
        def on_change(old: State, new: State, name: str, reason: str) -> None:
            try:
                o.on_transition(self.sup, old, new, name, reason)
            except Exception:  # noqa: BLE001
                log.exception("observer %r failed on a transition", o)
        return on_change

    def tell_exit(self, rec: CrashRecord) -> None:
        for o in self.all:
            try:
                o.on_exit(self.sup, rec)
            except Exception:  # noqa: BLE001
                log.exception("observer %r failed on an exit", o)
