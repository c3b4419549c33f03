"""Cross-thread hand-offs that wake an event loop only when it sleeps.

asyncio's call_soon_threadsafe writes a byte to the loop's self-pipe on every call: a syscall
each time, and with two busy threads a wait for the GIL after it (py-spy: 12 % of the worker
under an edit stream). A Mailbox is a deque that other threads append to and one loop drains.
A loop made by new_loop() looks into its mailboxes before select() may block, so a producer
wakes it only while it is (about to be) asleep; a busy loop picks the items up on its next turn.
On a loop of any other making, every put with nothing scheduled wakes it, as before.

Timers fire on time: the wait is in microseconds, not epoll's whole milliseconds rounded up.

The same selector runs `before_sleep` callbacks once per loop turn, just before it polls: the
server writes all frames a client got in one turn (reply and events) with one send there; and
`before_idle` callbacks once the loop has nothing ready (a few busy turns at most): the server
encodes a node run's events there, off the path from one node to the next.
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import selectors
import time
import weakref
from typing import Any, Callable

# FN_SUPERVISE_PRECISE_TIMERS=0: selectors' own rounding (benchmarks compare both).
WAIT_PRECISELY = (issubclass(selectors.DefaultSelector, selectors.EpollSelector)
                  and os.environ.get("FN_SUPERVISE_PRECISE_TIMERS", "1") != "0")

_SELECTORS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WakingSelector]" = weakref.WeakKeyDictionary()


class WakingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self) -> None:
        super().__init__()
        self.asleep = False
        self.turn_started = 0.0  # monotonic time the loop last woke: a stall is a long turn
        self.mailboxes: list[Mailbox] = []
        self.before_sleep: list[Callable[[], None]] = []  # this loop's thread only; run once each
        # Run once each when the loop is about to wait (nothing ready), before before_sleep; on a
        # busy loop after IDLE_WAIT_TURNS turns or IDLE_WAIT_S at most. This loop's thread only.
        self.before_idle: list[Callable[[], None]] = []
        self._idle_turns = 0
        self._idle_since = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        # Set by another thread that borrowed sockets of this loop while it stalled
        # (worker/stallwatch.py): reclaim() gives them back before this loop reads again.
        self.lent = False
        self.reclaim: Callable[[], None] | None = None
        self._epfd = self.fileno()

    def select(self, timeout: float | None = None):
        # asyncio computed timeout before this call: the hooks below take time of their own, so
        # the wait ends at this deadline, not timeout after them (a timer set late anyway).
        deadline = time.monotonic() + timeout if timeout else None
        if self.lent:
            self.lent = False  # before reclaim: a socket lent meanwhile sets it again
            self._read_next()  # reclaim() feeds readers
            self.reclaim()
            if self.loop is not None and self.loop._ready:  # it fed a reader: no sleep
                timeout = 0
        if self.before_idle:
            busy = timeout == 0 or (self.loop is not None and self.loop._ready) or any(m.items for m in self.mailboxes)
            if busy:
                if not self._idle_turns:
                    self._idle_since = time.monotonic()
                self._idle_turns += 1
            if not busy or self._idle_turns > IDLE_WAIT_TURNS or time.monotonic() - self._idle_since > IDLE_WAIT_S:
                self._idle_turns = 0
                hooks, self.before_idle = self.before_idle, []
                for hook in hooks:
                    hook()
                if self.loop is not None and self.loop._ready:  # a hook scheduled a callback: no sleep
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
            if deadline is not None and timeout:
                timeout = max(0.0, deadline - time.monotonic())
            if timeout is not None and timeout > 0 and WAIT_PRECISELY:
                ready = self._select_precisely(timeout)
            else:
                ready = super().select(timeout)
        finally:
            self.turn_started = time.monotonic()
            self.asleep = False
            for m in self.mailboxes:
                if m.items and not m.scheduled:
                    m.scheduled = True
                    m.loop.call_soon(m.drain)  # this loop's thread: run in this same turn
        if ready:
            self._read_next()
        return ready

    # A timer due in 9.7 ms fired after 10 ms or more: epoll waits whole milliseconds, and
    # selectors rounds up (twice: ceil(ms) * 1e-3 is 0.009000000000000001 for 9 ms, which epoll's
    # own rounding makes 10). So whatever the loop did between arming a timer and going to sleep
    # was added to the wait (a node's pretrigger sleep was stretched by the work after its
    # trigger). The whole milliseconds are waited in epoll (one syscall, as before, for a loop
    # woken by I/O: the edit path), the rest in select() on the epoll fd, which takes
    # microseconds: a second syscall only when a timer comes due with nothing else ready.
    def _select_precisely(self, timeout: float):
        deadline = time.monotonic() + timeout
        whole_ms = int(timeout * 1000)
        if whole_ms:
            ready = self._poll((whole_ms - 0.5) * 1e-3)  # epoll rounds this up to whole_ms
            if ready:
                return ready
        rest = deadline - time.monotonic()
        if rest <= 0:
            return self._poll(0)
        if self._epfd >= select_fd_limit:  # select() cannot take it: a whole millisecond then
            return self._poll(rest)
        select.select((self._epfd,), (), (), rest)  # readable: a registered fd is ready
        return self._poll(0)

    def _poll(self, timeout: float):
        """EpollSelector.select without its rounding of the timeout (selectors.py, 3.11)."""
        try:
            fd_events = self._selector.poll(timeout, max(len(self._fd_to_key), 1))
        except InterruptedError:
            return []
        ready = []
        for fd, event in fd_events:
            key = self._fd_to_key.get(fd)
            if key:
                events = ((selectors.EVENT_WRITE if event & ~select.EPOLLIN else 0)
                          | (selectors.EVENT_READ if event & ~select.EPOLLOUT else 0))
                ready.append((key, events & key.events))
        return ready

    def _read_next(self) -> None:
        """The loop is about to read: before_idle and before_sleep hooks run first, so what
        they send (a run's deferred events) leaves before anything read now is answered, even
        by aiohttp itself (a pong to a WebSocket ping)."""
        if self.before_idle:
            self._idle_turns = 0
            hooks, self.before_idle = self.before_idle, []
            for hook in hooks:
                hook()
            hooks, self.before_sleep = self.before_sleep, []
            for hook in hooks:
                hook()


IDLE_WAIT_TURNS = 8
IDLE_WAIT_S = 0.002
select_fd_limit = 1024  # FD_SETSIZE: select() cannot wait on a higher fd (then epoll's ms it is)


PR_SET_TIMERSLACK = 29


def fine_timer_slack(ns: int = 1) -> bool:
    """Let this thread's timed waits end within ns of their deadline (Linux PR_SET_TIMERSLACK).
    The default slack, 50 us, is added to every timed wake-up: to each node's pretrigger sleep
    in a chain (a bare 10 ms sleep overshoots 0.11 ms p50 with it, 0.08 ms without, on a 2-CPU VM).
    Threads started later by this one inherit it. False where it cannot be set."""
    try:
        import ctypes  # already loaded by funcnodes-core when the runtime calls this

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


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
