"""The worker's listening socket, held by the supervisor across worker restarts.

While no worker accepts, a socket that stays bound and listening lets new connections finish
the TCP handshake into the kernel's accept queue: clients wait instead of being refused (the
gunicorn / circus / systemd-socket-activation model). Every worker gets the same socket
(`pass_fds`, `--listen-fd N`) and serves on it with aiohttp's SockSite.

Where the socket comes from:
- systemd socket activation: `LISTEN_PID` == our PID and `LISTEN_FDS` >= 1 -> fd 3
  (SD_LISTEN_FDS_START). The variables are removed from os.environ so no child thinks they are
  meant for it (sd_listen_fds(3) with unset_environment=1).
- otherwise we bind `host:port` ourselves; a busy port is not fatal: the next free one up to
  FUNCNODES_WS_WORKER_ENDPORT (default 9582) is taken, the way the stock worker does it, and
  the caller writes the chosen port to the worker config before the worker reads it.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3
BACKLOG = 4096  # capped by net.core.somaxconn; the restart window is short, but bursts happen


class NoFreePort(OSError):
    pass


def from_systemd(environ: os._Environ | dict | None = None) -> socket.socket | None:
    """Take the first socket systemd passed us (and scrub the variables), or None."""
    env = os.environ if environ is None else environ
    pid, fds = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(k, None)
    if not pid or not fds or not pid.isdigit() or int(pid) != os.getpid():
        return None
    try:
        n = int(fds)
    except ValueError:
        return None
    if n < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(f"systemd passed fd {SD_LISTEN_FDS_START} but it is not a stream socket")
    os.set_inheritable(sock.fileno(), False)  # handed on explicitly (pass_fds), never by accident
    return sock


def end_port() -> int:
    try:
        return int(os.environ.get("FUNCNODES_WS_WORKER_ENDPORT", 9582))
    except ValueError:
        return 9582


def bind(host: str, port: int, endport: int | None = None) -> socket.socket:
    """Bind and listen on host:port, walking up to `endport` (inclusive) while ports are busy."""
    last = end_port() if endport is None else endport
    if last < port:  # a port above the stock range: walk as far as the stock range is wide
        last = min(65535, port + 200)
    err: OSError | None = None
    for p in range(port, last + 1):
        try:
            return _listen(host, p)
        except OSError as e:
            err = e
    raise NoFreePort(f"no free port on {host} in {port}..{last}" + (f" ({err.strerror or err})" if err else ""))


def _listen(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: rebinding over TIME_WAIT leftovers is fine; two live listeners are not
        # possible without SO_REUSEPORT, which we never set.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return host, port


def wanted_port(port: object) -> int:
    """The config's port, else FUNCNODES_WS_WORKER_STARTPORT (where a walk for a free one starts)."""
    if not isinstance(port, int) or isinstance(port, bool) or port <= 0:
        return int(os.environ.get("FUNCNODES_WS_WORKER_STARTPORT", 9382))
    return port


def hold(sock: socket.socket | None, host: str, port: int, same_host: bool) -> socket.socket:
    """The listening socket for host:port: `sock` itself when it is bound there already (held
    across restarts), else a new one, and `sock` is closed (the config names another address
    now, after SIGHUP). A busy port walks to the next free one up to end_port()."""
    if sock is not None:
        if same_host and address(sock)[1] == port:
            return sock
        sock.close()
    return bind(host, port)
