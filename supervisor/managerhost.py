"""`fn-supervise workermanager`: the real FuncNodes Workermanager, with every worker it starts
run under fn-supervise (spec/workermanager.md 5.1, hook A).

One foreground process (what systemd or supervisord expect):
  * our subprocess-monitor sidecar on loopback (subprocess_monitor 0.4.0's API);
  * the manager, `<PY> -m funcnodes --dir BASE startworkermanager [--host H] [--port P]`, started
    with SUBPROCESS_MONITOR_HOST/PORT/PID pointing at that monitor and at us, so the funcnodes
    launcher runs it in-process (no monitor of its own) and each worker start it makes
    (`set_active`, autostart) arrives at the monitor's POST /spawn;
  * each such start becomes `fn-supervise --dir BASE run worker_<U>`, once per uuid: a request
    for a worker that runs or starts is answered with its supervisor's PID.

`funcnodes runserver` finds this manager by the host/port in <BASE>/config.json and uses it.
SIGTERM/SIGINT, or the manager exiting on its own (`stop` message, kill file), stop everything:
the manager, the supervisors started here (each stops its worker gracefully), the monitor.
Exit code: 0 after a stop by signal or a clean manager exit, 1 if the manager failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from .sidecarset import MONITOR, _die_with_parent, request_base, start_supervised, stop_all

log = logging.getLogger("fn-supervise")


def manager_command(python: str | None, base: Path, host: str | None, port: int | None,
                    debug: bool = False) -> list[str]:
    """The manager's command line: `<python> -m funcnodes ...`, or the `funcnodes` script."""
    if python:
        argv = [python, "-m", "funcnodes"]
    else:
        exe = shutil.which("funcnodes")
        if exe is None:
            raise FileNotFoundError("no `funcnodes` on PATH; pass --python <interpreter with funcnodes>")
        argv = [exe]
    if debug:
        argv.append("--debug")
    argv += ["--dir", str(base), "startworkermanager"]
    if host:
        argv += ["--host", host]
    if port:
        argv += ["--port", str(port)]
    return argv


class ManagerHost:
    def __init__(self, base: Path, argv: list[str], monitor_port: int = 0, stop_timeout: float = 15.0):
        self.base = Path(base).resolve()
        self.argv = argv
        self.monitor_port = monitor_port
        self.stop_timeout = stop_timeout
        self.children: dict[tuple[str, str], subprocess.Popen] = {}
        self.manager: subprocess.Popen | None = None
        self.monitor = None
        self.events: asyncio.Queue = asyncio.Queue()

    def on_message(self, name: str, msg: dict[str, Any]) -> None:  # on the loop
        t = msg.get("type")
        if t == "monitor":
            self.events.put_nowait(("monitor", msg))
        elif t == "spawn_worker":
            reply = start_supervised(request_base(msg.get("args")) or self.base, str(msg.get("uuid") or ""),
                                     self.children)
            reply.update({"type": "spawn_worker_result", "request_id": msg.get("request_id")})
            self.monitor.send(reply)
        elif t == "error":
            log.error("monitor: %s", msg.get("error"))

    async def run(self) -> int:
        from sidecars.entry import run_named
        from sidecars.host import SidecarKeeper

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.events.put_nowait, ("signal", sig))
        self.monitor = SidecarKeeper("monitor", run_named, (MONITOR, "127.0.0.1", self.monitor_port),
                                   kwargs={"owner_pid": os.getpid()}, on_message=self.on_message, loop=loop)
        self.monitor.start()
        try:
            return await self._run(loop)
        finally:
            await self._stop_all()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _run(self, loop: asyncio.AbstractEventLoop) -> int:
        try:
            kind, msg = await asyncio.wait_for(self.events.get(), 30.0)
        except asyncio.TimeoutError:
            log.error("the subprocess monitor did not come up within 30s")
            return 1
        if kind == "signal":
            return 0
        host, port = msg.get("host"), msg.get("port")
        self.monitor.args = (MONITOR, host, port)  # a restarted monitor keeps its address
        env = dict(os.environ)
        env.update({"SUBPROCESS_MONITOR_HOST": str(host), "SUBPROCESS_MONITOR_PORT": str(port),
                    "SUBPROCESS_MONITOR_PID": str(os.getpid()), "FUNCNODES_CONFIG_DIR": str(self.base)})
        self.manager = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.info("workermanager pid %d (%s); worker starts go to the monitor on %s:%s",
                 self.manager.pid, " ".join(self.argv), host, port)
        while True:
            getter = asyncio.ensure_future(self.events.get())
            exited = loop.run_in_executor(None, self.manager.wait)
            done, _ = await asyncio.wait({getter, exited}, return_when=asyncio.FIRST_COMPLETED)
            if exited in done:
                getter.cancel()
                code = self.manager.returncode
                log.info("workermanager exited with %s", code)
                return 0 if code == 0 else 1
            kind, msg = getter.result()
            if kind == "signal":
                log.info("%s received: stopping", signal.Signals(msg).name)
                return 0

    async def _stop_all(self) -> None:
        """The manager and every supervisor started here get SIGTERM; SIGKILL after the timeout."""
        await stop_all([self.manager, *self.children.values()], [self.monitor], self.stop_timeout)


def run_workermanager(base: Path, argv: list[str], monitor_port: int = 0) -> int:
    return asyncio.run(ManagerHost(base, argv, monitor_port).run())
