"""Process-manager snippets for one worker: a systemd unit (or the template unit) and a
supervisord `[program:...]` section. Pure rendering: the caller passes the command, the base
folder and the worker's SupervisorConfig; `fn-supervise systemd-unit` / `supervisord-conf`
print the result, and examples/systemd and examples/supervisord are these outputs verbatim.

How the timeouts nest with ours (SupervisorConfig, seconds):

  stop      our staged worker stop takes at most stop_deadline() = stop_grace + term_timeout +
            kill_timeout; after it the sidecars are stopped (bounded, at most SIDECAR_STOP).
            TimeoutStopSec / stopwaitsecs = stop_deadline + SIDECAR_STOP + STOP_MARGIN, so the
            process manager's SIGKILL only ever hits a supervisor that is itself stuck.
  start     READY=1 comes once the worker serves. Before that: the venv build (bounded by the
            install timeouts of environment.py, and extended live with EXTEND_TIMEOUT_USEC) and
            up to start_budget starts of start_timeout each with a capped backoff between them.
            TimeoutStartSec covers all of it, so our own FATAL decides, not systemd's timer.
  watchdog  optional (--watchdog). Pings stop while the worker is hung (systemd.py); a
            WatchdogSec of at least watchdog_floor() leaves the hang to our own detector first.

Exit codes (runner.py) and what the process managers do with them:
  0 stopped (SIGTERM, or stop_worker from a client)  -> not restarted (Restart=on-failure,
                                                        autorestart=unexpected with exitcodes 0)
  1 unexpected error, or killed by a signal           -> restarted
  2 usage / unknown worker, 3 already supervised elsewhere, 4 FATAL (the worker never got
  ready in start_budget starts), 5 the environment could not be built -> not restarted: restarting fn-supervise
     cannot fix any of them, and supervisord has no restart limit once a program counts as
     running, so these would otherwise loop forever (supervisord #1285).
"""

from __future__ import annotations

import math
import os
import shlex
import site
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import SupervisorConfig

SIDECAR_STOP = 30.0    # SidecarSet.stop: hosts 3 s, monitor-started children up to 15 s + kill 5 s
STOP_MARGIN = 5.0      # interpreter exit, file writes, a slow box
START_MARGIN = 60.0
RESTART_SEC = 5        # systemd's 100 ms default would storm; supervisord has its own backoff
START_LIMIT_INTERVAL = 600
START_LIMIT_BURST = 5
SUPERVISORD_STARTSECS = 3
SUPERVISORD_STARTRETRIES = 3
NO_RESTART_EXIT_CODES = (2, 3, 4, 5)
LOG_MAX_BYTES = "10MB"
LOG_BACKUPS = 3
KILL = "/bin/kill"


def prepare_budget() -> float:
    """Worst case of a venv build + install + verify (environment.py's own timeouts)."""
    try:
        from . import environment as env  # noqa: PLC0415
        return float(env.VENV_TIMEOUT + env.INSTALL_TIMEOUT + env.VERIFY_TIMEOUT)
    except (ImportError, AttributeError):
        return 1140.0


def stop_timeout(cfg: SupervisorConfig) -> int:
    """TimeoutStopSec / stopwaitsecs: strictly above everything our stop may take."""
    return int(math.ceil(cfg.stop_deadline() + SIDECAR_STOP + STOP_MARGIN))


def start_timeout(cfg: SupervisorConfig, venv: bool = True) -> int:
    """TimeoutStartSec: venv build + every start attempt our start budget allows."""
    t = cfg.start_budget * (cfg.start_timeout + cfg.backoff_cap) + START_MARGIN
    if venv:
        t += prepare_budget()
    return int(math.ceil(t))


def watchdog_floor(cfg: SupervisorConfig) -> int:
    """Smallest WatchdogSec that leaves a hung worker to our own detector (2 x (hang limit + kill))."""
    return int(math.ceil(2 * (cfg.heartbeat_timeout + cfg.kill_timeout + 1.0)))


@dataclass
class Target:
    """How to run fn-supervise: an absolute argv prefix, extra environment, the base folder."""
    command: list[str]
    base: str
    env: dict[str, str] = field(default_factory=dict)


def fn_supervise_command(argv0: str | None = None, executable: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The running fn-supervise as an absolute command: the console script if we were started
    through it, else `<python> -m supervisor` (plus PYTHONPATH when the package is not installed
    in that interpreter's site-packages)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if argv0:
        a = os.path.abspath(argv0)
        if os.path.basename(a).startswith("fn-supervise") and os.path.isfile(a) and os.access(a, os.X_OK):
            return [a], {}
    exe = os.path.abspath(executable or sys.executable)  # not realpath: a venv's python must stay itself
    root = str(Path(__file__).resolve().parent.parent)
    installed = {os.path.realpath(p) for p in (site.getsitepackages() + [site.getusersitepackages()])}
    env = {} if os.path.realpath(root) in installed else {"PYTHONPATH": root}
    return [exe, "-m", "supervisor"], env


# ---------------------------------------------------------------- systemd
def _sd_escape(s: str) -> str:
    return s.replace("%", "%%")


def _sd_word(s: str) -> str:
    """One ExecStart= word: specifiers and variables escaped, quoted when needed."""
    s = _sd_escape(s).replace("$", "$$")
    if s and not any(c in s for c in " \t\"'\\;"):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sd_env(k: str, v: str) -> str:
    return "Environment=" + _sd_word(f"{k}={v}")


def systemd_unit(target: Target, cfg: SupervisorConfig, *, worker: str | None, name: str | None = None,
                 venv: bool = True, watchdog: float | None = None) -> str:
    """The unit for `worker` ("worker_<uuid>"), or the template unit fn-supervise@.service
    (instance name = the worker's uuid) when `worker` is None."""
    exec_worker = "worker_%i" if worker is None else _sd_word(worker)
    execstart = " ".join([_sd_word(c) for c in target.command] + ["run", exec_worker])
    head, desc = _unit_head(worker, name)
    stop = stop_timeout(cfg)
    start = start_timeout(cfg, venv)
    lines = head + [
        "",
        "[Unit]",
        f"Description={desc}",
        "After=network-online.target",
        "Wants=network-online.target",
        "# fn-supervise restarts the worker itself, without limit once it has been ready (a crash",
        "# loop quarantines the node in flight: safe mode); it ends FATAL (exit 4) only for a worker",
        "# that can never start. This only caps systemd's restarts of fn-supervise.",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        "# READY=1 once the worker has loaded its graph and listens; STATUS= on every state change.",
        "Type=notify",
        "# Only fn-supervise's main process notifies (it removes NOTIFY_SOCKET from its children's env).",
        "NotifyAccess=main",
        _sd_env("FUNCNODES_CONFIG_DIR", target.base),
        *(_sd_env(k, v) for k, v in sorted(target.env.items())),
        "Environment=PYTHONUNBUFFERED=1",
        f"ExecStart={execstart}",
        "# SIGHUP: fn-supervise restarts the worker with its config re-read.",
        f"ExecReload={KILL} -HUP $MAINPID",
        "# mixed: SIGTERM reaches fn-supervise alone, which stops the worker in stages (in-band stop:",
        "# the graph is saved and clients get close 1001; then SIGTERM, then SIGKILL to the worker's",
        "# process group) and then its sidecars. control-group would SIGTERM the worker directly and",
        "# race that. At TimeoutStopSec systemd's SIGKILL still reaches every process in the cgroup.",
        "KillMode=mixed",
        f"# > our stop deadline {cfg.stop_deadline():g}s (stop_grace {cfg.stop_grace:g} + term_timeout "
        f"{cfg.term_timeout:g} + kill_timeout {cfg.kill_timeout:g})",
        f"# + {SIDECAR_STOP:g}s for the sidecars + {STOP_MARGIN:g}s.",
        f"TimeoutStopSec={stop}",
        ("# venv build (" + f"{prepare_budget():g}s, extended live with EXTEND_TIMEOUT_USEC) + " if venv else "# ")
        + f"{cfg.start_budget} starts x ({cfg.start_timeout:g}s start_timeout + {cfg.backoff_cap:g}s backoff) "
        f"+ {START_MARGIN:g}s.",
        f"TimeoutStartSec={start}",
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "# 2 usage error, 3 already supervised elsewhere, 4 FATAL (the worker can never start), 5 the",
        "# environment could not be built: restarting fn-supervise does not fix these.",
        "RestartPreventExitStatus=" + " ".join(str(c) for c in NO_RESTART_EXIT_CODES),
        *memory_max_lines(cfg),
        *_watchdog_lines(cfg, watchdog),
        "", "[Install]", "WantedBy=default.target", "",
    ]
    return "\n".join(lines)


def _unit_head(worker: str | None, name: str | None) -> tuple[list[str], str]:
    """The comment at the top of a unit and its Description (the template's or one worker's)."""
    if worker is None:
        head = ["# fn-supervise@.service: one FuncNodes worker per instance; the instance name is the",
                "# worker's uuid:  systemctl enable --now fn-supervise@<uuid>",
                "# Generated by `fn-supervise systemd-unit --template`. Timeouts follow the default",
                "# `supervisor` settings; a worker with larger timers gets its own unit",
                "# (`fn-supervise systemd-unit worker_<uuid>`).",
                "# System unit: add User=/Group= below. User unit: ~/.config/systemd/user/."]
        desc = "fn-supervise: FuncNodes worker %i"
    else:
        label = f"{name} ({worker})" if name and name != worker else worker
        head = [f"# FuncNodes worker {label} supervised by fn-supervise.",
                f"# Generated by `fn-supervise systemd-unit {worker}` from the worker's `supervisor` settings.",
                "# System unit: add User=/Group= below. User unit: ~/.config/systemd/user/."]
        desc = _sd_escape(f"fn-supervise: FuncNodes worker {label}")
    return head, desc


def _watchdog_lines(cfg: SupervisorConfig, watchdog: float | None) -> list[str]:
    floor = watchdog_floor(cfg)
    if watchdog:
        return ([f"# below {floor}s, systemd may act on a hung worker before fn-supervise replaces it."]
                if watchdog < floor else []) + [f"WatchdogSec={watchdog:g}"]
    return [f"# Watchdog (pings stop while the worker is hung): --watchdog SEC, at least {floor}s.",
            f"#WatchdogSec={2 * floor}"]


MEMORY_HEADROOM = 256 * 2**20  # fn-supervise, its fork server and sidecars beside the worker


def memory_max_lines(cfg: SupervisorConfig) -> list[str]:
    """MemoryMax= for the unit's cgroup: the worker's memory_max plus room for the rest, so
    fn-supervise's own watch (which records why and restarts) acts before the kernel's OOM kill."""
    from .memory import parse_size  # noqa: PLC0415

    try:
        limit = parse_size(cfg.memory_max)
    except ValueError:
        return []
    if limit is None:
        return ["# memory_max in the worker's supervisor settings would add a matching MemoryMax=."]
    return [f"# memory_max {limit} bytes (fn-supervise kills and records the worker past it) + "
            f"{MEMORY_HEADROOM >> 20} MiB for fn-supervise, its fork server and sidecars.",
            f"MemoryMax={limit + MEMORY_HEADROOM}"]


# ---------------------------------------------------------------- supervisord
def _ini_value(s: str) -> str:
    return s.replace("%", "%%")  # supervisord expands %(name)s in every value


def _svd_env_value(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def supervisord_program(target: Target, cfg: SupervisorConfig, *, worker: str, uuid: str,
                        logfile: str, name: str | None = None) -> str:
    command = " ".join(shlex.quote(c) for c in [*target.command, "run", worker])
    env = {"FUNCNODES_CONFIG_DIR": target.base, **target.env, "PYTHONUNBUFFERED": "1"}
    env_line = ",".join(f"{k}={_svd_env_value(v)}" for k, v in env.items())
    stop = stop_timeout(cfg)
    label = f"{name} ({worker})" if name and name != worker else worker
    lines = [
        f"; FuncNodes worker {label} supervised by fn-supervise.",
        f"; Generated by `fn-supervise supervisord-conf {worker}` from the worker's `supervisor` settings.",
        "; fn-supervise stays in the foreground and restarts the worker itself (with backoff and a",
        "; crash budget); supervisord only restarts fn-supervise when it dies unexpectedly.",
        f"[program:fn-supervise-{uuid}]",
        f"command={_ini_value(command)}",
        f"environment={_ini_value(env_line)}",
        "autostart=true",
        "; exit 0 = stopped; 2 usage, 4 FATAL (the worker kept failing), 5 environment could not be",
        "; built: restarting cannot fix those, and supervisord has no restart limit once running.",
        "autorestart=unexpected",
        "exitcodes=" + ",".join(str(c) for c in (0, 2, 4, 5)),
        "; fn-supervise has read its config and taken its lock within a second; worker readiness",
        "; is its own business (state in `fn-supervise status`): a short startsecs lets a quick",
        "; failure (exit 3: already supervised) count as a failed start.",
        f"startsecs={SUPERVISORD_STARTSECS}",
        f"startretries={SUPERVISORD_STARTRETRIES}",
        "stopsignal=TERM",
        f"; > our stop deadline {cfg.stop_deadline():g}s + {SIDECAR_STOP:g}s sidecars + {STOP_MARGIN:g}s",
        f"stopwaitsecs={stop}",
        "; the TERM also reaches the sidecars (our process group; they stop on it); the worker runs in",
        "; a session of its own and is stopped by fn-supervise in stages. killasgroup: a SIGKILL at",
        "; stopwaitsecs leaves nothing behind (the worker follows on its lifeline).",
        "stopasgroup=true",
        "killasgroup=true",
        "redirect_stderr=true",
        f"stdout_logfile={_ini_value(logfile)}",
        f"stdout_logfile_maxbytes={LOG_MAX_BYTES}",
        f"stdout_logfile_backups={LOG_BACKUPS}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- host mode
HOST_START_TIMEOUT = 60  # READY=1 once the host listens and has started its first scan's workers


def host_stop_timeout(cfgs: list[SupervisorConfig]) -> int:
    """The host stops every worker at once: the slowest worker's stop + sidecars + the optional
    Workermanager (15 s) + margin."""
    worst = max([c.stop_deadline() for c in cfgs] or [SupervisorConfig().stop_deadline()])
    return int(math.ceil(worst + SIDECAR_STOP + 15.0 + STOP_MARGIN))


def host_args(metrics_port: int | None) -> list[str]:
    return ["host"] + (["--metrics-port", str(metrics_port)] if metrics_port is not None else [])


def host_systemd_unit(target: Target, cfgs: list[SupervisorConfig], *, metrics_port: int | None = None) -> str:
    """One unit for every autostart worker of the folder (`fn-supervise host`)."""
    execstart = " ".join([_sd_word(c) for c in target.command] + host_args(metrics_port))
    lines = [
        "# fn-supervise-host.service: every FuncNodes worker of the folder whose config has",
        "# autostart `always` or `unless-stopped`, supervised by one process (`fn-supervise host`).",
        "# Generated by `fn-supervise systemd-unit --host`. Workers added, changed or removed are",
        "# picked up while it runs; `fn-supervise list/status/stop/restart` talk to it over",
        "# <base>/fn-supervise-host.sock. System unit: add User=/Group= below.",
        "",
        "[Unit]",
        "Description=fn-supervise host: FuncNodes workers of " + _sd_escape(target.base),
        "After=network-online.target",
        "Wants=network-online.target",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        "# READY=1 once the control socket listens and the autostart workers are being started",
        "# (each worker's own readiness: `fn-supervise status`, or fn_supervise_worker_up).",
        "Type=notify",
        "NotifyAccess=main",
        _sd_env("FUNCNODES_CONFIG_DIR", target.base),
        *(_sd_env(k, v) for k, v in sorted(target.env.items())),
        "Environment=PYTHONUNBUFFERED=1",
        f"ExecStart={execstart}",
        "# SIGHUP: re-scan <base>/workers now (it also does so every second).",
        f"ExecReload={KILL} -HUP $MAINPID",
        "# mixed: SIGTERM to the host alone, which stops every worker in stages at once.",
        "KillMode=mixed",
        "# > the slowest worker's stop deadline + sidecars + Workermanager + margin",
        f"TimeoutStopSec={host_stop_timeout(cfgs)}",
        f"TimeoutStartSec={HOST_START_TIMEOUT}",
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "# 2 usage error, 3 another host runs for this folder",
        "RestartPreventExitStatus=2 3",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def host_supervisord_program(target: Target, cfgs: list[SupervisorConfig], *, logfile: str,
                             metrics_port: int | None = None) -> str:
    command = " ".join(shlex.quote(c) for c in [*target.command, *host_args(metrics_port)])
    env = {"FUNCNODES_CONFIG_DIR": target.base, **target.env, "PYTHONUNBUFFERED": "1"}
    env_line = ",".join(f"{k}={_svd_env_value(v)}" for k, v in env.items())
    lines = [
        "; Every FuncNodes worker of the folder with autostart `always` or `unless-stopped`,",
        "; supervised by one fn-supervise process. Generated by `fn-supervise supervisord-conf --host`.",
        "[program:fn-supervise-host]",
        f"command={_ini_value(command)}",
        f"environment={_ini_value(env_line)}",
        "autostart=true",
        "; exit 0 = stopped; 2 usage, 3 another host runs for this folder",
        "autorestart=unexpected",
        "exitcodes=0,2,3",
        f"startsecs={SUPERVISORD_STARTSECS}",
        f"startretries={SUPERVISORD_STARTRETRIES}",
        "stopsignal=TERM",
        "; > the slowest worker's stop deadline + sidecars + Workermanager + margin",
        f"stopwaitsecs={host_stop_timeout(cfgs)}",
        "stopasgroup=true",
        "killasgroup=true",
        "redirect_stderr=true",
        f"stdout_logfile={_ini_value(logfile)}",
        f"stdout_logfile_maxbytes={LOG_MAX_BYTES}",
        f"stdout_logfile_backups={LOG_BACKUPS}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- systemd socket activation
def listen_stream(host: str | None, port: int) -> str:
    """ListenStream= wants an address, not a name: resolve one (IPv4 first) at generation time."""
    import ipaddress  # noqa: PLC0415
    import socket  # noqa: PLC0415

    host = host or "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = sorted(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM),
                       key=lambda i: i[0] != socket.AF_INET)
        ip = ipaddress.ip_address(infos[0][4][0])
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def systemd_socket_unit(*, worker: str, port: int, host: str | None = None, name: str | None = None) -> str:
    """fn-supervise-<uuid>.socket: systemd holds the worker's port (even across restarts of
    fn-supervise itself) and passes it as fd 3 (LISTEN_FDS=1); fn-supervise hands it on to
    every worker it starts. Install beside the unit of `fn-supervise systemd-unit <worker>`
    under the same name, and enable the socket instead of the service."""
    uuid = worker[len("worker_"):] if worker.startswith("worker_") else worker
    label = f"{name} ({worker})" if name and name != worker else worker
    lines = [
        f"# Listening socket of FuncNodes worker {label}, held by systemd and passed to fn-supervise.",
        f"# Generated by `fn-supervise systemd-unit {worker} --socket`. Install it as",
        f"# fn-supervise-{uuid}.socket next to fn-supervise-{uuid}.service, then:",
        f"#   systemctl enable --now fn-supervise-{uuid}.socket",
        "# Connections that arrive while the worker (or fn-supervise) restarts wait in the backlog.",
        "",
        "[Unit]",
        _sd_escape(f"Description=fn-supervise: listening socket of FuncNodes worker {label}"),
        "",
        "[Socket]",
        f"ListenStream={listen_stream(host, port)}",
        "# one service for all connections (it accepts them itself), not one per connection",
        "Accept=no",
        "Backlog=4096",
        "ReusePort=no",
        f"Service=fn-supervise-{uuid}.service",
        "",
        "[Install]",
        "WantedBy=sockets.target",
        "",
    ]
    return "\n".join(lines)
