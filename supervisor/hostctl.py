"""The host's control socket: its protocol and its client (host.py serves it).

<base>/fn-supervise-host.sock, mode 0600. One JSON line out ({"op": ..., fields}), one JSON
line back ({"ok": bool, ...; "error", "code" when not ok; "elsewhere" when a per-worker
supervisor, not the host, runs that worker). `dispatch` is the CLI's hook: while a host runs for the
base folder, `list`, `status`, `stop`, `restart` and `new --autostart` go to it (the host's
Supervisors share its PID, so a signal to "the supervisor" would reach every worker); without
a host it returns None and the CLI does what it does for per-worker supervisors."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path
from typing import Any

from .status import err, format_status

SOCKET_NAME = "fn-supervise-host.sock"


def socket_path(base: Path) -> Path:
    return Path(base) / SOCKET_NAME


class HostNotRunning(Exception):
    pass


def request(base: Path, op: str, *, wait: float = 120.0, **fields: Any) -> dict[str, Any]:
    path = socket_path(base)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(wait)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise HostNotRunning(str(path)) from e
        s.sendall((json.dumps({"op": op, **fields}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    if not buf:
        raise HostNotRunning(f"{path}: no answer")
    return json.loads(buf)


def host_running(base: Path) -> bool:
    try:
        return bool(request(base, "ping", wait=5.0).get("ok"))
    except (HostNotRunning, OSError, ValueError):
        return False


def _fail(reply: dict[str, Any]) -> int | None:
    if reply.get("elsewhere"):
        return None  # a per-worker supervisor: the CLI's own path reaches it
    err(str(reply.get("error")))
    return int(reply.get("code") or 1)


def dispatch(a: argparse.Namespace, base: Path) -> int | None:
    """Run the command through the host, or None when no host runs (the caller goes on)."""
    if a.cmd not in ("list", "status", "stop", "restart"):
        return None
    try:
        if a.cmd == "list":
            r = request(base, "list")
            if not r.get("ok"):
                return _fail(r)
            if a.json:
                print(json.dumps(r["workers"], indent=2))
            else:
                for w in r["workers"]:
                    print("\t".join(str(w.get(k) if w.get(k) is not None else "-")
                                    for k in ("id", "name", "state", "port", "pid")))
            return 0
        if a.cmd == "status":
            r = request(base, "status", worker=a.worker)
            if not r.get("ok"):
                return _fail(r)
            s = r["status"]
            print(json.dumps(s, indent=2, default=str) if a.json else
                  format_status(s) + f"\n  host:        {s.get('host_pid')} (fn-supervise host)")
            return 0
        if a.cmd == "stop":
            r = request(base, "stop", worker=a.worker, timeout=a.timeout,
                        wait=(a.timeout + 15.0) if a.timeout is not None else 300.0)
            if not r.get("ok"):
                return _fail(r)
            print(f"{a.worker} stopped" if r.get("was_running") else f"{a.worker} is not running")
            return 0
        if a.cmd == "restart":
            r = request(base, "restart", worker=a.worker)
            if not r.get("ok"):
                return _fail(r)
            print(f"{a.worker} restarting")
            return 0
    except HostNotRunning:
        return None
    return None


def after_new(base: Path, worker: str) -> None:
    """`new --autostart`: a running host starts the new worker now (else at its next scan)."""
    try:
        request(base, "rescan", wait=30.0)
    except (HostNotRunning, OSError, ValueError):
        pass
