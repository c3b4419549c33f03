"""Smaller promises of issue 16 (defects 7 and 9): log level and location in the config, applied
by `fn-supervise restart` (SIGHUP); `logs -n N` prints N lines; `new` writes the stock worker's
`update_on_startup`; `--not-in-venv` is `--no-venv`; off Linux the CLI stops with a sentence; a
client that hangs up during the WebSocket handshake costs one debug line, not an ERROR."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

from conftest import REPO, poll_until
from helpers import DEMO_NODES, WorkerProc, write_config
from harness import make_worker, running_worker, start_supervisor, stop_supervisor


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True,
                          cwd=str(REPO), timeout=60, env=env)


def _hang_up_in_handshakes(port: int, n: int = 10) -> None:
    """The whole upgrade request, then a reset before the 101 can be written; and a partial one."""
    req = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        s.sendall(req if i else req[:40])
        s.close()


def test_handshake_hangup_is_one_debug_line_not_an_error(config_dir, port):
    write_config(config_dir, "hangup", supervisor={"log_level": "DEBUG"})
    w = WorkerProc(config_dir, "hangup", port).wait_ready()
    try:
        # A reset that arrives before the worker read the request leaves nothing to log (the read
        # just fails): hang up again until one lands inside a handshake.
        poll_until(lambda: _hang_up_in_handshakes(port, 3) or "hung up during the WebSocket handshake" in w.output(),
                   20, interval=0.1, what="the debug line")
        w.wait_ready()  # still serving
    finally:
        assert w.stop() == 0
    out = (config_dir / "worker_hangup.test.log").read_text()
    assert "Traceback" not in out, out[-3000:]
    assert all(" DEBUG " in ln for ln in out.splitlines() if "closing transport" in ln), out[-3000:]
    assert not [ln for ln in out.splitlines() if " ERROR " in ln], out[-3000:]


def test_restart_applies_changed_log_settings_and_logs_n(config_dir, port, tmp_path):
    paths = make_worker(config_dir, port, hb=0.5)
    cfg = paths.read_config()
    cfg["package_dependencies"] = {"demo_nodes": {"package": "demo_nodes", "path": str(DEMO_NODES)}}
    paths.write_config(cfg)
    sup = start_supervisor(paths, tmp_path)
    try:
        pid1 = poll_until(lambda: running_worker(paths), 30, what="worker ready")
        with open(paths.log_file(), "ab") as f:
            f.write(b"\n")  # what node code's print() of an empty line leaves in the log
        r = cli("logs", paths.name, "-n", "2")
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, repr(r.stdout)
        assert all(ln.strip() for ln in r.stdout.splitlines()), repr(r.stdout)
        default_log = paths.log_file()
        assert default_log.name == "worker.log" and "DEBUG" not in default_log.read_text()

        cfg = paths.read_config()
        cfg["supervisor"].update(log_file="logs/custom.log", log_level="debug")
        paths.write_config(cfg)
        assert cli("restart", paths.name).returncode == 0
        poll_until(lambda: running_worker(paths, not_pid=pid1), 30, what="restarted worker")
        custom = paths.data_dir() / "logs" / "custom.log"
        assert paths.log_file() == custom
        poll_until(custom.exists, 10, what="the new log file")
        poll_until(lambda: _hang_up_in_handshakes(port, 3) or "hung up during the WebSocket handshake"
                   in custom.read_text(), 20, interval=0.1, what="the worker's debug lines in the new log")
        text = custom.read_text()
        assert "log settings applied" in text and "level DEBUG" in text
        r = cli("logs", paths.name, "-n", "1")  # `logs` follows the setting
        # read again: the other hang-ups' debug lines may have been written since `text`
        assert r.stdout.strip() and r.stdout.strip() in custom.read_text()
        st = json.loads(cli("status", paths.name, "--json").stdout)
        assert st["log"] == str(custom)
    finally:
        stop_supervisor(sup, 20)


def test_new_writes_update_on_startup_and_accepts_not_in_venv(config_dir):
    r = cli("--dir", str(config_dir), "new", "--name", "a", "--not-in-venv", "--uuid", "notinvenv")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((config_dir / "workers" / "worker_notinvenv.json").read_text())
    assert cfg["supervisor"]["venv"] is False
    # funcnodes-worker's own defaults (spec: workermanager.md 3.2, worker-protocol.md)
    assert cfg["update_on_startup"] == {"funcnodes": True, "funcnodes-core": True, "funcnodes-worker": True}


def test_off_linux_the_cli_stops_with_a_sentence(config_dir):
    code = "import sys; sys.platform = 'darwin'; sys.argv = ['fn-supervise', 'list']; import supervisor.cli"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), env=env, timeout=60)
    assert r.returncode == 1
    assert "runs on Linux only" in r.stderr and "Traceback" not in r.stderr, r.stderr
