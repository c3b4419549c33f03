"""No acknowledged edit is lost to kill -9: a continuous edit stream, SIGKILLs at random moments.

A real supervisor runs a real worker on one folder; each round streams edits from one client
without pause, kills the worker with SIGKILL after a random time, and once the supervisor has
brought a new worker up (through its warm fork server, as in production) compares what it holds
with every edit it acknowledged. A small `journal_min_bytes` makes snapshots and journal cuts
frequent, so kills also land while a snapshot is written and while the journal is cut.

40 random kills here; with the deterministic ones of test_journal_files.py (kills inside an
append, a snapshot and a cut, and kill -9 after seeded edits) the suite SIGKILLs a worker
under edits 52 times, and checks every acknowledged edit after each. More: soak_journal.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal

import pytest

from conftest import poll_until
from editstream import EditStream, adopt, check, observed
from harness import make_worker, running_worker, start_supervisor, state, stop_supervisor
from helpers import DEMO_NODES, Client


async def _round(url: str, pid: int, stream: EditStream, rng: random.Random) -> None:
    async with Client(url) as c:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(rng.uniform(0.1, 0.9), os.kill, pid, signal.SIGKILL)
        await asyncio.wait_for(stream.run(c, stop), 30)


async def _verify(url: str, stream: EditStream) -> list[str]:
    async with Client(url) as c:
        got = await observed(c)
    problems = check(stream, got)
    adopt(stream, got)
    return problems


def _crash_of(paths, pid: int) -> dict | None:
    return next((c for c in state(paths).get("crashes") or [] if c.get("pid") == pid), None)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("durability,kills", [("process", 26), ("fsync", 14)])
def test_random_sigkill_during_edit_stream_loses_no_acknowledged_edit(config_dir, port, tmp_path, sup_procs,
                                                                      durability, kills):
    # Our kills are no node's fault and each follows a run: min_uptime 0 makes every one a healthy
    # run (restarted at once, by fork), and no node is quarantined for being in flight at our kills.
    paths = make_worker(config_dir, port, min_uptime=0.0, quarantine_after=1_000_000, heartbeat_timeout=30.0)
    paths.update_config(durability=durability, journal_min_bytes=4096, save_delay=0.05,
                        package_dependencies={"demo_nodes": {"package": "demo_nodes", "path": str(DEMO_NODES)}})
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(f"{durability}-{kills}")
    stream = EditStream(seed=rng.randrange(1 << 30))
    failures: list[str] = []
    pid = poll_until(lambda: running_worker(paths), 30, what="worker ready")
    for i in range(kills):
        if i:  # after every restart: everything acknowledged before the last kill is back
            pid = poll_until(lambda old=pid: running_worker(paths, not_pid=old), 30, what=f"restart after kill {i}")
            problems = asyncio.run(asyncio.wait_for(_verify(url, stream), 60))
            failures += [f"after kill {i}: {p}" for p in problems]
        asyncio.run(_round(url, pid, stream, rng))
        # the supervisor saw this worker die of a SIGKILL it did not send
        crash = poll_until(lambda p=pid: _crash_of(paths, p), 10, what=f"crash record of kill {i + 1}")
        assert crash["signal_name"] == "SIGKILL" and not crash["signal_by_supervisor"], crash
    pid = poll_until(lambda old=pid: running_worker(paths, not_pid=old), 30, what="restart after the last kill")
    failures += [f"after the last kill: {p}" for p in asyncio.run(_verify(url, stream))]
    assert stop_supervisor(sup, timeout=20) == 0
    st = state(paths)
    assert st["launches"] == {"fork": kills + 1, "spawn": 0}, st["launches"]  # every restart a warm fork
    assert not failures, "\n".join(failures[:20])
    assert stream.acked > kills * 5, f"only {stream.acked} edits acknowledged over {kills} kills"
    # node errors (an Add whose input was just unwired) are the graph's; ours must be silent
    log = "\n".join(f.read_text(errors="replace") for f in sorted(paths.data_dir().glob("worker.log*")))
    ours = [line for line in log.splitlines() if "fn_supervise" in line and ("ERROR" in line or "not replayed" in line)]
    assert not ours, "\n".join(ours[:20])
    # a clean stop leaves everything in nodespace.json (the journal is cut to its header)
    data = paths.data_dir()
    saved = json.loads((data / "nodespace.json").read_text())
    assert {n["id"] for n in saved["backend"]["nodes"]} == set(stream.model.nodes)
    assert (data / "nodespace.journal").read_bytes().count(b"\n") == 1
    assert not list(data.glob(".*.tmp")), "a temp file was left behind"
