"""A warm fork server: the worker's interpreter with the heavy imports done, waiting to fork.

    <venv>/bin/python -m worker.forkserver --sock-fd N --parent PID [--deps JSON] [--worker NAME]

Started by the supervisor (supervisor/forkclient.py), one per worker. It imports
funcnodes-core, aiohttp, the worker package and the worker's installed package dependencies
(plain path modules are imported fresh by every worker anyway), calls gc.freeze() so the
collector never touches (and un-shares) the imported objects, says ready, and waits.

Protocol on the unix socket N (one JSON line per message; fds by SCM_RIGHTS):
  supervisor -> {"type": "fork", "argv": [...], "env": {...}, "cwd": p, "fds": ["control", "out", "listen"?]}
                 + those fds in that order
  server     -> {"type": "ready", "pid": p, "preload": seconds, "imported": [...]}
             -> {"type": "forked", "pid": worker pid} | {"type": "error", "error": text}

A fork is a double fork: the intermediate child exits at once, so the worker is re-parented
to the nearest child subreaper, the supervisor, which then waits for it through a pidfd like
any worker it spawned. The worker calls setsid() first (own process group), then reports its
PID, waits until it has been re-parented (so the parent-death signal its runtime sets refers
to the supervisor), wires stdout/stderr to the supervisor's pipe and runs
`worker.__main__.main(argv)`: the same entry as `python -m worker`.

The server ends when its socket closes (the supervisor is gone) or by its own parent-death
signal; it refuses to fork once its environment was swapped (sys.prefix now names another
directory): the supervisor then spawns and replaces it.

A forked worker keeps the fork server's command line (`ps` shows `-m worker.forkserver ...
--worker worker_<uuid>`); its name (`ps -o comm`, top) is set to `fn-worker`, the server's to
`fn-forkserver`. The worker's PID is the one in `.p` and `fn-supervise status`.
"""

from __future__ import annotations

import argparse
import array
import gc
import importlib
import json
import os
import random
import select
import signal
import socket
import sys
import time
import traceback

MAX_FDS = 8
FORK_TIMEOUT = 5.0  # the new worker reports its pid within this (it does nothing before)


def _prefix_id() -> tuple[int, int] | None:
    try:
        st = os.stat(sys.prefix)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def preload(deps: dict) -> list[str]:
    """Import what every worker start would import; return the module names."""
    mods = ["funcnodes_core", "aiohttp", "aiohttp.web", "worker.runtime", "worker.commands", "worker.server",
            "worker.persistence", "worker.packages", "worker.localworkers", "worker.quarantine", "worker.metrics",
            "worker.listener"]
    from worker.deferred import deferred_ca_certificates, defer  # noqa: PLC0415

    defer("pytest")  # before funcnodes_core, which imports it only to ask whether it runs under a test
    done = []
    with deferred_ca_certificates():  # aiohttp's client contexts: CAs loaded at a node's first HTTPS
        for m in mods:
            importlib.import_module(m)
            done.append(m)
    from worker.packages import is_project, module_name  # noqa: PLC0415
    from worker.separate import install  # noqa: PLC0415

    install()  # before the dependencies: their separate_process=True nodes must fork, not thread

    for name, dep in (deps if isinstance(deps, dict) else {}).items():
        if not isinstance(dep, dict):
            continue
        dep = dict(dep, package=dep.get("package") or name)
        if dep.get("path"):
            if not is_project(dep["path"]):
                continue  # a path module is imported fresh by each worker: nothing to share
            dep = {k: v for k, v in dep.items() if k != "path"}  # installed into the venv: by name
        try:
            importlib.import_module(module_name(dep))
            done.append(module_name(dep))
        except Exception as e:  # noqa: BLE001 (the worker reports it properly when it loads)
            print(f"fork server: preloading {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return done


def _send(sock: socket.socket, msg: dict) -> None:
    sock.sendall((json.dumps(msg) + "\n").encode())


def _recv(sock: socket.socket, buf: bytearray) -> tuple[dict | None, list[int]]:
    """One request and its fds; (None, []) on EOF."""
    fds: list[int] = []
    while b"\n" not in buf:
        msg, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
                fds.extend(a)
        if not msg:
            for fd in fds:
                os.close(fd)
            return None, []
        buf += msg
    i = buf.index(b"\n")
    line = bytes(buf[:i])
    del buf[: i + 1]
    return json.loads(line), fds


def _become_worker(req: dict, fds: dict[str, int], server_sock: socket.socket, report_w: int, parent: int) -> None:
    """In the grandchild: never returns."""
    code = 1
    try:
        os.setsid()  # own process group and session, before anyone can signal the group
        os.write(report_w, f"{os.getpid()}\n".encode())
        _set_name(b"fn-worker")
        os.close(report_w)
        server_sock.close()
        deadline = time.monotonic() + FORK_TIMEOUT
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.0005)  # the intermediate child exits at once
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
        out = fds["out"]
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if req.get("cwd"):
            os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
        random.seed()
        # No gc.unfreeze(): the preloaded objects live as long as the worker anyway, and a full
        # collection over them would write to (and so copy) every page the fork shares.
        argv = [str(a) for a in req.get("argv") or []]
        argv += ["--control-fd", str(fds["control"])]
        if "listen" in fds:
            argv += ["--listen-fd", str(fds["listen"])]
        sys.argv = ["-m worker", *argv]
        from worker.__main__ import main  # noqa: PLC0415

        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def fork_worker(req: dict, fds: list[int], sock: socket.socket, prefix: tuple[int, int] | None,
                unsafe: str | None = None) -> dict:
    if unsafe:
        return {"type": "error", "error": unsafe}
    names = [str(n) for n in req.get("fds") or []]
    if len(names) != len(fds) or "control" not in names or "out" not in names:
        return {"type": "error", "error": f"fork request with fds {names} but {len(fds)} received"}
    if _prefix_id() != prefix or not os.path.exists(sys.executable):
        return {"type": "error", "error": f"stale: the environment {sys.prefix} was replaced since this server started"}
    named = dict(zip(names, fds))
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # the intermediate child: fork the worker and exit at once
        try:
            os.close(r)
            mid = os.getpid()
            if os.fork() == 0:
                _become_worker(req, named, sock, w, mid)  # never returns
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    pid = _read_pid(r)
    os.close(r)
    if pid is None:
        return {"type": "error", "error": "the forked worker did not report its pid"}
    return {"type": "forked", "pid": pid}


def _read_pid(r: int) -> int | None:
    data = b""
    deadline = time.monotonic() + FORK_TIMEOUT
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            return None
        chunk = os.read(r, 64)
        if not chunk:
            return None
        data += chunk
    try:
        return int(data.split(b"\n", 1)[0])
    except ValueError:
        return None


def _set_name(name: bytes) -> None:
    """PR_SET_NAME: what ps -o comm / top show (15 bytes at most)."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None).prctl(15, name[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _set_parent_death_signal() -> None:
    from worker.control import set_parent_death_signal  # noqa: PLC0415

    set_parent_death_signal(signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.forkserver")
    ap.add_argument("--sock-fd", type=int, required=True)
    ap.add_argument("--deps", default="{}", help="the worker's package_dependencies (JSON): installed ones are preloaded")
    ap.add_argument("--parent", type=int, help="the supervisor's pid (checked after arming the death signal)")
    ap.add_argument("--worker", help="worker_<uuid> it serves (in the command line, so tools can tell)")
    a = ap.parse_args(argv)
    _set_parent_death_signal()
    _set_name(b"fn-forkserver")
    if a.parent and os.getppid() != a.parent:
        return 70  # the supervisor died before the death signal was armed
    sock = socket.socket(fileno=a.sock_fd)
    sock.setblocking(True)
    t0 = time.monotonic()
    try:
        deps = json.loads(a.deps)
    except ValueError:
        deps = {}
    imported = preload(deps)
    import threading  # noqa: PLC0415

    unsafe = None
    if threading.active_count() > 1:
        # a fork copies only this thread: locks the others hold would stay locked in the worker
        unsafe = (f"threads running after preload ({', '.join(t.name for t in threading.enumerate())}): "
                  "forking is unsafe")
        print(f"fork server: {unsafe}", file=sys.stderr, flush=True)
    gc.collect()
    gc.freeze()  # imported objects stay out of the collector: their pages stay shared after fork
    prefix = _prefix_id()
    # Reap intermediate children only (waitpid(child)); workers are re-parented away from us.
    _send(sock, {"type": "ready", "pid": os.getpid(), "preload": round(time.monotonic() - t0, 4),
                 "imported": imported})
    buf = bytearray()
    while True:
        try:
            req, fds = _recv(sock, buf)
        except (OSError, ValueError) as e:
            print(f"fork server: bad request: {e}", file=sys.stderr, flush=True)
            return 1
        if req is None:
            return 0  # the supervisor closed its end: we are done
        try:
            if req.get("type") != "fork":
                reply = {"type": "error", "error": f"unknown request {req.get('type')!r}"}
            else:
                reply = fork_worker(req, fds, sock, prefix, unsafe)
        finally:
            for fd in fds:
                os.close(fd)
        _send(sock, reply)


if __name__ == "__main__":
    sys.exit(main())
