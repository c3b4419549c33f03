"""A warm fork server for `fn-supervise host`: one process that has imported the worker (aiohttp,
funcnodes-core, the runtime) once, and forks each worker from that state.

Forked workers share those pages with the fork server and with each other (copy-on-write;
gc.freeze() keeps the collector from dirtying them), so N workers cost far less than N cold
interpreters, and a worker starts without paying the imports (~2 s of CPU each).

Protocol (SOCK_SEQPACKET socketpair with the host, supervisor/forkserver.py):
  host -> server   JSON {"args": [...], "env": {...}, "cwd": str} + SCM_RIGHTS [control fd, output fd]
  server -> host   JSON {"pid": n} | {"error": text}
The worker is a grandchild: the server forks an intermediate that forks the worker and exits at
once, so the worker is reparented to the host (a child subreaper). The host is then its parent:
it reaps it, reads its exit status and gets its pidfd exactly as for a worker it spawned itself.
The worker runs setsid() (its own session and process group, as `start_new_session`), waits
until it has been reparented (so its PR_SET_PDEATHSIG, set by the runtime, is tied to the host),
then runs `python -m worker` in-process with the given argv, environment and cwd.

The server ends on EOF of its socket (the host stopped or died) and on PR_SET_PDEATHSIG=SIGKILL.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
REPARENT_WAIT = 5.0


def _preload() -> None:
    import aiohttp  # noqa: F401
    import aiohttp.web  # noqa: F401

    from . import channel, codec, config, control, runtime, server  # noqa: F401
    try:  # the heavy part of a worker start; loaded at runtime when absent
        from . import commands, graph, store  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    try:
        from . import metrics  # noqa: F401
    except Exception:  # noqa: BLE001
        pass


def _child(req: dict, fds: list[int], sock: socket.socket, w: int, intermediate: int) -> None:
    code = 1
    try:
        sock.close()
        ctl, out = fds
        os.setsid()
        try:  # `ps -o comm` / top show it as a worker (its cmdline stays the fork server's)
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, b"fn-worker", 0, 0, 0)
        except (OSError, AttributeError):
            pass
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        deadline = time.monotonic() + REPARENT_WAIT
        while os.getppid() == intermediate and time.monotonic() < deadline:
            time.sleep(0.001)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(devnull)
        os.close(out)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(req.get("cwd") or "/")
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
        args = [str(a) for a in req["args"]] + ["--control-fd", str(ctl)]
        sys.argv = ["python -m worker", *args]
        # the preloaded objects stay frozen (permanent): a full collection would otherwise walk
        # them and write their GC headers, unsharing the very pages the fork shares
        from .__main__ import main

        code = main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _spawn(sock: socket.socket, req: dict, fds: list[int]) -> dict:
    r, w = os.pipe()
    pid1 = os.fork()
    if pid1 == 0:  # intermediate: fork the worker and go, so the host becomes its parent
        try:
            os.close(r)
            inter = os.getpid()
            if os.fork() == 0:
                _child(req, fds, sock, w, inter)
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    os.close(w)
    for fd in fds:
        os.close(fd)
    os.waitpid(pid1, 0)
    data = b""
    while True:
        chunk = os.read(r, 64)
        if not chunk:
            break
        data += chunk
    os.close(r)
    if not data:
        return {"error": "the worker died before it started"}
    return {"pid": int(data)}


def serve(fd: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    parent = int(os.environ.get("FN_SUPERVISE_PID") or 0)
    if parent and os.getppid() != parent:
        os._exit(1)  # the host died before the prctl took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal ^C is the host's to handle
    sock = socket.socket(fileno=fd)
    _preload()
    gc.collect()
    gc.freeze()  # the collector must not touch (and so unshare) the preloaded objects
    try:
        sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 2)
            except (ConnectionError, OSError):
                break
            if not msg:
                break
            try:
                req = json.loads(msg)
                if len(fds) != 2 or not isinstance(req.get("args"), list):
                    raise ValueError("a spawn needs args and two descriptors")
                reply = _spawn(sock, req, fds)
            except Exception as e:  # noqa: BLE001
                for f in fds:
                    try:
                        os.close(f)
                    except OSError:
                        pass
                reply = {"error": f"{type(e).__name__}: {e}"}
            sock.send(json.dumps(reply).encode())
    finally:
        sock.close()
        os._exit(0)
