"""supervisord (PyPI `supervisor`) as a test-only tool, in an environment of its own.

Its import name `supervisor` is also ours, so it can never share an interpreter with this
project: `supervisord_bin()` returns the bin folder of a venv at `<repo>/.envs/supervisord`
(gitignored) that holds it, building it with uv when it is missing or half-built (the marker file
is written last; a file lock keeps parallel sessions from building it twice; every step has a
timeout). The test run builds it itself, so CI needs no manual step.

`Supervisord` runs it in the foreground (nodaemon) with a config of its own in a tmp folder
(unix socket, pidfile, logs there) and talks to it with supervisorctl.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from uvenv import clean_env, ensure_venv

REPO = Path(__file__).resolve().parents[1]
PINS = ["supervisor==4.3.0"]


def supervisord_bin() -> Path:
    """bin/ of a venv with supervisord and supervisorctl; built with uv if needed."""
    # it must be PyPI's supervisor, importable from its own venv (not ours)
    check = ("import supervisor.supervisord, supervisor.options as o; "
             "assert 'site-packages' in o.__file__, o.__file__")
    return ensure_venv("supervisord", PINS, check).parent


class Supervisord:
    """A foreground supervisord with its own config in `root`, including `programs` (text)."""

    def __init__(self, root: Path, programs: str, env: dict[str, str] | None = None):
        self.bin = supervisord_bin()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock = self.root / "supervisor.sock"
        self.conf = self.root / "supervisord.conf"
        self.logfile = self.root / "supervisord.log"
        self.conf.write_text(
            "[unix_http_server]\n"
            f"file={self.sock}\n"
            "chmod=0700\n\n"
            "[supervisord]\n"
            "nodaemon=true\n"
            f"logfile={self.logfile}\n"
            f"pidfile={self.root / 'supervisord.pid'}\n"
            f"childlogdir={self.root}\n"
            "loglevel=debug\n\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            "[supervisorctl]\n"
            f"serverurl=unix://{self.sock}\n\n"
            + programs
        )
        e = clean_env()
        e.update(env or {})
        self.out = open(self.root / "supervisord.out", "wb")
        self.proc = subprocess.Popen([str(self.bin / "supervisord"), "-c", str(self.conf)], env=e,
                                     cwd=str(self.root), stdout=self.out, stderr=subprocess.STDOUT)

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "supervisorctl"), "-c", str(self.conf), *args], env=clean_env(),
                              capture_output=True, text=True, timeout=timeout, cwd=str(self.root))

    def status(self, program: str) -> str:
        """RUNNING / STARTING / BACKOFF / STOPPED / EXITED / FATAL ... ('' if unknown)."""
        r = self.ctl("status", program, timeout=10)
        parts = r.stdout.split()
        return parts[1] if len(parts) > 1 and parts[0] == program else ""

    def pid(self, program: str) -> int | None:
        r = self.ctl("pid", program, timeout=10)
        try:
            pid = int(r.stdout.strip())
        except ValueError:
            return None
        return pid or None

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def shutdown(self, timeout: float = 60.0) -> int:
        """supervisorctl shutdown, then wait for supervisord with a deadline (SIGKILL past it)."""
        if self.proc.poll() is None:
            try:
                self.ctl("shutdown", timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        if not self.out.closed:
            self.out.close()
        return self.proc.returncode


if __name__ == "__main__":  # build the env by hand: python tests/supervisordenv.py
    print(supervisord_bin())
