"""The worker's end of the supervisor channel.

Writes go through one lock on a blocking socket, so node code in any thread can declare itself
busy. Reads run in a thread: if the supervisor's end closes (the lifeline), the worker is told
at once, and if its event loop is stuck it is ended anyway after a grace period.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

from . import channel

_PR_SET_PDEATHSIG = 1
LIFELINE_GRACE = 3.0  # seconds a stuck worker gets to exit by itself after the supervisor is gone


try:  # resolved once: a child forked from a threaded worker (worker/separate.py) must not dlopen
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to kill us when our parent dies (Linux only; set by the child itself)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


class ControlChannel:
    def __init__(self, fd: int, on_message: Callable[[dict], None], on_eof: Callable[[], None]):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self._lock = threading.Lock()
        self._on_message = on_message
        self._on_eof = on_eof
        self.closed = False
        self._closed_by_us = False
        self._reader = threading.Thread(target=self._read_loop, name="fn-control-reader", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def send(self, msg: dict[str, Any]) -> bool:
        data = channel.encode(msg)
        with self._lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.closed = True
                return False

    def _read_loop(self) -> None:
        buf = channel.FrameBuffer()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            for item in buf.feed(data):
                if isinstance(item, channel.ChannelError):
                    continue  # a torn frame from a dying peer; nothing to act on
                self._on_message(item)  # the runtime's one table, on the main loop
        if self._closed_by_us:
            return  # our own shutdown closed the channel: not the supervisor going away
        self.closed = True
        self._on_eof()
        # If the event loop cannot act on the EOF (a node blocks it), do not outlive the supervisor.
        time.sleep(LIFELINE_GRACE)
        os._exit(70)

    def close(self) -> None:
        with self._lock:
            self._closed_by_us = True
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# The channel of this process, for node code that declares itself busy (see worker.busy).
CURRENT: ControlChannel | None = None
