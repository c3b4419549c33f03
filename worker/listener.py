"""A listening socket handed down by the supervisor (`--listen-fd N`).

The supervisor binds the worker's port once (or takes it from systemd socket activation) and
passes the same socket to every worker it starts, so while one worker is replaced new
connections wait in the kernel backlog instead of being refused. Alone (`python -m worker`)
there is none and the worker binds its own port.
"""

from __future__ import annotations

import socket

INHERITED: socket.socket | None = None


def adopt(fd: int) -> socket.socket:
    """Wrap the inherited fd (a bound, listening TCP socket) for the server to serve on."""
    global INHERITED
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"--listen-fd {fd} is not a stream socket")
    sock.setblocking(False)
    INHERITED = sock
    return sock


def take() -> socket.socket | None:
    """The inherited socket, once: a later start (after a failed one) binds as usual."""
    global INHERITED
    sock, INHERITED = INHERITED, None
    return sock
