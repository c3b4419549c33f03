"""Frontend plugins: the React UI's renderers (file pickers, image and plot views) that FuncNodes
modules ship beside their nodes.

A module offers one through a `react_plugin` entry point of the `funcnodes.module` group (or, for
a module the worker loaded, a REACT_PLUGIN attribute): {"module": path of an ES module,
"js": [paths], "css": [paths]}. The UI asks `get_plugin_keys` once per connection and then
`get_plugin` per key, and loads the module it gets back.

Beside the stock worker: it serves them through funcnodes-react-flow, which it installs from PyPI
when it is missing; here the entry points are read directly and nothing is ever installed. Its
keys are `str(module)` (the server's install path, plus a duplicate 'None'); ours are the module
names. The UI treats a key as an opaque name.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("fn_supervise.worker.plugins")

TYPES = ("react",)


def _check_type(type: str) -> None:
    if type not in TYPES:
        raise ValueError(f"Plugin type {type} not found")


def _valid(plugin: Any) -> bool:
    return isinstance(plugin, dict) and isinstance(plugin.get("module"), (str, Path)) and bool(plugin["module"])


_cache: tuple[tuple, dict[str, dict]] | None = None  # (what was installed and loaded, the plugins)


def react_plugins(loaded: Iterable[Any] = ()) -> dict[str, dict]:
    """{module name: plugin} of every installed module's entry point, then of `loaded` modules.

    Loading an entry point imports its module (seconds for a large one): call this off the event
    loop. The answer is kept until the installed entry points or the loaded modules change."""
    global _cache
    loaded = list(loaded)
    eps = [ep for ep in entry_points(group="funcnodes.module") if ep.name == "react_plugin"]
    key = (tuple((ep.module, ep.value) for ep in eps), tuple(getattr(m, "__name__", "") for m in loaded))
    if _cache is not None and _cache[0] == key:
        return _cache[1]
    out: dict[str, dict] = {}
    for ep in eps:
        if ep.module in out:
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # a broken package must not take the others' plugins down
            log.warning("react_plugin of %s cannot be loaded: %s", ep.module, e)
            continue
        if _valid(plugin):
            out[ep.module] = plugin
    for mod in loaded:
        plugin = getattr(mod, "REACT_PLUGIN", None)
        name = getattr(mod, "__name__", None)
        if name and name not in out and _valid(plugin):
            out[name] = plugin
    _cache = (key, out)
    return out


def keys(type: str, loaded: Iterable[Any] = ()) -> list[str]:
    _check_type(type)
    return sorted(react_plugins(loaded))


def content(key: str, type: str, loaded: Iterable[Any] = ()) -> dict[str, Any]:
    """The plugin's files as bytes (the JSON encoder sends them base64, as stock does)."""
    _check_type(type)
    plugin = react_plugins(loaded).get(str(key))
    if plugin is None:
        raise ValueError(f"React plugin {key} not found")
    return {
        "js": [Path(p).read_bytes() for p in plugin.get("js") or []],
        "module": Path(plugin["module"]).read_bytes(),
        "css": [Path(p).read_bytes() for p in plugin.get("css") or []],
    }
