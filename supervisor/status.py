"""What the CLI and the host's control socket both show: a worker's live status (its state file
checked against a living supervisor), its human form, and the CLI's error line. A module of its
own so that cli.py is a front end only and nobody imports it as a library."""

from __future__ import annotations

import sys
import time
from typing import Any

from worker.tls import scheme as tls_scheme

from .crash import CrashRecord
from .files import WorkerPaths, identity_alive, lock_held


def err(msg: str) -> None:
    print(f"fn-supervise: {msg}", file=sys.stderr)


def live_status(paths: WorkerPaths) -> dict[str, Any]:
    st = paths.read_state() or {}
    cfg = paths.read_config_or_empty()
    alive = identity_alive(st.get("supervisor")) and lock_held(paths.lock)
    out = dict(st)
    out["id"] = paths.name
    out["name"] = cfg.get("name")
    out["supervisor_alive"] = alive
    if not alive:
        if not st:
            out["state"] = "STOPPED"
        elif st.get("state") not in ("FATAL", "STOPPED"):
            out["state"] = "STOPPED"
            out["reason"] = f"supervisor gone (was {st.get('state')})"
        out["worker"] = None
    out.setdefault("port", cfg.get("port"))
    out.setdefault("host", cfg.get("host"))
    if out.get("port") is None:
        out["port"] = cfg.get("port")
    out["url"] = f"{tls_scheme(cfg)}://{out.get('host')}:{out.get('port')}/"  # wss:// with "ssl": true
    out["update"] = update_line(paths, cfg)
    ready_at = out.get("ready_at")
    out["uptime"] = (time.time() - ready_at) if (alive and ready_at) else None
    return out


def update_line(paths: WorkerPaths, cfg: dict[str, Any]) -> str | None:
    """What update_on_startup found (a pending venv is used at the next restart)."""
    try:
        from .environment import describe_update  # noqa: PLC0415
    except ImportError:
        return None
    return describe_update(paths.data_dir(cfg))


def format_status(s: dict[str, Any]) -> str:
    lines = [f"{s['id']} ({s.get('name')})",
             f"  state:       {s.get('state')}" + (f"  ({s.get('reason')})" if s.get("reason") else "")]
    sup = s.get("supervisor") or {}
    wk = s.get("worker") or {}
    lines.append(f"  supervisor:  {sup.get('pid') if s.get('supervisor_alive') else '-'}")
    lines.append(f"  worker:      {wk.get('pid', '-') if wk else '-'}")
    lines.append(f"  address:     {s.get('url') or str(s.get('host')) + ':' + str(s.get('port'))}")
    up = s.get("uptime")
    lines.append(f"  uptime:      {f'{up:.1f}s' if up is not None else '-'}")
    launches = s.get("launches") or {}
    lines.append(f"  restarts:    {s.get('restarts', 0)}"
                 + (f"  (workers forked {launches.get('fork', 0)}, spawned {launches.get('spawn', 0)})"
                    if launches else ""))
    r = s.get("last_restart")
    if r:
        phases = ", ".join(f"{k} {r[k]:.3f}s" for k in ("detect", "delay", r.get("launch"), "boot", "graph_load")
                           if isinstance(r.get(k), (int, float)))
        lines.append(f"  last restart: {r.get('total', 0):.3f}s by {r.get('launch')} ({phases})")
    fs = s.get("fork_server")
    if fs:
        lines.append(f"  fork server: pid {fs.get('pid')} " + ("ready" if fs.get("ready") else
                                                               "alive, preloading" if fs.get("alive") else "dead")
                     + (f", preload {fs['preload']:.2f}s" if isinstance(fs.get("preload"), (int, float)) else ""))
    j = s.get("journal") if s.get("supervisor_alive") else None
    if j:
        lines.append(f"  DISK FULL:   edits refused since {time.strftime('%H:%M:%S', time.localtime(j.get('since') or 0))}: "
                     f"{j.get('reason')} (reads go on; edits resume by themselves when there is room)")
    q = s.get("quarantine") or {}
    if q:
        lines.append(f"  SAFE MODE:   {len(q)} node(s) quarantined (never run; lift: fn-supervise lift {s['id']} NODE)")
        for nid, info in q.items():
            lines.append(f"    {nid}: {(info or {}).get('reason')}")
    env = s.get("env") or {}
    lines.append(f"  environment: {env.get('fingerprint') or '-'}  ({env.get('python') or '-'})")
    if s.get("update"):
        lines.append(f"  update:      {s['update']}")
    crashes = s.get("crashes") or []
    lines.append(f"  crashes:     {len(crashes)} recorded")
    for c in crashes[-5:]:
        try:
            lines.append("    " + CrashRecord(**c).summary())
        except TypeError:
            lines.append(f"    {c}")
    for sc in s.get("sidecars") or []:
        last = sc.get("last_exit") or {}
        lines.append(f"  sidecar:     {sc.get('name')}: {sc.get('state')} pid {sc.get('pid') or '-'}, "
                     f"{sc.get('restarts', 0)} restarts" + (f", last exit {last}" if last else ""))
    if s.get("log"):
        lines.append(f"  log:         {s['log']}")
    return "\n".join(lines)
