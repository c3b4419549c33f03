"""The worker's supervisor channel driven by the test itself: a real `python -m worker` on one
end of a socket pair, frames written by the test on the other."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

from conftest import REPO, poll_until
from harness import child_env
from helpers import Client, run, write_config
from worker.channel import FrameBuffer, encode

SCRIPT = '''
from worker.external import ExternalWorker

class Early(ExternalWorker):
    NODECLASSID = "early"
    NAME = "Early"
'''


def test_local_scripts_frame_before_ready_is_applied_once_ready(config_dir, port, tmp_path):
    """The discovery sidecar's first listing can arrive while the worker still listens (no graph
    yet): it is held and applied at ready, not dropped with an AttributeError in the log."""
    uuid = "c0ffee0000000000000000000000ea41"
    write_config(config_dir, uuid, port=port)
    scripts = config_dir / "workers" / f"worker_{uuid}" / "local_scripts"
    scripts.mkdir(parents=True)
    (scripts / "early.py").write_text(SCRIPT)
    ours, theirs = socket.socketpair()
    # Queued before the worker even starts: its channel thread reads it at once.
    ours.sendall(encode({"type": "local_scripts", "initial": True,
                         "changes": [{"change": "added", "path": str(scripts / "early.py")}]}))
    log = open(tmp_path / "worker.log", "wb")
    env = child_env(inherit_path=False)
    proc = subprocess.Popen([sys.executable, "-m", "worker", f"worker_{uuid}", "--dir", str(config_dir),
                             "--port", str(port), "--control-fd", str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    theirs.close()
    try:
        buf, frames = FrameBuffer(), []
        ours.settimeout(0.5)

        def ready():
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            try:
                data = ours.recv(65536)
            except socket.timeout:
                return False
            frames.extend(f for f in buf.feed(data) if isinstance(f, dict))
            return any(f.get("type") == "ready" for f in frames)
        poll_until(ready, 60, what="ready frame")

        async def go():
            async with Client(f"http://127.0.0.1:{port}") as c:
                t0 = time.monotonic()
                while [w["nodeclassid"] for w in await c.cmd("list_local_workers")] != ["early"]:
                    assert time.monotonic() - t0 < 10, "the script was never listed"
                    await asyncio.sleep(0.02)
        run(go())
        ours.sendall(encode({"type": "stop", "deadline": 5}))
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        ours.close()
        log.close()
    out = (tmp_path / "worker.log").read_text(errors="replace")
    bad = [ln for ln in out.splitlines() if " ERROR " in ln or "Traceback" in ln or "Error:" in ln]
    assert not bad, out
