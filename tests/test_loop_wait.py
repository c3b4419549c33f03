"""The main loop's wait (worker/wakeup.py): whole milliseconds in epoll, the rest in microseconds
through select() on the epoll fd, so a timer is not late by the rest of the turn that set it; every wake-up source still works
(threads, sockets, signals, timers), also on the fallback (epoll's own wait, for fds >= 1024)."""

import asyncio
import os
import random
import select
import signal
import socket
import threading
import time
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


# Random timers and arrivals, with and without the precise wait (whole ms in epoll, the rest
# in select()): none early, all in order, every socket byte and Mailbox item handled.
@pytest.fixture(params=[True, False], ids=["precise", "selectors"])
def precise(request, monkeypatch):
    monkeypatch.setattr(wakeup, "WAIT_PRECISELY", request.param)  # False: FN_SUPERVISE_PRECISE_TIMERS=0
    return request.param


def test_timers_fire_in_time_order_never_early_and_all_of_them(precise):
    rng = random.Random(5)
    loop = wakeup.new_loop()
    fired: list[tuple[float, float]] = []
    try:
        async def go():
            done = loop.create_future()
            n = 300
            base = loop.time()
            for i in range(n):
                when = base + rng.uniform(0.0, 0.2)  # fractions of a millisecond everywhere
                loop.call_at(when, lambda w=when: (fired.append((w, loop.time())),
                                                   len(fired) == n and done.set_result(None)))
            await asyncio.wait_for(done, 10)
        loop.run_until_complete(go())
    finally:
        loop.close()
    assert len(fired) == 300
    assert all(at >= when for when, at in fired), "a timer fired before it was due"
    assert [w for w, _ in fired] == sorted(w for w, _ in fired)


def test_io_and_handoffs_during_timed_waits_are_all_handled_in_order(precise):
    """While the loop does nothing but wait for short timers (most of each wait is the
    sub-millisecond rest), a peer writes to a socket and another thread puts into a Mailbox at
    random moments: every byte and every item is handled, in order, and the timers go on."""
    rng = random.Random(9)
    loop = wakeup.new_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    n = 200
    got_io: list[int] = []
    got_box: list[int] = []
    ticks = [0]
    try:
        box = wakeup.Mailbox(loop, got_box.append)
        buf = bytearray()

        def readable():
            buf.extend(a.recv(4096))
            while len(buf) >= 4:
                got_io.append(int.from_bytes(buf[:4], "big"))
                del buf[:4]

        loop.add_reader(a.fileno(), readable)

        def tick():
            ticks[0] += 1
            if len(got_io) < n or len(got_box) < n:
                loop.call_later(rng.uniform(0.0001, 0.0015), tick)

        def producer():
            prng = random.Random(3)
            for i in range(n):
                b.send(i.to_bytes(4, "big"))
                box.put(i)
                time.sleep(prng.uniform(0, 0.002))  # the producer's own pace

        async def go():
            loop.call_soon(tick)
            t = threading.Thread(target=producer)
            t.start()
            deadline = loop.time() + 30
            while (len(got_io) < n or len(got_box) < n) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            t.join(10)
        loop.run_until_complete(go())
    finally:
        loop.remove_reader(a.fileno())
        a.close()
        b.close()
        loop.close()
    assert got_io == list(range(n))
    assert got_box == list(range(n))
    assert ticks[0] > 50  # the loop spent the run in short timed waits
