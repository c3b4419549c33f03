"""No acknowledged edit is lost to kill -9: a continuous edit stream, SIGKILLs at random moments.

Each round starts a real worker on the same folder, streams edits from one client without pause,
kills the worker with SIGKILL after a random time, restarts it and compares what it holds with
every edit it acknowledged. A small `journal_min_bytes` makes snapshots and journal cuts frequent,
so kills also land while a snapshot is written and while the journal is cut.

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

from editstream import EditStream, adopt, check, observed
from helpers import Client, WorkerProc, write_config


async def _round(w: WorkerProc, stream: EditStream, rng: random.Random) -> None:
    async with Client(w.url) as c:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(rng.uniform(0.1, 0.9), os.kill, w.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(stream.run(c, stop), 30)


async def _verify(w: WorkerProc, stream: EditStream) -> list[str]:
    async with Client(w.url) as c:
        got = await observed(c)
    problems = check(stream, got)
    adopt(stream, got)
    return problems


@pytest.mark.timeout(420)
@pytest.mark.parametrize("durability,kills", [("process", 26), ("fsync", 14)])
def test_random_sigkill_during_edit_stream_loses_no_acknowledged_edit(config_dir, port, durability, kills):
    uid = f"crash_{durability}"
    write_config(config_dir, uid, durability=durability, journal_min_bytes=4096, save_delay=0.05)
    rng = random.Random(f"{durability}-{kills}")
    stream = EditStream(seed=rng.randrange(1 << 30))
    failures: list[str] = []
    for i in range(kills):
        w = WorkerProc(config_dir, uid, port).wait_ready()
        if i:  # after every restart: everything acknowledged before the last kill is back
            problems = asyncio.run(asyncio.wait_for(_verify(w, stream), 60))
            failures += [f"after kill {i}: {p}" for p in problems]
        asyncio.run(_round(w, stream, rng))
        w.proc.wait(10)
        assert w.proc.returncode == -signal.SIGKILL
        w.log.close()
    w = WorkerProc(config_dir, uid, port).wait_ready()
    failures += [f"after the last kill: {p}" for p in asyncio.run(_verify(w, stream))]
    log = w.output()
    assert w.stop() == 0
    assert not failures, "\n".join(failures[:20])
    assert stream.acked > kills * 5, f"only {stream.acked} edits acknowledged over {kills} kills"
    # node errors (an Add whose input was just unwired) are the graph's; ours must be silent
    ours = [line for line in log.splitlines() if "fn_supervise" in line and ("ERROR" in line or "not replayed" in line)]
    assert not ours, "\n".join(ours[:20])
    # a clean stop leaves everything in nodespace.json (the journal is cut to its header)
    data = config_dir / "workers" / f"worker_{uid}"
    state = json.loads((data / "nodespace.json").read_text())
    assert {n["id"] for n in state["backend"]["nodes"]} == set(stream.model.nodes)
    assert (data / "nodespace.journal").read_bytes().count(b"\n") == 1
    assert not list(data.glob(".*.tmp")), "a temp file was left behind"
