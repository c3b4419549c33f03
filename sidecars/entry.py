"""Start a sidecar by name in the child, so the supervisor never imports the sidecar's own
dependencies (aiohttp for the monitor, watchfiles for discovery): less memory in the parent."""

from __future__ import annotations

import importlib
from typing import Any


def run_named(conn, target: str, *args: Any, **kwargs: Any) -> Any:
    """`target` is "package.module:function"; it is called as function(conn, *args, **kwargs)."""
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(conn, *args, **kwargs)


def preload(target: str) -> None:
    """Import the module of a "package.module:function" target here, in the parent, before a
    fork: the forked sidecar then shares its pages instead of importing its own copy."""
    importlib.import_module(target.partition(":")[0])
