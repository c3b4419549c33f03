"""Test nodes for separate_process=True (tests/test_separate_process.py), loaded as a path
dependency like examples/demo_nodes.py."""

import os
import signal
import threading
import time

import funcnodes_core as fn


@fn.NodeDecorator("sep.pid", name="PID (separate)", separate_process=True)
def pid(x: int = 0) -> int:
    return os.getpid()


@fn.NodeDecorator("sep.square", name="Square (separate)", separate_process=True)
def square(x: float = 3.0) -> float:
    return x * x


@fn.NodeDecorator("sep.exit", name="os._exit (separate)", separate_process=True)
def exit_now(code: int = 1) -> int:
    os._exit(code)


@fn.NodeDecorator("sep.sigkill", name="SIGKILL itself (separate)", separate_process=True)
def sigkill(x: int = 0) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


@fn.NodeDecorator("sep.segv", name="Segfault (separate)", separate_process=True)
def segv(x: int = 0) -> int:
    import ctypes

    return ctypes.string_at(1, 1)[0]  # reads address 1 (unmapped): SIGSEGV


@fn.NodeDecorator("sep.raise", name="Raise (separate)", separate_process=True)
def fail(message: str = "boom") -> int:
    raise ValueError(message)


@fn.NodeDecorator("sep.unpicklable", name="Unpicklable result (separate)", separate_process=True)
def unpicklable(x: int = 0) -> object:
    return threading.Lock()


@fn.NodeDecorator("sep.hold", name="Allocate and hold (separate)", separate_process=True)
def hold(mb: int = 200, seconds: float = 60.0) -> int:
    block = bytearray(mb * 2**20)
    for i in range(0, len(block), 4096):  # touch every page: resident, not just reserved
        block[i] = 1
    time.sleep(seconds)
    return len(block)


@fn.NodeDecorator("sep.thread_pid", name="PID (thread)", separate_thread=True)
def thread_pid(x: int = 0) -> int:
    return os.getpid()


NODE_SHELF = fn.Shelf(
    nodes=[pid, square, exit_now, sigkill, segv, fail, unpicklable, hold, thread_pid],
    subshelves=[],
    name="sep",
    description="separate_process test nodes",
)
