"""A tiny node library for the demo worker and the tests: no network, no extra packages.

Used as a path dependency: {"package": "demo_nodes", "path": "<this file>"}.
"""

import asyncio
import time

import funcnodes_core as fn


@fn.NodeDecorator("demo.number", name="Number")
def number(value: float = 1.0) -> float:
    return value


@fn.NodeDecorator("demo.add", name="Add")
def add(a: float, b: float = 1.0) -> float:
    return a + b


@fn.NodeDecorator("demo.multiply", name="Multiply")
def multiply(a: float, b: float = 2.0) -> float:
    return a * b


@fn.NodeDecorator("demo.text", name="Text")
def text(value: str = "") -> str:
    return value


@fn.NodeDecorator("demo.sleep", name="Sleep (async)")
async def sleep(value: float = 0.0, seconds: float = 0.1) -> float:
    await asyncio.sleep(seconds)
    return value


@fn.NodeDecorator("demo.block", name="Block the loop")
def block(seconds: float = 1.0) -> float:
    # Deliberately blocks the event loop: what a careless sync node does.
    time.sleep(seconds)
    return seconds


@fn.NodeDecorator("demo.fail", name="Fail")
def fail(message: str = "boom") -> str:
    raise RuntimeError(message)


NODE_SHELF = fn.Shelf(
    nodes=[number, add, multiply, text, sleep, block, fail],
    subshelves=[],
    name="demo",
    description="Demo nodes of fn-supervise",
)
