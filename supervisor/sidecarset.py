"""The supervisor's sidecars: local-script discovery and the subprocess monitor.

Routing lives here, apart from the main loop: discovery events and the monitor's address go
to the worker as channel frames; a FuncNodes worker start that reached the monitor (the
Workermanager running under it) starts that worker under fn-supervise, once per uuid.
Both run as roles of one forked process (sidecars/pair.py); it is restarted whole by its host
on its own budget when it crashes; the worker never notices.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .runner import Supervisor

log = logging.getLogger("fn_supervise.sidecars")

MONITOR = "sidecars.monitor:run_monitor"
DISCOVERY = "sidecars.discovery:run_discovery"
PAIR = "sidecars.pair:run_pair"  # both roles in one process
# What the supervisor itself imports only after the forks (the idna codec every getaddrinfo of a
# str host loads, asyncio.to_thread's executor): imported before, their pages are shared with the
# sidecar and the fork server instead of being the supervisor's alone.
LATE_IMPORTS = ("encodings.idna", "concurrent.futures.thread")
# Forked from the supervisor (sidecars/forked.py): the sidecars share its pages instead of each
# being a fresh interpreter. They start before any thread of the supervisor exists.
START_METHOD = "fork"


class SidecarSet:
    def __init__(self, sup: "Supervisor"):
        self.sup = sup
        self.keeper: Any = None  # the one sidecar process (sidecars.host.SidecarKeeper)
        self.monitor_addr: dict[str, Any] | None = None
        self.children: dict[tuple[str, str], subprocess.Popen] = {}  # (base, uuid) -> child fn-supervise
        self.sidecar_cfg = (sup.worker_cfg.get("sidecars") or {}) if isinstance(sup.worker_cfg.get("sidecars"), dict) else {}

    # region lifecycle
    def start(self) -> None:
        from sidecars.entry import preload, run_named
        from sidecars.host import SidecarKeeper

        from . import forkstandby  # noqa: PLC0415

        roles = self.roles()
        # Everything forked from the supervisor is forked here, before its first thread: the
        # fork server's standby (it becomes the fork server at the first worker start), then
        # the sidecar. The sidecars' modules are imported before any fork, so every child
        # shares them (a page a later import made the supervisor and the fork server both write
        # would be left to the sidecar alone).
        for target in (PAIR, *(t for t, _a, _k in roles.values()), *LATE_IMPORTS):
            preload(target)
        if self.sup.cfg.fork_server and self.sup.cfg.worker_module == "worker":
            forkstandby.prepare()
        if not roles:
            return
        # One process for both roles (sidecars/pair.py): a second Python process would copy
        # its own few MB of the shared pages. It restarts whole, on one crash budget.
        self.keeper = SidecarKeeper(
            "+".join(roles), run_named, (PAIR, roles), on_message=self.on_message,
            loop=asyncio.get_running_loop(), budget=int(self.sidecar_cfg.get("budget", 5)),
            start_method=START_METHOD)
        self.keeper.start()

    def roles(self) -> dict[str, tuple[str, tuple, dict]]:
        """The roles this worker's sidecar runs: role -> (target, args, kwargs), as configured."""
        out: dict[str, tuple[str, tuple, dict]] = {}
        if self.sidecar_cfg.get("discovery", True):
            data = self.sup.paths.data_dir(self.sup.worker_cfg)
            out["discovery"] = (DISCOVERY, (str(data / "local_scripts"),), {})
        if self.sidecar_cfg.get("monitor", True):
            port = int(self.sidecar_cfg.get("monitor_port") or 0)
            out["monitor"] = (MONITOR, ("127.0.0.1", port),
                              {"owner_pid": os.getpid(), "token": self.sup.worker_cfg.get("auth_token"),
                               "peer_uid_check": self.sup.worker_cfg.get("peer_uid_check")})
        return out

    async def stop(self) -> None:
        from . import forkstandby  # noqa: PLC0415

        forkstandby.close()  # never taken (the worker has its own venv): it goes now
        await stop_all(list(self.children.values()), [self.keeper], CHILD_STOP_TIMEOUT)

    def status(self) -> list[dict[str, Any]]:
        """One entry per role (same process, same pid, same restarts): what status and the
        state file have always listed."""
        if self.keeper is None:
            return []
        try:
            st = self.keeper.status()
        except Exception as e:  # noqa: BLE001
            st = {"state": f"unknown ({e})"}
        return [{**st, "name": role} for role in self.keeper.args[1]]
    # endregion

    # region routing (runs in the supervisor's loop thread)
    def on_message(self, name: str, msg: dict[str, Any]) -> None:
        t = msg.get("type")
        if t == "monitor":
            self.monitor_addr = {"type": "monitor", "host": msg.get("host"), "port": msg.get("port"),
                                 "pid": msg.get("env_pid") or os.getpid()}
            roles = dict(self.keeper.args[1]) if self.keeper is not None else {}
            if "monitor" in roles and msg.get("port"):
                _t, _a, kw = roles["monitor"]
                roles["monitor"] = (MONITOR, (msg.get("host"), msg.get("port")), kw)
                self.keeper.args = (PAIR, roles)  # a restart keeps the address
            self.to_worker(self.monitor_addr)
        elif t == "local_scripts":
            self.to_worker({"type": "local_scripts", "changes": msg.get("changes") or [],
                            "initial": bool(msg.get("initial"))})
        elif t == "spawn_worker":
            reply = self.spawn_worker(str(msg.get("uuid") or ""), msg.get("args"))
            reply.update({"type": "spawn_worker_result", "request_id": msg.get("request_id")})
            self.keeper.send(reply)  # the sidecar hands it to its monitor
        elif t == "error":
            log.error("sidecar %s: %s", name, msg.get("error"))
        self.sup.write_state()

    def to_worker(self, frame: dict[str, Any]) -> None:
        w = self.sup.worker
        if w is not None and w.alive:
            w.send(frame)

    def on_worker_ready(self) -> None:
        """A new worker process learns the monitor's address (discovery it reads itself)."""
        if self.monitor_addr:
            self.to_worker(self.monitor_addr)
    # endregion

    # region worker starts from the Workermanager
    def spawn_worker(self, uuid: str, args: list[str] | None = None) -> dict[str, Any]:
        """Idempotent per uuid: a worker that runs or starts keeps its PID; else one is started."""
        from worker.config import ConfigError, parse_worker_name

        try:
            uuid = parse_worker_name(uuid)
        except ConfigError as e:
            return {"pid": None, "error": str(e)}
        own = Path(self.sup.paths.base).resolve()
        base = request_base(args) or own
        if base == own and uuid == self.sup.paths.uuid:
            w = self.sup.worker
            return {"pid": w.pid if (w is not None and w.alive) else os.getpid(), "error": None}
        return start_supervised(base, uuid, self.children)
    # endregion


CHILD_STOP_TIMEOUT = 15.0  # a child supervisor's own staged stop fits in this


async def stop_all(procs: list, hosts: list, timeout: float) -> None:
    """SIGTERM to child processes (supervisors stop their workers gracefully), the sidecar hosts
    stopped meanwhile, SIGKILL to what is left at the deadline; bounded throughout."""
    procs = [p for p in procs if p is not None and p.poll() is None]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    await asyncio.gather(*(h.stop(3.0) for h in hosts if h is not None), return_exceptions=True)
    deadline = time.monotonic() + timeout
    for p in procs:
        while p.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if p.poll() is None:
            log.warning("pid %d did not stop within %gs: SIGKILL", p.pid, timeout)
            p.kill()
            p.wait(5)
    try:
        from sidecars.host import stop_helper_processes

        stop_helper_processes()
    except Exception:  # noqa: BLE001
        pass


def request_base(args: list[str] | None) -> Path | None:
    """The config folder a FuncNodes start command names (`--dir D` / `--dir=D`), else None.

    The Workermanager appends `--dir $FUNCNODES_CONFIG_DIR` to every worker start; a worker of
    another folder is started (and looked up) in that folder, not in ours."""
    args = list(args or [])
    for i, a in enumerate(args):
        if a == "--dir" and i + 1 < len(args) and args[i + 1]:
            return Path(args[i + 1]).expanduser().resolve()
        if a.startswith("--dir=") and len(a) > len("--dir="):
            return Path(a[len("--dir="):]).expanduser().resolve()
    return None


def start_supervised(base: Path, uuid: str, children: dict) -> dict[str, Any]:
    """Start `fn-supervise --dir BASE run worker_<uuid>` unless one runs or starts already.

    Idempotent per (base, uuid): a supervisor started here that has not exited, or any live
    supervisor recorded in the worker's state file (PID + start time + boot id), is answered
    with its PID. `children` maps (base, uuid) -> Popen and belongs to the caller, who stops
    them. Returns {"pid": int|None, "error": str|None}."""
    from worker.config import ConfigError, parse_worker_name

    try:
        uuid = parse_worker_name(uuid)
    except ConfigError as e:
        return {"pid": None, "error": str(e)}
    base = Path(base)
    key = (str(base), uuid)
    child = children.get(key)
    if child is not None and child.poll() is None:
        return {"pid": child.pid, "error": None}
    from .files import WorkerPaths as SupPaths  # noqa: PLC0415
    from .files import identity_alive  # noqa: PLC0415

    other = SupPaths(base, uuid)
    st = other.read_state() or {}
    if identity_alive(st.get("supervisor")):
        return {"pid": int(st["supervisor"]["pid"]), "error": None}
    if not other.config.exists():
        return {"pid": None, "error": f"no worker config {other.config}"}
    env = dict(os.environ)
    env["FUNCNODES_CONFIG_DIR"] = str(base)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("SUBPROCESS_MONITOR_HOST", "SUBPROCESS_MONITOR_PORT", "SUBPROCESS_MONITOR_PID"):
        env.pop(k, None)  # the new supervisor is an owner itself, not a monitor's command
    log_path = other.data_dir(other.read_config_or_empty())
    log_path.mkdir(parents=True, exist_ok=True)
    with open(log_path / "supervisor.out", "ab") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--dir", str(base), "run", f"worker_{uuid}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
    children[key] = p
    # reaped the moment it exits (a supervisor the Workermanager stopped must not linger as a
    # zombie until the next request); poll() elsewhere then sees its returncode
    threading.Thread(target=p.wait, name=f"reap-supervisor-{p.pid}", daemon=True).start()
    log.info("started fn-supervise for worker_%s as pid %d (Workermanager request)", uuid, p.pid)
    return {"pid": p.pid, "error": None}


def _die_with_parent() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: a graceful stop
    except OSError:
        pass
