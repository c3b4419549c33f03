"""Our worker and the stock FuncNodes worker (funcnodes-worker 1.6.0), side by side, in one run.

    python benchmarks/bench_worker_compare.py [--quick] [--out results.json]

Both workers run alone (no supervisor, no Workermanager) on loopback in fresh config folders, with
the same demo node library (examples/demo_nodes.py). The stock worker comes from the venv that
tests/stockenv.py builds (<repo>/.envs/stock, with uv, on first use). The measurements are those
of ../shared/bench/bench_worker.py (imported from there), on the demo nodes:

- cold start: process spawn -> first pong (median of --starts fresh starts, after one warm-up)
- ping and `uuid` round trips (single client, sequential), p50/p99
- RPCs per second, 8 clients, closed loop, `uuid`
- a 200-node chain of demo.add: time from setting the first input to the last output's io_value
  frame; per-node overhead = per-node time - the pretrigger delay (funcnodes-core's 0.01 s)
- full_state with those 200 nodes
- a 5 MB message: POST /message/ -> large_message stub -> GET
- idle RSS (library loaded, no graph) and after the graph

and prints a table with both figures, the ratio ours/stock and the targets of issue 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "bench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

import bench_worker as bw  # noqa: E402
from fnclient import FNClient, wait_for_pong  # noqa: E402
from stockenv import LAUNCHER, stock_python, write_stock_config  # noqa: E402

UUID = "benchw0001"
PRETRIGGER_DELAY_S = 0.01  # funcnodes-core's default Node.pretrigger_delay


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_our_config(base: Path, port: int) -> None:
    d = base / "workers"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"uuid": UUID, "type": "WSWorker", "name": UUID, "host": "127.0.0.1", "port": port,
           "package_dependencies": {"demo_nodes": {"package": "demo_nodes",
                                                   "path": str(REPO / "examples" / "demo_nodes.py")}}}
    (d / f"worker_{UUID}.json").write_text(json.dumps(cfg))


class Spawned:
    def __init__(self, kind: str, base: Path, port: int, python: str):
        self.kind, self.base, self.port = kind, base, port
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        env["FUNCNODES_CONFIG_DIR"] = str(base)
        self.log = open(base / f"{kind}.log", "ab")
        if kind == "stock":
            write_stock_config(base, UUID, port)
            env.update({"FUNCNODES_HOST": "127.0.0.1", "FUNCNODES_WS_WORKER_STARTPORT": str(port),
                        "FUNCNODES_WS_WORKER_ENDPORT": str(port), "PYTHONPATH": str(REPO / "examples")})
            argv = [python, "-c", LAUNCHER, UUID, str(port)]
        else:
            write_our_config(base, port)
            env["PYTHONPATH"] = str(REPO)
            argv = [python, "-m", "worker", f"worker_{UUID}", "--dir", str(base), "--port", str(port)]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=str(REPO if kind == "ours" else base), env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def first_pong(self, timeout: float = 90.0) -> float:
        await wait_for_pong(self.url, deadline_s=timeout, interval=0.005)
        return time.perf_counter() - self.t0

    async def stop(self) -> None:
        try:
            async with FNClient(self.url) as c:
                await c.request("stop_worker", {}, timeout=2)
        except Exception:
            pass  # the stock worker never replies to stop_worker
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 10)
        except asyncio.TimeoutError:
            os.kill(self.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait)
        self.log.close()


def tmpdir(kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"fnbench-{kind}-"))


async def cold_starts(kind: str, python: str, n: int) -> list[float]:
    times = []
    for i in range(n + 1):  # the first start warms the OS file cache and bytecode; not counted
        w = Spawned(kind, tmpdir(kind), free_port(), python)
        try:
            t = await w.first_pong()
        finally:
            await w.stop()
        if i:
            times.append(t)
    return times


async def measure(kind: str, python: str, args) -> dict:
    res: dict = {"kind": kind}
    res["cold_start_s"] = await cold_starts(kind, python, args.starts)
    w = Spawned(kind, tmpdir(kind), free_port(), python)
    try:
        await w.first_pong()
        pid = w.proc.pid
        async with FNClient(w.url, id_prefix="m") as c:
            res["library"] = await bw.ensure_library(c, "demo-nodes", "demo.add")
        await asyncio.sleep(1.0)
        res["rss_idle"] = bw.rss_mb(pid)
        res["ping"] = await bw.bench_ping(w.url, args.pings)
        res["rpc_uuid"] = await bw.bench_rpc(w.url, args.rpcs)
        m = bw.CpuMeter(pid)
        res["throughput"] = await bw.bench_throughput(w.url, args.clients, args.duration)
        cpu = m.done()
        if cpu is not None and res["throughput"]["rpcs"]:
            res["throughput"]["worker_cpu_us_per_rpc"] = round(cpu / res["throughput"]["rpcs"] * 1e6, 2)
        async with FNClient(w.url, id_prefix="g") as c:
            g = await bw.bench_graph(c, args.nodes, args.exec_runs, node_id="demo.add")
            g.pop("_ids", None)
            res["graph"] = g
            res["rss_after_graph"] = bw.rss_mb(pid)
            res["full_state"] = await bw.bench_full_state(c, args.full_state_reps)
            res["large_payload"] = await bw.bench_large_payload(c, args.payload_mb, args.payload_reps,
                                                                node_id="demo.text", io="value")
            await c.call("clear")
    finally:
        await w.stop()
    return res


def pick(r: dict, path: str):
    cur = r
    for k in path.split("."):
        if cur is None:
            return None
        cur = cur[int(k)] if isinstance(cur, list) else cur.get(k)
    return cur


def chain_overhead_ms(r: dict):
    ok = [x["per_node_ms"] for x in r["graph"]["exec_runs"] if "per_node_ms" in x and x.get("ok")]
    if not ok:
        return None
    return statistics.median(ok) - PRETRIGGER_DELAY_S * 1000


# (label, unit, getter, target as (op, factor) on ours/stock, or None)
ROWS = [
    ("cold start -> first pong (median)", "s", lambda r: statistics.median(r["cold_start_s"]), ("<=", 0.25)),
    ("ping RTT p50", "ms", lambda r: r["ping"]["p50_ms"], ("<=", 1.0)),
    ("ping RTT p99", "ms", lambda r: r["ping"]["p99_ms"], None),
    ("uuid RPC RTT p50", "ms", lambda r: r["rpc_uuid"]["p50_ms"], ("<=", 1.0)),
    ("uuid RPC RTT p99", "ms", lambda r: r["rpc_uuid"]["p99_ms"], None),
    ("RPC/s, 8 clients (uuid)", "rpc/s", lambda r: r["throughput"]["rpc_per_s"], (">=", 1.5)),
    ("  worker CPU per RPC", "us", lambda r: r["throughput"].get("worker_cpu_us_per_rpc"), None),
    ("200-node chain build (599 RPCs)", "s", lambda r: r["graph"]["build"]["total_s"], None),
    ("200-node chain: first input -> last output (median)", "s", lambda r: r["graph"]["exec_latency_s_median"], None),
    ("  per node", "ms", lambda r: r["graph"]["exec_latency_s_median"] / r["graph"]["nodes"] * 1000, None),
    ("  per-node overhead beyond pretrigger delay", "ms", chain_overhead_ms, ("<=", 1 / 3)),
    ("  chain runs correct", "", lambda r: sum(1 for x in r["graph"]["exec_runs"] if x.get("ok")), None),
    ("full_state (200 nodes) p50", "ms", lambda r: r["full_state"]["p50_ms"], ("<=", 1 / 3)),
    ("full_state size", "bytes", lambda r: r["full_state"]["bytes"], None),
    ("5 MB POST /message/ -> stub -> GET (median)", "s", lambda r: r["large_payload"]["roundtrip_s_median"], None),
    ("RSS idle (library loaded)", "MB", lambda r: r["rss_idle"]["tree_rss_mb"], ("<=", 1.0)),
    ("RSS after 200-node graph", "MB", lambda r: r["rss_after_graph"]["tree_rss_mb"], None),
]


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def table(stock: dict, ours: dict) -> str:
    lines = ["| metric | unit | stock 1.6.0 | ours | ours/stock | target | met |", "|---|---|---:|---:|---:|---|---|"]
    for label, unit, get, target in ROWS:
        try:
            a, b = get(stock), get(ours)
        except (KeyError, TypeError, IndexError, ZeroDivisionError):
            a = b = None
        ratio = (b / a) if (a not in (None, 0) and b is not None) else None
        tgt = met = ""
        if target and ratio is not None:
            op, f = target
            tgt = f"{op} {f:.2g}x"
            met = "yes" if (ratio <= f if op == "<=" else ratio >= f) else "**no**"
        elif target:
            tgt = f"{target[0]} {target[1]:.2g}x"
        lines.append(f"| {label} | {unit} | {fmt(a)} | {fmt(b)} | {fmt(ratio) + 'x' if ratio is not None else 'n/a'} | {tgt} | {met} |")
    return "\n".join(lines)


async def main_async(args) -> None:
    stock_py = stock_python()
    ours_py = args.python or sys.executable
    print(f"[compare] stock: {stock_py}\n[compare] ours:  {ours_py}", file=sys.stderr)
    results = {}
    for kind, py in (("stock", stock_py), ("ours", ours_py)):  # one after the other: no CPU sharing
        print(f"[compare] measuring {kind} ...", file=sys.stderr, flush=True)
        results[kind] = await measure(kind, py, args)
    results["host"] = {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]}
    print(table(results["stock"], results["ours"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", help="interpreter for our worker (default: this one)")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--rpcs", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--exec-runs", type=int, default=3)
    ap.add_argument("--full-state-reps", type=int, default=5)
    ap.add_argument("--payload-mb", type=float, default=5.0)
    ap.add_argument("--payload-reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "worker_compare.json"))
    args = ap.parse_args()
    if args.quick:
        args.starts, args.pings, args.rpcs, args.duration = 1, 200, 200, 1.0
        args.nodes, args.exec_runs, args.full_state_reps, args.payload_reps = 50, 1, 2, 1
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
