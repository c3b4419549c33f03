"""Support for the sidecar tests (no tests here): a supervisor stand-in loop in a thread, a
message recorder, and sidecar targets that the spawned children import by module name."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time

import psutil

from conftest import REPO, poll_until

if str(REPO) not in sys.path:  # spawned sidecars inherit sys.path: make `sidecars` importable
    sys.path.insert(0, str(REPO))

from sidecars.host import SidecarKeeper, stop_helper_processes  # noqa: E402


class LoopThread:
    """An asyncio loop in a thread: the supervisor's loop, as far as a SidecarKeeper can tell."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="supervisor-loop")
        self.thread.start()

    def call(self, fn, *args, timeout: float = 10.0):
        async def wrap():
            return fn(*args)
        return self.run(wrap(), timeout)

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self.run(drain(), 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


class Recorder:
    """on_message callback that keeps (arrival time, name, msg)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items: list[tuple[float, str, dict]] = []
        self.reply = None  # optional fn(name, msg) run on the loop

    def __call__(self, name, msg):
        with self.lock:
            self.items.append((time.monotonic(), name, msg))
        if self.reply is not None:
            return self.reply(name, msg)

    def messages(self, type_=None) -> list[dict]:
        with self.lock:
            return [m for _, _, m in self.items if type_ is None or m.get("type") == type_]

    def timed(self, type_=None) -> list[tuple[float, dict]]:
        with self.lock:
            return [(t, m) for t, _, m in self.items if type_ is None or m.get("type") == type_]

    def wait(self, pred, timeout: float = 5.0, what: str = "message"):
        """First message (after none seen so far is required) satisfying pred."""
        def find():
            for t, m in self.timed():
                if pred(m):
                    return (t, m)
            return None
        return poll_until(find, timeout, what=what)


class Hosted:
    """A SidecarKeeper on a LoopThread, with a Recorder; close() stops it (bounded)."""

    def __init__(self, name, target, args=(), **kw):
        self.lt = LoopThread()
        self.rec = Recorder()
        self.host = self.lt.call(lambda: SidecarKeeper(name, target, args, on_message=self.rec,
                                                     loop=self.lt.loop, **kw))
        self.lt.call(self.host.start)

    def status(self) -> dict:
        return self.lt.call(self.host.status)

    def send(self, msg) -> bool:
        return self.lt.call(self.host.send, msg)

    def stop(self, timeout: float = 5.0) -> float:
        t0 = time.monotonic()
        self.lt.run(self.host.stop(timeout), timeout + 5)
        return time.monotonic() - t0

    def close(self):
        try:
            self.stop()
        finally:
            self.lt.close()
            stop_helper_processes()  # no-op while another host's sidecar is still alive


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---- sidecar targets (module level: the spawned child imports them) ---------------------------

def crash_at_start(conn):
    raise SystemExit(3)


# Set by idle once its hello is sent: a role in the same process can crash after it, not before.
IDLE_SAID_HELLO = threading.Event()


def crash_after_hello(conn):
    IDLE_SAID_HELLO.wait(30)
    raise SystemExit(3)


def idle(conn):
    """Says hello with its pid, then serves until stop or EOF."""
    conn.send({"type": "hello", "pid": os.getpid()})
    IDLE_SAID_HELLO.set()
    try:
        while True:
            msg = conn.recv()
            if msg.get("type") == "stop":
                return
            conn.send({"type": "echo", "msg": msg})
    except EOFError:
        return


def stubborn(conn):
    """Ignores the stop message and SIGTERM: only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send({"type": "hello", "pid": os.getpid()})
    threading.Event().wait(300)
