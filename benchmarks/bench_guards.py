"""What issue 17's guards cost: the peer-uid lookup per loopback connection, the memory sampler
per tick, and a WebSocket connect + `uuid` against a real worker with the check on and off.

    python benchmarks/bench_guards.py [--rounds 200]

No stock figure: the stock worker has neither guard (its connect + `uuid` is in
bench_worker_compare.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.memory import tree_rss  # noqa: E402
import ipaddress  # noqa: E402

from worker.peers import peer_uid, proc_uid  # noqa: E402


def per_call(fn, rounds: int) -> float:
    t = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t) / rounds


def lookup_cost(rounds: int, extra: int, via_proc: bool = False) -> float:
    """peer_uid with `extra` other loopback connections open (they lengthen /proc/net/tcp)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    held = []
    for _ in range(extra):
        c = socket.create_connection(("127.0.0.1", port))
        held += [c, srv.accept()[0]]
    c = socket.create_connection(("127.0.0.1", port))
    conn, peer = srv.accept()
    ours = conn.getsockname()
    assert peer_uid(peer, ours) == os.getuid()
    try:
        if via_proc:
            pip, lip = ipaddress.ip_address(peer[0]), ipaddress.ip_address(ours[0])
            return per_call(lambda: proc_uid(pip, peer[1], lip, ours[1]), rounds)
        return per_call(lambda: peer_uid(peer, ours), rounds)
    finally:
        for s in (*held, c, conn, srv):
            s.close()


def ws_uuid_cost(rounds: int, check: bool) -> float:
    import aiohttp

    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        (base / "workers").mkdir()
        (base / "workers" / "worker_b1.json").write_text(json.dumps(
            {"uuid": "b1", "type": "WSWorker", "host": "127.0.0.1", "peer_uid_check": check}))
        port = socket.create_server(("127.0.0.1", 0))
        p_num = port.getsockname()[1]
        port.close()
        env = {**os.environ, "PYTHONPATH": str(REPO), "FUNCNODES_CONFIG_DIR": str(base)}
        proc = subprocess.Popen([sys.executable, "-m", "worker", "worker_b1", "--dir", str(base), "--port", str(p_num)],
                                cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{p_num}/readyz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("worker not ready in 60 s")
                time.sleep(0.05)

            async def go() -> list[float]:
                out = []
                async with aiohttp.ClientSession() as s:
                    for _ in range(rounds):
                        t = time.perf_counter()
                        async with s.ws_connect(f"ws://127.0.0.1:{p_num}/") as ws:
                            await ws.send_str(json.dumps({"type": "cmd", "cmd": "uuid", "id": "x"}))
                            await ws.receive()
                        out.append(time.perf_counter() - t)
                return out
            return statistics.median(asyncio.run(go()))
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args()
    print(f"peer_uid lookup, 1 connection:       {lookup_cost(a.rounds, 0) * 1e6:8.1f} us")
    print(f"peer_uid lookup, 200 more open:      {lookup_cost(a.rounds, 200) * 1e6:8.1f} us")
    n = sum(1 for _ in open("/proc/net/tcp")) - 1
    print(f"/proc/net/tcp fallback, {n:5d} sockets: {lookup_cost(a.rounds // 4, 0, via_proc=True) * 1e6:8.1f} us")
    child = subprocess.Popen([sys.executable, "-c", "import os,time; os.fork(); time.sleep(60)"],
                             start_new_session=True)  # its own group: both ended below
    time.sleep(0.2)
    try:
        print(f"memory sample (tree of 2 processes): {per_call(lambda: tree_rss(child.pid), a.rounds) * 1e6:8.1f} us")
    finally:
        os.killpg(child.pid, 9)
        child.wait()
    on, off = ws_uuid_cost(a.rounds // 4, True), ws_uuid_cost(a.rounds // 4, False)
    print(f"ws connect + uuid, check on:         {on * 1e3:8.2f} ms (median)")
    print(f"ws connect + uuid, check off:        {off * 1e3:8.2f} ms (median)")


if __name__ == "__main__":
    main()
