"""Many workers on one machine: what supervision costs per worker, with real processes.

  python benchmarks/bench_host.py [--n 1,5,10,20] [--idle 30] [--modes stock,host,per-worker,worker]

For each N, one after the other, in fresh config folders, N empty-graph workers:
  stock        the stock FuncNodes worker started the stock way (tests/stockenv.py: PyPI
               funcnodes-worker 1.6.0, one `WSWorker(...).run_forever()` process per worker)
  host         ours, `fn-supervise --dir B host` (one process supervising every autostart worker,
               shared discovery/monitor/dead-man's switch), workers `--no-venv`
  per-worker   ours, one `fn-supervise --dir B worker_<uuid>` per worker (its own sidecars)
  worker       ours unsupervised: N lone `python -m worker worker_<uuid>` processes, the baseline
               "beyond the worker" is measured against
Measured (every process that carries this run's marker in its environment, i.e. everything
each mode started and everything that started):
  procs, RSS, USS, PSS     psutil memory_full_info, summed; "supervision" = all but the worker
                           processes themselves (PSS splits pages a fork or a library shares)
  beyond worker            (total PSS - total PSS of N lone workers at the same N) / N: what
                           supervising one worker costs, whatever the process layout (a forked
                           worker shares pages with its fork server, so its own PSS understates it)
  start                    launch -> all N answer a WebSocket ping
  idle CPU                 CPU seconds of all processes over --idle s once all answer (after
                           a settle of --settle s), as % of one core
Targets (issue 11): supervision <= 15 MB PSS per worker at N = 20; total PSS at N = 20 <= half of
stock's; start of 20 <= 0.4x stock's; idle CPU <= stock's. Issue 18 (per-worker mode): beyond
worker <= 25 MB PSS at N = 5; start of 20 <= 0.4x stock's. The JSON goes to benchmarks/results/.
Times are wall-clock on whatever else the machine runs: compare modes within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from supervisor.cli import create_worker  # noqa: E402

MARKER = "FN_BENCH_HOST_MARKER"
FN_SUPERVISE = str(Path(sys.executable).with_name("fn-supervise"))


def free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


async def _ping(session: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with session.ws_connect(f"ws://127.0.0.1:{port}/", timeout=aiohttp.ClientWSTimeout(ws_close=1)) as ws:
            await ws.send_str(json.dumps({"type": "ping"}))
            m = await asyncio.wait_for(ws.receive(), 2)
            return json.loads(m.data).get("type") == "pong"
    except (OSError, aiohttp.ClientError, asyncio.TimeoutError, ValueError, TypeError, AttributeError):
        return False


def wait_all_answer(ports: list[int], t0: float, timeout: float) -> float:
    """Seconds from t0 until every port answered a ping (each polled until it does)."""
    async def go() -> float:
        pending = set(ports)
        async with aiohttp.ClientSession() as s:
            while pending:
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"{len(pending)} of {len(ports)} workers did not answer within {timeout}s")
                done = await asyncio.gather(*(_ping(s, p) for p in pending))
                pending -= {p for p, ok in zip(list(pending), done) if ok}
                if pending:
                    await asyncio.sleep(0.05)
        return time.perf_counter() - t0
    return asyncio.run(go())


def marked(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(MARKER) == marker and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def worker_pids(base: Path) -> set[int]:
    """Our workers, by the pid each worker's state file records (a forked worker's command line
    is its fork server's)."""
    out = set()
    for f in (base / "workers").glob("worker_*.supervisor"):
        try:
            w = json.loads(f.read_text()).get("worker") or {}
        except (OSError, ValueError):
            continue
        if w.get("pid"):
            out.add(int(w["pid"]))
    return out


def is_worker(p: psutil.Process, mode: str, ours: set[int]) -> bool:
    if mode == "worker":
        return True
    if mode != "stock":
        return p.pid in ours
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return False
    return "-c" in cmd and any("WSWorker" in c for c in cmd)


def measure(marker: str, mode: str, base: Path, detail: bool = False) -> dict:
    procs = marked(marker)
    ours = worker_pids(base)
    tot = {"procs": 0, "rss": 0.0, "uss": 0.0, "pss": 0.0}
    sup = {"procs": 0, "rss": 0.0, "uss": 0.0, "pss": 0.0}
    for p in procs:
        try:
            m = p.memory_full_info()
        except psutil.Error:
            continue
        w = is_worker(p, mode, ours)
        if detail:
            try:
                print(f"    {'worker' if w else 'supervision':<11} pid {p.pid:<7} PSS {m.pss / 1e6:6.1f} USS "
                      f"{m.uss / 1e6:6.1f} RSS {m.rss / 1e6:6.1f}  {' '.join(p.cmdline())[:70]}")
            except psutil.Error:
                pass
        for d in (tot,) + ((sup,) if not w else ()):
            d["procs"] += 1
            d["rss"] += m.rss / 1e6
            d["uss"] += m.uss / 1e6
            d["pss"] += getattr(m, "pss", m.uss) / 1e6
    return {"total": tot, "supervision": sup}


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def idle_cpu(marker: str, seconds: float) -> float:
    """% of one core used by every marked process over `seconds` (processes alive at both ends)."""
    procs = marked(marker)
    a = cpu_seconds(procs)
    t = time.perf_counter()
    time.sleep(seconds)
    b = cpu_seconds(procs)
    el = time.perf_counter() - t
    return 100.0 * sum(b[k] - a[k] for k in b if k in a) / el


def base_env(marker: str, base: Path) -> dict:
    env = dict(os.environ)
    env[MARKER] = marker
    env["FUNCNODES_CONFIG_DIR"] = str(base)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "FN_SUPERVISE_TOKEN"):
        env.pop(k, None)
    return env


def run_ours(mode: str, n: int, base: Path, marker: str, args) -> tuple[list[subprocess.Popen], list[int], float]:
    ports = free_ports(n)
    names = []
    for port in ports:
        p = create_worker(base, host="127.0.0.1", port=port, no_venv=True)
        extra = {"sidecars": {"discovery": False, "monitor": False}} if getattr(args, "no_sidecars", False) else {}
        p.update_config(autostart="unless-stopped", heartbeat_interval=1.0, **extra)
        names.append(p.name)
    env = base_env(marker, base)
    out = open(base / f"{mode}.out", "ab")
    t0 = time.perf_counter()
    if mode == "host":
        procs = [subprocess.Popen([FN_SUPERVISE, "--dir", str(base), "host"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(base))]
    elif mode == "worker":
        procs = [subprocess.Popen([sys.executable, "-m", "worker", name, "--dir", str(base)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(base)) for name in names]
    else:
        procs = [subprocess.Popen([FN_SUPERVISE, "--dir", str(base), name], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(base)) for name in names]
    return procs, ports, t0


def run_stock(n: int, base: Path, marker: str, args) -> tuple[list, list[int], float]:
    from stockenv import StockWorker, stock_python

    py = stock_python()
    ports = free_ports(n)
    env = {MARKER: marker}
    t0 = time.perf_counter()
    workers = [StockWorker(py, base, uuidlib.uuid4().hex, port, env=env) for port in ports]
    return workers, ports, t0


def stop_all(mode: str, procs: list, marker: str) -> None:
    if mode == "stock":
        for w in procs:
            w.kill()
    else:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for p in procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    deadline = time.monotonic() + 15
    while marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in marked(marker):  # only processes this run started (they carry its marker)
        try:
            p.kill()
        except psutil.Error:
            pass


def one(mode: str, n: int, args) -> dict:
    marker = uuidlib.uuid4().hex
    with tempfile.TemporaryDirectory(prefix=f"bench-host-{mode}-") as tmp:
        base = Path(tmp)
        procs, ports, t0 = (run_stock(n, base, marker, args) if mode == "stock"
                            else run_ours(mode, n, base, marker, args))
        try:
            start = wait_all_answer(ports, t0, args.timeout)
            time.sleep(args.settle)  # sidecars, module lists, first heartbeats settle
            mem = measure(marker, mode, base, args.detail)
            cpu = idle_cpu(marker, args.idle)
        finally:
            stop_all(mode, procs, marker)
    r = {"mode": mode, "n": n, "start_s": start, "idle_cpu_pct": cpu, **{f"{k}_{m}": v for k, d in mem.items()
                                                                          for m, v in d.items()}}
    print(f"  {mode:<10} N={n:<3} start {start:6.2f}s  procs {mem['total']['procs']:4d}  "
          f"PSS {mem['total']['pss']:8.1f} MB (supervision {mem['supervision']['pss']:7.1f})  "
          f"USS {mem['total']['uss']:8.1f}  RSS {mem['total']['rss']:8.1f}  idle CPU {cpu:5.2f}%", flush=True)
    return r


def beyond_worker(results: list[dict], r: dict) -> float | None:
    """PSS per worker beyond N lone workers' (same N, same run); None without the worker mode."""
    lone = next((x for x in results if x["mode"] == "worker" and x["n"] == r["n"]), None)
    return None if lone is None else (r["total_pss"] - lone["total_pss"]) / r["n"]


def table(results: list[dict]) -> str:
    rows = ["| mode | N | procs | RSS MB | USS MB | PSS MB | supervision PSS MB | per worker | beyond worker MB | "
            "start s | idle CPU % |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b = beyond_worker(results, r)
        rows.append(f"| {r['mode']} | {r['n']} | {r['total_procs']} | {r['total_rss']:.0f} | {r['total_uss']:.0f} | "
                    f"{r['total_pss']:.0f} | {r['supervision_pss']:.1f} | {r['supervision_pss'] / r['n']:.1f} | "
                    f"{'-' if b is None else f'{b:.1f}'} | {r['start_s']:.2f} | {r['idle_cpu_pct']:.2f} |")
    return "\n".join(rows)


def verdict(results: list[dict]) -> list[str]:
    by = {(r["mode"], r["n"]): r for r in results}
    out = []
    nmax = max(r["n"] for r in results)
    st = by.get(("stock", nmax))
    for mode in ("host", "per-worker"):
        r = by.get((mode, nmax))
        if r is None:
            continue
        per = r["supervision_pss"] / nmax
        out.append(f"{mode} N={nmax}: supervision {per:.1f} MB PSS/worker (target <= 15): {'yes' if per <= 15 else 'NO'}")
        if st:
            ratio = r["total_pss"] / st["total_pss"]
            out.append(f"{mode} N={nmax}: total PSS {ratio:.2f}x stock (target <= 0.5): {'yes' if ratio <= 0.5 else 'NO'}")
            ratio = r["start_s"] / st["start_s"]
            out.append(f"{mode} N={nmax}: start {ratio:.2f}x stock (target <= 0.4): {'yes' if ratio <= 0.4 else 'NO'}")
            ok = r["idle_cpu_pct"] <= st["idle_cpu_pct"]
            out.append(f"{mode} N={nmax}: idle CPU {r['idle_cpu_pct']:.2f}% vs stock {st['idle_cpu_pct']:.2f}%: "
                       f"{'yes' if ok else 'NO'}")
    for r in results:  # issue 18: per-worker mode's supervision beyond the worker itself
        b = beyond_worker(results, r)
        if r["mode"] == "per-worker" and b is not None:
            tgt = " (target <= 25 at N = 5)" if r["n"] == 5 else ""
            ok = "" if r["n"] != 5 else (": yes" if b <= 25 else ": NO")
            out.append(f"per-worker N={r['n']}: beyond the worker {b:.1f} MB PSS per worker{tgt}{ok}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="1,5,10,20", help="comma-separated worker counts")
    ap.add_argument("--modes", default="stock,host,per-worker")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after all answer, before measuring")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds for all N to answer")
    ap.add_argument("--detail", action="store_true", help="print every process's memory")
    ap.add_argument("--no-sidecars", action="store_true",
                    help="per-worker units without their sidecar process (discovery and monitor off): what it costs")
    ap.add_argument("--no-bytecode", dest="bytecode", action="store_false",
                    help="keep PYTHONDONTWRITEBYTECODE if set: every start compiles every module it cannot find cached")
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    print(f"bench_host: N={ns} modes={modes} idle={args.idle:g}s; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}{'; per-worker units without sidecars' if args.no_sidecars else ''}",
          flush=True)
    if args.bytecode:
        # An installed package has its .pyc files; with PYTHONDONTWRITEBYTECODE (set on this host)
        # a source checkout compiles every module of ours at every start, N times per round, while
        # the stock env's site-packages are compiled once. Both sides get a bytecode cache outside
        # the trees, warmed by one unmeasured start of each mode.
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="fnbench-host-pycache-")
        warm = argparse.Namespace(**{**vars(args), "idle": 0.5, "settle": 0.0, "detail": False})
        for mode in modes:
            one(mode, 1, warm)
        print(f"bytecode cached under {os.environ['PYTHONPYCACHEPREFIX']} (warmed by one start of each mode)", flush=True)
    results = []
    for n in ns:
        for mode in modes:
            results.append(one(mode, n, args))
    print()
    print(table(results))
    print()
    for line in verdict(results):
        print(line)
    outdir = REPO / "benchmarks" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"bench_host-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "load_end": os.getloadavg()[0], "results": results}, indent=2))
    print(f"\nJSON: {path}")
    if args.bytecode:
        import shutil

        shutil.rmtree(os.environ["PYTHONPYCACHEPREFIX"], ignore_errors=True)


if __name__ == "__main__":
    main()
