"""The worker's aiohttp server: one port for the WebSocket protocol and the HTTP endpoints.

An I/O thread ("fn-io", its own loop) accepts every connection and hands it to the main loop,
which also runs the NodeSpace and every command, and serves it with no thread hop on the edit
path, as the stock worker does (Redis keeps one command thread too). While the main loop is
loading the graph or has been held by one turn (a node blocking it) for STALL_AFTER, the I/O
thread keeps new connections and serves them for their lifetime, so the Workermanager's `uuid`
probe, pings and `heartbeat` are answered while a node blocks; commands of those connections
reach the main loop through one inbox, their replies and events come back through one outbox,
each woken once per burst at most (worker/wakeup.py). A connection the main loop already serves
is lent to the I/O thread while the loop is held: it answers the same liveness messages on the
raw socket and keeps every other byte for the loop (worker/stallwatch.py; not for TLS).

Security beyond the stock worker: optional bearer token on every request, a WebSocket Origin
check, CORS granted only to loopback origins and an allow-list, bounded upload and message
stores, and error replies that go to the sender only. TLS (worker/tls.py): one ssl_context;
both loops serve with it.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import hmac
import inspect
import ipaddress
import json
import logging
import os
import socket
import struct
import sys
import termios
import threading
import uuid
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import unquote, urlsplit

from aiohttp import WSMsgType, web

from . import codec, stallwatch, wakeup, wsread
from .config import max_data_size, max_message_size
from .fsutil import ConfinedWriter, safe_relative
from .peers import PeerGate, enabled_by
from .tls import server_context


log = logging.getLogger("fn_supervise.worker.server")

LARGE_MESSAGE_TTL = 60.0
LARGE_STORE_MAX_BYTES = 512 << 20
CLIENT_QUEUE_MAX = 10000
CLIENT_CMDS_MAX = 1000
SEND_TIMEOUT = 10.0
STUCK_LOOKS = 4  # a client whose socket takes nothing is looked at this often per SEND_TIMEOUT
CLOSE_TIMEOUT = 2.0  # for the close handshake with a client we drop


class Backend(Protocol):
    """All the transport knows of the worker (STYLE.md section 3): the runtime implements it.
    Everything but `fast` runs on `loop` (the main loop); the server makes that one hop itself."""

    uuid: str
    ready: bool  # /readyz
    loop: asyncio.AbstractEventLoop
    config: Mapping[str, Any]  # cors_origins, auth_token, max_upload_size
    paths: Any  # .data: uploads go to its files/
    metrics: Any  # GET /metrics: .public, .render() -> (body, content type) (worker/metrics.py)

    def fast(self, cmd: str, kwargs: dict) -> Any: ...  # I/O thread: uuid, name, get_runstate, heartbeat

    def nodes_running(self) -> bool: ...  # any thread: node code runs on the main loop now

    # The reply (text, or binary frames), or a coroutine that finishes the command.
    def dispatch(self, cmd: str, kwargs: dict, msg_id: Any, as_bytes: bool) -> Any: ...

    async def execute(self, cmd: str, kwargs: dict, msg_id: Any, as_bytes: bool) -> str | list[bytes]: ...

    async def io_value(self, nid: str, ioid: str) -> tuple[bytes, str]: ...  # full value, mime

    def files_changed(self) -> None: ...  # after an upload

    def journal_health(self) -> dict: ...  # /healthz: can edits be written (a full disk)?


class ProtocolError(Exception):
    """A client message that is not valid protocol; answered with an error reply."""


def is_loopback_origin(origin: str) -> bool:
    try:
        host = urlsplit(origin).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ws_compression(config: Mapping[str, Any]) -> bool:
    """`ws_compression` (default off; env FN_SUPERVISE_WS_COMPRESSION=1 turns it on). Browsers
    offer permessage-deflate and aiohttp accepts it by default: then every frame is deflated on the
    main loop (far more CPU than the edit it carries), frames go through aiohttp's writer instead
    of one send per turn, and the stall watch cannot read them. For a worker on the same machine
    or a LAN, off is faster; on pays off only on a slow link with large graphs."""
    env = os.environ.get("FN_SUPERVISE_WS_COMPRESSION", "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    return config.get("ws_compression") is True


# SIOCOUTQ: a socket's bytes not yet acknowledged by the peer (Linux; elsewhere only our buffer counts).
_OUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform.startswith("linux") else None


class Client:
    """One WebSocket connection with its own outbound queue, so a slow client stalls only itself."""

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None = None,
                 main: bool = False):
        self.ws = ws
        self.main = main  # served by the main loop (else by the I/O thread, for its lifetime)
        self.transport = transport
        self.id = uuid.uuid4().hex
        self.queue: asyncio.Queue = asyncio.Queue(CLIENT_QUEUE_MAX)
        self.in_flight = 0  # commands not yet answered (counted on the client's own loop)
        self.closing = False
        self.sending = False  # the write loop holds an item it has not finished sending
        self.writer: asyncio.Task | None = None
        # Frames go straight to the transport unless the connection deflates (aiohttp's writer
        # keeps the compressor state) or something is queued or being sent before them.
        self.direct = transport is not None and not ws.compress
        # A direct write has no drain to time out: a timer, armed by a direct write and kept
        # while bytes wait (our buffer or the kernel's), looks STUCK_LOOKS times per SEND_TIMEOUT
        # and drops a client whose socket took none of them for SEND_TIMEOUT.
        self.written = 0  # bytes handed to the transport by direct writes
        self._stuck_mark = 0
        self._stuck_since = 0.0  # loop time the socket last took a byte (or the timer was armed)
        self._stuck_timer: asyncio.TimerHandle | None = None
        # Direct frames of one loop turn (a reply and the events around it) are held and written
        # with one send just before the loop polls again (wakeup before_sleep); on a loop
        # without that hook, each is written at once.
        self._turn = wakeup.selector_of(asyncio.get_running_loop()) if self.direct else None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self.watched: stallwatch.WatchedSocket | None = None  # lent to the I/O thread in a stall
        # A main-loop client: the server's deferred events (WorkerServer.send_later) are put
        # ahead of anything else this client gets, so frames keep the order they happened in.
        self.events_first: Callable[[], None] | None = None
        # Moving to the main loop (an I/O-thread connection, once the loop is free): the upgrade
        # request to replay there; the new Client's writes wait (gate) until the old one drained.
        self.request_head: bytes | None = None
        self.migrating = False
        self.gate: asyncio.Event | None = None

    def put(self, item: str | bytes | list[bytes] | None) -> None:
        if self.events_first is not None:
            self.events_first()
        if self.closing:
            return
        if isinstance(item, list) and len(item) == 1:
            item = item[0]  # a binary value in one chunk: one frame like any other
        # A list is the chunks of one binary value: through the queue, so other writes interleave.
        if (item is not None and not isinstance(item, list) and self.direct and not self.sending and self.queue.empty()
                and not self.ws.closed and not self.transport.is_closing()
                and self.transport.get_write_buffer_size() + self._held_bytes <= DIRECT_WRITE_MAX):
            frame = ws_frame(item)
            if self._turn is None:
                self._write(frame)
                return
            if not self._held:
                self._turn.before_sleep.append(self.flush)
            self._held.append(frame)
            self._held_bytes += len(frame)
            return
        self.flush()  # what this turn holds goes first: frames leave in the order they were put
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # A client that cannot keep up is told so and dropped, never silently starved.
            log.warning("client %s too slow, closing", self.id)
            self.drop(1013, b"client too slow")

    def flush(self) -> None:
        """Write the frames held this turn, in one send."""
        if not self._held:
            return
        held, self._held, self._held_bytes = self._held, [], 0
        if self.closing or self.transport.is_closing():
            return
        self._write(held[0] if len(held) == 1 else b"".join(held))

    def _write(self, data: bytes) -> None:
        self.transport.write(data)
        self.written += len(data)
        if self._stuck_timer is None:
            loop = asyncio.get_running_loop()
            self._stuck_mark = self.written - self._unsent()
            self._stuck_since = loop.time()
            self._stuck_timer = loop.call_later(SEND_TIMEOUT / STUCK_LOOKS, self._check_stuck)

    def _unsent(self) -> int:
        """Bytes written but not yet taken by the peer: the transport's buffer plus the kernel's
        send queue (a client that reads nothing can leave our buffer empty and the kernel's full)."""
        waiting = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if _OUTQ is not None and sock is not None:
            try:
                waiting += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass
        return waiting

    def _check_stuck(self) -> None:
        self._stuck_timer = None
        if self.closing or self.transport.is_closing():
            return
        waiting = self._unsent()
        if not waiting:
            return  # all taken: armed again by the next direct write
        loop = asyncio.get_running_loop()
        taken = self.written - waiting  # changes whenever the socket takes bytes
        if taken != self._stuck_mark:
            self._stuck_mark, self._stuck_since = taken, loop.time()
        elif loop.time() - self._stuck_since >= SEND_TIMEOUT:
            log.warning("client %s too slow (read nothing for %.0f s), closing", self.id, SEND_TIMEOUT)
            self.drop(1013, b"client too slow")
            return
        self._stuck_timer = loop.call_later(SEND_TIMEOUT / STUCK_LOOKS, self._check_stuck)

    def drop(self, code: int, message: bytes = b"") -> asyncio.Future | None:
        """Close with code, and let go of the socket even if the client never reads again: the
        queue is emptied at once, the close handshake gets CLOSE_TIMEOUT, then the transport is
        aborted (transport.close() would wait for a buffer the client never drains)."""
        if self.closing:
            return None
        if self.events_first is not None:
            self.events_first()
        self.flush()  # frames put before the drop still go ahead of the close frame
        self.closing = True
        if self._stuck_timer is not None:
            self._stuck_timer.cancel()
            self._stuck_timer = None
        while not self.queue.empty():
            self.queue.get_nowait()
        if self.writer is not None and self.writer is not asyncio.current_task():
            self.writer.cancel()
        return asyncio.ensure_future(self._close(code, message))

    async def _close(self, code: int, message: bytes) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=message)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            if self.transport is not None:
                self.transport.abort()

    async def write_loop(self) -> None:
        while True:
            item = await self.queue.get()
            if self.gate is not None and not self.gate.is_set():
                await self.gate.wait()  # an adopted connection: the old one's frames go first
            if item is None:
                return
            self.sending = True
            try:
                async with asyncio.timeout(SEND_TIMEOUT):  # no Task per message, unlike wait_for
                    if isinstance(item, bytes):
                        await self.ws.send_bytes(item)
                    elif isinstance(item, list):  # the chunks of one binary value: other clients'
                        for frame in item:        # writes run between them (each send awaits drain)
                            await self.ws.send_bytes(frame)
                    else:
                        await self.ws.send_str(item)
            except asyncio.TimeoutError:
                # Not reading for SEND_TIMEOUT: the same verdict as a full queue, said the same way.
                log.warning("client %s too slow (a reply waited %.0f s), closing", self.id, SEND_TIMEOUT)
                closing = self.drop(1013, b"client too slow")
                if closing is not None:
                    await closing
                return
            except (ConnectionError, RuntimeError):
                closing = self.drop(1011)
                if closing is not None:
                    await closing
                return
            finally:
                self.sending = False


# The main loop counts as stalled after a turn this long: new connections stay on the I/O thread.
STALL_AFTER = 0.2
WATCH_EVERY = 0.05  # how often the I/O thread looks for sockets handed over just before a stall
MIGRATE_EVERY = 0.1  # how often the I/O thread looks for its connections the main loop could take


def request_head(request: web.Request) -> bytes:
    """The upgrade request as the client sent it (method, target, headers), to replay it."""
    v = request.version
    lines = [f"{request.method} {request.raw_path} HTTP/{v.major}.{v.minor}".encode("latin-1")]
    lines += [k + b": " + val for k, val in request.raw_headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _SkipHandshake:
    """An adopted connection's socket while aiohttp answers the replayed upgrade: the client had
    its 101 long ago, so that reply is dropped and the plain socket put back; any other status
    (the token or origin no longer allowed) is dropped too and ends the adoption (fail)."""

    __slots__ = ("_sock", "_transport", "_head", "_fail")

    def __init__(self, sock: socket.socket, transport: Any, fail: Callable[[], None]):
        self._sock, self._transport, self._head, self._fail = sock, transport, b"", fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def send(self, data: Any) -> int:
        if self._head is None:  # failed: nothing more reaches the client from here
            return len(data)
        self._head += bytes(data)
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return len(data)
        if not self._head.startswith(b"HTTP/1.1 101"):
            self._head = None
            asyncio.get_running_loop().call_soon(self._fail)
            return len(data)
        rest = self._head[end + 4:]
        self._head = None
        self._transport._sock = self._sock  # from here on the plain socket
        if not rest:
            return len(data)
        try:
            return len(data) - len(rest) + self._sock.send(rest)
        except (BlockingIOError, InterruptedError):
            return len(data) - len(rest)

    def sendmsg(self, buffers: Any, *args: Any) -> int:  # asyncio 3.12+ (writelines)
        return self.send(b"".join(bytes(b) for b in buffers))


class _Adopted(asyncio.Protocol):
    """aiohttp's handler for a connection moved from the I/O thread, for one call: in
    connection_made (before the socket is read) the upgrade request is replayed and reading waits
    until the new Client is in place (handle_ws)."""

    def __init__(self, inner: Any, head: bytes, made: Callable[[Any], None]):
        self.inner, self.head, self.made = inner, head, made

    def connection_made(self, transport: Any) -> None:
        transport.set_protocol(self.inner)
        self.inner.connection_made(transport)
        transport.pause_reading()  # until handle_ws has the new Client (or the adoption failed)
        self.made(transport)
        self.inner.data_received(self.head)


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("a connection accepted on the I/O thread failed: %s", fut.exception())


# Written directly while the transport holds less than this; beyond, the write loop and its
# SEND_TIMEOUT take over (a slow client is still let go, never buffered without end).
DIRECT_WRITE_MAX = 64 << 10


def ws_frame(item: str | bytes) -> bytes:
    """One unmasked, final, uncompressed server frame (RFC 6455 5.2): text for str, binary for bytes."""
    if isinstance(item, str):
        payload, head = item.encode("utf-8"), 0x81
    else:
        payload, head = item, 0x82
    n = len(payload)
    if n < 126:
        return bytes((head, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", head, 126, n) + payload
    return struct.pack("!BBQ", head, 127, n) + payload


# Answered on the I/O thread without touching the NodeSpace, so they work while a node blocks.
FAST_COMMANDS = {"uuid", "name", "get_runstate", "heartbeat"}


class IOThread:
    """A daemon thread running its own asyncio loop."""

    def __init__(self) -> None:
        self.loop = wakeup.new_loop()
        self.thread = threading.Thread(target=self._run, name="fn-io", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def call(self, coro):
        """Await coro on the I/O loop from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(2.0)


class WorkerServer:
    def __init__(self, backend: "Backend"):
        self.backend = backend
        self.io: IOThread | None = None
        self.core_ready: asyncio.Event | None = None  # set once commands can run
        self._outbox: wakeup.Mailbox | None = None  # main loop -> I/O thread: replies, events
        self._inbox: wakeup.Mailbox | None = None  # I/O thread -> main loop: commands
        self._commands_open = False  # main loop: set once the graph is loaded
        self._held: list[tuple] = []  # main loop: commands that came before that
        self._posts: list = []  # main loop: for the I/O thread's clients, sent at the turn's end
        self._later: list[tuple] = []  # main loop: events to encode when it is about to wait (send_later)
        self._busy: dict[Client, collections.deque] = {}  # main loop: a client's commands behind a waiting one
        self.clients: dict[str, Client] = {}
        self.large: dict[str, list] = {}  # msg id -> [text, fetches left, expiry timer]
        self.large_bytes = 0
        self.large_ttl = float(os.environ.get("FN_SUPERVISE_LARGE_MESSAGE_TTL") or LARGE_MESSAGE_TTL)
        self.runner: web.AppRunner | None = None  # the I/O thread's
        self.main_runner: web.AppRunner | None = None
        self.ssl_context: Any = None  # an ssl.SSLContext to serve TLS on both loops
        self._accept_sock: socket.socket | None = None  # the listener; the I/O thread accepts
        self._handoff: wakeup.Mailbox | None = None  # I/O thread -> main loop: accepted sockets
        self._watch_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None  # the I/O thread's stall watch
        self._reclaim_posted = False
        self._migrate_timer: asyncio.TimerHandle | None = None  # the I/O thread's
        self._adopting: dict[Any, Client] = {}  # main loop: new transport -> the I/O-thread Client it replaces
        self.migrated = 0  # connections moved from the I/O thread to the main loop
        self._moves = 0  # the I/O thread's: moves begun and not yet ended (retired or failed)
        self._large_lock = threading.RLock()  # both loops stage and fetch large messages
        self.host = ""
        self.port = 0
        self.max_msg = max_message_size()
        self.max_data = max_data_size()
        self.scheme = "http"
        self.peers = PeerGate(enabled_by(backend.config.get("peer_uid_check")))
        self.ws_compression = ws_compression(backend.config)

    # region setup
    def make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.max_data,
            middlewares=[self.peer_middleware, self.cors_middleware, self.auth_middleware],
        )
        r = app.router
        r.add_get("/", self.handle_ws)
        r.add_get("/healthz", self.handle_healthz)
        r.add_get("/readyz", self.handle_readyz)
        r.add_get("/metrics", self.handle_metrics)
        r.add_get("/message/{msg_id}", self.handle_get_message)
        r.add_post("/message/", self.handle_post_message)
        r.add_post("/message", self.handle_post_message)
        r.add_post("/upload/", self.handle_upload)
        r.add_post("/upload", self.handle_upload)
        r.add_get("/node/{nid}/io/{ioid}/value", self.handle_io_value)
        r.add_route("OPTIONS", "/{tail:.*}", self.handle_options)
        return app

    async def start(self, host: str, port: int | None) -> tuple[str, int]:
        """Bind (or take the supervisor's held socket); the I/O thread answers on it at once, the
        main loop once the graph is loaded (set_core_ready). Runs on the main loop."""
        if self.io is None:
            self.io = IOThread()
            self._outbox = wakeup.Mailbox(self.io.loop, self._on_outgoing)
            self._inbox = wakeup.Mailbox(self.backend.loop, self._on_command)
        self.ssl_context = server_context(self.backend.config)  # TLS (worker/tls.py): wss:// and https://
        self.scheme = "https" if self.ssl_context is not None else "http"
        sock = self._bind(host, port)
        try:
            self.host, self.port = host, sock.getsockname()[1]  # the real port when 0 was asked for
            if self.main_runner is None:
                self.main_runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False,
                                                 shutdown_timeout=1.0)
                await self.main_runner.setup()
                self._handoff = wakeup.Mailbox(self.backend.loop, self._serve_on_main)
                sel = wakeup.selector_of(self.backend.loop)
                if sel is not None:
                    sel.reclaim = self._reclaim
            await self.io.call(self._start_io(sock))
        except BaseException:
            sock.close()
            raise
        return self.host, self.port

    @staticmethod
    def _bind(host: str, port: int | None) -> socket.socket:
        from . import listener  # the supervisor's held socket, if it handed us one

        held = listener.take()
        if held is not None:
            held.setblocking(False)
            return held
        family, _, _, _, addr = socket.getaddrinfo(host or None, port or 0, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _start_io(self, sock: socket.socket) -> None:
        if self.core_ready is None:
            self.core_ready = asyncio.Event()
        self.runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        self._accept_sock = sock
        self.io.loop.add_reader(sock.fileno(), self._accept_on_io)
        self._watch()

    # region the watchdog: which loop serves a new connection
    # The I/O thread accepts every connection and hands it, before a byte is read, to the main
    # loop, which then serves it with no thread hop (stock's shape and speed). While the graph
    # loads, node code runs or the loop is held (_main_takes_new), the I/O thread keeps the
    # connection and serves it for its lifetime:
    # `uuid`, ping and heartbeat at once, commands through the inbox once the loop is free. A
    # connection handed over just before the loop stalled (STALL_AFTER) is taken back while the
    # main loop has not picked it up yet (_watch). A connection the main loop already serves is
    # lent to the I/O thread while the loop is held (_stall_tick below).
    def _main_stalled(self) -> bool:
        busy = wakeup.busy_for(self.backend.loop)
        return not self._commands_open or busy is None or busy > STALL_AFTER

    def _watch(self) -> None:
        # Armed only while a hand-over waits (an idle worker's I/O thread sleeps; a host runs many).
        self._watch_timer = None
        if self._handoff is None or not self._handoff.items:
            return
        if self._main_stalled():
            while True:
                try:
                    conn = self._handoff.items.popleft()  # atomic: the main loop gets it or we do
                except IndexError:
                    break
                self._serve_on_io(conn)
        if self._handoff.items:
            self._arm_watch()

    def _arm_watch(self) -> None:
        if self._watch_timer is None:
            self._watch_timer = self.io.loop.call_later(WATCH_EVERY, self._watch)

    def _accept_on_io(self) -> None:
        for _ in range(64):
            try:
                conn, _addr = self._accept_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: retried on the next readiness
                log.warning("accept failed: %s", e)
                return
            conn.setblocking(False)
            if self._main_takes_new():
                self._handoff.put(conn)
                self._arm_watch()
            else:
                self._serve_on_io(conn)

    def _main_takes_new(self) -> bool:
        """Whether a new connection goes to the main loop: not while it loads the graph or is
        held (STALL_AFTER), and not while node code runs on it, which may hold it for seconds
        (a probe right after a triggerstart must still be answered)."""
        return not self._main_stalled() and not self.backend.nodes_running()

    def _serve_on_io(self, conn: socket.socket) -> None:
        self._serve(self.io.loop, self.runner, conn)

    def _serve_on_main(self, conn: socket.socket) -> None:
        if self.backend.nodes_running():  # started since the hand-over: back, nothing was read
            self.io.loop.call_soon_threadsafe(self._serve_on_io, conn)
            return
        self._serve(self.backend.loop, self.main_runner, conn)

    # A connection the I/O thread serves (it came while the graph loaded, node code ran or the
    # loop was held) moves to the main loop once that loop is free and the connection is at
    # rest: nothing in flight, queued, half read or half written. The I/O thread pauses it and
    # hands a dup of its socket over; the main loop replays the upgrade request into its own
    # aiohttp (the 101 it writes is dropped: _SkipHandshake), then takes the client's place:
    # the old Client leaves after every frame posted for it, the new one writes after that.
    def _arm_migrate(self) -> None:  # the I/O thread
        if self._migrate_timer is None and self.io is not None and self._accept_sock is not None:
            self._migrate_timer = self.io.loop.call_later(MIGRATE_EVERY, self._migrate_tick)

    def _migrate_tick(self) -> None:  # the I/O thread
        self._migrate_timer = None
        mine = [c for c in list(self.clients.values()) if not c.main and c.request_head is not None]
        if not mine:
            return
        if self.main_runner is not None and self._main_takes_new():
            for c in mine:
                if self._at_rest(c):
                    self._begin_migration(c)
        self._arm_migrate()

    def _at_rest(self, c: Client) -> bool:  # the I/O thread
        t = c.transport
        if (c.migrating or c.closing or c.in_flight or c.sending or not c.queue.empty() or c._held
                or t is None or t.is_closing() or t.get_write_buffer_size()
                or type(getattr(t, "_sock", None)) is not socket.socket):
            return False
        tap = self._tap_of(c)
        return tap is not None and tap.idle and not tap._buf and not tap._owed and not tap.held()

    def _begin_migration(self, c: Client) -> None:  # the I/O thread
        c.transport.pause_reading()  # whatever the client sends next waits in the kernel
        try:
            sock = c.transport._sock.dup()
        except OSError:
            c.transport.resume_reading()
            return
        c.migrating = True
        self._moves += 1
        self.backend.loop.call_soon_threadsafe(self._adopt, c, sock)

    def _adopt(self, c: Client, sock: socket.socket) -> None:  # the main loop
        runner = self.main_runner
        if runner is None or c.id not in self.clients:
            sock.close()
            self.io.loop.call_soon_threadsafe(self._migration_failed, c)
            return
        loop = self.backend.loop

        def made(transport: Any) -> None:
            self._adopting[transport] = c
            transport._sock = _SkipHandshake(transport._sock, transport, lambda: fail(transport))

        def fail(transport: Any) -> None:
            self._adopting.pop(transport, None)
            transport.abort()  # the dup only: the connection stays with the old Client
            self.io.loop.call_soon_threadsafe(self._migration_failed, c)

        fut = asyncio.ensure_future(
            loop.connect_accepted_socket(lambda: _Adopted(runner.server(), c.request_head, made), sock), loop=loop)

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None:
                sock.close()
                self.io.loop.call_soon_threadsafe(self._migration_failed, c)

        fut.add_done_callback(done)

    def _migration_failed(self, c: Client) -> None:  # the I/O thread: the old Client serves on
        if not c.migrating:
            return  # told twice (the dup's transport failed after its handshake did)
        self._moves -= 1
        c.migrating = False
        c.request_head = None  # not tried again
        if c.transport is not None and not c.transport.is_closing():
            c.transport.resume_reading()

    def _retire(self, old: Client, new: Client) -> None:  # the I/O thread
        self.clients.pop(old.id, None)
        old.flush()
        deadline = self.io.loop.time() + SEND_TIMEOUT

        def drained() -> None:
            t = old.transport
            if not t.is_closing() and (old.sending or not old.queue.empty() or t.get_write_buffer_size()):
                if self.io.loop.time() < deadline:
                    self.io.loop.call_later(0.002, drained)
                    return
                log.warning("client %s too slow (its frames did not drain while it moved), closing", old.id)
                self.backend.loop.call_soon_threadsafe(new.drop, 1013, b"client too slow")
            old.closing = True
            t.abort()  # closes the old descriptor only: the connection lives on in the new one's
            self._moves -= 1
            self.backend.loop.call_soon_threadsafe(self._release, new)

        drained()

    def _release(self, new: Client) -> None:  # the main loop
        new.direct = not new.ws.compress
        if new.gate is not None:
            new.gate.set()
        if not new.closing:
            self._watch_stall(new)
    # endregion

    # region stall watch
    # The main loop's own connections, while one of its turns runs long (a node blocking it): the
    # I/O thread borrows their plain sockets and answers pings and FAST_COMMANDS on them
    # (worker/stallwatch.py); the main loop takes them back before it reads again (_reclaim, at
    # the start of its next select). Ticks only while such connections exist.
    def _watch_stall(self, client: Client) -> None:
        """On the main loop, for a client it serves: lend its socket during stalls, if plain."""
        transport, tap = client.transport, self._tap_of(client)
        sock = getattr(transport, "_sock", None)
        if (not tap or not stallwatch.enabled() or not client.direct or self.io is None
                or type(sock) is not socket.socket or transport.get_extra_info("sslcontext") is not None
                or wakeup.selector_of(self.backend.loop) is None):
            return  # TLS records or deflated frames cannot be parsed from raw bytes
        client.watched = stallwatch.WatchedSocket(sock, transport, tap, lambda: not client.sending, self.max_msg)
        transport._sock = client.watched
        self.io.loop.call_soon_threadsafe(self._arm_stall_watch)

    @staticmethod
    def _tap_of(client: Client) -> Any:
        parser = getattr(client.transport.get_protocol(), "_payload_parser", None)
        return parser if isinstance(parser, wsread.FrameTap) else None

    def _arm_stall_watch(self, every: float = STALL_AFTER / 2) -> None:  # the I/O thread
        if self._stall_timer is None and self.io is not None and self._accept_sock is not None:
            self._stall_timer = self.io.loop.call_later(every, self._stall_tick)

    def _stall_tick(self) -> None:  # the I/O thread
        self._stall_timer = None
        busy = wakeup.busy_for(self.backend.loop)
        stalled = busy is not None and busy > STALL_AFTER
        watched = lent = False
        for c in list(self.clients.values()):
            w = c.watched
            if w is None or not c.main:
                continue
            watched = True
            if stalled and not c.closing:
                if w.serve(self._liveness_reply):
                    wakeup.selector_of(self.backend.loop).lent = True  # after w.lent: never missed
            if w.lent:
                lent = True
        if lent and not stalled and not self._reclaim_posted:
            # The loop went to sleep with sockets lent (borrowed as its turn ended): wake it.
            self._reclaim_posted = True
            try:
                self.backend.loop.call_soon_threadsafe(self._reclaim)
            except RuntimeError:  # the main loop is closed: the worker is going away
                return
        if watched or lent:
            self._arm_stall_watch(WATCH_EVERY if stalled or lent else STALL_AFTER / 2)

    def _reclaim(self) -> None:  # the main loop, before it reads from any socket
        self._reclaim_posted = False
        for c in list(self.clients.values()):
            if c.watched is not None and c.main:
                c.watched.give_back()

    def _liveness_reply(self, text: str) -> str | None:  # the I/O thread
        """The reply to a ping or a FAST_COMMANDS message, as route gives it; None for any other."""
        try:
            data = codec.parse_message(text)
        except codec.MessageError:
            return None
        if not isinstance(data, dict):
            return None
        if data.get("type") == "ping":
            out = json.dumps({"type": "pong"})
        elif (data.get("type") == "cmd" and data.get("cmd") in FAST_COMMANDS and not data.get("as_bytes")
              and isinstance(data.get("kwargs", {}), (dict, type(None)))):
            out = self._fast_answer(data["cmd"], data.get("kwargs") or {}, data.get("id"))
        else:
            return None
        return out if len(out) * 1.1 <= self.max_msg else None  # a staged reply: the main loop's

    def _fast_answer(self, cmd: str, kwargs: dict, msg_id: Any) -> str:
        try:
            return json.dumps(codec.result(self.backend.fast(cmd, kwargs), msg_id))
        except TypeError as e:
            return json.dumps(codec.error(f"bad arguments for '{cmd}': {e}", [], msg_id))

    def _serve(self, loop: asyncio.AbstractEventLoop, runner: web.AppRunner | None, conn: socket.socket) -> None:
        if runner is None:  # closing
            conn.close()
            return
        fut = asyncio.ensure_future(loop.connect_accepted_socket(runner.server, conn, ssl=self.ssl_context),
                                    loop=loop)
        fut.add_done_callback(_log_failure)
    # endregion

    async def close(self, timeout: float = 2.0) -> None:
        """On the main loop: its connections, then the I/O thread's, each closed by its own loop."""
        if self.io is None:
            return
        try:
            await asyncio.wait_for(self.io.call(self._stop_accepting()), 2.0)
        except (asyncio.TimeoutError, Exception):
            log.warning("server did not stop accepting cleanly")
        try:
            await asyncio.wait_for(self._close(timeout, main=True), timeout + 2.0)
        except (asyncio.TimeoutError, Exception):
            log.warning("server did not close cleanly")
        try:
            await asyncio.wait_for(self.io.call(self._close(timeout, main=False)), timeout + 2.0)
        except (asyncio.TimeoutError, Exception):
            log.warning("server did not close cleanly")
        self.io.stop()
        self.io = None
        for box in (self._inbox, self._outbox, self._handoff):
            if box is not None:
                box.close()
        while self._handoff is not None and self._handoff.items:
            self._handoff.items.popleft().close()

    async def _stop_accepting(self) -> None:
        if self._watch_timer is not None:
            self._watch_timer.cancel()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._accept_sock is not None:
            self.io.loop.remove_reader(self._accept_sock.fileno())
            self._accept_sock.close()
            self._accept_sock = None

    async def _close(self, timeout: float, main: bool) -> None:
        clients = [c for c in list(self.clients.values()) if c.main == main]
        for c in clients:
            c.put(None)
        async def close_one(c: Client):
            if c.writer:
                try:
                    await asyncio.wait_for(c.writer, timeout / 2)
                except (asyncio.TimeoutError, Exception):
                    c.writer.cancel()
            closing = c.drop(1001, b"Server shutting down")
            if closing is not None:
                await closing
        if clients:
            await asyncio.wait([asyncio.ensure_future(close_one(c)) for c in clients], timeout=timeout)
        if main:
            if self.main_runner is not None:
                await self.main_runner.cleanup()
                self.main_runner = None
            return
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
    # endregion

    # region auth and CORS
    def origin_allowed(self, origin: str) -> bool:
        allowed = self.backend.config.get("cors_origins") or []
        return is_loopback_origin(origin) or origin in allowed or "*" in allowed

    def token(self) -> str | None:
        return self.backend.config.get("auth_token") or os.environ.get("FN_SUPERVISE_TOKEN") or None

    def authorized(self, request: web.Request) -> bool:
        token = self.token()
        if not token:
            return True
        given = ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        else:
            given = request.query.get("token", "")
        return hmac.compare_digest(given.encode(), token.encode())

    @web.middleware
    async def cors_middleware(self, request: web.Request, handler):
        origin = request.headers.get("Origin")
        if origin and request.method not in ("GET", "HEAD", "OPTIONS") and not self.origin_allowed(origin):
            # A foreign page may send a "simple" POST without a preflight: refuse it outright,
            # a missing CORS grant alone would still let the command run.
            return web.json_response({"error": f"origin {origin} not allowed"}, status=403)
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            resp = e
        if origin and self.origin_allowed(origin) and not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"
            resp.headers["Access-Control-Allow-Credentials"] = "true"
            resp.headers["Access-Control-Expose-Headers"] = "*"
        if isinstance(resp, web.HTTPException) and not isinstance(resp, web.HTTPSuccessful):
            raise resp
        return resp

    @web.middleware
    async def peer_middleware(self, request: web.Request, handler):
        """Another local user is refused before anything else (WebSocket handshake included)."""
        path = request.path
        if request.method == "OPTIONS" or self.open_route(request):
            path = "/healthz"  # as open to every local user as to every remote one
        verdict = self.peers.check(request.transport, path, bool(self.token()) and self.authorized(request))
        if verdict.gone:  # the client's doing, as in handle_ws: one debug line
            upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
            log.debug("client %s hung up during the %s (%s)", request.remote,
                      "WebSocket handshake" if upgrade else "request", verdict.reason)
        if not verdict.allowed:
            return web.Response(status=403, text=verdict.reason + "\n")
        return await handler(request)

    def open_route(self, request: web.Request) -> bool:
        """Served without the token: probes, public metrics, large-message fetches."""
        return (request.path in ("/healthz", "/readyz")
                or (request.path == "/metrics" and self.backend.metrics.public)
                or (request.method == "GET" and request.path.startswith("/message/")))

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler):
        if request.method == "OPTIONS" or self.open_route(request):
            # /message/<id>: the id is a random uuid4 that only the recipient of the stub knows,
            # and clients written for the stock worker fetch it without a token.
            return await handler(request)
        if not self.authorized(request):
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": "authentication required: Authorization: Bearer <token> or ?token=<token>"}),
                content_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    async def handle_options(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if not origin or not self.origin_allowed(origin):
            return web.Response(status=403, text="origin not allowed")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "Authorization, Content-Type"
                ),
                "Access-Control-Max-Age": "600",
            },
        )
    # endregion

    # region websocket
    async def handle_ws(self, request: web.Request):
        origin = request.headers.get("Origin")
        if origin and not self.origin_allowed(origin):
            # Cross-site WebSocket hijacking: a foreign page must not drive the worker.
            return web.Response(status=403, text=f"origin {origin} not allowed")
        # Frames up to 16x the protocol limit (and within MAX_DATA_SIZE) are read and answered
        # with an error; only beyond that does aiohttp close with 1009.
        read_limit = max(self.max_msg + 1, min(max(self.max_msg * 16, 64 << 20), self.max_data))
        ws = web.WebSocketResponse(max_msg_size=read_limit, autoping=True, compress=self.ws_compression)
        try:
            await ws.prepare(request)
        except ConnectionResetError as e:  # the client hung up mid-handshake: its doing, not ours
            log.debug("client %s hung up during the WebSocket handshake (%s)", request.remote, e)
            raise web.HTTPBadRequest() from None  # nobody to read it; aiohttp just closes
        client = Client(ws, request.transport, main=self._on_main())
        old = self._adopting.pop(request.transport, None) if client.main and self._adopting else None
        if old is not None:  # moved from the I/O thread: writes wait until the old Client drained
            client.gate, client.direct = asyncio.Event(), False
        client.writer = asyncio.ensure_future(client.write_loop())
        if client.main:
            self.send_later()  # events from before it joined go to the clients of then
            client.events_first = self.send_later
        elif self.ssl_context is None and client.direct:
            client.request_head = request_head(request)  # moved to the main loop once it is free
            self._arm_migrate()
        self.clients[client.id] = client
        # Text frames handled inside data_received (worker/wsread.py); the loop below then sees
        # only what aiohttp still reads: pings, close, binary, oversized or fragmented frames.
        if wsread.install(ws, request.protocol, lambda text: self.on_frame(client, text), self.max_msg) and client.main:
            if old is None:
                self._watch_stall(client)
        if old is not None:
            # The old Client leaves after every frame queued for it (the I/O thread keeps the
            # order of the outbox), then this one writes and reads.
            self._post(("retire", old, client))
            self.migrated += 1
            request.transport.resume_reading()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self.on_text(client, msg.data, inline=False)
                elif msg.type == WSMsgType.BINARY:
                    self.reply(client, codec.error("binary frames are not accepted from clients; send JSON text", [], None))
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.clients.pop(client.id, None)
            client.put(None)
        return ws

    def on_frame(self, client: Client, text: str) -> None:
        """A text frame, from inside the connection's data_received (worker/wsread.py)."""
        if client.closing:
            return
        try:
            self.route(client, text, inline=False)  # with a client, never a coroutine
        except Exception:  # a bug, not the client's doing: a clear close, not a dead reader
            log.exception("client %s: a message could not be handled", client.id)
            client.drop(1011)

    async def on_text(self, client: Client | None, text: str, inline: bool = True,
                      limit: int | None = None) -> dict | None:
        """Handle one client message; returns the reply (also sent to client when given)."""
        out = self.route(client, text, inline, limit)
        return (await out) if inspect.iscoroutine(out) else out

    def route(self, client: Client | None, text: str, inline: bool = True, limit: int | None = None) -> Any:
        """on_text's work; a coroutine only where the reply must be awaited (no client, or inline)."""
        msg_id = None
        try:
            limit = self.max_msg if limit is None else limit
            if len(text) > limit // 4 and len(text.encode("utf-8", "surrogatepass")) > limit:
                msg_id = codec.peek_id(text)  # so the client waiting for its id hears why
                raise ProtocolError(
                    f"message of {len(text)} bytes exceeds the limit of {limit} bytes; "
                    "send large requests with POST /message/"
                )
            try:
                data = codec.parse_message(text)  # the stdlib: pings need no funcnodes-core
            except codec.MessageError as e:
                raise ProtocolError(str(e)) from None
            if not isinstance(data, dict):
                raise ProtocolError(f"message must be a JSON object, got {type(data).__name__}")
            msg_id = data.get("id")
            mtype = data.get("type")
            if mtype == "ping":
                pong = {"type": "pong"}
                self.reply(client, pong)
                return pong
            if mtype is None:
                raise ProtocolError("message has no 'type'; expected 'cmd' or 'ping'")
            if mtype != "cmd":
                raise ProtocolError(f"unknown message type {mtype!r}; expected 'cmd' or 'ping'")
            cmd = data.get("cmd")
            if not isinstance(cmd, str):
                raise ProtocolError("'cmd' is missing or not a string")
            kwargs = data.get("kwargs", {})
            if kwargs is None:
                kwargs = {}
            if not isinstance(kwargs, dict):
                raise ProtocolError(f"'kwargs' must be an object, got {type(kwargs).__name__}")
            if codec.may_hold_novalue(text):
                kwargs = codec.revive(kwargs)  # as funcnodes-core's decoder reads a message
        except ProtocolError as e:
            err = codec.error(str(e), [], msg_id)
            self.reply(client, err)
            return err
        as_bytes = bool(data.get("as_bytes"))
        if cmd in FAST_COMMANDS and not as_bytes:
            return self.deliver(client, self._fast_answer(cmd, kwargs, msg_id), msg_id)
        if client is not None and not inline:
            # Commands of one connection run in order, but behind the reader: pings still pass.
            if client.in_flight >= CLIENT_CMDS_MAX:
                err = codec.error(f"too many commands in flight on this connection (>{CLIENT_CMDS_MAX})", [], msg_id)
                self.reply(client, err)
                return err
            client.in_flight += 1
            if client.main:
                self._on_command((client, cmd, kwargs, msg_id, as_bytes))
            else:
                self._inbox.put((client, cmd, kwargs, msg_id, as_bytes))
            return None
        return self.run_cmd(client, cmd, kwargs, msg_id, as_bytes)

    async def run_cmd(self, client: Client | None, cmd: str, kwargs: dict, msg_id: Any, as_bytes: bool) -> dict:
        # shield: a client that disconnects must not cancel a command half-way on the main loop
        out = await asyncio.shield(self._on_main_loop(self.backend.execute(cmd, kwargs, msg_id, as_bytes)))
        return self.deliver(client, out, msg_id)

    def _on_main(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.backend.loop
        except RuntimeError:
            return False

    async def _on_main_loop(self, coro):
        """Await coro on the main loop, from either loop; on the I/O thread, after the graph loaded."""
        if self._on_main():
            return await coro
        await self.core_ready.wait()  # commands wait while the graph loads; pings do not
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.backend.loop))

    def deliver(self, client: Client | None, out: str | list, msg_id: Any) -> str | dict:
        if isinstance(out, list):  # binary result frames
            if client is not None:
                client.put(out)  # one queue item, however many chunks
            return {"type": "result", "id": msg_id, "binary": True}
        if client is None:
            self.broadcast_text(out)
        else:
            client.put(self._stub_if_large(out))
        return out

    def _text(self, msg: dict) -> str:
        # Plain data only (pongs, protocol errors): stdlib json, no funcnodes-core needed.
        return self._stub_if_large(json.dumps(msg))

    def _stub_if_large(self, text: str, fetches: int = 1) -> str:
        if len(text) * 1.1 > self.max_msg:
            msg_id = str(uuid.uuid4())
            self.store_large(msg_id, text, fetches)
            return json.dumps(
                {"type": "large_message", "url": f"{self.scheme}://{self.url_host()}:{self.port}/message/{msg_id}", "msg_id": msg_id}
            )
        return text

    def url_host(self) -> str:
        h = self.host
        if h in ("0.0.0.0", "::", ""):
            return "127.0.0.1"
        return f"[{h}]" if ":" in h else h

    def reply(self, client: Client | None, msg: dict) -> None:
        if client is None:  # an HTTP-submitted command: everyone may be waiting for it
            self.broadcast(msg)
            return
        client.put(self._text(msg))

    def broadcast(self, msg: dict) -> None:
        self.broadcast_text(codec.dumps(msg))

    def broadcast_text(self, text: str) -> None:
        """To every client, from either loop: each loop writes to its own clients only."""
        if not self.clients:
            return
        main = self._on_main()
        if not main and self._moves:
            # A connection is moving to the main loop: there this broadcast falls on one side of
            # the swap of its Clients, so the connection gets it once (from the old or the new).
            self.backend.loop.call_soon_threadsafe(self.broadcast_text, text)
            return
        text = self._stub_if_large(text, fetches=len(self.clients))
        if self._put_all(text, main) < len(self.clients):
            if main:
                self._post(text)
            else:
                self.backend.loop.call_soon_threadsafe(self._put_all, text, True)

    def _put_all(self, item: str | list[bytes], main: bool) -> int:
        """item (text, or binary frames) to the clients of one loop; returns how many."""
        n = 0
        for c in list(self.clients.values()):
            if c.main == main:
                n += 1
                c.put(item)  # a list is the chunks of one binary value: one queue item
        return n

    def set_core_ready(self) -> None:
        """Called on the main loop once the graph is loaded: commands held until now run."""
        self._commands_open = True
        held, self._held = self._held, []
        for item in held:
            self._on_command(item)
        if self.io is not None:
            self.io.loop.call_soon_threadsafe(self.core_ready.set)

    # region main loop side of the command hop
    def _answer(self, client: Client, out: str | list, msg_id: Any) -> None:
        if not client.main:  # the I/O thread writes it, in order with the events before it
            self._post(("reply", client, out, msg_id))
            return
        client.in_flight -= 1
        if client.id in self.clients:
            self.deliver(client, out, msg_id)

    def _on_command(self, item: tuple) -> None:
        if not self._commands_open:
            self._held.append(item)  # the graph is loading; set_core_ready runs them
            return
        waiting = self._busy.get(item[0])
        if waiting is not None:
            waiting.append(item)  # behind this client's command that waits
        else:
            self._run_command(item)

    def _run_command(self, item: tuple) -> None:
        client, cmd, kwargs, msg_id, as_bytes = item
        out = self.backend.dispatch(cmd, kwargs, msg_id, as_bytes)
        if not inspect.iscoroutine(out):
            self._answer(client, out, msg_id)
            return
        # It waits (an async verb, a group fdatasync): the client's next commands queue behind
        # it, other clients' do not. A client that goes away does not cancel it.
        self._busy[client] = collections.deque()
        task = self.backend.loop.create_task(out)
        task.add_done_callback(lambda t: self._finished(item, t))

    def _finished(self, item: tuple, task: asyncio.Task) -> None:
        client, _cmd, _kw, msg_id, _b = item
        if task.cancelled():  # only at shutdown
            out = json.dumps(codec.error("the command was cancelled", [], msg_id))
        else:
            out = task.result()  # dispatch's coroutine turns every error into an error reply
        self._answer(client, out, msg_id)
        waiting = self._busy.pop(client)
        while waiting and client not in self._busy:
            self._run_command(waiting.popleft())
        if waiting:
            self._busy[client].extend(waiting)
    # endregion

    # Called from the main loop: encode there (the NodeSpace is not thread-safe), send here.
    # A burst of events wakes the I/O thread once at most (worker/wakeup.py).
    def post_broadcast(self, msg: dict) -> None:
        self.post_later(self._event_text, msg)

    def _event_text(self, msg: dict) -> str:
        return self._stub_if_large(codec.dumps(msg), fetches=len(self.clients))

    def post_later(self, encode: Callable[..., str | list[bytes] | None], *args: Any) -> None:
        """An event for every client, encode(*args) run when the main loop is about to wait
        (before_idle), or sooner, before any other frame is put to a client: what a node run
        emits is encoded off the path to the next node (stock encodes in a task started later),
        and every client gets its frames in the order they happened."""
        if self.io is None or not self.clients:
            return
        if not self._later:
            turn = wakeup.selector_of(self.backend.loop)
            if turn is None:  # a loop without the hook: at once
                self._send_event(encode, args)
                return
            turn.before_idle.append(self.send_later)
        self._later.append((encode, args))

    def send_later(self) -> None:
        """The deferred events, encoded and put to every client in order (main loop only)."""
        if not self._later:
            return
        later, self._later = self._later, []  # a put below finds nothing left to put first
        for encode, args in later:
            self._send_event(encode, args)

    def _send_event(self, encode: Callable[..., str | list[bytes] | None], args: tuple) -> None:
        try:
            item = encode(*args)
        except Exception:
            log.exception("an event could not be encoded")
            return
        if item is not None and self.clients and self._put_all(item, True) < len(self.clients):
            self._post(item)

    def _post(self, item: str | list[bytes] | tuple) -> None:
        if self.io is None:
            return
        turn = wakeup.selector_of(self.backend.loop) if self._on_main() else None
        if turn is None:
            self._outbox.put(item)
            return
        self.send_later()  # deferred events go first, as to the main loop's clients
        # Held to the end of the main loop's turn, as Client.put holds direct frames: an edit's
        # events reach the I/O thread's clients after its journal record is written (write_now
        # runs later in the same turn), and the I/O thread is woken once per turn, not per event.
        if not self._posts:
            turn.before_sleep.append(self._flush_posts)
        self._posts.append(item)

    def _flush_posts(self) -> None:
        posts, self._posts = self._posts, []
        if self.io is not None:
            for item in posts:
                self._outbox.put(item)

    def _on_outgoing(self, item: str | list[bytes] | tuple) -> None:  # the I/O thread
        if isinstance(item, tuple) and item[0] == "retire":
            self._retire(item[1], item[2])
            return
        if isinstance(item, tuple):  # ("reply", client, reply, msg_id): in order with the events
            _, client, out, msg_id = item
            client.in_flight -= 1
            if client.id in self.clients:
                self.deliver(client, out, msg_id)
        else:  # text already staged if large, or binary frames: for the I/O thread's clients
            self._put_all(item, False)
    # endregion

    # region large messages
    # A reply too big for a frame is staged here and fetched by its id. Each entry is dropped
    # by its own timer, or once every recipient has fetched it, whatever else happens (before,
    # a staged 20 MB value stayed until some other request swept the store).
    def store_large(self, msg_id: str, text: str, fetches: int = 1) -> None:
        size = len(text)
        loop = asyncio.get_running_loop()  # either loop; its timer drops the entry
        with self._large_lock:
            while self.large and self.large_bytes + size > LARGE_STORE_MAX_BYTES:
                self._drop_large(next(iter(self.large)))
            timer = loop.call_later(self.large_ttl, self._drop_large, msg_id)
            self.large[msg_id] = [text, max(1, fetches), timer, loop]
            self.large_bytes += size

    def _drop_large(self, msg_id: str) -> None:
        with self._large_lock:
            item = self.large.pop(msg_id, None)
            if item is not None:
                self.large_bytes -= len(item[0])
        if item is not None:
            if item[3] is asyncio.get_running_loop():
                item[2].cancel()
            else:
                item[3].call_soon_threadsafe(item[2].cancel)

    async def handle_get_message(self, request: web.Request) -> web.Response:
        msg_id = request.match_info["msg_id"]
        with self._large_lock:
            item = self.large.get(msg_id)
            if item is not None:
                item[1] -= 1
        if item is None:
            return web.Response(status=404, text="Message not found")
        if item[1] <= 0:
            self._drop_large(msg_id)
        return web.Response(text=item[0], content_type="application/json")

    async def handle_post_message(self, request: web.Request) -> web.Response:
        try:
            text = (await request.read()).decode("utf-8")
        except web.HTTPRequestEntityTooLarge:
            return self.too_large("message", self.max_data, DATA_VAR)
        except UnicodeDecodeError:
            return web.Response(status=400, text="Error processing message: body is not UTF-8")
        reply = await self.on_text(None, text, limit=self.max_data)  # HTTP is the route for big requests
        if isinstance(reply, str) and reply.startswith('{"type": "error"'):
            reply = json.loads(reply)
        if isinstance(reply, dict) and reply.get("type") == "error":
            return web.json_response(reply, status=400)
        return web.Response(text="Message received")
    # endregion

    # region limits
    def upload_limit(self) -> tuple[int, str]:
        """The stock worker's FUNCNODES_WS_WORKER_MAX_DATA_SIZE and our max_upload_size both
        bound an upload: the smaller wins, and the 413 names it."""
        own = int(self.backend.config.get("max_upload_size") or (1 << 30))
        if self.max_data < own:
            return self.max_data, DATA_VAR
        return own, "max_upload_size"

    @staticmethod
    def too_large(what: str, limit: int, which: str) -> web.Response:
        return web.json_response(
            {"error": f"{what} exceeds the limit of {limit} bytes ({which})"}, status=413)
    # endregion

    # region other HTTP
    async def handle_healthz(self, request: web.Request) -> web.Response:
        journal = self.backend.journal_health()
        body = {"status": "ok" if journal["writable"] else "degraded", "uuid": self.backend.uuid}
        # Open to every prober (other local users, remote ones without the token): health only.
        # The details are for those the worker would serve anyway.
        token_ok = bool(self.token()) and self.authorized(request)
        if (token_ok or not self.token()) and self.peers.verdict(request.transport, "/", token_ok).allowed:
            body.update(clients=len(self.clients), journal=journal,
                        staged_messages=len(self.large), staged_bytes=self.large_bytes,
                        stall_watched=sum(1 for c in list(self.clients.values()) if c.watched is not None),
                        main_loop_clients=sum(1 for c in list(self.clients.values()) if c.main),
                        migrated=self.migrated)
        return web.json_response(body)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body, ctype = self.backend.metrics.render()  # worker/metrics.py (thread-safe: the library locks)
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def handle_readyz(self, request: web.Request) -> web.Response:
        if self.backend.ready:
            return web.json_response({"status": "ready", "uuid": self.backend.uuid})
        return web.json_response({"status": "starting", "uuid": self.backend.uuid}, status=503)

    async def handle_io_value(self, request: web.Request) -> web.Response:
        value = self.backend.io_value(request.match_info["nid"], request.match_info["ioid"])
        try:
            payload, mime = await self._on_main_loop(value)
        except Exception as e:
            return web.json_response({"error": str(e)}, status=404)
        return web.Response(body=payload, content_type=mime.split(";")[0] if mime else "application/octet-stream")

    async def handle_upload(self, request: web.Request) -> web.Response:
        try:
            reader = await request.multipart()
        except Exception:
            return web.json_response({"error": "expected a multipart/form-data body"}, status=400)
        limit, which = self.upload_limit()
        if request.content_length is not None and request.content_length > self.max_data:
            return self.too_large(f"request body of {request.content_length} bytes", self.max_data, DATA_VAR)
        names: list[str] = []
        total = 0
        # Staged in files/ (never through a symlink), visible only once every part has arrived.
        with ConfinedWriter(self.backend.paths.data, "files") as staged:
            try:
                while True:
                    part = await reader.next()
                    if part is None:
                        break
                    if part.name != "file" or not part.filename:
                        await part.release()
                        continue
                    # Browsers send 'dir/a.txt' raw; aiohttp clients percent-encode it.
                    rel = safe_relative(unquote(part.filename))
                    with staged.open(rel) as f:
                        while True:
                            chunk = await part.read_chunk(1 << 16)
                            if not chunk:
                                break
                            total += len(chunk)
                            if total > limit:
                                raise UploadTooLarge(limit, which)
                            f.write(chunk)
                    names.append(str(rel))
                if not names:
                    return web.json_response({"error": "No files uploaded"}, status=400)
                staged.commit()
            except UploadTooLarge as e:
                return self.too_large("upload", *e.args)
            except ValueError as e:
                return web.json_response({"error": str(e)}, status=400)
        self.backend.loop.call_soon_threadsafe(self.backend.files_changed)
        if len(names) == 1:
            common = names[0]
        else:
            common = os.path.commonpath(names) or "."
        return web.json_response({"file": common})
    # endregion


class UploadTooLarge(Exception):
    """args: (limit in bytes, the name of the setting that set it)."""


DATA_VAR = "FUNCNODES_WS_WORKER_MAX_DATA_SIZE"

