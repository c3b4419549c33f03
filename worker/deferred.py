"""Modules a dependency imports at start but the worker never uses: executed on first use instead.

funcnodes-core imports pytest at every start (config.py asks pytest_funcnodes whether it runs
under a test, and pytest_funcnodes imports pytest at module level for markers used only inside
its functions): ~50 ms of CPU and a few MB in every fork server and worker. `defer("pytest")`
puts a module object in sys.modules whose code runs on the first use of an attribute, so a
node module that does use pytest (`pytest.mark...`, `from pytest import x`) still gets it.

`deferred_ca_certificates()`: aiohttp.connector builds two client SSL contexts at import, and
each parses the system CA bundle (set_default_verify_paths, ~18 ms of CPU apiece) for clients
the worker's server never makes. Inside the block a plain SSLContext's set_default_verify_paths()
is recorded instead, and done on the context's first handshake or certificate query, so a node
that makes HTTPS requests verifies against the same CAs as before.

Not importlib.util.LazyLoader: on Python 3.11 a second `import pytest` reads the module's
`__spec__`, which makes LazyLoader run it, and its first attribute access is not thread-safe.
Here the import machinery's metadata reads (`__spec__`, `__name__`, `__path__`, ...) do not
load; everything else does, once, under a lock that other threads wait on. If the module fails
to run, it leaves sys.modules and the error is raised at that use (as the import would have).
"""

from __future__ import annotations

import contextlib
import importlib.util
import ssl
import sys
import threading
import types
from typing import Iterator

# What the import system reads from a module it finds in sys.modules, without using it.
_METADATA = frozenset({"__spec__", "__name__", "__loader__", "__package__", "__path__", "__file__", "__class__"})
_LOCK = threading.RLock()  # re-entered by the loading thread; other threads wait for the load
_pending: dict[int, types.ModuleType] = {}  # id(module) -> module, until it has run


class _Deferred(types.ModuleType):
    def __getattribute__(self, attr: str):
        if attr not in _METADATA:
            _load(self)
        return types.ModuleType.__getattribute__(self, attr)

    def __setattr__(self, attr: str, value) -> None:
        _load(self)
        types.ModuleType.__setattr__(self, attr, value)

    def __delattr__(self, attr: str) -> None:
        _load(self)
        types.ModuleType.__delattr__(self, attr)

    def __dir__(self):  # dir() looks __dir__ up on the type, past __getattribute__
        _load(self)
        return types.ModuleType.__dir__(self)


def defer(name: str) -> bool:
    """Put a not-yet-run `name` in sys.modules; False if it is already imported or not installed."""
    if name in sys.modules or "." in name:
        return False
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    with _LOCK:
        if name in sys.modules:
            return False
        module.__class__ = _Deferred
        _pending[id(module)] = module
        sys.modules[name] = module
    return True


def is_deferred(module: types.ModuleType) -> bool:
    """True while the module's code has not run yet."""
    return type(module) is _Deferred


def _load(module: types.ModuleType) -> None:
    if type(module) is not _Deferred:
        return
    with _LOCK:
        if _pending.pop(id(module), None) is None:
            return  # loaded meanwhile, or this very thread is running it (a circular use)
        spec = types.ModuleType.__getattribute__(module, "__spec__")
        try:
            spec.loader.exec_module(module)
        except BaseException:
            if sys.modules.get(spec.name) is module:
                del sys.modules[spec.name]  # the next `import` tries again and raises as usual
            raise
        finally:
            object.__setattr__(module, "__class__", types.ModuleType)


class _DeferredVerifyPaths(ssl.SSLContext):
    """A plain SSLContext whose set_default_verify_paths() is still to be done: at first use."""

    def _verify_paths(self) -> None:
        with _LOCK:
            if type(self) is _DeferredVerifyPaths:
                super(ssl.SSLContext, self).set_default_verify_paths()  # the C method, patched or not
                self.__class__ = ssl.SSLContext

    def wrap_socket(self, *args, **kwargs):
        self._verify_paths()
        return ssl.SSLContext.wrap_socket(self, *args, **kwargs)

    def wrap_bio(self, *args, **kwargs):  # asyncio's handshakes
        self._verify_paths()
        return ssl.SSLContext.wrap_bio(self, *args, **kwargs)

    def get_ca_certs(self, *args, **kwargs):
        self._verify_paths()
        return ssl.SSLContext.get_ca_certs(self, *args, **kwargs)

    def cert_store_stats(self):
        self._verify_paths()
        return ssl.SSLContext.cert_store_stats(self)

    def set_default_verify_paths(self) -> None:
        self._verify_paths()


def _record_verify_paths(self: ssl.SSLContext) -> None:
    if type(self) is ssl.SSLContext:
        self.__class__ = _DeferredVerifyPaths
    else:  # someone's subclass: its class stays, the paths load now
        super(ssl.SSLContext, self).set_default_verify_paths()


@contextlib.contextmanager
def deferred_ca_certificates() -> Iterator[None]:
    """Plain SSLContexts made inside load the system CAs on first use (call with no other thread)."""
    if "set_default_verify_paths" in vars(ssl.SSLContext):  # already inside such a block
        yield
        return
    ssl.SSLContext.set_default_verify_paths = _record_verify_paths
    try:
        yield
    finally:
        del ssl.SSLContext.set_default_verify_paths  # the C method again
