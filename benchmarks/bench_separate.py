"""Per-call overhead of separate_process=True: our fork (worker/separate.py) beside what stock
does with the flag (funcnodes-core's thread wrapper) and a plain call, for a trivial function.
The fork copies the parent's page tables, so it is measured again with a larger parent.

    python benchmarks/bench_separate.py [--calls 200] [--heap-mb 0,300]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "FUNCNODES_CONFIG_DIR" not in os.environ:  # funcnodes-core writes there at import: ours, removed at exit
    os.environ["FUNCNODES_CONFIG_DIR"] = tempfile.mkdtemp(prefix="bench-separate-")
    atexit.register(shutil.rmtree, os.environ["FUNCNODES_CONFIG_DIR"], True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from funcnodes_core.utils.functions import make_run_in_new_thread  # noqa: E402

from worker import separate  # noqa: E402


def tiny(x: int) -> int:
    return x + 1


async def per_call(call, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        assert await call(i) == i + 1
        out.append(time.perf_counter() - t)
    return out


async def direct(x: int) -> int:
    return tiny(x)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--heap-mb", default="0,300")
    a = ap.parse_args()
    thread = make_run_in_new_thread(tiny)

    async def forked(x: int) -> int:
        return await separate.run(tiny, (x,), {})

    ballast = []
    print(f"{'parent RSS':>10} {'call':>28} {'median ms':>10} {'p90 ms':>8}")
    for mb in (int(v) for v in a.heap_mb.split(",")):
        ballast.append(bytearray(mb * 2**20))
        for i in range(0, len(ballast[-1]), 4096):
            ballast[-1][i] = 1
        rss = psutil.Process().memory_info().rss / 2**20
        for name, fn in (("plain call", direct), ("stock: thread (funcnodes-core)", thread), ("ours: fork", forked)):
            await per_call(fn, 5)  # warm-up
            xs = sorted(await per_call(fn, a.calls))
            print(f"{rss:>8.0f}MB {name:>28} {statistics.median(xs) * 1e3:>10.3f} {xs[int(len(xs) * 0.9)] * 1e3:>8.3f}")
    thread.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
