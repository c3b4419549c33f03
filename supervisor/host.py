"""`fn-supervise host`: every autostart worker of a base folder supervised from ONE process.

One asyncio loop runs one `runner.Supervisor` per worker (each keeps its own state machine,
restart policy, channel, heartbeat, crash records, lock and state file), and shares what can
be shared:

  * one discovery sidecar watching every worker's local_scripts/ (events carry the worker's
    key and are routed to that worker's Supervisor);
  * one subprocess monitor for the whole host (a FuncNodes worker start that reaches it starts
    that worker here);
  * one dead-man's switch (`/bin/sh`) for every worker's process group, instead of one each;
  * one warm fork server per environment (supervisor/forkpool.py), instead of one per worker:
    the workers forked from it share its imported pages;
  * the signal handlers (SIGCHLD reaps orphans for every Supervisor);
  * a local control socket, <base>/fn-supervise-host.sock (mode 0600), which `fn-supervise
    list/status/stop/restart/new --autostart` use while the host runs (supervisor/hostctl.py);
  * optionally a Prometheus endpoint on 127.0.0.1 (supervisor/hostmetrics.py).

A worker is supervised when its config says `autostart` `always` or `unless-stopped` (or
`true`, the stock boolean for `unless-stopped`), or when it was started explicitly (control
`start`/`restart`, or a Workermanager start through the monitor). A worker stopped through the
control socket, or that stopped itself (stop_worker), stays stopped until started again; for
`unless-stopped` that survives a host restart (the state file), for `always` it does not (the
stock meaning). Workers added, changed (autostart, `supervisor`, host, port) or removed are
picked up by a scan every `poll` seconds (and at once on SIGHUP or a control `rescan`).

Nothing lingers: a stopped worker's Supervisor has ended its worker and group; a SIGKILL of
the host closes every worker's channel (lifeline EOF, PR_SET_PDEATHSIG), the shared switch
kills every worker group, and the sidecars see their pipe close.

One host per base folder: <base>/fn-supervise-host.lock (flock). Exit: 0 after SIGTERM/SIGINT,
3 if a host already runs for the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .files import AlreadyRunning, SupervisorLock, WorkerPaths, list_workers, process_identity
from .hostctl import socket_path
from .launcher import LauncherPool
from .process import GroupReaper
from .runner import EXIT_FATAL, EXIT_OK, EXIT_RUNNING, Supervisor
from .status import live_status
from .systemd import Notifier

log = logging.getLogger("fn-supervise")

LOCK_NAME = "fn-supervise-host.lock"
STATE_NAME = "fn-supervise-host.state"
AUTOSTART = ("always", "unless-stopped")
DISCOVERY = "sidecars.discovery:run_discovery_multi"
MONITOR = "sidecars.monitor:run_monitor"


def autostart_mode(value: Any) -> str:
    """The stock field: "always" | "unless-stopped" | "never"; a boolean true = unless-stopped."""
    if value is True:
        return "unless-stopped"
    if isinstance(value, str) and value in AUTOSTART:
        return value
    return "never"


def config_signature(cfg: dict[str, Any]) -> str:
    """What a running worker must be restarted for when it changes (other keys, e.g. the
    package list the worker itself updates, are read at its next start anyway)."""
    return json.dumps([cfg.get("supervisor"), cfg.get("host"), cfg.get("port"), cfg.get("data_path")],
                      sort_keys=True, default=str)


# region shared dead-man's switch
class SharedGroupReaper(GroupReaper):
    """One `/bin/sh` for every worker group of the host (a GroupReaper per worker otherwise).

    Each line it reads is the full list of live worker pgids; at EOF (the host died, SIGKILL
    included) it SIGKILLs the groups of the last line. A clean stop writes an empty list first."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: dict[str, int] = {}

    def set(self, key: str, pgid: int | None) -> None:
        if pgid is None:
            self.groups.pop(key, None)
        else:
            self.groups[key] = int(pgid)
        self._send(" ".join(str(g) for g in self.groups.values()))

    def slot(self, key: str) -> "ReaperSlot":
        return ReaperSlot(self, key)

    def close(self) -> None:
        self.groups.clear()
        super().close()


class ReaperSlot:
    """A Supervisor's view of the shared switch (the GroupReaper interface)."""

    def __init__(self, shared: SharedGroupReaper, key: str):
        self.shared, self.key = shared, key

    def start(self) -> bool:
        return True

    def watch(self, pgid: int) -> None:
        self.shared.set(self.key, pgid)

    def clear(self) -> None:
        self.shared.set(self.key, None)

    def close(self) -> None:
        self.clear()
# endregion


# region shared sidecars
class SharedSidecars:
    """One discovery and one monitor for the host; messages routed by worker key."""

    def __init__(self, host: "Fleet", *, discovery: bool = True, monitor: bool = True,
                 monitor_port: int = 0, budget: int = 5):
        self.host = host
        self.want_discovery, self.want_monitor = discovery, monitor
        self.monitor_port = monitor_port
        self.budget = budget
        self.roots: dict[str, str] = {}
        self.discovery = None
        self.monitor = None
        self.monitor_addr: dict[str, Any] | None = None

    def start(self) -> None:
        from sidecars.entry import run_named
        from sidecars.host import SidecarKeeper as cls  # spawns with a bare __main__ (lean children)

        loop = asyncio.get_running_loop()
        if self.want_discovery:
            self.discovery = cls("discovery", run_named, (DISCOVERY, dict(self.roots)), on_message=self.on_message,
                                 loop=loop, budget=self.budget)
            self.discovery.start()
        if self.want_monitor:
            self.monitor = cls("monitor", run_named, (MONITOR, "127.0.0.1", self.monitor_port),
                               kwargs={"owner_pid": os.getpid()}, on_message=self.on_message, loop=loop,
                               budget=self.budget)
            self.monitor.start()

    async def stop(self) -> None:
        hosts = [h for h in (self.discovery, self.monitor) if h is not None]
        await asyncio.gather(*(h.stop(3.0) for h in hosts), return_exceptions=True)
        try:
            from sidecars.host import stop_helper_processes

            stop_helper_processes()
        except Exception:  # noqa: BLE001
            pass

    def status(self) -> list[dict[str, Any]]:
        out = []
        for h in (self.discovery, self.monitor):
            if h is not None:
                st = h.status()
                st["shared"] = True
                out.append(st)
        return out

    def watch(self, key: str, path: Path) -> None:
        self.roots[key] = str(path)
        if self.discovery is not None:
            self.discovery.args = (DISCOVERY, dict(self.roots))  # a restarted sidecar gets them all
            self.discovery.send({"type": "watch", "key": key, "dir": str(path)})

    def unwatch(self, key: str) -> None:
        self.roots.pop(key, None)
        if self.discovery is not None:
            self.discovery.args = (DISCOVERY, dict(self.roots))
            self.discovery.send({"type": "unwatch", "key": key})

    def on_message(self, name: str, msg: dict[str, Any]) -> None:
        t = msg.get("type")
        if t == "local_scripts":
            sup = self.host.supervisor_of(str(msg.get("key") or ""))
            if sup is not None:
                sup.deliver({"type": "local_scripts", "changes": msg.get("changes") or [],
                                    "initial": bool(msg.get("initial"))})
        elif t == "monitor":
            self.monitor_addr = {"type": "monitor", "host": msg.get("host"), "port": msg.get("port"),
                                 "pid": msg.get("env_pid") or os.getpid()}
            if self.monitor is not None and msg.get("port"):
                self.monitor.args = (MONITOR, msg.get("host"), msg.get("port"))  # a restart keeps the address
            for sup in self.host.supervisors():
                sup.deliver(self.monitor_addr)
            self.host.start_manager(msg.get("host"), msg.get("port"))
        elif t == "spawn_worker":
            reply = self.host.spawn_request(str(msg.get("uuid") or ""), msg.get("args"))
            reply.update({"type": "spawn_worker_result", "request_id": msg.get("request_id")})
            if self.monitor is not None:
                self.monitor.send(reply)
        elif t == "error":
            log.error("sidecar %s: %s", name, msg.get("error"))


class WorkerSidecars:
    """What one Supervisor sees as its sidecars (runner's sidecar_factory seam)."""

    def __init__(self, shared: SharedSidecars, sup: Supervisor):
        self.shared, self.sup = shared, sup

    def start(self) -> None:
        self.shared.watch(self.sup.paths.uuid, self.sup.paths.data_dir(self.sup.worker_cfg) / "local_scripts")

    def stop(self) -> None:
        self.shared.unwatch(self.sup.paths.uuid)

    def status(self) -> list[dict[str, Any]]:
        return self.shared.status()

    def on_worker_ready(self) -> None:
        if self.shared.monitor_addr:
            self.sup.deliver(self.shared.monitor_addr)
# endregion


class Entry:
    """One worker the host knows of."""

    def __init__(self, paths: WorkerPaths):
        self.paths = paths
        self.sup: Supervisor | None = None
        self.task: asyncio.Task | None = None
        self.signature: str | None = None
        self.mode = "never"
        self.exit_code: int | None = None
        self.held: bool = False        # the host is stopping it (not a deliberate stop of its own)
        self.blocked: str | None = None  # FATAL / env failure / supervised elsewhere: wait for a change
        self.started = 0               # supervisor runs started by this host (metrics)
        self.stamp: tuple | None = None  # the config file's (mtime, size, inode) at the last scan

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class Fleet:
    """`fn-supervise host`: every worker of one base folder under one process, one Supervisor each
    (was HostSupervisor: "host" is the address a worker binds)."""

    def __init__(self, base: Path, *, no_venv: bool = False, poll: float = 1.0, metrics_port: int | None = None,
                 sidecars: bool = True, monitor_port: int = 0, manager_argv: list[str] | None = None,
                 metrics_bind: str = "127.0.0.1", fork_server: bool = True):
        self.base = Path(base).resolve()
        self.no_venv = no_venv
        self.poll = max(0.05, float(poll))
        self.metrics_port = metrics_port
        self.metrics_bind = metrics_bind
        self.fork_server = fork_server
        self.launchers = LauncherPool(fork=fork_server)  # one warm fork server per environment, shared
        self.metrics_addr: tuple[str, int] | None = None
        self.entries: dict[str, Entry] = {}
        self.stopped: set[str] = set()   # stopped by hand (or by themselves) while the host runs
        self.manual: set[str] = set()    # started by hand although autostart is never
        self.lock = SupervisorLock(self.base / LOCK_NAME)
        self.reaper = SharedGroupReaper()
        self.shared = SharedSidecars(self, discovery=sidecars, monitor=sidecars, monitor_port=monitor_port)
        self.notify = Notifier()
        self.children: dict[tuple[str, str], subprocess.Popen] = {}  # starts for other base folders
        self.started_wall = time.time()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._metrics_server = None
        self.metrics = None  # hostmetrics.HostMetrics with --metrics-port
        self._last_state: dict[str, Any] | None = None
        # --workermanager: the real FuncNodes Workermanager as our child, its worker starts sent
        # to the shared monitor (managerhost.py's hook A), so they land here, in-process
        self.manager_argv = manager_argv
        self.manager: subprocess.Popen | None = None
        self.exit_code = EXIT_OK

    # region lookup
    def supervisors(self) -> list[Supervisor]:
        return [e.sup for e in self.entries.values() if e.sup is not None and e.running]

    def supervisor_of(self, uuid: str) -> Supervisor | None:
        e = self.entries.get(uuid)
        return e.sup if e is not None and e.running else None

    def _find(self, wid: str) -> Entry | None:
        from .files import parse_worker_id

        try:
            uuid = parse_worker_id(wid)
        except ValueError:
            uuid = None
        if uuid is not None:
            if uuid in self.entries:
                return self.entries[uuid]
            p = WorkerPaths(self.base, uuid)
            if p.config.exists():
                return self.entries.setdefault(uuid, Entry(p))
        for p in list_workers(self.base):
            if p.read_config_or_empty().get("name") == wid:
                return self.entries.setdefault(p.uuid, Entry(p))
        return None
    # endregion

    # region persisted bits
    def _state_file(self) -> Path:
        return self.base / STATE_NAME

    def _load_stopped(self) -> None:
        try:
            data = json.loads(self._state_file().read_text())
        except (OSError, ValueError):
            return
        for uuid in data.get("stopped") or []:
            cfg = WorkerPaths(self.base, str(uuid)).read_config_or_empty()
            if autostart_mode(cfg.get("autostart")) == "unless-stopped":
                self.stopped.add(str(uuid))  # `always` starts again with the host (stock meaning)

    def write_state(self) -> None:
        from worker.fsutil import atomic_write_json

        data = {"pid": os.getpid(), "identity": process_identity(os.getpid()), "started": self.started_wall,
                "socket": str(socket_path(self.base)), "stopped": sorted(self.stopped),
                "metrics": ({"host": self.metrics_addr[0], "port": self.metrics_addr[1]}
                            if self.metrics_addr else None),
                "workers": sorted(u for u, e in self.entries.items() if e.running)}
        if data == self._last_state:
            return  # the scan runs every second: write (and fsync) only what changed
        self._last_state = data
        try:
            atomic_write_json(self._state_file(), data)
        except OSError as e:
            log.warning("cannot write %s: %s", self._state_file(), e)
    # endregion

    # region worker lifecycle
    def _start(self, e: Entry) -> None:
        if e.running:
            return
        sup = Supervisor(e.paths, no_venv=self.no_venv, install_signals=False,
                         sidecar_factory=lambda s: WorkerSidecars(self.shared, s),
                         reaper=self.reaper.slot(e.paths.uuid), launcher=self.launchers.launcher(),
                         observers=[self.metrics] if self.metrics is not None else [])
        e.sup, e.exit_code, e.held, e.blocked = sup, None, False, None
        e.started += 1
        e.task = asyncio.ensure_future(self._supervise(e, sup))
        log.info("host: supervising %s", e.paths.name)

    async def _supervise(self, e: Entry, sup: Supervisor) -> None:
        try:
            code = await sup.run()
        except AlreadyRunning:
            e.blocked = "supervised by another fn-supervise"
            log.warning("host: %s is supervised by another fn-supervise; leaving it", e.paths.name)
            return
        except Exception:  # noqa: BLE001 (one worker's failure never ends the host)
            log.exception("host: supervisor of %s failed", e.paths.name)
            code = 1
        e.exit_code = code
        if code == EXIT_OK and not e.held:
            # it stopped itself (stop_worker from a client): it stays stopped, like a CLI stop
            self.stopped.add(e.paths.uuid)
        elif code != EXIT_OK:
            e.blocked = f"exit {code}" + (" (FATAL)" if code == EXIT_FATAL else "")
            log.error("host: %s ended with %s; not restarted until its config changes or a restart",
                      e.paths.name, e.blocked)
        self.write_state()

    async def _stop(self, e: Entry, timeout: float | None = None) -> bool:
        if not e.running or e.sup is None:
            return True
        e.held = True
        e.sup.request_stop()
        if timeout is None:
            timeout = e.sup.cfg.stop_deadline() + 5.0
        done, _ = await asyncio.wait({e.task}, timeout=timeout)
        if not done:  # its finally kills the worker
            log.error("host: %s did not stop within %gs: cancelling", e.paths.name, timeout)
            e.task.cancel()
            await asyncio.wait({e.task}, timeout=10.0)
        return True

    def spawn_request(self, uuid: str, args: list[str] | None) -> dict[str, Any]:
        """A FuncNodes worker start that reached the shared monitor (the Workermanager)."""
        from worker.config import ConfigError, parse_worker_name

        from .sidecarset import request_base, start_supervised

        try:
            uuid = parse_worker_name(uuid)
        except ConfigError as err:
            return {"pid": None, "error": str(err)}
        base = request_base(args) or self.base
        if base != self.base:
            return start_supervised(base, uuid, self.children)
        e = self._find(uuid)
        if e is None:
            return {"pid": None, "error": f"no worker config for worker_{uuid} in {self.base}"}
        self.stopped.discard(uuid)
        self.manual.add(uuid)
        self._start(e)
        w = e.sup.worker if e.sup is not None else None
        return {"pid": w.pid if (w is not None and w.alive) else os.getpid(), "error": None}

    async def scan(self) -> None:
        present = set()
        for paths in list_workers(self.base):
            present.add(paths.uuid)
            e = self.entries.setdefault(paths.uuid, Entry(paths))
            try:
                st = paths.config.stat()
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                continue
            idle = e.running or e.blocked or paths.uuid in self.stopped or not (
                e.mode in AUTOSTART or paths.uuid in self.manual)
            if stamp == e.stamp and idle:
                continue  # unchanged since the last scan and nothing to do: not even parsed
            try:
                cfg = paths.read_config()
            except (OSError, ValueError):
                continue  # half-written or broken: looked at again next scan, nothing lost
            e.stamp = stamp
            mode = autostart_mode(cfg.get("autostart"))
            sig = config_signature(cfg)
            changed = e.signature is not None and sig != e.signature
            mode_changed = mode != e.mode
            e.mode = mode
            e.signature = sig
            if (changed or mode_changed) and e.blocked:
                e.blocked = None  # a FATAL worker gets another go after its config changed
            want = (mode in AUTOSTART or paths.uuid in self.manual) and paths.uuid not in self.stopped
            if want and not e.running and not e.blocked:
                self._start(e)
            elif e.running and not want and mode_changed:
                asyncio.ensure_future(self._stop(e))  # autostart turned to never
            elif e.running and changed and e.sup is not None:
                e.sup.request_restart()  # restart with the re-read config
        for uuid in list(self.entries):
            if uuid not in present:
                e = self.entries.pop(uuid)
                self.manual.discard(uuid)
                if e.running:
                    log.info("host: %s was removed: stopping it", e.paths.name)
                    await self._stop(e)
        self.write_state()

    async def _scan_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.scan()
            except Exception:  # noqa: BLE001
                log.exception("host: scan failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
    # endregion

    # region the Workermanager (--workermanager)
    def start_manager(self, host: Any, port: Any) -> None:
        if not self.manager_argv or self.manager is not None or self._stopping.is_set():
            return
        from .sidecarset import _die_with_parent

        env = dict(os.environ)
        env.update({"SUBPROCESS_MONITOR_HOST": str(host), "SUBPROCESS_MONITOR_PORT": str(port),
                    "SUBPROCESS_MONITOR_PID": str(os.getpid()), "FUNCNODES_CONFIG_DIR": str(self.base)})
        self.manager = subprocess.Popen(self.manager_argv, env=env, stdin=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)
        log.info("host: workermanager pid %d (%s)", self.manager.pid, " ".join(self.manager_argv))
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self.manager.wait)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._manager_exited))

    def _manager_exited(self) -> None:
        code = self.manager.returncode if self.manager is not None else None
        if self._stopping.is_set():
            return
        # as `fn-supervise workermanager`: the manager ending (its `stop`, a crash) ends the pair
        log.info("host: workermanager exited with %s: stopping", code)
        self.exit_code = EXIT_OK if code == 0 else 1
        self._stopping.set()
        self._wake.set()
    # endregion

    # region control socket (supervisor/hostctl.py is the client)
    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
                reply = await self.handle(req)
            except ValueError as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            writer.write((json.dumps(reply, default=str) + "\n").encode())
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "base": str(self.base)}
        if op == "rescan":
            await self.scan()
            return {"ok": True}
        if op == "list":
            rows = []
            for p in list_workers(self.base):
                s = live_status(p)
                e = self.entries.get(p.uuid)
                rows.append({"id": p.name, "name": s.get("name"), "state": s.get("state"),
                             "port": s.get("port"), "pid": (s.get("worker") or {}).get("pid"),
                             "hosted": bool(e and e.running), "autostart": e.mode if e else None})
            return {"ok": True, "workers": rows}
        e = self._find(str(req.get("worker") or ""))
        if e is None:
            return {"ok": False, "error": f"unknown worker {req.get('worker')!r} in {self.base / 'workers'}",
                    "code": 2}
        uuid = e.paths.uuid
        if not e.running and op in ("status", "stop", "restart"):
            from .files import lock_held

            if lock_held(e.paths.lock):  # a per-worker `fn-supervise run` has it: the CLI asks that one
                return {"ok": False, "elsewhere": True, "error": f"{e.paths.name} is supervised outside the host"}
        if op == "status":
            s = live_status(e.paths)
            s.update({"hosted": e.running, "host_pid": os.getpid(), "blocked": e.blocked,
                      "stopped_by_hand": uuid in self.stopped})
            return {"ok": True, "status": s}
        if op == "stop":
            self.stopped.add(uuid)
            was = e.running
            if was:
                await self._stop(e, req.get("timeout"))
            self.write_state()
            return {"ok": True, "was_running": was}
        if op in ("start", "restart"):
            self.stopped.discard(uuid)
            if e.paths.read_config_or_empty().get("autostart") not in AUTOSTART:
                self.manual.add(uuid)
            e.blocked = None
            if op == "restart" and e.running and e.sup is not None:
                e.sup.policy.reset()
                e.sup.request_restart()
                return {"ok": True, "restarted": True}
            self._start(e)
            self.write_state()
            return {"ok": True, "started": True}
        return {"ok": False, "error": f"unknown op {op!r}", "code": 2}

    async def _open_socket(self) -> None:
        path = socket_path(self.base)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # we hold the host lock: any socket file here is a dead host's
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve_client, path=str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
    # endregion

    # region run
    def _reap(self) -> None:
        for sup in self.supervisors():
            sup.reap()

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            self._wake.set()
        else:
            log.info("host: %s received: stopping every worker", signal.Signals(sig).name)
            self._stopping.set()
            self._wake.set()

    async def run(self) -> int:
        self.base.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # AlreadyRunning: one host per base folder
        # Only the host talks to systemd; the Supervisors inside find NOTIFY_SOCKET scrubbed.
        self.notify = Notifier.from_environ()
        # A socket systemd passed is one port; which worker would it be? None: each worker binds
        # its own (the first Supervisor would otherwise take fd 3 as its listening socket).
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)
        loop = asyncio.get_running_loop()
        try:
            from .process import set_child_subreaper

            set_child_subreaper()
            self.reaper.start()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self._on_signal, sig)
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
            self._load_stopped()
            self.shared.start()
            await self._open_socket()
            if self.metrics_port is not None:
                from .hostmetrics import serve

                self.metrics, self._metrics_server, self.metrics_addr = serve(self, self.metrics_port,
                                                                             self.metrics_bind)
            await self.scan()
            self.notify.ready(f"host: {len(self.supervisors())} workers")
            log.info("host: %s, control socket %s%s", self.base, socket_path(self.base),
                     f", metrics http://{self.metrics_addr[0]}:{self.metrics_addr[1]}/metrics"
                     if self.metrics_addr else "")
            scanner = asyncio.ensure_future(self._scan_loop())
            await self._stopping.wait()
            scanner.cancel()
            await asyncio.gather(scanner, return_exceptions=True)
            self.notify.stopping("stopping every worker")
            return self.exit_code
        finally:
            await self._shutdown(loop)

    async def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        """The manager first (no worker start may arrive meanwhile), then every worker, then the
        shared parts; the lock last."""
        if self.manager is not None and self.manager.poll() is None:
            self.manager.terminate()  # it stops first: no worker start may arrive meanwhile
            try:
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self.manager.wait), 15)
            except asyncio.TimeoutError:
                self.manager.kill()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(OSError):
            socket_path(self.base).unlink()
        await asyncio.gather(*(self._stop(e) for e in list(self.entries.values()) if e.running),
                             return_exceptions=True)
        from .sidecarset import stop_all

        await stop_all(list(self.children.values()), [], 15.0)
        await self.shared.stop()
        self.launchers.close()
        self.reaper.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        self.write_state()
        self.notify.close()
        self.lock.release()
    # endregion


def run_host(base: Path, **kw: Any) -> int:
    try:
        return asyncio.run(Fleet(base, **kw).run())
    except AlreadyRunning:
        print(f"fn-supervise: a host already runs for {base} (lock {Path(base) / LOCK_NAME})", file=sys.stderr)
        return EXIT_RUNNING
