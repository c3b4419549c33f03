"""The worker's loops wait for timers to the microsecond (worker/wakeup.py: whole milliseconds in
epoll, the rest in select() on the epoll fd). What must hold whatever the wait does: no timer
fires before it is due, every one fires, and I/O or a cross-thread hand-off that arrives while
the loop waits out the sub-millisecond rest wakes it (it is not held until the timer). Both
ways of waiting are tried (FN_SUPERVISE_PRECISE_TIMERS=0 is selectors' own rounding); random
timers and random arrivals, real sockets and a real producer thread."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import pytest

from worker import wakeup


@pytest.fixture(params=[True, False], ids=["precise", "selectors"])
def precise(request, monkeypatch):
    monkeypatch.setattr(wakeup.WakingSelector, "_wait_precisely", request.param)
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
