"""The worker process: wiring and lifecycle, NodeSpace events, and the supervisor channel.

Start: config -> listen (pings and `uuid` answered from here on) -> import funcnodes-core ->
packages -> nodespace.json + journal replay -> ready (commands run). Nothing sleeps on a fixed
timer: execution is event-driven; every edit reaches the disk through the Store (store.py)
before its reply leaves.

The runtime is the only module that knows the others; it wires them with callables:
server (transport) -> runtime.execute -> commands (verbs) -> graph / store.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

from . import codec, control, separate, wakeup
from .config import ConfigError, WorkerPaths, base_dir, load_config
from .fsutil import atomic_write, pid_alive, read_pid
from .health import HEALTH
from .server import WorkerServer

log = logging.getLogger("fn_supervise.worker")

# Events the stock worker never forwards (spec 1.8); after_set_value goes out as a binary frame.
SUPPRESSED = {
    "before_set_value", "before_request_trigger", "after_request_trigger", "before_disconnect",
    "before_connect", "before_trigger", "after_trigger", "before_unforward", "before_forward",
}
MUTATING = {
    "node_added", "node_removed", "after_connect", "after_disconnect", "after_forward",
    "after_unforward", "after_update_value_options",
}

EXIT_OK = 0
EXIT_CONFIG = 3
# Binary values in one frame by default, as the stock worker: the React UI's reassembly of
# chunk=i/n frames (n > 1) keeps each frame's header in the data, so it would corrupt them.
# 262144 keeps other clients' replies flowing (benchmarks/bench_binary_stream.py) for clients
# that reassemble correctly.
BINARY_CHUNK = 0


class WorkerRuntime:
    def __init__(self, uuid: str, base: Path | None = None, host: str | None = None,
                 port: int | None = None, control_fd: int | None = None, debug: bool = False,
                 quarantined: dict[str, str] | None = None):
        self.uuid = uuid
        self.quarantined = dict(quarantined or {})  # --quarantine: safe mode's nodes (quarantine.py)
        self.safe: Any = None  # quarantine.SafeMode, built with the graph
        self.base = base_dir(base)
        self.config = load_config(self.base, uuid)
        if debug:
            self.config["debug"] = True
        _set_log_level(self.config)
        self.paths = WorkerPaths.make(self.base, uuid, self.config.get("data_path"))
        self.host = host or self.config.get("host") or "127.0.0.1"
        self.port = port if port is not None else self.config.get("port")
        self.control_fd = control_fd
        self.supervised = control_fd is not None
        self.graph: Any = None  # graph.Graph, built by _load_core once the server listens
        self.store: Any = None  # store.Store
        self.commands: Any = None
        self.local: Any = None  # localworkers.LocalScripts
        self.progress_state = {"message": "", "status": "", "progress": 0, "blocking": False}
        self._ns_events = 0  # graph events seen (Store.activity)
        self.server = WorkerServer(self)
        from .metrics import WorkerMetrics  # GET /metrics (worker/metrics.py)

        self.metrics = WorkerMetrics(self)
        self.ready = False
        self.runstate = "undefined"
        self.saving_enabled = False
        self.stop_event: asyncio.Event | None = None
        self.stop_reason = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweep_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self.last_heartbeat_cmd = time.monotonic()
        self.install_waiters: dict[str, asyncio.Future] = {}
        self.channel: control.ControlChannel | None = None
        self._early_control: list[dict] = []  # frames that need the graph, held until ready

    # region lifecycle
    def set_runstate(self, state: str, detail: str = "") -> None:
        self.runstate = state
        if self.channel is not None:
            self.channel.send({"type": "runstate", "state": state, "detail": detail})
        elif not self.supervised:
            atomic_write(self.paths.runstate, state + (f"\n{detail}" if detail else ""))

    def _claim_pidfile(self) -> None:
        pid = read_pid(self.paths.pidfile)
        if pid and pid != os.getpid() and pid_alive(pid) and _is_our_worker(pid, self.uuid):
            raise ConfigError(f"worker {self.uuid} is already running as PID {pid}")
        # Anything else there is stale (a dead run, a reused PID): never a reason to refuse.
        atomic_write(self.paths.pidfile, str(os.getpid()))

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        if self.supervised:
            control.set_parent_death_signal()
            self.channel = control.ControlChannel(
                self.control_fd,
                on_message=lambda m: self.loop.call_soon_threadsafe(self._on_control, m),
                on_eof=lambda: self.loop.call_soon_threadsafe(self.request_stop, "supervisor gone"),
            )
            control.CURRENT = self.channel
            HEALTH.on_in_flight = self._in_flight_changed
            self.channel.start()
        else:
            self._claim_pidfile()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop, f"signal {sig}")
        try:
            self.paths.data.mkdir(parents=True, exist_ok=True)
            self.paths.files.mkdir(exist_ok=True)
            self.set_runstate("starting", "Listening")
            await self.listen()
            self.set_runstate("starting", "Loading funcnodes-core")
            self._load_core()
            if self.safe.nodes:
                self.loop.call_soon(self.safe.announce)  # runs once the start yields to the loop
            self.set_runstate("starting", "Loading packages")
            self.graph.load_dependencies(self.config)
            from .localworkers import scan

            scan(self.local)  # the discovery sidecar's listing then finds them loaded
            self.set_runstate("starting", "Loading nodespace")
            self.load_nodespace()
        except ConfigError as e:
            print(f"fn-supervise worker: {e}", file=sys.stderr, flush=True)
            self._cleanup_files()
            return EXIT_CONFIG
        self.saving_enabled = True
        self.store.open(self.loop)
        self.write_config()
        self._sync_pyproject()
        self.ready = True
        self.server.set_core_ready()
        self._apply_early_control()
        self.set_runstate("running")
        if self.channel is not None:
            self.channel.send({"type": "ready", "host": self.server.host, "port": self.server.port, "pid": os.getpid()})
        self._tasks.append(asyncio.ensure_future(self._heartbeat_loop()))
        self._tasks.append(asyncio.ensure_future(self._sweep_loop()))
        self._tasks.append(asyncio.ensure_future(self._required_heartbeat_loop()))
        self.broadcast(codec.workerevent("fullsync"))
        await self.stop_event.wait()
        await self.shutdown()
        return EXIT_OK

    def _load_core(self) -> None:
        # The one lazy import: funcnodes-core takes most of a start, so it loads after listen().
        from . import nodeio
        from .commands import Commands
        from .graph import Graph
        from .localworkers import LocalScripts
        from .quarantine import SafeMode
        from .store import Store

        nodeio.install()  # node construction: the class's IO found once per class, not per node
        wakeup.fine_timer_slack()  # the main loop's timers (pretrigger sleeps) end on time
        # safe mode: quarantined nodes are loaded but never run (worker/quarantine.py)
        self.safe = SafeMode(self.quarantined, broadcast=self.broadcast, to_supervisor=self._to_supervisor,
                             find_node=self._find_node, has_clients=lambda: bool(getattr(self.server, "clients", None)))
        self.graph = Graph(self._on_ns_event, files_dir=str(self.paths.files), admit=self.safe.admit)
        self.store = Store(self.paths, self.config, self.graph.state)
        self.store.state_steps = self.graph.state_steps
        self.store.activity = lambda: self._ns_events
        self.store.on_trouble = self._on_journal_trouble
        self.store.on_restore = lambda: self.broadcast(codec.workerevent("fullsync"))  # an edit undone
        self.metrics.watch_store(self.store)
        self.local = LocalScripts(self.paths, self.config, lambda: self.graph.nodespace, self.broadcast)
        self.commands = Commands(self.graph, self.store, self, self.local)
        self.safe.register(self.commands)

    def _find_node(self, nid: str) -> Any:
        try:
            return self.graph.nodespace.get_node_by_id(nid)
        except Exception:  # noqa: BLE001
            return None

    def _to_supervisor(self, msg: dict) -> None:
        if self.channel is not None:
            self.channel.send(msg)

    def _in_flight_changed(self, nodes: list[str]) -> None:
        """Health's callback: the nodes running now, at once (the newest is the one to blame)."""
        self._to_supervisor({"type": "in_flight", "node": nodes[-1] if nodes else None, "nodes": nodes})

    @property
    def nodespace(self) -> Any:
        return self.graph.nodespace if self.graph is not None else None

    def fast_command(self, cmd: str, kwargs: dict) -> Any:
        """Commands answered on the I/O thread, even before the graph is loaded."""
        if kwargs:
            raise TypeError(f"got unexpected arguments {sorted(kwargs)}")
        if cmd == "uuid":
            return self.uuid
        if cmd == "name":
            return self.config.get("name") or self.uuid
        if cmd == "get_runstate":
            return self.runstate
        if cmd == "heartbeat":
            self.last_heartbeat_cmd = time.monotonic()
            return None
        raise ValueError(f"not a fast command: {cmd}")

    def request_stop(self, reason: str = "") -> None:
        if self.stop_event is not None and not self.stop_event.is_set():
            self.stop_reason = reason
            self.stop_event.set()

    async def shutdown(self) -> None:
        log.info("stopping: %s", self.stop_reason)
        self.set_runstate("stopping", self.stop_reason)
        self.set_progress("Stopping worker", "info", 0.0, False)
        self.broadcast(codec.workerevent("stopping"))
        for t in self._tasks:
            t.cancel()
        if killed := separate.kill_all():  # separate_process children in flight: none outlives the worker
            log.info("stopped the separate processes %s of running nodes", killed)
        if self.saving_enabled:
            try:
                self.store.close()  # nodespace.json then holds everything; the journal is cut
                self.write_config()
            except Exception:
                log.exception("final save failed")
        self.saving_enabled = False
        self.ready = False
        await self.server.close()
        self.set_runstate("stopped")
        self._cleanup_files()
        if self.channel is not None:
            self.channel.close()

    def _cleanup_files(self) -> None:
        if self.supervised:
            return
        for p in (self.paths.pidfile, self.paths.runstate):
            try:
                if p == self.paths.pidfile and read_pid(p) not in (None, os.getpid()):
                    continue  # someone else's now
                p.unlink()
            except FileNotFoundError:
                pass

    async def listen(self) -> None:
        if self.port:
            try:
                await self.server.start(self.host, int(self.port))
            except OSError as e:
                raise ConfigError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
            return
        start = int(os.environ.get("FUNCNODES_WS_WORKER_STARTPORT", 9382))
        end = int(os.environ.get("FUNCNODES_WS_WORKER_ENDPORT", 9582))
        for p in range(start, end + 1):
            try:
                await self.server.start(self.host, p)
                return
            except OSError:
                continue
        raise ConfigError(f"no free port on {self.host} in {start}..{end}")
    # endregion

    # region supervisor channel
    def _on_control(self, msg: dict) -> None:
        t = msg.get("type")
        if t == "stop":
            self.request_stop("supervisor stop")
        elif t == "save":
            if self.saving_enabled:
                self.save()
        elif t == "install_progress":
            self.set_progress(msg.get("message", ""), "info", float(msg.get("progress") or 0), True)
        elif t == "install_result":
            fut = self.install_waiters.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif t == "local_scripts":
            if not self.ready:  # the discovery sidecar's first listing can beat the graph
                self._early_control.append(msg)
                return
            self.commands.on_local_scripts(msg.get("changes") or [], bool(msg.get("initial")))
        elif t == "memory":  # the supervisor's memory_max watch (supervisor/memory.py)
            self.metrics.memory(msg)
            if msg.get("level") == "warn":
                self.broadcast(codec.workerevent("memory_warning", rss=msg.get("rss"), limit=msg.get("limit")))
        elif t == "quarantine":  # `fn-supervise lift` lifted a node (the supervisor's list now)
            if self.safe is not None:
                self.safe.apply(msg)
        elif t == "monitor":
            self.config["subprocess_monitor"] = {"host": msg.get("host"), "port": msg.get("port")}
            os.environ["SUBPROCESS_MONITOR_HOST"] = str(msg.get("host"))
            os.environ["SUBPROCESS_MONITOR_PORT"] = str(msg.get("port"))
            os.environ["SUBPROCESS_MONITOR_PID"] = str(msg.get("pid"))
            if self.saving_enabled:  # a tool reading worker_<uuid>.json must find this run's monitor
                self.write_config()

    def _on_journal_trouble(self, why: str | None) -> None:
        """The journal stopped (or resumed) taking edits: tell the clients and the supervisor."""
        if self.channel is not None:
            self.channel.send({"type": "journal", **self.journal_health()})
        if why is not None:
            self.set_progress(f"Edits are refused: {why}", "error", 0.0, False)
        else:
            self.set_progress("Edits are accepted again", "info", 1.0, False)

    def _apply_early_control(self) -> None:
        early, self._early_control = self._early_control, []
        for msg in early:
            try:
                self._on_control(msg)
            except Exception:
                log.exception("control frame %s failed", msg.get("type"))

    async def _heartbeat_loop(self) -> None:
        interval = float(self.config.get("heartbeat_interval") or 1.0)
        expected = time.monotonic() + interval
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            HEALTH.lag = max(0.0, now - expected)
            expected = now + interval
            if self.channel is not None:
                self.channel.send(HEALTH.beat())

    async def _required_heartbeat_loop(self) -> None:
        required = self.config.get("required_heartbeat")
        if not required:
            return
        required = float(required)
        self.last_heartbeat_cmd = time.monotonic()  # counted from running, not construction
        second_look = False
        while True:
            left = self.last_heartbeat_cmd + required - time.monotonic()
            if left <= 0 and not second_look:
                # The loop may just have been held by a node: heartbeats that came meanwhile on a
                # connection it serves are read in its next turns, not before this timer.
                second_look = True
                await asyncio.sleep(0.05)
                continue
            second_look = False
            if left <= 0:
                if self.channel is not None:
                    self.channel.send({"type": "stopping", "reason": "required_heartbeat expired"})
                self.request_stop("no heartbeat command within required_heartbeat")
                return
            await asyncio.sleep(min(left, 1.0) + 0.01)

    async def request_install(self, deps: list[dict], timeout: float = 900.0) -> dict:
        rid = uuid4().hex
        fut = self.loop.create_future()
        self.install_waiters[rid] = fut
        if not self.channel.send({"type": "install", "id": rid, "deps": deps}):
            self.install_waiters.pop(rid, None)
            raise RuntimeError("the supervisor channel is closed")
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.install_waiters.pop(rid, None)
    # endregion

    # region events
    def broadcast(self, msg: dict) -> None:
        self.server.post_broadcast(msg)

    def error_text(self, e: BaseException, msg_id: Any) -> str:
        from .errors import clean_traceback

        debug = bool(self.config.get("debug"))
        text = str(e) or type(e).__name__
        if not debug:  # the message itself may name server paths too (OSError, imports)
            for path, alias in ((str(self.paths.data), "<data>"), (str(self.base), "<base>"),
                                (sys.prefix, "<env>"), (sys.base_prefix, "<python>")):
                text = text.replace(path, alias)
        return codec.dumps(codec.error(text, clean_traceback(e, debug), msg_id))

    def dispatch(self, cmd: str, kwargs: dict, msg_id: Any, as_bytes: bool) -> Any:
        """Run a command on this (the main) loop as far as it goes without waiting: return its
        encoded reply (text, or binary frames), or a coroutine that finishes it (an async verb,
        a group fdatasync). Most edits end here, with no Task and no Future."""
        started = time.perf_counter()  # metrics: RPCs by command, latency
        try:
            res = self.commands.call(cmd, kwargs)  # revived by the server where the text held "<NoValue>"
            # Write before reply (Redis flushes its AOF in beforeSleep, before any client write):
            # the result below exists only once the edit's record is in the journal.
            if inspect.iscoroutine(res):
                return self._finish(cmd, res, started, msg_id, as_bytes)
            if not self.store.write_now():  # a group fdatasync follows; store.mine: this edit's records
                return self._finish(cmd, res, started, msg_id, as_bytes, self.store.mine)
            self.metrics.rpc(cmd, started, ok=True)
            return self._encode_result(res, msg_id, as_bytes)
        except Exception as e:
            self.metrics.rpc(cmd, started, ok=False)
            return self.error_text(e, msg_id)

    async def _finish(self, cmd: str, res: Any, started: float, msg_id: Any, as_bytes: bool,
                      mine: int | None = None) -> str | list[bytes]:
        try:
            if inspect.iscoroutine(res):
                res = await res
            await self.store.flush(mine)
            self.metrics.rpc(cmd, started, ok=True)
            return self._encode_result(res, msg_id, as_bytes)
        except Exception as e:
            self.metrics.rpc(cmd, started, ok=False)
            return self.error_text(e, msg_id)

    async def execute(self, cmd: str, kwargs: dict, msg_id: Any, as_bytes: bool) -> str | list[bytes]:
        """dispatch, awaited to the end (the HTTP route for commands)."""
        out = self.dispatch(cmd, kwargs, msg_id, as_bytes)
        return (await out) if inspect.iscoroutine(out) else out

    def _encode_result(self, res: Any, msg_id: Any, as_bytes: bool) -> str | list[bytes]:
        if as_bytes:
            if codec.is_bytes_result(res):
                payload, mime = res.data, res.mime
            else:
                payload, mime = codec.encode_bytes(res, preview=False)
            return codec.binary_frames({"id": msg_id, "mime": mime, "type": "result"}, payload, self.binary_chunk())
        return codec.result_text(res, msg_id)

    def binary_chunk(self) -> int:
        """Frame size of binary values (`binary_chunk_size`; 0, the default: one frame, as stock)."""
        size = self.config.get("binary_chunk_size", BINARY_CHUNK)
        size = int(size) if isinstance(size, int) and size >= 0 else BINARY_CHUNK
        return min(size, self.server.max_data) if size else self.server.max_data

    def set_progress(self, message: str, status: str, progress: float, blocking: bool) -> None:
        self.progress_state = {"message": message, "status": status, "progress": progress, "blocking": blocking}
        self.broadcast(codec.progress(message, status, progress, blocking))

    def _on_ns_event(self, event: str, src: Any = None, **data: Any) -> None:
        self._ns_events += 1  # the graph moved: a quiet snapshot being taken starts over
        self.metrics.ns_event(event)
        if event == "after_set_value":
            self._send_value(data.get("node"), data.get("io"), data.get("result"))
            return
        if event in ("triggerstart", "triggerfast"):
            self._track_trigger(data.get("node"))
        if event in SUPPRESSED:
            return
        if event in MUTATING:
            self.store.touch()  # a no-op for a verb's own events: its record carries them
        if event in ("after_add_shelf", "after_remove_shelf"):
            self.broadcast(codec.workerevent("lib_update"))
        msg = codec.nsevent(event, data)
        if event in ("node_trigger_error", "node_error"):
            err = data.get("error")
            data["error"] = str(err)
            if not self.config.get("debug") and isinstance(err, BaseException):
                from .errors import clean_traceback
                data["tb"] = clean_traceback(err, False)
        self.broadcast(msg)

    def _send_value(self, nid: str | None, ioid: str | None, value: Any) -> None:
        if self.server.clients and nid is not None:
            self.server.post_later(self._value_frames, nid, ioid, value)  # encoded once the run step is over

    def _value_frames(self, nid: str, ioid: str | None, value: Any) -> list[bytes] | None:
        try:
            payload, mime = codec.encode_bytes(value, preview=True)
        except Exception:
            log.exception("cannot encode value of %s/%s", nid, ioid)
            return None
        return codec.binary_frames(
            {"node": nid, "io": ioid, "mime": mime, "type": "io_value", "preview": 1}, payload, self.binary_chunk(),
            repeats=True,
        )

    def _track_trigger(self, nid: str | None) -> None:
        """Event-driven execution: when a run ends, start what was requested meanwhile."""
        try:
            node = self.nodespace.get_node_by_id(nid)
        except Exception:
            return
        task = getattr(node, "_trigger_task", None)
        if task is None or nid in HEALTH.in_flight:
            return
        HEALTH.started(nid)

        def done(_t, node=node, nid=nid):
            HEALTH.ended(nid)
            if self.store is not None:
                self.store.ran()
            # Only this node's readiness changed (a node's readiness is its own inputs and its
            # own run); a trigger requested while it ran starts now.
            self.loop.call_soon(self._trigger_if_requested, node)

        task.add_done_callback(done)

    def _trigger_if_requested(self, node) -> None:
        try:
            node.trigger_if_requested()
        except Exception:
            log.exception("trigger of %s failed", node.uuid)

    def trigger_requested(self) -> None:
        for node in self.nodespace.nodes:
            try:
                node.trigger_if_requested()
            except Exception:
                log.exception("trigger of %s failed", node.uuid)

    async def _sweep_loop(self) -> None:
        # A safety net only; runs are started by events above, not by this tick.
        delay = max(0.05, float(self.config.get("nodespace_delay") or 0.5))
        while True:
            await asyncio.sleep(delay)
            self.trigger_requested()
    # endregion

    # region persistence (the Store does the work; these keep the runtime's view of it)
    def save(self) -> dict:
        state = self.store.snapshot()
        self.write_config()
        return state

    def write_config(self) -> dict:
        if self.server.port:
            self.config["host"], self.config["port"] = self.server.host, self.server.port
        self.config["pid"] = os.getpid()
        return self.store.write_config()

    def _sync_pyproject(self) -> None:
        # In step with the config even after a hand edit or `fn-supervise new --dep`.
        from .pyproject import sync

        try:
            sync(self.paths.data, f"worker-{self.uuid}", self.config.get("package_dependencies") or {})
        except OSError as e:
            log.error("cannot write %s/pyproject.toml: %s", self.paths.data, e)

    def load_nodespace(self) -> None:
        """nodespace.json, then the journal after it. Bad files are kept aside, never fatal."""
        from . import nodeio
        from .effects import OPS

        with nodeio.quiet_load():  # no node_added per node: `fullsync` follows the load
            self.store.load(self.graph.apply_state, self.graph.apply_record, OPS)
    # endregion

    # region server backend (server.Backend): what the transport may ask of the graph
    def fast(self, cmd: str, kwargs: dict) -> Any:
        return self.fast_command(cmd, kwargs)

    def nodes_running(self) -> bool:
        return bool(HEALTH.in_flight)

    async def io_value(self, nid: str, ioid: str) -> tuple[bytes, str]:
        io = self.nodespace.get_node_by_id(nid).get_input_or_output(ioid)
        return codec.encode_bytes(io.value, preview=False)

    def journal_health(self) -> dict:
        store = self.store
        why = getattr(store, "trouble", None)
        return {"writable": why is None, "reason": why, "since": getattr(store, "trouble_since", None)}

    def files_changed(self) -> None:
        if self.graph is not None:
            self.graph.pin_files_dir()  # set from the first load on; kept here for a graph swapped in
    # endregion


def _set_log_level(config: dict) -> None:
    """`supervisor.log_level` of the config: what this worker writes to its log (INFO by default)."""
    sup = config.get("supervisor")
    level = str((sup.get("log_level") if isinstance(sup, dict) else None) or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        log.warning("unknown log_level %r (expected DEBUG, INFO, WARNING or ERROR); using INFO", level)
        level = "INFO"
    logging.getLogger().setLevel(level)


def _is_our_worker(pid: int, uuid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return False
    return any(uuid.encode() in part for part in cmd)
