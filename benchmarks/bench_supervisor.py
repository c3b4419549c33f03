"""Supervisor benchmark: what a user waits for, measured with real processes.

  python benchmarks/bench_supervisor.py [--runs 5] [--hang-timeout 2] [--stock /work/stockvenv/bin/funcnodes]

Figures (median, min..max over --runs):
  new_venv_warm      `fn-supervise new` with a venv from a warm uv cache   (target <= 2 s)
  start_to_pong      supervisor spawned -> first WebSocket pong            (target <= 0.7 s)
  kill9_to_serving   SIGKILL of the worker -> `uuid` answered again, same port (target <= 1 s)
  hang_to_replaced   SIGSTOP of the worker -> replacement answers; minus the heartbeat timeout
                     (target <= 1 s over the timeout)
  supervisor_rss     RSS of the supervisor process (and its sh dead-man's switch) (target <= 40 MB)
With --stock, the stock FuncNodes CLI's `worker new --not-in-venv` start to first pong too
(the stock worker is never restarted after kill -9 unless a manager autostarts it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.cli import create_worker  # noqa: E402
from supervisor.files import WorkerPaths  # noqa: E402


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _probe(port: int, cmd: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{port}/", timeout=aiohttp.ClientWSTimeout(ws_close=1)) as ws:
                if cmd == "ping":
                    await ws.send_str(json.dumps({"type": "ping"}))
                else:
                    await ws.send_str(json.dumps({"type": "cmd", "cmd": "uuid", "kwargs": {}, "id": 1}))
                m = await asyncio.wait_for(ws.receive(), 2)
                js = json.loads(m.data)
                return js.get("type") in ("pong", "result")
    except (OSError, aiohttp.ClientError, asyncio.TimeoutError, ValueError, TypeError):
        return False


def wait_answer(port: int, cmd: str = "ping", timeout: float = 60.0, interval: float = 0.01) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if asyncio.run(_probe(port, cmd)):
            return time.monotonic() - t0
        time.sleep(interval)
    raise TimeoutError(f"no answer on {port} within {timeout}s")


def wait_for(cond, timeout: float, interval: float = 0.005):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError("condition")


def worker_pid(paths: WorkerPaths, not_pid: int | None = None) -> int | None:
    st = paths.read_state() or {}
    w = st.get("worker")
    if st.get("state") == "RUNNING" and w and w["pid"] != not_pid:
        return w["pid"]
    return None


def start_supervisor(paths: WorkerPaths) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", "supervisor", "--dir", str(paths.base), paths.name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=str(REPO))


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def fmt(xs: list[float], unit: str = "s") -> str:
    if not xs:
        return "n/a"
    return f"{statistics.median(xs):.3f} {unit} (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def bench(args) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("new_venv_warm", "start_to_pong_novenv", "start_to_pong_venv",
                                                     "kill9_to_serving", "hang_to_replaced_over_timeout",
                                                     "supervisor_rss_mb", "reaper_rss_mb", "stock_start_to_pong")}
    tmp = Path(tempfile.mkdtemp(prefix="fnsup-bench-"))
    try:
        base = tmp / "cfg"
        sup_opts = {"heartbeat_timeout": args.hang_timeout, "backoff_base": 0.05}
        # warm the uv cache once (not measured), then measure fresh venv workers
        create_worker(base, name="warm", port=free_port(), supervisor=sup_opts)
        venv_workers = []
        for i in range(args.runs):
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(base), "new", "--name", f"v{i}",
                                "--port", str(free_port())], capture_output=True, text=True, cwd=str(REPO),
                               env={**os.environ, "PYTHONPATH": str(REPO)})
            if r.returncode == 0:
                out["new_venv_warm"].append(time.monotonic() - t0)
                venv_workers.append(WorkerPaths(base, r.stdout.strip().splitlines()[-1][len("worker_"):]))
        for mode in ("novenv", "venv"):
            for i in range(args.runs):
                if mode == "venv":
                    if i >= len(venv_workers):
                        break
                    paths = venv_workers[i]
                    cfg = paths.read_config()
                    cfg["supervisor"].update(sup_opts)
                    paths.write_config(cfg)
                else:
                    paths = create_worker(base, name=f"n{i}", port=free_port(), no_venv=True, supervisor=sup_opts)
                port = paths.read_config()["port"]
                t0 = time.monotonic()
                sup = start_supervisor(paths)
                try:
                    wait_answer(port, "ping")
                    out[f"start_to_pong_{mode}"].append(time.monotonic() - t0)
                    if mode == "novenv" and i == 0 or mode == "venv":
                        pid = wait_for(lambda: worker_pid(paths), 30)
                        # kill -9 -> serving again
                        os.kill(pid, signal.SIGKILL)
                        t0 = time.monotonic()
                        time.sleep(0.001)
                        wait_answer(port, "uuid")
                        out["kill9_to_serving"].append(time.monotonic() - t0)
                        pid = wait_for(lambda: worker_pid(paths, not_pid=pid), 30)
                        # hang -> replaced
                        os.kill(pid, signal.SIGSTOP)
                        t0 = time.monotonic()
                        pid2 = wait_for(lambda: worker_pid(paths, not_pid=pid), 60)
                        wait_answer(port, "uuid")
                        out["hang_to_replaced_over_timeout"].append(time.monotonic() - t0 - args.hang_timeout)
                        del pid2
                        time.sleep(0.5)  # steady state for RSS (not a timing)
                        sp = psutil.Process(sup.pid)
                        out["supervisor_rss_mb"].append(sp.memory_info().rss / 2**20)
                        for c in sp.children():
                            if c.name() in ("sh", "dash"):
                                out["reaper_rss_mb"].append(c.memory_info().rss / 2**20)
                finally:
                    stop(sup)
        if args.stock and Path(args.stock).exists():
            out["stock_start_to_pong"] = bench_stock(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def bench_stock(args, tmp: Path) -> list[float]:
    res = []
    for i in range(args.runs):
        d = tmp / f"stock{i}"
        d.mkdir()
        env = {**os.environ, "FUNCNODES_CONFIG_DIR": str(d), "HOME": str(d), "UV_OFFLINE": "1",
               "FUNCNODES_WS_WORKER_STARTPORT": str(free_port()), "FUNCNODES_HOST": "127.0.0.1"}
        env["FUNCNODES_WS_WORKER_ENDPORT"] = str(int(env["FUNCNODES_WS_WORKER_STARTPORT"]) + 20)
        env.pop("PYTHONPATH", None)
        t0 = time.monotonic()
        p = subprocess.Popen([args.stock, "--use-subprocess-monitor", "0", "worker", "--name", f"s{i}", "new",
                              "--not-in-venv"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            def port():
                for f in (d / "workers").glob("worker_*.json"):
                    try:
                        return json.loads(f.read_text()).get("port")
                    except ValueError:
                        return None
                return None
            pt = wait_for(port, 60, 0.02)
            wait_answer(pt, "ping", 60)
            res.append(time.monotonic() - t0)
        except TimeoutError:
            pass
        finally:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hang-timeout", type=float, default=2.0)
    ap.add_argument("--stock", default=None, help="path of the stock `funcnodes` CLI to compare with")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = bench(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"fn-supervise benchmark ({os.cpu_count()} cores, python {sys.version.split()[0]})")
    print(f"  new worker, venv, warm uv cache : {fmt(out['new_venv_warm'])}   target <= 2 s")
    print(f"  start to first pong (no venv)   : {fmt(out['start_to_pong_novenv'])}   target <= 0.7 s")
    print(f"  start to first pong (venv)      : {fmt(out['start_to_pong_venv'])}")
    print(f"  SIGKILL of worker to serving    : {fmt(out['kill9_to_serving'])}   target <= 1 s")
    print(f"  hang to replaced, over timeout  : {fmt(out['hang_to_replaced_over_timeout'])}   "
          f"(timeout {args.hang_timeout:g} s) target <= 1 s")
    print(f"  supervisor RSS                  : {fmt(out['supervisor_rss_mb'], 'MB')}   target <= 40 MB")
    print(f"  dead-man's switch (sh) RSS      : {fmt(out['reaper_rss_mb'], 'MB')}")
    if args.stock:
        print(f"  stock `worker new --not-in-venv` start to first pong: {fmt(out['stock_start_to_pong'])}")
        print("  stock after kill -9: not restarted (only a manager with autostart restarts, after <= 10 s)")


if __name__ == "__main__":
    main()
