"""`fn-supervise modules list|install|remove worker_<uuid> [NAME]`: a worker's package dependencies.

install and remove go to the running worker as the RPCs `add_package_dependency` and
`remove_package_dependency`, the path the UI's Manage Libraries takes: the worker checks the
name, has its supervisor install it (into a venv built aside, one install at a time; standalone,
uv into its interpreter), loads the shelf, and saves the config and pyproject.toml. The worker's
progress lines are printed as they come. `list` reads the config; the worker need not run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any, Callable

from worker.tls import scheme as tls_scheme

from .files import WorkerPaths

INSTALL_TIMEOUT = 960.0  # the worker's own install bound (900 s), plus a margin


class NotRunning(RuntimeError):
    pass


def list_modules(paths: WorkerPaths) -> dict[str, dict]:
    deps = paths.read_config_or_empty().get("package_dependencies") or {}
    if isinstance(deps, list):  # the legacy list form
        deps = {d["package"]: d for d in deps if isinstance(d, dict) and "package" in d}
    return {str(k): (v if isinstance(v, dict) else {}) for k, v in deps.items()}


def format_list(deps: dict[str, dict]) -> str:
    if not deps:
        return "(no package dependencies)"
    return "\n".join(f"{name}\t{d.get('path') or d.get('version') or 'latest'}" for name, d in sorted(deps.items()))


def _url(cfg: dict[str, Any]) -> str:
    host = cfg.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"  # a worker listening everywhere answers on loopback too
    if ":" in host:
        host = f"[{host}]"
    return f"{tls_scheme(cfg)}://{host}:{cfg.get('port')}/"


async def call(paths: WorkerPaths, cmd: str, kwargs: dict, timeout: float,
               on_progress: Callable[[str], None] = lambda line: None) -> Any:
    """Run one RPC on the worker; its result, or RuntimeError with the worker's error text."""
    import aiohttp

    cfg = paths.read_config_or_empty()
    if not cfg.get("port"):
        raise NotRunning(f"{paths.name} has no port in its config: it never ran")
    token = cfg.get("auth_token") or os.environ.get("FN_SUPERVISE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    msg = {"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": "fn-supervise-modules"}
    async with aiohttp.ClientSession() as s:
        try:
            # ssl=False: our own worker on loopback, with the certificate it made for itself
            ws = await s.ws_connect(_url(cfg), headers=headers, max_msg_size=0, ssl=False if tls_scheme(cfg) == "wss" else None,
                                    timeout=aiohttp.ClientWSTimeout(ws_close=5))
        except (aiohttp.ClientError, OSError) as e:
            raise NotRunning(f"{paths.name} is not running ({e}); start it: fn-supervise run {paths.name}") from None
        async with ws:
            await ws.send_str(json.dumps(msg))
            async with asyncio.timeout(timeout):
                async for m in ws:
                    if m.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(m.data)
                    if data.get("type") == "progress" and data.get("message"):
                        on_progress(str(data["message"]))
                    elif data.get("id") == msg["id"] and data.get("type") == "result":
                        return data.get("result")
                    elif data.get("id") == msg["id"] and data.get("type") == "error":
                        raise RuntimeError(str(data.get("error")))
    raise RuntimeError("the worker closed the connection before it answered")


def run(action: str, paths: WorkerPaths, name: str | None, dep: dict | None, as_json: bool = False) -> int:
    """The CLI verb; returns the exit code (0 ok, 1 refused or failed)."""
    if action == "list":
        deps = list_modules(paths)
        print(json.dumps(deps, indent=2) if as_json else format_list(deps))
        return 0
    if action == "install":
        kwargs = {"name": name, "dep": dep or None}
        done = f"installed {name} into {paths.name}"
    else:
        kwargs = {"name": name}
        done = f"removed {name} from {paths.name}"
    last = [""]

    def progress(line: str) -> None:
        if line != last[0]:
            last[0] = line
            print(line, file=sys.stderr, flush=True)

    verb = "add_package_dependency" if action == "install" else "remove_package_dependency"
    try:
        asyncio.run(call(paths, verb, kwargs, INSTALL_TIMEOUT, progress))
    except NotRunning as e:
        print(f"fn-supervise: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError) as e:
        print(f"fn-supervise: {action} {name} failed: {e or 'timed out'}", file=sys.stderr)
        return 1
    print(done)
    return 0
