"""The main loop's wait (worker/wakeup.py): in microseconds through select() on the epoll fd,
so a timer is not late by the rest of the turn that set it; every wake-up source still works
(threads, sockets, signals, timers), also on the fallback (epoll's own wait, for fds >= 1024)."""

import asyncio
import os
import select
import signal
import socket
import threading
from pathlib import Path

import pytest

from worker import wakeup


@pytest.fixture(params=["select", "epoll"])
def loop(request, monkeypatch):
    if request.param == "epoll":
        monkeypatch.setattr(wakeup, "select_fd_limit", 0)  # as with an epoll fd beyond FD_SETSIZE
    lp = wakeup.new_loop()
    yield lp
    lp.close()


def test_a_timer_never_fires_before_it_is_due(loop):
    async def go():
        late = []
        for delay in (0.0003, 0.0037, 0.0101):
            fired = loop.create_future()
            when = loop.time() + delay
            loop.call_at(when, lambda f=fired: f.set_result(loop.time()))
            late.append(await asyncio.wait_for(fired, 5) - when)
        return late

    assert all(x >= 0 for x in loop.run_until_complete(go()))


def test_a_thread_a_socket_and_a_signal_each_wake_a_loop_waiting_for_a_far_timer(loop):
    a, b = socket.socketpair()
    got = []

    async def go():
        far = loop.call_later(30, got.append, "far")  # the loop would wait up to 30 s
        woke = loop.create_future()
        threading.Timer(0.05, loop.call_soon_threadsafe, (woke.set_result, "thread")).start()
        got.append(await asyncio.wait_for(woke, 5))

        readable = loop.create_future()
        loop.add_reader(a.fileno(), lambda: readable.done() or readable.set_result(a.recv(16)))
        threading.Timer(0.05, b.send, (b"x",)).start()
        got.append(await asyncio.wait_for(readable, 5))
        loop.remove_reader(a.fileno())

        signalled = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, lambda: signalled.done() or signalled.set_result("signal"))
        try:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            got.append(await asyncio.wait_for(signalled, 5))
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
        far.cancel()

    try:
        loop.run_until_complete(go())
    finally:
        a.close()
        b.close()
    assert got == ["thread", b"x", "signal"]


def test_a_wait_of_a_fraction_of_a_millisecond_is_not_rounded_up_to_one(monkeypatch):
    # A spy on select.select (it still waits): the wait is asked for in the timer's own
    # microseconds; epoll_wait would be asked for a whole millisecond.
    waits = []
    real = select.select

    def spy(r, w, x, timeout=None):
        waits.append(timeout)
        return real(r, w, x, timeout)

    monkeypatch.setattr(wakeup.select, "select", spy)
    loop = wakeup.new_loop()

    async def go():
        fired = loop.create_future()
        loop.call_later(0.0004, fired.set_result, None)
        await asyncio.wait_for(fired, 5)

    try:
        loop.run_until_complete(go())
    finally:
        loop.close()
    assert waits and 0 < max(waits) <= 0.0004


def test_the_workers_main_thread_has_a_fine_timer_slack(config_dir, port):
    # The kernel adds the thread's timer slack (50 us by default) to every timed wake-up.
    from helpers import WorkerProc, write_config

    write_config(config_dir, "slack1")
    w = WorkerProc(config_dir, "slack1", port).wait_ready()
    try:
        slack = int((Path("/proc") / str(w.proc.pid) / "timerslack_ns").read_text())
    finally:
        assert w.stop() == 0
    assert slack == 1
