"""A second client's ping while a large binary value streams to the first (issue 16).

    python benchmarks/bench_binary_stream.py [--mb 50] [--reps 3] [--chunks 0,1048576,262144]

One worker at a time (stock, then ours once per `binary_chunk_size` in --chunks; 0 = one frame,
the old behaviour), on loopback, with the demo nodes. Client A sets a --mb string on a demo.text
node (POST /message/), then fetches it --reps times with `get_io_full_value` and `as_bytes`
(binary `type=result` frames, as the React UI does). Client B, in a process of its own so that
A's reassembly does not stall it, connects after the value is set and pings every 2 ms for the
whole time A downloads. Printed: B's ping round trip (p50, p99, max) and A's download time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_worker_compare import BENCH, Spawned, free_port, tmpdir  # noqa: E402
from fnclient import FNClient  # noqa: E402
from stockenv import stock_python  # noqa: E402
import bench_worker as bw  # noqa: E402


async def pinger(url: str, interval: float) -> None:
    """Child process: ping until stdin closes; print the round trips (s) as one JSON line."""
    rtts: list[float] = []
    async with FNClient(url, id_prefix="p") as c:
        print("ready", flush=True)
        stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.read))
        while not stop.done():
            rtts.append(await c.ping(timeout=30))
            await asyncio.sleep(interval)
    print(json.dumps(rtts), flush=True)


async def one(kind: str, python: str, args, chunk: int | None) -> dict:
    cfg = {"binary_chunk_size": chunk} if (kind == "ours" and chunk is not None) else {}
    w = Spawned(kind, tmpdir(kind), free_port(), python, **cfg)
    try:
        await w.first_pong()
        async with FNClient(w.url, id_prefix="a") as a:
            await bw.ensure_library(a, "demo-nodes", "demo.text")
            nid = (await a.call("add_node", id="demo.text"))["id"]
            value = "x" * int(args.mb * 1024 * 1024)
            reply = await a.request_msg(a.make_cmd("set_io_value", {"nid": nid, "ioid": "value", "value": value}),
                                        timeout=300, via_http=True)
            assert reply.get("type") == "result", str(reply)[:300]
            await asyncio.sleep(1.0)  # the preview frame of the set is out of the way
            b = subprocess.Popen([sys.executable, __file__, "--pinger", w.url, "--interval", str(args.interval)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert b.stdout.readline().strip() == "ready"
            await asyncio.sleep(0.2)
            downloads = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                r = await a.request("get_io_full_value", {"nid": nid, "ioid": "value"}, as_bytes=True, timeout=300)
                downloads.append(time.perf_counter() - t0)
                assert r.get("_binary") and len(r["result"]) >= len(value), str(r)[:300]
            out, _ = b.communicate("", timeout=60)
            rtts = json.loads(out.strip().splitlines()[-1])
    finally:
        await w.stop()
    return {"kind": kind, "chunk": chunk, "ping": bw.summary_ms(rtts),
            "download_s_median": round(sorted(downloads)[len(downloads) // 2], 3)}


async def main_async(args) -> None:
    runs = [("stock", stock_python(), None)] if not args.no_stock else []
    runs += [("ours", args.python or sys.executable, int(c)) for c in args.chunks.split(",")]
    rows = [await one(k, py, args, c) for k, py, c in runs]
    print(f"\n{args.mb:g} MB value, get_io_full_value(as_bytes) x{args.reps} to client A; client B pings every "
          f"{args.interval * 1000:g} ms meanwhile\n")
    print("| worker | binary_chunk_size | B ping p50 ms | p99 ms | max ms | pings | A download (median) s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p = r["ping"]
        chunk = "-" if r["chunk"] is None else ("one frame" if r["chunk"] == 0 else f"{r['chunk']:,}")
        print(f"| {r['kind']} | {chunk} | {p['p50_ms']:.2f} | {p['p99_ms']:.1f} | {p['max_ms']:.1f} | {p['n']} "
              f"| {r['download_s_median']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.002)
    ap.add_argument("--chunks", default="0,1048576,262144", help="our binary_chunk_size values (0 = one frame)")
    ap.add_argument("--no-stock", action="store_true")
    ap.add_argument("--python", help="interpreter for our worker (default: this one)")
    ap.add_argument("--pinger", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pinger:
        asyncio.run(pinger(args.pinger, args.interval))
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
