"""Subprocess-monitor sidecar: subprocess_monitor 0.4.0's HTTP/WebSocket API on loopback.

Endpoints (same paths, payloads and JSON shapes as the stock service, so its client helpers and
FuncNodes code work unchanged):
  GET  /                 -> [pid, ...]  commands spawned here whose process group is alive
  POST /spawn            {"cmd": str, "args": [str], "env": {str: str}}
                         -> {"status": "success", "pid": int} | {"status": "failure", "error": str}
  POST /stop             {"pid": int > 0} -> {"status": "success"} | {"status": "failure", ...}
  GET  /subscribe?pid=N  WebSocket: {"stream": "stdout"|"stderr", "pid": N, "data": line}

HTTP status: the stock service answers failures with 200; the stock helpers never look at the
status, so we answer with the same JSON body and a meaningful status: 400 for malformed
requests and commands that cannot be started, 404 for an unknown pid, 503 when a worker start
cannot be delegated to the supervisor (see below).

Differences from the stock monitor, all in the direction of "nothing leaks":
  * every command runs in its own session/process group (start_new_session) with
    PR_SET_PDEATHSIG=SIGKILL, and stdin from /dev/null;
  * the monitor is a child subreaper: whatever a command forks and orphans is reparented here,
    reaped here, and killed here;
  * a pid stays "owned" (listed, stoppable, subscribable) until its whole process group is gone,
    not only its leader: `sh -c 'server &'` leaves a group that /stop still reaches;
  * stop = SIGTERM to the group, SIGKILL to the group after `kill_timeout` (default 5 s);
  * exited commands are reaped at once (SIGCHLD), not every 2 s;
  * output is read in chunks, split into lines (a line longer than `max_line` bytes is cut into
    pieces), decoded with errors="replace", and queued per subscriber in a bounded queue (oldest
    lines dropped): a flooding child or a slow subscriber cannot stall the server;
  * the monitor reports each process group it owns to the host ({"type": "pgroup", ...}), so if
    the monitor itself is SIGKILLed the supervisor kills the groups it left behind.

Environment of a spawned command: os.environ + request env + SUBPROCESS_MONITOR_HOST/PORT/PID.
SUBPROCESS_MONITOR_PID is the *supervisor's* pid (the monitor's parent), not the monitor's as
in the stock service: stock clients (call_on_manager_death) use it to learn that the process
that owns them has gone. The monitor is a restartable sidecar whose death already kills its
commands; the supervisor is the owner whose death matters, and its pid is also what the
supervisor gives the FuncNodes manager it may run itself (spec 5.1, hook A), so every process
below the supervisor sees one stable value. `owner_pid` overrides it.

Worker starts (hook for the supervisor): a spawn request that is a FuncNodes worker start
(`... funcnodes ... worker ... --uuid U ... start`, in either argument order FuncNodes has
used) is not executed. The monitor sends {"type": "spawn_worker", "uuid": U, "request_id": rid,
"cmd": ..., "args": [...], "env": {...}} to the supervisor and answers the HTTP request with the
supervisor's {"type": "spawn_worker_result", "request_id": rid, "pid": int|None,
"error": str|None}, or with a failure after `worker_spawn_timeout` seconds.

Limits (what is and is not guaranteed):
  * monitor stopped, SIGTERMed, or its pipe closes (the supervisor exited or was SIGKILLed,
    which also delivers PR_SET_PDEATHSIG=SIGTERM to the monitor): every group it spawned and
    every descendant reparented to it get SIGTERM, then SIGKILL after kill_timeout.
  * monitor SIGKILLed: its direct children die of their PDEATHSIG; the host (supervisor) SIGKILLs
    the process groups the monitor reported, which takes grandchildren in those groups.
  * monitor *and* supervisor SIGKILLed together (e.g. kill -9 of the supervisor's process
    group, or the OOM killer taking both): direct children still die (PDEATHSIG), but a
    grandchild is only reached by something outside (systemd's KillMode=control-group).
  * a descendant that leaves its group (setsid/setpgid, i.e. a deliberate daemon) is reached by
    the monitor's own shutdown (it is reparented to the monitor, a subreaper) but not by the
    host's group kill after a SIGKILL of the monitor.

Lazy HTTP: the monitor binds its port and announces it at once, but imports aiohttp (~20 MB
per process) only when the first connection is waiting; until then it is a bound socket and a
pipe. The first client waits in the listen backlog for that import (~0.2 s), then is served.
psutil (~8 MB in a forked sidecar) likewise: only to find and kill descendants at shutdown.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import select
import signal
import socket
import subprocess
from collections import deque
from typing import TYPE_CHECKING, Any

import hmac

if TYPE_CHECKING:
    import psutil

from worker.peers import PeerGate, enabled_by

from ._lifeline import arm_sidecar, set_child_subreaper, set_parent_death_signal

web: Any = None  # aiohttp.web and aiohttp.WSMsgType, imported by _load_http() at the first connection
WSMsgType: Any = None


def _load_http() -> None:
    global web, WSMsgType
    if web is None:
        from aiohttp import WSMsgType as _ws_msg_type  # noqa: PLC0415
        from aiohttp import web as _web  # noqa: PLC0415

        web, WSMsgType = _web, _ws_msg_type


log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024        # bytes; a longer line is delivered in pieces
SUBSCRIBER_QUEUE = 10_000   # lines buffered per subscriber before the oldest are dropped


def worker_start_uuid(cmd: str, args: list[str]) -> str | None:
    """The uuid if (cmd, args) is a FuncNodes worker start command, else None.

    Recognised: `<py> -m funcnodes [opts] worker --uuid U start` (funcnodes >= 1.x, what the
    Workermanager sends), `<py> -m funcnodes worker start --uuid=U` (older), and the
    `funcnodes` console script with the same arguments.
    """
    if "worker" not in args:
        return None
    w = args.index("worker")
    if not ("funcnodes" in args[:w] or os.path.basename(cmd).startswith("funcnodes")):
        return None
    rest = args[w + 1:]
    if "start" not in rest:
        return None
    for i, a in enumerate(rest):
        if a == "--uuid" and i + 1 < len(rest) and rest[i + 1]:
            return rest[i + 1]
        if a.startswith("--uuid=") and len(a) > len("--uuid="):
            return a[len("--uuid="):]
    return None


def _failure(error: str, status: int) -> web.Response:
    return web.json_response({"status": "failure", "error": error}, status=status)


def _validate_spawn(data: Any) -> str | None:
    """Stock-equivalent validation of a spawn request; returns an error or None."""
    if not isinstance(data, dict):
        return f"SpawnProcessRequest must be a dict, got {type(data).__name__}"
    for field in ("cmd", "args", "env"):
        if field not in data:
            return f"SpawnProcessRequest missing required field: {field}"
    if not isinstance(data["cmd"], str):
        return f"SpawnProcessRequest.cmd must be str, got {type(data['cmd']).__name__}"
    if not data["cmd"].strip():
        return "SpawnProcessRequest.cmd cannot be empty"
    if not isinstance(data["args"], list):
        return f"SpawnProcessRequest.args must be list, got {type(data['args']).__name__}"
    for i, a in enumerate(data["args"]):
        if not isinstance(a, str):
            return f"SpawnProcessRequest.args[{i}] must be str, got {type(a).__name__}"
    if not isinstance(data["env"], dict):
        return f"SpawnProcessRequest.env must be dict, got {type(data['env']).__name__}"
    for k, v in data["env"].items():
        if not isinstance(v, str):
            return f"SpawnProcessRequest.env[{k}] must be str, got {type(v).__name__}"
    if any("\0" in s for s in [data["cmd"], *data["args"], *data["env"], *data["env"].values()]):
        return "SpawnProcessRequest contains a NUL character"
    return None


def _pid_param(value: Any) -> int | None:
    # bool is an int in Python; a JSON true is not a pid
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


class _Subscriber:
    __slots__ = ("ws", "queue", "wake", "closing", "dropped")

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws
        self.queue: deque[str] = deque()
        self.wake = asyncio.Event()
        self.closing = False
        self.dropped = 0

    def push(self, frame: str) -> None:
        if len(self.queue) >= SUBSCRIBER_QUEUE:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(frame)
        self.wake.set()

    def close(self) -> None:
        self.closing = True
        self.wake.set()


class _Child:
    """One spawned command: its process group (pgid == pid) and its output streams."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own session and group
        self.returncode: int | None = None
        self.group_alive = True
        self.open_streams = 2
        self.subscribers: set[_Subscriber] = set()
        self.kill_handle: asyncio.TimerHandle | None = None
        self.transports: list[asyncio.BaseTransport] = []

    @property
    def leader_alive(self) -> bool:
        return self.returncode is None


class _LineReader(asyncio.Protocol):
    def __init__(self, monitor: "Monitor", child: _Child, stream: str):
        self.monitor = monitor
        self.child = child
        self.stream = stream
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.child.subscribers:
            # nobody listens: output is dropped (as in the stock monitor); keep only the tail
            # of an unfinished line so the next subscriber starts on a line boundary
            nl = buf.rfind(b"\n")
            if nl >= 0:
                del buf[: nl + 1]
            if len(buf) > MAX_LINE:
                del buf[:]
            return
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            self._emit(bytes(buf[start:nl]))
            start = nl + 1
        del buf[:start]
        while len(buf) >= MAX_LINE:
            self._emit(bytes(buf[:MAX_LINE]))
            del buf[:MAX_LINE]

    def _emit(self, line: bytes) -> None:
        self.monitor.broadcast(self.child, self.stream, line)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buf:
            if self.child.subscribers:
                self._emit(bytes(self.buf))
            self.buf.clear()
        self.child.open_streams -= 1
        self.monitor.maybe_finish(self.child)


class Monitor:
    def __init__(self, conn, host: str = "127.0.0.1", port: int = 0, *,
                 kill_timeout: float = 5.0, owner_pid: int | None = None,
                 worker_spawn_timeout: float = 30.0, delegate_workers: bool = True,
                 token: str | None = None, peer_uid_check: bool | None = None):
        self.conn = conn
        self.host = host
        self.port = port
        self.kill_timeout = kill_timeout
        self.owner_pid = owner_pid if owner_pid is not None else os.getppid()
        self.worker_spawn_timeout = worker_spawn_timeout
        self.delegate_workers = delegate_workers
        self.children: dict[int, _Child] = {}  # by pid (== pgid), while the group lives
        self.pending: dict[str, asyncio.Future] = {}
        self._rid = itertools.count(1)
        self.shutting_down = False
        self.done = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.sock: socket.socket | None = None  # bound and listening; aiohttp serves it from the first connection
        # Set once run() has bound (or failed to) and, from the first connection, while the HTTP
        # server is not starting: a stop waits for it, so the runner is never cleaned up under a
        # site that is still starting.
        self.bound = asyncio.Event()
        # /spawn runs commands as our user: another local user must not reach it (worker/peers.py)
        self.token = token or os.environ.get("FN_SUPERVISE_TOKEN") or None
        self.peers = PeerGate(enabled_by(peer_uid_check), what="subprocess monitor")

    # -- pipe to the supervisor -------------------------------------------------------------

    def send(self, msg: dict) -> None:
        if self.conn is None:
            return
        try:
            self.conn.send(msg)
        except (OSError, EOFError, ValueError):
            self.request_shutdown("pipe to the supervisor broken")

    def _on_conn(self) -> None:
        try:
            while self.conn is not None and self.conn.poll(0):
                msg = self.conn.recv()
                if not isinstance(msg, dict):
                    continue
                if msg.get("type") == "stop":
                    self.request_shutdown("stop requested")
                elif msg.get("type") == "spawn_worker_result":
                    fut = self.pending.get(msg.get("request_id"))
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except (EOFError, OSError):
            conn, self.conn = self.conn, None
            asyncio.get_running_loop().remove_reader(conn.fileno())
            conn.close()
            self.request_shutdown("supervisor gone (pipe EOF)")

    def request_shutdown(self, why: str) -> None:
        if not self.shutting_down:
            log.info("monitor shutting down: %s", why)
            self.shutting_down = True
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # still idle (wait_first_connection): nothing was spawned, nothing to kill
            loop.create_task(self.shutdown())

    # -- HTTP API ---------------------------------------------------------------------------

    async def peer_middleware(self, request: web.Request, handler):
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.query.get("token", "")
        token_ok = bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())
        verdict = self.peers.check(request.transport, request.path, token_ok)
        if not verdict.allowed:
            return web.Response(status=403, text=verdict.reason + "\n")
        return await handler(request)

    async def index(self, _request: web.Request) -> web.Response:
        return web.json_response(sorted(self.children))

    async def spawn(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except Exception:
            return _failure("Invalid JSON request", 400)
        err = _validate_spawn(data)
        if err:
            return _failure(f"Invalid request: {err}", 400)
        if self.shutting_down:
            return _failure("subprocess monitor is shutting down", 503)
        cmd, args, env = data["cmd"], data["args"], data["env"]
        uuid = worker_start_uuid(cmd, args) if self.delegate_workers else None
        if uuid is not None:
            return await self._delegate_worker(uuid, cmd, args, env)
        try:
            child = self._start(cmd, args, env)
        except OSError as exc:
            return _failure(str(exc), 400)
        except (ValueError, subprocess.SubprocessError) as exc:
            return _failure(f"could not start {cmd!r}: {exc}", 400)
        return web.json_response({"status": "success", "pid": child.pid})

    async def stop(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except Exception:
            return _failure("Invalid JSON request", 400)
        if not isinstance(data, dict) or "pid" not in data:
            return _failure("Invalid request: StopProcessRequest missing required field: pid",
                            400)
        pid = _pid_param(data["pid"])
        if pid is None:
            return _failure(f"Invalid request: StopProcessRequest.pid must be a positive int, "
                            f"got {data['pid']!r}", 400)
        child = self.children.get(pid)
        if child is None:
            return _failure("PID not found", 404)
        self.stop_child(child)
        return web.json_response({"status": "success"})

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        raw = request.query.get("pid", "")
        try:
            pid = _pid_param(int(raw))
        except ValueError:
            pid = None
        if pid is None:
            return web.Response(status=400, text=f"Invalid 'pid' parameter: {raw!r}")
        child = self.children.get(pid)
        if child is None or self.shutting_down:
            return web.Response(status=400, text="PID not found in managed processes.")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sub = _Subscriber(ws)
        child.subscribers.add(sub)
        if child.open_streams == 0 and not child.leader_alive:
            sub.close()
        pump = asyncio.get_running_loop().create_task(self._pump(sub))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            child.subscribers.discard(sub)
            if not pump.done():
                pump.cancel()
        return ws

    async def _pump(self, sub: _Subscriber) -> None:
        try:
            while True:
                while sub.queue:
                    await sub.ws.send_str(sub.queue.popleft())
                if sub.closing:
                    break
                sub.wake.clear()
                await sub.wake.wait()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            if not sub.ws.closed:
                try:
                    await sub.ws.close()
                except Exception:
                    pass

    async def _delegate_worker(self, uuid: str, cmd: str, args: list, env: dict) -> web.Response:
        rid = f"{os.getpid()}-{next(self._rid)}"
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            self.send({"type": "spawn_worker", "uuid": uuid, "request_id": rid,
                       "cmd": cmd, "args": list(args), "env": dict(env)})
            try:
                res = await asyncio.wait_for(fut, self.worker_spawn_timeout)
            except asyncio.TimeoutError:
                return _failure(f"worker start for uuid {uuid} was not handled by the "
                                f"supervisor within {self.worker_spawn_timeout:g}s", 503)
        finally:
            self.pending.pop(rid, None)
        pid = _pid_param(res.get("pid"))
        if pid is None:
            error = res.get("error") or "supervisor returned no pid"
            return _failure(f"worker start for uuid {uuid} failed: {error}", 503)
        return web.json_response({"status": "success", "pid": pid})

    # -- children ---------------------------------------------------------------------------

    def _start(self, cmd: str, args: list[str], env: dict[str, str]) -> _Child:
        full_env = {**os.environ, **env,
                    "SUBPROCESS_MONITOR_HOST": self.host,
                    "SUBPROCESS_MONITOR_PORT": str(self.port),
                    "SUBPROCESS_MONITOR_PID": str(self.owner_pid)}
        me = os.getpid()

        def preexec() -> None:  # in the child, after setsid, before exec
            set_parent_death_signal(signal.SIGKILL, expected_parent=me)

        proc = subprocess.Popen([cmd, *args], env=full_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=preexec, close_fds=True)
        child = _Child(proc)
        self.children[child.pid] = child
        self.send({"type": "pgroup", "op": "add", "pgid": child.pgid})
        loop = asyncio.get_running_loop()
        for stream, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            loop.create_task(self._attach(child, stream, pipe))
        log.info("spawned %s %s as pid %d", cmd, args, child.pid)
        self._reap()  # in case it died before we got here
        return child

    async def _attach(self, child: _Child, stream: str, pipe) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: _LineReader(self, child, stream), pipe)
            child.transports.append(transport)
        except Exception:
            log.exception("cannot read %s of pid %d", stream, child.pid)
            pipe.close()
            child.open_streams -= 1
            self.maybe_finish(child)

    def broadcast(self, child: _Child, stream: str, line: bytes) -> None:
        frame = json.dumps({"stream": stream, "pid": child.pid,
                            "data": line.decode("utf-8", "replace").rstrip()})
        for sub in child.subscribers:
            sub.push(frame)

    def stop_child(self, child: _Child) -> None:
        """SIGTERM to the group now, SIGKILL to the group after kill_timeout."""
        self._killpg(child, signal.SIGTERM)
        if child.kill_handle is None:
            child.kill_handle = asyncio.get_running_loop().call_later(
                self.kill_timeout, self._killpg, child, signal.SIGKILL)

    def _killpg(self, child: _Child, sig: int) -> None:
        if not child.group_alive:
            return
        try:
            os.killpg(child.pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # a member changed uid: signal the leader at least
            if child.leader_alive:
                try:
                    os.kill(child.pid, sig)
                except ProcessLookupError:
                    pass

    def _reap(self) -> None:
        """SIGCHLD: reap every dead child (ours and orphans reparented to us)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.get(pid)
            if child is not None and child.leader_alive:
                child.returncode = os.waitstatus_to_exitcode(status)
                child.proc.returncode = child.returncode  # so Popen never waits on a reused pid
                log.info("pid %d exited with %s", pid, child.returncode)
        for child in list(self.children.values()):
            if not child.leader_alive:
                self.maybe_finish(child)

    def maybe_finish(self, child: _Child) -> None:
        if child.leader_alive:
            return
        if child.group_alive:
            try:
                os.killpg(child.pgid, 0)
            except ProcessLookupError:
                child.group_alive = False
            except PermissionError:
                pass
        if child.open_streams <= 0 or not child.group_alive:
            for sub in list(child.subscribers):
                sub.close()
        if not child.group_alive and self.children.get(child.pid) is child:
            del self.children[child.pid]
            if child.kill_handle is not None:
                child.kill_handle.cancel()
            self.send({"type": "pgroup", "op": "remove", "pgid": child.pgid})
            if child.open_streams > 0:  # a member that left the group still holds the pipe
                for t in child.transports:
                    t.close()

    def _descendants(self) -> list[psutil.Process]:
        import psutil  # noqa: PLC0415

        try:
            return psutil.Process().children(recursive=True)
        except psutil.Error:
            return []

    def _all_gone(self) -> bool:
        self._reap()
        if any(c.group_alive for c in self.children.values()):
            return False
        return not [p for p in self._descendants() if _alive(p)]

    async def kill_all(self) -> None:
        """SIGTERM every group and descendant, SIGKILL after kill_timeout; bounded."""
        import psutil  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        for sig, wait in ((signal.SIGTERM, self.kill_timeout), (signal.SIGKILL, 2.0)):
            for child in list(self.children.values()):
                self._killpg(child, sig)
            for p in self._descendants():
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
            deadline = loop.time() + wait
            while loop.time() < deadline:
                if self._all_gone():
                    return
                await asyncio.sleep(0.02)
        log.error("monitor: descendants still alive after SIGKILL")

    async def shutdown(self) -> None:
        self.shutting_down = True
        try:
            await self.kill_all()
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_result({"pid": None, "error": "subprocess monitor shutting down"})
            await self.bound.wait()
            if self.runner is not None:
                await self.runner.cleanup()
            elif self.sock is not None:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
                self.sock.close()
        finally:
            self.done.set()

    # -- main -------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        loop.add_signal_handler(signal.SIGTERM, self.request_shutdown, "SIGTERM")
        if self.conn is not None:
            loop.add_reader(self.conn.fileno(), self._on_conn)
        if self.conn is not None:
            self._on_conn()  # a stop (or EOF) already waiting: handled before we bind
        if self.sock is None:  # not bound by wait_first_connection (run() on its own)
            try:
                if not self.shutting_down:
                    self._bind()
            finally:
                self.bound.set()
            if self.shutting_down:  # a stop came while we bound: never announce an address
                await self.done.wait()
                return
            self._announce()
        else:
            self.bound.set()
        loop.add_reader(self.sock.fileno(), self._first_connection)
        await self.done.wait()

    def _bind(self) -> None:
        self.sock = _listen(self.host, self.port)
        self.port = self.sock.getsockname()[1]  # the real one when port=0

    def _announce(self) -> None:
        self.send({"type": "monitor", "host": self.host, "port": self.port, "pid": os.getpid(),
                   "env_pid": self.owner_pid})
        log.info("subprocess monitor listening on %s:%d", self.host, self.port)

    def wait_first_connection(self) -> bool:
        """Idle without an asyncio loop: bind, announce, then sleep in select() on the pipe and
        the socket. True once a client connects (run() then serves it), False on a stop, EOF or
        SIGTERM first (nothing was spawned yet: nothing to kill). A loop would write its own
        state and many of asyncio's shared pages into this process (~1.5 MB) for a monitor
        that most workers never use."""
        def term(*_a: Any) -> None:
            raise _Stopped

        old = signal.signal(signal.SIGTERM, term)
        try:
            if self._idle_read():
                self._bind()
                self._announce()
                while not self.shutting_down:
                    ready, _w, _x = select.select([c for c in (self.conn, self.sock) if c is not None], [], [])
                    if self.sock in ready:
                        return True
                    self._idle_read()
        except _Stopped:
            self.request_shutdown("SIGTERM")
        finally:
            signal.signal(signal.SIGTERM, old)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        return False

    def _idle_read(self) -> bool:
        """The pipe before any loop: False once a stop or EOF came (no request is pending yet,
        so nothing else needs an answer)."""
        try:
            while self.conn is not None and self.conn.poll(0):
                msg = self.conn.recv()
                if isinstance(msg, dict) and msg.get("type") == "stop":
                    self.request_shutdown("stop requested")
        except (EOFError, OSError):
            self.request_shutdown("supervisor gone (pipe EOF)")
        return not self.shutting_down

    def _first_connection(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        if not self.shutting_down:
            self.bound.clear()
            asyncio.get_running_loop().create_task(self._serve_http())

    async def _serve_http(self) -> None:
        """aiohttp takes over the bound socket; the waiting connection is its first."""
        try:
            _load_http()

            @web.middleware
            async def peer(request: web.Request, handler):
                return await self.peer_middleware(request, handler)

            app = web.Application(middlewares=[peer])
            app.router.add_get("/", self.index)
            app.router.add_post("/spawn", self.spawn)
            app.router.add_post("/stop", self.stop)
            app.router.add_get("/subscribe", self.subscribe)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
            await runner.setup()
            self.runner = runner
            await web.SockSite(runner, self.sock).start()
        except Exception as exc:  # noqa: BLE001 (cannot serve: exit non-zero, the host restarts us)
            log.error("monitor: cannot serve HTTP: %s", exc)
            self.send({"type": "error", "sidecar": "monitor", "error": f"cannot serve HTTP: {exc}"})
            self.request_shutdown("cannot serve HTTP")
        finally:
            self.bound.set()


class _Stopped(Exception):
    """SIGTERM while the monitor idles in select()."""


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket aiohttp's TCPSite would make (SO_REUSEADDR, first address of host)."""
    family, *_rest, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _alive(p: psutil.Process) -> bool:
    import psutil  # noqa: PLC0415

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_monitor(conn, host: str = "127.0.0.1", port: int = 0, *, kill_timeout: float = 5.0,
                owner_pid: int | None = None, worker_spawn_timeout: float = 30.0,
                delegate_workers: bool = True, token: str | None = None,
                peer_uid_check: bool | None = None) -> None:
    """Sidecar entry point (runs in the child process)."""
    arm_sidecar()
    set_child_subreaper()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING,
                            format="monitor[%(process)d] %(levelname)s %(message)s")
    monitor = Monitor(conn, host, port, kill_timeout=kill_timeout, owner_pid=owner_pid,
                      worker_spawn_timeout=worker_spawn_timeout,
                      delegate_workers=delegate_workers, token=token, peer_uid_check=peer_uid_check)
    try:
        if monitor.wait_first_connection():
            asyncio.run(monitor.run())
    except OSError as exc:  # cannot listen: say why, then exit non-zero (the host restarts us)
        try:
            conn.send({"type": "error", "sidecar": "monitor", "error": str(exc)})
        except (OSError, EOFError, ValueError):
            pass
        raise SystemExit(1) from None
    finally:
        try:
            conn.close()
        except OSError:
            pass
