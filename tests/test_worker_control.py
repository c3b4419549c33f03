"""The worker's supervisor channel driven by the test itself: a real `python -m worker` on one
end of a socket pair, frames written by the test on the other."""

from __future__ import annotations

import asyncio
import time

from helpers import ChannelWorker, Client, run, write_config

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
    # Queued before the worker even starts: its channel thread reads it at once.
    w = ChannelWorker(config_dir, uuid, port, tmp_path / "worker.log", before_start=[
        {"type": "local_scripts", "initial": True, "changes": [{"change": "added", "path": str(scripts / "early.py")}]}])
    try:
        w.wait_ready()

        async def go():
            async with Client(f"http://127.0.0.1:{port}") as c:
                t0 = time.monotonic()
                while [s["nodeclassid"] for s in await c.cmd("list_local_workers")] != ["early"]:
                    assert time.monotonic() - t0 < 10, "the script was never listed"
                    await asyncio.sleep(0.02)
        run(go())
        assert w.stop() == 0
    finally:
        w.close()
    out = (tmp_path / "worker.log").read_text(errors="replace")
    bad = [ln for ln in out.splitlines() if " ERROR " in ln or "Traceback" in ln or "Error:" in ln]
    assert not bad, out
