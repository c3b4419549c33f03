"""Cross-thread hand-offs that wake an event loop only when it sleeps.

asyncio's call_soon_threadsafe writes a byte to the loop's self-pipe on every call: a syscall
each time, and with two busy threads a wait for the GIL after it (py-spy: 12 % of the worker
under an edit stream). A Mailbox is a deque that other threads append to and one loop drains.
A loop made by new_loop() looks into its mailboxes before select() may block, so a producer
wakes it only while it is (about to be) asleep; a busy loop picks the items up on its next turn.
On a loop of any other making, every put with nothing scheduled wakes it, as before.

Timers fire on time: the wait is in microseconds, not epoll's whole milliseconds rounded up.

The same selector runs `before_sleep` callbacks once per loop turn, just before it polls: the
server writes all frames a client got in one turn (reply and events) with one send there.
"""

from __future__ import annotations

import asyncio
import collections
import select
import selectors
import time
import weakref
from typing import Any, Callable

_SELECTORS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WakingSelector]" = weakref.WeakKeyDictionary()


class WakingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self) -> None:
        super().__init__()
        self.asleep = False
        self.turn_started = 0.0  # monotonic time the loop last woke: a stall is a long turn
        self.mailboxes: list[Mailbox] = []
        self.before_sleep: list[Callable[[], None]] = []  # this loop's thread only; run once each
        self.loop: asyncio.AbstractEventLoop | None = None
        # Set by another thread that borrowed sockets of this loop while it stalled
        # (worker/stallwatch.py): reclaim() gives them back before this loop reads again.
        self.lent = False
        self.reclaim: Callable[[], None] | None = None
        self._epfd = self.fileno()

    def select(self, timeout: float | None = None):
        if self.lent:
            self.lent = False  # before reclaim: a socket lent meanwhile sets it again
            self.reclaim()
            if self.loop is not None and self.loop._ready:  # it fed a reader: no sleep
                timeout = 0
        if self.before_sleep:
            hooks, self.before_sleep = self.before_sleep, []
            for hook in hooks:
                hook()
            if self.loop is not None and self.loop._ready:  # a hook scheduled a callback: no sleep
                timeout = 0
        self.asleep = True  # from here on, a producer wakes us: nothing put now is missed
        try:
            if any(m.items for m in self.mailboxes):
                timeout = 0
            if timeout is not None and timeout > 0 and self._epfd < select_fd_limit:
                # epoll_wait takes whole milliseconds, rounded up: a timer due in 9.7 ms fires at
                # 10, late by whatever the turn did after setting it (a node's pretrigger sleep is
                # set before its events are sent: in a chain, every node paid for that). select()
                # waits in microseconds on the epoll fd itself; epoll then collects what is ready.
                select.select((self._epfd,), (), (), timeout)
                timeout = 0
            return super().select(timeout)
        finally:
            self.turn_started = time.monotonic()
            self.asleep = False
            for m in self.mailboxes:
                if m.items and not m.scheduled:
                    m.scheduled = True
                    m.loop.call_soon(m.drain)  # this loop's thread: run in this same turn


select_fd_limit = 1024  # FD_SETSIZE: select() cannot wait on a higher fd (then epoll's ms it is)


def new_loop() -> asyncio.AbstractEventLoop:
    sel = WakingSelector()
    loop = asyncio.SelectorEventLoop(sel)
    sel.loop = loop
    _SELECTORS[loop] = sel
    return loop


def selector_of(loop: asyncio.AbstractEventLoop) -> WakingSelector | None:
    """The WakingSelector of a loop made by new_loop (else None: no before_sleep there)."""
    return _SELECTORS.get(loop)


def busy_for(loop: asyncio.AbstractEventLoop) -> float | None:
    """Seconds the loop has been running its current turn (0 while it sleeps in select), from
    any thread; None for a loop not made by new_loop (its stalls cannot be seen)."""
    sel = _SELECTORS.get(loop)
    if sel is None:
        return None
    return 0.0 if sel.asleep else max(0.0, time.monotonic() - sel.turn_started)


class Mailbox:
    """Items put from any thread; handler(item) runs for each, in order, on loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Callable[[Any], None]):
        self.loop, self.handler = loop, handler
        self.items: collections.deque = collections.deque()
        self.scheduled = False  # a drain is on the loop's ready queue
        self.selector = _SELECTORS.get(loop)
        if self.selector is not None:
            self.selector.mailboxes.append(self)

    def put(self, item: Any) -> None:
        self.items.append(item)
        if not self.scheduled and (self.selector is None or self.selector.asleep):
            self.scheduled = True
            self.loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        self.scheduled = False  # before draining: a later put schedules another drain
        items, handler = self.items, self.handler
        while items:
            handler(items.popleft())

    def close(self) -> None:
        if self.selector is not None and self in self.selector.mailboxes:
            self.selector.mailboxes.remove(self)
