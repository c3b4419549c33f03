"""Soak: SIGKILL a worker at random moments of a continuous edit stream, as long as asked, and
check after every restart that every acknowledged edit is back (the CI test does 50 kills).

    python benchmarks/soak_journal.py [--kills 500] [--minutes 0] [--durability process|fsync]

Prints one line per kill and a summary: kills, acknowledged edits, edits lost (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("FUNCNODES_CONFIG_DIR", tempfile.mkdtemp(prefix="fnsoak-cfg-"))

from conftest import free_port  # noqa: E402
from editstream import EditStream, adopt, check, observed  # noqa: E402
from helpers import Client, WorkerProc, write_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=500)
    ap.add_argument("--minutes", type=float, default=0, help="stop after this long (0: no limit)")
    ap.add_argument("--durability", default="process", choices=["process", "fsync"])
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fnsoak-"))
    uid, port = "soak", free_port()
    write_config(base, uid, durability=a.durability, journal_min_bytes=4096, save_delay=0.05)
    rng = random.Random(a.seed)
    stream = EditStream(seed=a.seed)
    lost, end = 0, time.monotonic() + a.minutes * 60 if a.minutes else float("inf")
    print(f"seed {a.seed}, folder {base}")
    for i in range(a.kills + 1):
        w = WorkerProc(base, uid, port).wait_ready(60)

        async def verify():
            async with Client(w.url) as c:
                return await observed(c)

        got = asyncio.run(verify())
        problems = check(stream, got)
        lost += len(problems)
        adopt(stream, got)
        print(f"kill {i}: {stream.acked} acknowledged so far, {len(got.nodes)} nodes, "
              f"{'OK' if not problems else 'LOST: ' + '; '.join(problems)}", flush=True)
        if i == a.kills or time.monotonic() > end:
            w.stop()
            break

        async def edit():
            async with Client(w.url) as c:
                asyncio.get_running_loop().call_later(rng.uniform(0.1, 2.0), os.kill, w.proc.pid, signal.SIGKILL)
                await stream.run(c, asyncio.Event())

        asyncio.run(edit())
        w.proc.wait(10)
        w.log.close()
    print(f"{i} kills, {stream.acked} acknowledged edits, {lost} problems")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
