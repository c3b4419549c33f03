"""What the journal costs: ack latency and sustained edits, ours (durability process / fsync) beside
the stock worker, in one run; and whether the journal stays bounded under an endless edit stream.

    python benchmarks/bench_journal.py [--acks 1500] [--seconds 5] [--clients 4]

Per worker (fresh config folder, the demo nodes, a 30-node graph built first):
- ack latency of `update_node_view` and `set_io_value`: one client, sequential, p50/p99
- sustained edits per second: --clients clients in a closed loop of `update_node_view`, and the
  worker's CPU time per edit (user + system; steadier than wall clock on a shared host)
- ours only: journal and snapshot sizes sampled during the sustained phase (max journal/snapshot)
And in this process, without any socket: Commands.run + store.flush for update_node_view with the
store on vs off (the journal's own cost per acknowledged edit, free of network noise).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent / "shared" / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from fnclient import FNClient, wait_for_pong  # noqa: E402
from stockenv import stock_launch  # noqa: E402

UUID = "benchjournal"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, kind: str, durability: str | None = None, supervised: bool = False):
        self.kind = kind
        self.base = Path(tempfile.mkdtemp(prefix=f"fnbench-journal-{kind}-"))
        atexit.register(shutil.rmtree, self.base, True)  # the worker's folder goes with the benchmark
        self.port = free_port()
        env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(self.base))
        env.pop("VIRTUAL_ENV", None)
        if kind == "stock":
            argv, cwd = stock_launch(self.base, UUID, self.port, env)
        else:
            d = self.base / "workers"
            d.mkdir(parents=True)
            (d / f"worker_{UUID}.json").write_text(json.dumps({
                "uuid": UUID, "type": "WSWorker", "host": "127.0.0.1", "port": self.port, "durability": durability,
                "package_dependencies": {"demo_nodes": {"package": "demo_nodes", "path": str(REPO / "examples" / "demo_nodes.py")}}}))
            env["PYTHONPATH"] = str(REPO)
            # supervised: as `fn-supervise worker_<uuid>` runs it (the worker is the supervisor's child)
            argv = ([sys.executable, "-m", "supervisor", "--dir", str(self.base), f"worker_{UUID}"] if supervised
                    else [sys.executable, "-m", "worker", f"worker_{UUID}", "--dir", str(self.base)])
            cwd = REPO
        self.data = self.base / "workers" / f"worker_{UUID}"
        self.log = open(self.base / "worker.log", "ab")
        self.proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()


async def ready(c: FNClient) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            lib = await c.call("get_library", _timeout=30)
            if "demo.add" in json.dumps(lib):
                return
        except Exception:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("the worker never listed the demo nodes")


async def build(c: FNClient) -> tuple[list[str], list[str]]:
    nums, adds = [], []
    for i in range(15):
        nums.append((await c.call("add_node", id="demo.number"))["id"])
        adds.append((await c.call("add_node", id="demo.add"))["id"])
        await c.call("add_edge", src_nid=nums[-1], src_ioid="out", trg_nid=adds[-1], trg_ioid="a")
    return nums, adds


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def measure(p: Proc, acks: int, seconds: float, clients: int) -> dict:
    await wait_for_pong(p.url, deadline_s=90, interval=0.01)
    out: dict = {}
    async with FNClient(p.url) as c:
        await ready(c)
        nums, adds = await build(c)
        rng = random.Random(1)
        for cmd in ("update_node_view", "set_io_value"):
            lat = []
            for i in range(acks):
                if cmd == "update_node_view":
                    kw = {"nid": rng.choice(nums + adds), "data": {"pos": [rng.randint(0, 999), rng.randint(0, 999)]}}
                else:
                    kw = {"nid": rng.choice(nums), "ioid": "value", "value": rng.randint(0, 10**6)}
                t = time.perf_counter()
                await c.call(cmd, **kw)
                lat.append(time.perf_counter() - t)
            out[cmd] = {"p50_us": pct(lat, 0.5) * 1e6, "p99_us": pct(lat, 0.99) * 1e6}
    sizes: list[tuple[int, int]] = []
    stop = time.monotonic() + seconds
    count = [0]

    async def editor(k: int) -> None:
        r = random.Random(k)
        async with FNClient(p.url, id_prefix=f"e{k}") as c:
            while time.monotonic() < stop:
                await c.call("update_node_view", nid=r.choice(nums + adds), data={"pos": [r.randint(0, 999), 1]})
                count[0] += 1

    async def sampler() -> None:
        while time.monotonic() < stop:
            try:
                sizes.append(((p.data / "nodespace.journal").stat().st_size, (p.data / "nodespace.json").stat().st_size))
            except FileNotFoundError:
                pass
            await asyncio.sleep(0.02)

    import psutil

    proc = psutil.Process(p.proc.pid)
    cpu0 = sum(proc.cpu_times()[:2])
    t0 = time.monotonic()
    await asyncio.gather(*(editor(k) for k in range(clients)), sampler() if p.kind != "stock" else asyncio.sleep(0))
    out["edits_per_s"] = count[0] / (time.monotonic() - t0)
    # the worker's own CPU per edit: steadier than wall clock on a shared host
    out["cpu_us_per_edit"] = (sum(proc.cpu_times()[:2]) - cpu0) / max(1, count[0]) * 1e6
    if sizes:
        out["journal_max_bytes"] = max(j for j, _ in sizes)
        out["snapshot_bytes"] = max(s for _, s in sizes)
        out["journal_over_snapshot_max"] = max(j / s for j, s in sizes if s)
    return out


def in_process_overhead(n: int = 20000) -> dict:
    """Commands.run + store.flush of update_node_view, journal on vs off, in this process."""
    import importlib.util

    os.environ.setdefault("FUNCNODES_CONFIG_DIR", tempfile.mkdtemp(prefix="fnbench-cfg-"))
    from worker.config import WorkerPaths
    from worker.commands import Commands
    from worker.graph import Graph
    from worker.localworkers import LocalScripts
    from worker.store import Store

    spec = importlib.util.spec_from_file_location("demo_nodes", REPO / "examples" / "demo_nodes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Host:  # just enough host for the verbs under test
        uuid, runstate, channel, progress_state = UUID, "running", None, {}

    base = Path(tempfile.mkdtemp(prefix="fnbench-inproc-"))
    paths = WorkerPaths.make(base, UUID)
    paths.data.mkdir(parents=True)
    res = {}

    async def go():
        loop = asyncio.get_running_loop()
        for durability in ("off", "process", "fsync"):
            g = Graph(lambda *a, **k: None)
            g.nodespace.add_shelf(mod.NODE_SHELF)
            store = Store(paths, {"durability": "process" if durability == "off" else durability,
                                  "save_delay": 3600, "journal_min_bytes": 1 << 30}, g.state)
            host = Host()
            host.config, host.paths, host.loop = store.config, paths, loop
            cmds = Commands(g, store, host, LocalScripts(paths, store.config, lambda: g.nodespace, lambda m: None))
            nid = (await cmds.run("add_node", {"id": "demo.number"})).uuid
            if durability != "off":
                store.open(loop)
            rng = random.Random(0)
            times = []
            for _ in range(n if durability != "fsync" else n // 20):
                kw = {"nid": nid, "data": {"pos": [rng.randint(0, 999), 5]}}
                t = time.perf_counter()
                await cmds.run("update_node_view", kw)
                await store.flush()
                times.append(time.perf_counter() - t)
            res[durability] = statistics.median(times) * 1e6
            if store.file is not None:
                store.file.close()
            (paths.data / "nodespace.journal").unlink(missing_ok=True)

    asyncio.run(go())
    return {"p50_us_" + k: v for k, v in res.items()} | {
        "journal_adds_p50_us": res["process"] - res["off"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acks", type=int, default=1500)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--no-stock", action="store_true")
    a = ap.parse_args()
    kinds = [("ours-process", "ours", "process"), ("ours-fsync", "ours", "fsync")]
    if not a.no_stock:
        kinds.append(("stock", "stock", None))
    results = {}
    for label, kind, durability in kinds:
        p = Proc(kind, durability)
        try:
            results[label] = asyncio.run(measure(p, a.acks, a.seconds, a.clients))
        finally:
            p.stop()
    inproc = in_process_overhead()
    print(f"{'':32}" + "".join(f"{k:>16}" for k in results))
    rows = [("update_node_view ack p50 (us)", lambda r: r["update_node_view"]["p50_us"]),
            ("update_node_view ack p99 (us)", lambda r: r["update_node_view"]["p99_us"]),
            ("set_io_value ack p50 (us)", lambda r: r["set_io_value"]["p50_us"]),
            ("set_io_value ack p99 (us)", lambda r: r["set_io_value"]["p99_us"]),
            (f"edits/s ({a.clients} clients)", lambda r: r["edits_per_s"]),
            ("worker CPU per edit (us)", lambda r: r["cpu_us_per_edit"]),
            ("journal max (bytes)", lambda r: r.get("journal_max_bytes", float("nan"))),
            ("snapshot (bytes)", lambda r: r.get("snapshot_bytes", float("nan"))),
            ("journal/snapshot max", lambda r: r.get("journal_over_snapshot_max", float("nan")))]
    for name, f in rows:
        print(f"{name:32}" + "".join(f"{f(r):16.1f}" for r in results.values()))
    print("in-process update_node_view (Commands.run + store.flush), p50 us:",
          ", ".join(f"{k}={v:.1f}" for k, v in inproc.items()))
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"journal-{int(time.time())}.json").write_text(json.dumps({"wire": results, "in_process": inproc}, indent=2))


if __name__ == "__main__":
    main()
