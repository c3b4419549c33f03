"""`fn-supervise`: create, run, inspect and control supervised FuncNodes workers.

  fn-supervise [--dir D] new [--name N] [--uuid U] [--host H] [--port P] [--no-venv] [--dep SPEC]...
  fn-supervise [--dir D] worker_<uuid>            same as `run worker_<uuid>` (foreground)
  fn-supervise [--dir D] run worker_<uuid> [--no-venv]
  fn-supervise [--dir D] list
  fn-supervise [--dir D] status worker_<uuid> [--json]
  fn-supervise [--dir D] stop worker_<uuid> [--timeout S]
  fn-supervise [--dir D] restart worker_<uuid>
  fn-supervise [--dir D] lift worker_<uuid> NODE...   lift a quarantine (safe mode): the nodes run again
  fn-supervise [--dir D] logs worker_<uuid> [-n N] [-f]
  fn-supervise [--dir D] modules list|install|remove worker_<uuid> [NAME]
                                                  a worker's package dependencies (install/remove
                                                  through the running worker, as the UI does)
  fn-supervise [--dir D] demo [--port P] [--seed nodespace.json] [--no-venv]
  fn-supervise [--dir D] systemd-unit (worker_<uuid> [--socket] | --template) [--exec PATH] [--watchdog SEC]
  fn-supervise [--dir D] supervisord-conf worker_<uuid> [--exec PATH]
  fn-supervise [--dir D] workermanager [--python PY] [--host H] [--port P] [--monitor-port P]
                                                  the real FuncNodes Workermanager (foreground); the
                                                  workers it starts run under fn-supervise

<base> = --dir, else $FUNCNODES_CONFIG_DIR, else ~/.funcnodes.

`run` stays in the foreground (what systemd and supervisord expect). SIGTERM/SIGINT stop the
worker gracefully and exit 0; SIGHUP restarts the worker with its config re-read; SIGUSR1
makes it read lift requests (<workers>/worker_<uuid>.lift, written by `lift`).
Exit codes: 0 ok, 1 error (or a stop that timed out), 2 usage / unknown worker,
3 already running, 4 FATAL (the worker never got ready in start_budget starts), 5 environment
could not be prepared (or no free port).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

# Linux only: pidfds, prctl (parent-death signal, child subreaper), /proc. Elsewhere stop here with
# a sentence, before the imports below fail with a traceback.
if not sys.platform.startswith("linux"):
    sys.exit(f"fn-supervise: runs on Linux only (it needs pidfd, prctl and a child subreaper); this is "
             f"{sys.platform}. Run it in a Linux VM or container (WSL2 works).")

from worker.tls import scheme as tls_scheme  # noqa: E402

from .config import SupervisorConfig  # noqa: E402
from .files import (AlreadyRunning, WorkerPaths, base_dir, identity_alive, list_workers, lock_held,
                    parse_worker_id)
from .progress import Progress
from .runner import EXIT_ENV, EXIT_ERROR, EXIT_OK, EXIT_RUNNING, EXIT_USAGE, run_supervisor
from .status import err as _err  # noqa: F401 (the CLI's name for it)
from .status import format_status as _fmt_status  # noqa: F401
from .status import live_status

log = logging.getLogger("fn-supervise")

PORT_RANGE = (int(os.environ.get("FUNCNODES_WS_WORKER_STARTPORT", "9382")),
              int(os.environ.get("FUNCNODES_WS_WORKER_ENDPORT", "9582")))


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, taken: set[int]) -> int:
    for p in range(PORT_RANGE[0], PORT_RANGE[1] + 1):
        if p not in taken and _port_free(host, p):
            return p
    raise RuntimeError(f"no free port in {PORT_RANGE[0]}..{PORT_RANGE[1]}")


def parse_dep(spec: str) -> tuple[str, dict[str, Any]]:
    """'pkg', 'pkg==1.2', 'pkg>=1' or a local path -> (name, {"package", "version"[, "path"]})."""
    p = Path(spec).expanduser()
    if ("/" in spec or spec.startswith(".")) and p.exists():
        p = p.resolve()
        name = p.stem if p.is_file() else p.name
        return name, {"package": name, "version": None, "path": str(p)}
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", spec)
    if not m:
        raise ValueError(f"bad dependency: {spec!r}")
    name, ver = m.group(1), m.group(2).strip() or None
    return name, {"package": name, "version": ver}


def seed_nodespace(data_dir: Path, seed: Path | None) -> bool:
    """Demo hook: put a seed nodespace.json into a worker's data folder (only if it has none)."""
    if seed is None:
        return False
    target = Path(data_dir) / "nodespace.json"
    if target.exists():
        return False
    from worker.fsutil import atomic_write
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, Path(seed).read_bytes())
    return True


def _env_available() -> bool:
    try:
        from . import environment  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def create_worker(base: Path, *, name: str | None = None, uuid: str | None = None, host: str = "127.0.0.1",
                  port: int | None = None, no_venv: bool = False, deps: list[str] = (),
                  supervisor: dict[str, Any] | None = None, progress: Progress | None = None) -> WorkerPaths:
    uuid = uuid or uuidlib.uuid4().hex
    paths = WorkerPaths(base, parse_worker_id(uuid))
    if paths.config.exists():
        raise FileExistsError(f"{paths.name} exists already ({paths.config})")
    taken = {int(c.get("port")) for c in (w.read_config_or_empty() for w in list_workers(base))
             if isinstance(c.get("port"), int)}
    if port is None:
        port = pick_port(host, taken)
    package_deps: dict[str, Any] = {}
    for spec in deps:
        n, d = parse_dep(spec)
        package_deps[n] = d
    cfg: dict[str, Any] = {
        "type": "WSWorker", "uuid": paths.uuid, "name": name or paths.uuid,
        "data_path": None, "env_path": None,
        "worker_dependencies": {}, "package_dependencies": package_deps,
        "autostart": "never",  # the supervisor restarts; a manager autostart would race it
        # the stock worker's defaults: a new venv worker checks for newer FuncNodes on its first run
        "update_on_startup": {"funcnodes": True, "funcnodes-core": True, "funcnodes-worker": True},
        "host": host, "port": port, "ssl": False,
        "supervisor": dict(supervisor or {}),
    }
    if no_venv:
        cfg["supervisor"]["venv"] = False
    data = paths.data_dir(cfg)
    created_data = not data.exists()
    data.mkdir(parents=True, exist_ok=True)
    for sub in ("files", "local_scripts"):
        (data / sub).mkdir(exist_ok=True)
    try:
        if not no_venv:
            from . import environment  # noqa: PLC0415
            info = environment.ensure_environment(data, package_deps, python=sys.executable, progress=progress)
            cfg["env_path"] = str(Path(info.python).parent.parent)
            if progress is not None:
                progress.done(f"environment ready ({info.fingerprint})")
    except BaseException:
        if created_data:
            shutil.rmtree(data, ignore_errors=True)
        raise
    paths.write_config(cfg)
    return paths


def _resolve(base: Path, wid: str) -> WorkerPaths | None:
    try:
        uuid = parse_worker_id(wid)
    except ValueError:
        uuid = None
    if uuid is not None:
        p = WorkerPaths(base, uuid)
        if p.config.exists():
            return p
    for p in list_workers(base):  # also accept a name
        if p.read_config_or_empty().get("name") == wid:
            return p
    return None


def _known(base: Path, wid: str) -> WorkerPaths | None:
    """The worker's paths, or None after telling the user it does not exist."""
    paths = _resolve(base, wid)
    if paths is None:
        _err(f"unknown worker {wid!r} in {base / 'workers'}")
    return paths


def _sidecars_for(paths: WorkerPaths):
    """The sidecars, unless the worker config says `"sidecars": {"enabled": false}`."""
    sc = paths.read_config_or_empty().get("sidecars")
    if isinstance(sc, dict) and sc.get("enabled") is False:
        return None
    from .sidecarset import SidecarSet  # noqa: PLC0415 (imports multiprocess only when used)

    return SidecarSet


def _signal_supervisor(paths: WorkerPaths, sig: int) -> dict[str, Any] | None:
    st = paths.read_state() or {}
    ident = st.get("supervisor")
    if not (identity_alive(ident) and lock_held(paths.lock)):
        return None
    os.kill(int(ident["pid"]), sig)  # identity verified by PID + start time + boot id
    return ident


# ---------------------------------------------------------------- commands
def cmd_new(a: argparse.Namespace, base: Path) -> int:
    prog = Progress()
    try:
        paths = create_worker(base, name=a.name, uuid=a.uuid, host=a.host, port=a.port, no_venv=a.no_venv,
                              deps=a.dep or [], progress=prog)
    except FileExistsError as e:
        _err(str(e))
        return EXIT_USAGE
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    except ImportError as e:
        _err(f"venv support is not available ({e}); use --no-venv")
        return EXIT_ENV
    except Exception as e:  # noqa: BLE001 (InstallError and friends)
        prog.done()
        _err(f"environment could not be prepared: {type(e).__name__}: {e}")
        return EXIT_ENV
    if getattr(a, "autostart", None):  # host mode: a running host starts it now
        paths.update_config(autostart=a.autostart)
        from .hostctl import after_new  # noqa: PLC0415

        after_new(base, paths.name)
    print(paths.name)
    return EXIT_OK


def _setup_logging() -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("fn-supervise[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger("fn-supervise")
    root.handlers[:] = [h]
    root.setLevel(logging.INFO)
    root.propagate = False


def cmd_run(a: argparse.Namespace, base: Path, on_ready=None) -> int:
    paths = _known(base, a.worker)
    if paths is None:
        return EXIT_USAGE
    _setup_logging()
    try:
        return run_supervisor(paths, no_venv=getattr(a, "no_venv", False), on_ready=on_ready,
                              sidecar_factory=_sidecars_for(paths))
    except AlreadyRunning:
        st = paths.read_state() or {}
        pid = (st.get("supervisor") or {}).get("pid")
        _err(f"{paths.name} is already supervised" + (f" by PID {pid}" if pid else "")
             + f" (lock {paths.lock}); use `fn-supervise stop {paths.name}` first")
        return EXIT_RUNNING


def cmd_list(a: argparse.Namespace, base: Path) -> int:
    rows = []
    for p in list_workers(base):
        s = live_status(p)
        wk = s.get("worker") or {}
        rows.append((p.name, str(s.get("name") or ""), str(s.get("state")), str(s.get("port") or "-"),
                     str(wk.get("pid") or "-")))
    if a.json:
        print(json.dumps([dict(zip(("id", "name", "state", "port", "pid"), r)) for r in rows], indent=2))
        return EXIT_OK
    for r in rows:
        print("\t".join(r))
    return EXIT_OK


def cmd_status(a: argparse.Namespace, base: Path) -> int:
    paths = _known(base, a.worker)
    if paths is None:
        return EXIT_USAGE
    s = live_status(paths)
    print(json.dumps(s, indent=2, default=str) if a.json else _fmt_status(s))
    return EXIT_OK


def cmd_stop(a: argparse.Namespace, base: Path) -> int:
    paths = _known(base, a.worker)
    if paths is None:
        return EXIT_USAGE
    ident = _signal_supervisor(paths, signal.SIGTERM)
    if ident is None:
        print(f"{paths.name} is not running")
        return EXIT_OK
    cfg = SupervisorConfig.from_worker_config(paths.read_config_or_empty())
    timeout = a.timeout if a.timeout is not None else cfg.stop_deadline() + 5.0
    deadline = time.monotonic() + timeout
    while identity_alive(ident):
        if time.monotonic() > deadline:
            _err(f"supervisor {ident['pid']} did not stop within {timeout:g}s")
            return EXIT_ERROR
        time.sleep(0.05)
    print(f"{paths.name} stopped")
    return EXIT_OK


def cmd_lift(a: argparse.Namespace, base: Path) -> int:
    """Lift the quarantine of nodes (safe mode): the running supervisor tells its worker at once."""
    paths = _known(base, a.worker)
    if paths is None:
        return EXIT_USAGE
    cfg = paths.read_config_or_empty()
    q = paths.read_quarantine(cfg)
    unknown = [n for n in a.node if n not in q]
    if unknown:
        _err(f"not quarantined in {paths.name}: {' '.join(unknown)}"
             + (f" (quarantined: {' '.join(q)})" if q else " (nothing is quarantined)"))
        return EXIT_USAGE
    st = paths.read_state() or {}
    ident = st.get("supervisor")
    if identity_alive(ident) and lock_held(paths.lock):
        with open(paths.lift_requests, "a", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in a.node))
        os.kill(int(ident["pid"]), signal.SIGUSR1)  # identity verified by PID + start time + boot id
        deadline = time.monotonic() + 10.0

        def still_quarantined() -> bool:
            # Done when both say so: the quarantine file (written first) and the state file that
            # `status` reads (written after), so a `status` right after this shows it lifted.
            st = paths.read_state() or {}
            return any(n in paths.read_quarantine(cfg) or n in (st.get("quarantine") or {}) for n in a.node)

        while still_quarantined():
            if time.monotonic() > deadline:
                _err(f"supervisor {ident['pid']} did not lift {' '.join(a.node)} within 10s")
                return EXIT_ERROR
            time.sleep(0.05)
    else:
        for n in a.node:
            q.pop(n, None)
        paths.write_quarantine(q, cfg)
    print(f"{paths.name}: lifted {' '.join(a.node)}")
    return EXIT_OK


def cmd_restart(a: argparse.Namespace, base: Path) -> int:
    paths = _known(base, a.worker)
    if paths is None:
        return EXIT_USAGE
    if _signal_supervisor(paths, signal.SIGHUP) is None:
        _err(f"{paths.name} is not running; start it with `fn-supervise run {paths.name}`")
        return EXIT_ERROR
    print(f"{paths.name} restarting")
    return EXIT_OK


def _tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except OSError:
        return []
    # Blank lines (a worker printing an empty line) carry nothing: -n counts lines with text.
    return [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()][-n:] if n > 0 else []


def cmd_logs(a: argparse.Namespace, base: Path) -> int:
    paths = _known(base, a.worker)
    if paths is None:
        return EXIT_USAGE
    path = paths.log_file()
    for line in _tail(path, a.lines):
        print(line)
    sys.stdout.flush()
    if not a.follow:
        return EXIT_OK
    try:
        f = open(path, "rb")
        f.seek(0, os.SEEK_END)
    except OSError:
        f = None
    try:
        while True:
            if f is None:
                try:
                    f = open(path, "rb")
                except OSError:
                    time.sleep(0.2)
                    continue
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
                continue
            try:  # rotated: a new file under the same name
                if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
                    f.close()
                    f = open(path, "rb")
                    continue
            except OSError:
                pass
            time.sleep(0.2)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if f is not None:
            f.close()


def default_demo_seed() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    for cand in (root / "examples" / "demo" / "nodespace.json", root / "examples" / "demo_nodespace.json"):
        if cand.exists():
            return cand
    return None


def add_demo_nodes(paths: WorkerPaths) -> bool:
    """Demo hook: copy examples/demo_nodes.py into the data folder and record it as a path
    dependency (the seed graph uses its demo.* nodes). Only if not recorded yet."""
    src = Path(__file__).resolve().parent.parent / "examples" / "demo_nodes.py"
    cfg = paths.read_config()
    deps = cfg.setdefault("package_dependencies", {})
    if not src.exists() or "demo_nodes" in deps:
        return False
    from worker.fsutil import atomic_write
    target = paths.data_dir(cfg) / "demo_nodes.py"
    atomic_write(target, src.read_bytes())
    deps["demo_nodes"] = {"package": "demo_nodes", "version": None, "path": str(target)}
    paths.write_config(cfg)
    return True


def cmd_modules(a: argparse.Namespace, base: Path) -> int:
    from . import modules  # noqa: PLC0415

    paths = _known(base, a.worker)
    if paths is None:
        return EXIT_USAGE
    name, dep = None, None
    if a.action != "list":
        if not a.name:
            _err(f"modules {a.action} needs a NAME")
            return EXIT_USAGE
        try:
            name, dep = parse_dep(a.name)
        except ValueError as e:
            _err(str(e))
            return EXIT_USAGE
    return modules.run(a.action, paths, name, dep, a.json)


def cmd_demo(a: argparse.Namespace, base: Path) -> int:
    paths = None
    for p in list_workers(base):
        if p.read_config_or_empty().get("name") == "demo":
            paths = p
            break
    if paths is None:
        no_venv = a.no_venv or not _env_available()
        try:
            paths = create_worker(base, name="demo", host="127.0.0.1", port=a.port, no_venv=no_venv,
                                  progress=Progress())
        except Exception as e:  # noqa: BLE001
            _err(f"cannot create the demo worker: {type(e).__name__}: {e}")
            return EXIT_ENV
        print(f"created {paths.name}")
    add_demo_nodes(paths)
    seed = Path(a.seed) if a.seed else default_demo_seed()
    if seed_nodespace(paths.data_dir(), seed):
        print(f"seeded {paths.data_dir() / 'nodespace.json'} from {seed}")

    def ready(host: str, port: int) -> None:
        scheme = tls_scheme(paths.read_config_or_empty())
        print(f"demo worker {paths.name} serving at {scheme}://{host}:{port}/  (Ctrl-C to stop)", flush=True)

    a.worker = paths.name
    return cmd_run(a, base, on_ready=ready)


def _target(a: argparse.Namespace, base: Path):
    from . import units  # noqa: PLC0415
    if a.exec:
        if not os.path.isabs(a.exec):
            raise ValueError(f"--exec needs an absolute path, not {a.exec!r}")
        return units.Target([a.exec], str(base))
    cmd, env = units.fn_supervise_command()
    return units.Target(cmd, str(base), env)


def _host_unit(a: argparse.Namespace, base: Path, kind: str) -> int:
    """systemd-unit --host / supervisord-conf --host: the unit of `fn-supervise host`."""
    from . import units  # noqa: PLC0415
    from .files import list_workers as _workers  # noqa: PLC0415

    try:
        target = _target(a, base)
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    cfgs = [SupervisorConfig.from_worker_config(p.read_config_or_empty()) for p in _workers(base)]
    if kind == "systemd":
        print(units.host_systemd_unit(target, cfgs, metrics_port=a.metrics_port), end="")
    else:
        print(units.host_supervisord_program(target, cfgs, logfile=str(base / "fn-supervise-host.log"),
                                             metrics_port=a.metrics_port), end="")
    return EXIT_OK


def cmd_systemd_unit(a: argparse.Namespace, base: Path) -> int:
    from . import units  # noqa: PLC0415
    if getattr(a, "host", False):
        return _host_unit(a, base, "systemd")
    if a.watchdog is not None and a.watchdog <= 0:
        _err("--watchdog must be > 0")
        return EXIT_USAGE
    if a.template == (a.worker is not None):
        _err("systemd-unit needs a worker (worker_<uuid>) or --template, not both")
        return EXIT_USAGE
    if a.socket and a.template:
        _err("--socket needs a worker: each worker listens on a port of its own")
        return EXIT_USAGE
    try:
        target = _target(a, base)
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    if a.template:
        print(units.systemd_unit(target, SupervisorConfig(), worker=None, watchdog=a.watchdog), end="")
        return EXIT_OK
    paths = _known(base, a.worker)
    if paths is None:
        return EXIT_USAGE
    wcfg = paths.read_config_or_empty()
    if a.socket:
        port = wcfg.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or port <= 0:
            _err(f"{paths.name} has no port in its config; set one (`port` in {paths.config}) for a socket unit")
            return EXIT_USAGE
        try:
            print(units.systemd_socket_unit(worker=paths.name, port=port, host=wcfg.get("host"),
                                            name=wcfg.get("name")), end="")
        except OSError as e:
            _err(f"cannot resolve host {wcfg.get('host')!r}: {e}")
            return EXIT_USAGE
        return EXIT_OK
    cfg = SupervisorConfig.from_worker_config(wcfg)
    print(units.systemd_unit(target, cfg, worker=paths.name, name=wcfg.get("name"),
                             venv=bool(cfg.venv and not cfg.python), watchdog=a.watchdog), end="")
    return EXIT_OK


def cmd_supervisord_conf(a: argparse.Namespace, base: Path) -> int:
    from . import units  # noqa: PLC0415
    if getattr(a, "host", False):
        return _host_unit(a, base, "supervisord")
    if a.worker is None:
        _err("supervisord-conf needs a worker (worker_<uuid>) or --host")
        return EXIT_USAGE
    try:
        target = _target(a, base)
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    paths = _known(base, a.worker)
    if paths is None:
        return EXIT_USAGE
    wcfg = paths.read_config_or_empty()
    cfg = SupervisorConfig.from_worker_config(wcfg)
    logfile = str(paths.data_dir(wcfg) / "fn-supervise.log")
    print(units.supervisord_program(target, cfg, worker=paths.name, uuid=paths.uuid, logfile=logfile,
                                    name=wcfg.get("name")), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fn-supervise", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="FuncNodes base folder (default $FUNCNODES_CONFIG_DIR or ~/.funcnodes)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    _worker_commands(sub, common)
    _deploy_commands(sub, common)
    _fleet_commands(sub, common)
    return ap


def _worker_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """One worker: create, run, inspect, stop, restart, lift, logs, modules."""
    p = sub.add_parser("new", parents=[common], help="create a worker (config, data folder, venv)")
    p.add_argument("--name")
    p.add_argument("--uuid")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--no-venv", "--not-in-venv", dest="no_venv", action="store_true",
                   help="run with this interpreter, no venv (--not-in-venv: the stock CLI's name)")
    p.add_argument("--dep", action="append", metavar="SPEC", help="package dependency (repeatable)")
    p.add_argument("--autostart", nargs="?", const="unless-stopped", choices=("always", "unless-stopped", "never"),
                   help="supervise it under `fn-supervise host` (default unless-stopped)")

    p = sub.add_parser("run", parents=[common], help="supervise a worker in the foreground")
    p.add_argument("worker")
    p.add_argument("--no-venv", "--not-in-venv", dest="no_venv", action="store_true")

    p = sub.add_parser("list", parents=[common], help="list workers")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", parents=[common], help="show a worker's supervisor state")
    p.add_argument("worker")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stop", parents=[common], help="stop a supervised worker (and its supervisor)")
    p.add_argument("worker")
    p.add_argument("--timeout", type=float, default=None)

    p = sub.add_parser("restart", parents=[common], help="restart the worker (SIGHUP to its supervisor)")
    p.add_argument("worker")

    p = sub.add_parser("lift", parents=[common], help="lift the quarantine of nodes (safe mode): they run again")
    p.add_argument("worker")
    p.add_argument("node", nargs="+", help="node id(s), as `status` lists them")

    p = sub.add_parser("logs", parents=[common], help="show the worker's log")
    p.add_argument("worker")
    p.add_argument("-n", "--lines", type=int, default=50)
    p.add_argument("-f", "--follow", action="store_true")

    p = sub.add_parser("modules", parents=[common], help="list, install or remove a worker's package dependencies")
    p.add_argument("action", choices=("list", "install", "remove"))
    p.add_argument("worker")
    p.add_argument("name", nargs="?", metavar="NAME", help="package (pkg, pkg==1.2, pkg>=1) or a path in the data folder")
    p.add_argument("--json", action="store_true", help="list as JSON")


def _deploy_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """The demo, and units for systemd and supervisord."""
    p = sub.add_parser("demo", parents=[common], help="create (if needed) and run a demo worker on loopback")
    p.add_argument("--port", type=int)
    p.add_argument("--seed", help="nodespace.json to seed the demo worker with")
    p.add_argument("--no-venv", "--not-in-venv", dest="no_venv", action="store_true")

    p = sub.add_parser("systemd-unit", parents=[common], help="print a systemd unit (Type=notify) for a worker")
    p.add_argument("worker", nargs="?")
    p.add_argument("--template", action="store_true", help="the template unit fn-supervise@.service (%%i = uuid)")
    p.add_argument("--exec", metavar="PATH", help="absolute path of fn-supervise to run (default: this one)")
    p.add_argument("--watchdog", type=float, metavar="SEC", help="WatchdogSec= (pings stop while the worker hangs)")
    p.add_argument("--socket", action="store_true",
                   help="print the matching .socket unit (systemd holds the port and passes it as fd 3)")
    p.add_argument("--host", action="store_true", help="the unit of `fn-supervise host` (every autostart worker)")
    p.add_argument("--metrics-port", type=int, help="with --host: pass --metrics-port to the host")

    p = sub.add_parser("supervisord-conf", parents=[common], help="print a supervisord [program:...] section")
    p.add_argument("worker", nargs="?")
    p.add_argument("--host", action="store_true", help="the section of `fn-supervise host` (every autostart worker)")
    p.add_argument("--metrics-port", type=int, help="with --host: pass --metrics-port to the host")
    p.add_argument("--exec", metavar="PATH", help="absolute path of fn-supervise to run (default: this one)")


def _fleet_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Many workers: the FuncNodes Workermanager, and `fn-supervise host`."""
    p = sub.add_parser("workermanager", parents=[common],
                       help="run the FuncNodes Workermanager; the workers it starts run under fn-supervise")
    p.add_argument("--python", metavar="PY", help="interpreter with funcnodes installed (default: `funcnodes` on PATH)")
    p.add_argument("--host", help="manager host (default: worker_manager.host in <base>/config.json)")
    p.add_argument("--port", type=int, help="manager port (default: worker_manager.port in <base>/config.json)")
    p.add_argument("--monitor-port", type=int, default=0, help="subprocess monitor port (default: a free one)")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("host", parents=[common], help="supervise every autostart worker of the folder in one process")
    p.add_argument("--no-venv", "--not-in-venv", dest="no_venv", action="store_true")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics on 127.0.0.1:PORT (0: any)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address of /metrics (0.0.0.0 in a container)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between scans of <base>/workers")
    p.add_argument("--no-sidecars", action="store_true", help="no shared discovery / subprocess monitor")
    p.add_argument("--no-fork-server", action="store_true", help="spawn every worker cold (no warm fork server)")
    p.add_argument("--workermanager", action="store_true",
                   help="also run the FuncNodes Workermanager; the workers it starts run in this host")
    p.add_argument("--python", metavar="PY", help="with --workermanager: interpreter with funcnodes installed")
    p.add_argument("--wm-host", help="with --workermanager: manager host (default: <base>/config.json)")
    p.add_argument("--wm-port", type=int, help="with --workermanager: manager port (default: <base>/config.json)")
    p.add_argument("--monitor-port", type=int, default=0, help="shared subprocess monitor port (default: a free one)")


def cmd_host(a: argparse.Namespace, base: Path) -> int:
    from .host import run_host  # noqa: PLC0415

    argv = None
    if a.workermanager:
        from .managerhost import manager_command  # noqa: PLC0415

        if a.no_sidecars:
            _err("--workermanager needs the shared subprocess monitor (drop --no-sidecars)")
            return EXIT_USAGE
        try:
            argv = manager_command(a.python, base, a.wm_host, a.wm_port)
        except FileNotFoundError as e:
            _err(str(e))
            return EXIT_USAGE
    _setup_logging()
    return run_host(base, no_venv=a.no_venv, metrics_port=a.metrics_port, poll=a.poll, sidecars=not a.no_sidecars,
                    manager_argv=argv, monitor_port=a.monitor_port,
                    metrics_bind=a.metrics_addr, fork_server=not a.no_fork_server)


def cmd_workermanager(a: argparse.Namespace, base: Path) -> int:
    from .managerhost import manager_command, run_workermanager  # noqa: PLC0415

    try:
        argv = manager_command(a.python, base, a.host, a.port, a.debug)
    except FileNotFoundError as e:
        _err(str(e))
        return EXIT_USAGE
    _setup_logging()
    return run_workermanager(base, argv, a.monitor_port)


COMMANDS = {"new": cmd_new, "run": cmd_run, "list": cmd_list, "status": cmd_status, "stop": cmd_stop,
            "restart": cmd_restart, "lift": cmd_lift, "logs": cmd_logs, "modules": cmd_modules, "demo": cmd_demo,
            "systemd-unit": cmd_systemd_unit, "supervisord-conf": cmd_supervisord_conf,
            "workermanager": cmd_workermanager, "host": cmd_host}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `fn-supervise worker_<uuid>` == `fn-supervise run worker_<uuid>`
    i = 0
    while i < len(argv):
        if argv[i] == "--dir":
            i += 2
            continue
        if argv[i].startswith("--dir="):
            i += 1
            continue
        if argv[i].startswith("worker_"):
            argv.insert(i, "run")
        break
    ap = build_parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    base = base_dir(a.dir)
    from .hostctl import dispatch  # noqa: PLC0415 (a running host answers list/status/stop/restart)

    hosted = dispatch(a, base)
    if hosted is not None:
        return hosted
    return COMMANDS[a.cmd](a, base)


if __name__ == "__main__":
    sys.exit(main())
