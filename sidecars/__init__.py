"""Sidecar processes of the fn-supervise supervisor, and their host.

Each sidecar is a `multiprocess` process (start method "spawn", see host.py) of the
supervisor's interpreter, connected to it by one `multiprocess.Pipe`. It exits when the
supervisor goes away (pipe EOF; PR_SET_PDEATHSIG=SIGTERM as a second line), ignores SIGINT, and
is restarted one-for-one by `sidecars.host.SidecarKeeper` on its own crash budget.
Per-worker mode forks one process for both (sidecars.pair.run_pair; routing: sidecars.roles):
each role runs as below on a pipe of its own inside it, and the process restarts whole.

  sidecars.discovery.run_discovery(conn, scripts_dir, debounce_ms=200)
  sidecars.monitor.run_monitor(conn, host="127.0.0.1", port=0, *, kill_timeout=5.0,
                               owner_pid=None, worker_spawn_timeout=30.0, delegate_workers=True)
  sidecars.host.SidecarKeeper(name, target, args, *, on_message, loop=None, budget=5,
                            window=60.0, backoff_base=0.2, backoff_cap=5.0)

Messages, sidecar -> supervisor
  discovery:
    {"type": "local_scripts", "initial": true, "changes": [{"change": "added", "path": p}, ...]}
        once per start: a full snapshot of the .py files (a restarted sidecar resyncs; the
        receiver drops what it had loaded but is not listed)
    {"type": "local_scripts", "changes": [{"change": "added"|"modified"|"deleted", "path": p}]}
        one message per debounced burst; paths are absolute
  monitor:
    {"type": "monitor", "host": h, "port": p, "pid": monitor_pid, "env_pid": pid}
        listening; env_pid is what spawned commands get as SUBPROCESS_MONITOR_PID
    {"type": "spawn_worker", "uuid": U, "request_id": rid, "cmd": c, "args": [...], "env": {...}}
        a FuncNodes worker start arrived at POST /spawn; answer with spawn_worker_result
    {"type": "error", "sidecar": "monitor", "error": text}
        cannot listen (the sidecar then exits non-zero)
  any sidecar (consumed by SidecarKeeper, not passed to on_message):
    {"type": "pgroup", "op": "add"|"remove", "pgid": n}
        a process group the sidecar owns; the host SIGKILLs the groups still recorded when the
        sidecar dies

Messages, supervisor -> sidecar
  {"type": "stop"}                                   any sidecar: clean exit
  {"type": "spawn_worker_result", "request_id": rid, "pid": int|None, "error": str|None}
                                                     monitor: the answer to spawn_worker
"""
