"""The edit path, ours beside the stock worker in one run (issue 14's targets).

    python benchmarks/bench_edit_path.py [--seconds 4] [--ack-seconds 2] [--clients 4] [--client raw|aiohttp] [--no-fsync]
                                         [--stall-watch-off]

Three workers, each in a fresh config folder with the demo nodes (examples/demo_nodes.py):
stock (funcnodes-worker 1.6.0, tests/stockenv.py), ours supervised (`python -m supervisor
worker_<uuid>`, i.e. `fn-supervise worker_<uuid>`) with `durability: process`, and the same with
`durability: fsync` (printed beside, no target). Phases run in the order stock, ours, ours, stock
(fsync after ours), so host load from elsewhere hits both alike:

- acked `update_node_view`/s and `set_io_value`/s (on a lone demo.add), --clients clients in a
  closed loop, one request in flight each; by default each client is its own process on a plain
  socket with its frames encoded before the clock starts (--client raw), so the client costs the
  host less than the worker does; --client aiohttp keeps the earlier single aiohttp process
- the worker's CPU time (user + system, psutil) per acked edit over those phases
- ack p50/p99 of both verbs, one client, sequential
- a 200-node chain built by 399 RPCs (200 add_node, 199 add_edge)

Prints one table: stock, ours, ours/stock, target, met; the fsync column beside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

sys.path.insert(0, str(REPO / "benchmarks"))

from bench_journal import Proc, free_port  # noqa: E402,F401



class Worker(Proc):
    def __init__(self, label: str, kind: str, durability: str | None = None, env: dict | None = None):
        saved = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})  # Proc hands os.environ to the worker
        try:
            super().__init__(kind, durability, supervised=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.label = label
        self.pid: int | None = None  # the process that serves the port (ours: the supervisor's child)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def find_server_pid(self) -> int:
        """Call with a connection open."""
        procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        for p in procs:
            try:
                # the one holding our open connection (ours: the supervisor holds the listener too)
                if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port
                       for c in p.net_connections("tcp")):
                    return p.pid
            except psutil.Error:
                continue
        raise RuntimeError(f"{self.label}: no process serves {self.port}")

    def cpu(self) -> float:
        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.pid and psutil.pid_exists(self.pid) and self.pid != self.proc.pid:
            try:  # ours: the worker goes with its supervisor; never leave one behind
                psutil.Process(self.pid).wait(10)
            except psutil.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        self.log.close()


# One edit request, the same for both clients (each script is EDIT + its own text).
EDIT = r"""
def edit(r, verb, targets, mid):
    import json
    nid = r.choice(targets)
    if verb == "update_node_view":
        kw = {"nid": nid, "data": {"pos": [r.randint(0, 999), r.randint(0, 999)]}}
    else:
        kw = {"nid": nid, "ioid": "a", "value": r.randint(0, 10**6)}
    return json.dumps({"type": "cmd", "cmd": verb, "kwargs": kw, "id": mid})
"""


# A lean closed-loop client (aiohttp only), so the client process is not what limits the figure.
CLIENT = r"""
import asyncio, json, sys, time, random
import aiohttp

async def client(session, url, k, verb, targets, stop_at, counts, lat):
    r = random.Random(k)
    async with session.ws_connect(url, max_msg_size=0) as ws:
        n = 0
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            n += 1
            mid = f"c{k}-{n}"
            await ws.send_str(edit(r, verb, targets, mid))
            while True:
                m = await ws.receive()
                if m.type == aiohttp.WSMsgType.TEXT:
                    if mid in m.data:
                        d = json.loads(m.data)
                        if d.get("id") == mid:
                            if d.get("type") != "result":
                                raise RuntimeError(f"not acked: {m.data[:300]}")
                            break
                elif m.type != aiohttp.WSMsgType.BINARY:
                    raise RuntimeError(f"connection ended: {m.type}")
            lat.append(time.perf_counter() - now)
            counts[0] += 1

async def main(url, verb, targets, clients, seconds):
    counts, lat = [0], []
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(s, url, k, verb, targets, t0 + seconds, counts, lat) for k in range(clients)))
        dt = time.perf_counter() - t0
    print(json.dumps({"acks": counts[0], "seconds": dt, "lat": lat if clients == 1 else []}))

url, verb, targets, clients, seconds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
asyncio.run(main(url, verb, targets, clients, seconds))
"""


# The default client: one process per connection, a blocking socket, frames encoded before the
# clock starts (zero mask, RFC 6455 allows it), replies parsed only when they carry the id. It
# costs the host far less per edit than the aiohttp client above, so on a 2-CPU machine the
# acked/s figures say more about the worker than about the client.
RAW_CLIENT = r"""
import json, os, random, socket, struct, sys, time, base64

def frames(k, verb, targets, count=512):
    r = random.Random(k)
    out = []
    for n in range(count):
        mid = f"c{k}-{n}"
        data = edit(r, verb, targets, mid).encode()
        m = len(data)
        head = b"\x81" + (bytes([0x80 | m]) if m < 126 else bytes([0x80 | 126]) + struct.pack("!H", m))
        out.append((mid, json.dumps(mid).encode(), head + b"\0\0\0\0" + data))
    return out

def connect(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("handshake failed")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode(errors="replace"))
    return s, rest

def main(port, verb, targets, k, seconds, start_at):
    todo = frames(k, verb, targets)
    s, buf = connect(port)
    recv = s.recv
    while time.time() < start_at:
        time.sleep(0.001)
    acks, lat = 0, []
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    i = 0
    while True:
        now = time.perf_counter()
        if now >= stop_at:
            break
        mid, quoted, frame = todo[i % len(todo)]
        i += 1
        s.sendall(frame)
        while True:  # frames until our reply (events may come first)
            while len(buf) < 2:
                chunk = recv(65536)
                if not chunk:
                    raise RuntimeError("connection ended")
                buf += chunk
            n, h = buf[1] & 0x7F, 2
            if n == 126:
                h = 4
            elif n == 127:
                h = 10
            while len(buf) < h:
                buf += recv(65536)
            if h == 4:
                n = struct.unpack("!H", buf[2:4])[0]
            elif h == 10:
                n = struct.unpack("!Q", buf[2:10])[0]
            while len(buf) < h + n:
                chunk = recv(max(65536, h + n - len(buf)))
                if not chunk:
                    raise RuntimeError("connection ended")
                buf += chunk
            op, payload, buf = buf[0] & 0x0F, buf[h:h + n], buf[h + n:]
            if op == 1 and quoted in payload:
                d = json.loads(payload)
                if d.get("id") == mid:
                    if d.get("type") != "result":
                        raise RuntimeError(f"not acked: {payload[:300]!r}")
                    break
            elif op == 8:
                raise RuntimeError("closed by the worker")
        lat.append(time.perf_counter() - now)
        acks += 1
    print(json.dumps({"acks": acks, "seconds": time.perf_counter() - t0, "lat": lat}))

main(int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
"""


def run_clients(w: Worker, verb: str, targets: list[str], clients: int, seconds: float, kind: str = "raw") -> dict:
    if kind == "aiohttp":
        out = subprocess.run([sys.executable, "-c", EDIT + CLIENT, w.url, verb, json.dumps(targets), str(clients), str(seconds)],
                             capture_output=True, text=True, timeout=seconds + 60)
        if out.returncode:
            raise RuntimeError(f"{w.label} {verb}: {out.stderr[-2000:]}")
        return json.loads(out.stdout)
    start_at = time.time() + 1.0  # every process connected and waiting before the clock starts
    procs = [subprocess.Popen([sys.executable, "-c", EDIT + RAW_CLIENT, str(w.port), verb, json.dumps(targets), str(k),
                               str(seconds), str(start_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(clients)]
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{w.label} {verb}: {e[-2000:]}")
        outs.append(json.loads(o))
    return {"acks": sum(o["acks"] for o in outs), "seconds": max(o["seconds"] for o in outs),
            "lat": outs[0]["lat"] if clients == 1 else []}


def ack_latencies(w: Worker, verb: str, targets: list[str], seconds: float, kind: str = "raw") -> list[float]:
    """One client, one edit at a time; the first 50 acks are a warm-up."""
    return run_clients(w, verb, targets, 1, seconds, kind)["lat"][50:]


# Set-up and the chain over a plain connection of this process.
class Conn:
    def __init__(self, url: str):
        self.url, self.n = url, 0

    async def __aenter__(self):
        import aiohttp

        self.session = aiohttp.ClientSession()
        try:
            self.ws = await self.session.ws_connect(self.url, max_msg_size=0)
        except BaseException:
            await self.session.close()
            raise
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self.session.close()

    async def call(self, cmd: str, timeout: float = 60.0, **kw):
        import aiohttp

        self.n += 1
        mid = f"s{self.n}"
        await self.ws.send_str(json.dumps({"type": "cmd", "cmd": cmd, "kwargs": kw, "id": mid}))
        async with asyncio.timeout(timeout):
            while True:
                m = await self.ws.receive()
                if m.type == aiohttp.WSMsgType.TEXT and mid in m.data:
                    d = json.loads(m.data)
                    if d.get("id") == mid:
                        if d.get("type") != "result":
                            raise RuntimeError(f"{cmd}: {m.data[:500]}")
                        return d.get("result")
                elif m.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    raise RuntimeError(f"connection ended: {m.type}")


async def wait_ready(w: Worker, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if w.proc.poll() is not None:
            raise RuntimeError(f"{w.label} exited with {w.proc.returncode}; see {w.base / 'worker.log'}")
        try:
            async with Conn(w.url) as c:
                lib = await c.call("get_library", timeout=30)
                if "demo.add" in json.dumps(lib):
                    w.pid = w.find_server_pid()
                    return
        except Exception as e:  # not listening yet, or the library not loaded yet
            last = e
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{w.label} never listed the demo nodes: {last!r}")


async def setup(w: Worker) -> dict:
    async with Conn(w.url) as c:
        views = []
        for _ in range(15):
            views.append((await c.call("add_node", id="demo.number"))["id"])
            views.append((await c.call("add_node", id="demo.add"))["id"])
        lone = (await c.call("add_node", id="demo.add"))["id"]
    return {"update_node_view": views, "set_io_value": [lone]}


async def chain(w: Worker, nodes: int) -> float:
    async with Conn(w.url) as c:
        t0 = time.perf_counter()
        ids = [(await c.call("add_node", id="demo.add"))["id"] for _ in range(nodes)]
        for a, b in zip(ids, ids[1:]):
            await c.call("add_edge", src_nid=a, src_ioid="out", trg_nid=b, trg_ioid="a")
        dt = time.perf_counter() - t0
        for nid in ids:
            await c.call("remove_node", id=nid)
    return dt


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def measure(args) -> dict:
    labels = [("stock", "stock", None, None), ("ours", "ours", "process", None)]
    if not args.no_fsync:
        labels.append(("fsync", "ours", "fsync", None))
    if args.stall_watch_off:
        labels.append(("nowatch", "ours", "process", {"FN_SUPERVISE_STALL_WATCH": "0"}))
    workers = {lab: Worker(lab, kind, dur, env) for lab, kind, dur, env in labels}
    res = {lab: {"acks": {}, "secs": {}, "cpu": {}, "lat": {}, "chain": []} for lab in workers}
    try:
        await asyncio.gather(*(wait_ready(w) for w in workers.values()))
        targets = {lab: await setup(w) for lab, w in workers.items()}
        order = list(workers)
        for rnd in range(2):  # stock, ours, fsync, then fsync, ours, stock
            for lab in (order if rnd == 0 else order[::-1]):
                w, r = workers[lab], res[lab]
                for verb in ("update_node_view", "set_io_value"):
                    cpu0 = w.cpu()
                    t = await asyncio.to_thread(run_clients, w, verb, targets[lab][verb], args.clients, args.seconds / 2,
                                            args.client)
                    r["cpu"][verb] = r["cpu"].get(verb, 0.0) + w.cpu() - cpu0
                    r["acks"][verb] = r["acks"].get(verb, 0) + t["acks"]
                    r["secs"][verb] = r["secs"].get(verb, 0.0) + t["seconds"]
                    lat = await asyncio.to_thread(ack_latencies, w, verb, targets[lab][verb], args.ack_seconds / 2, args.client)
                    r["lat"].setdefault(verb, []).extend(lat)
                r["chain"].append(await chain(w, args.nodes))
    finally:
        for w in workers.values():
            w.stop()
    return res


def rows(args):
    c = args.clients
    return [
        (f"update_node_view acked/s, {c} clients", "1/s",
         lambda r: r["acks"]["update_node_view"] / r["secs"]["update_node_view"], (">=", 1.5)),
        (f"set_io_value (lone demo.add) acked/s, {c} clients", "1/s",
         lambda r: r["acks"]["set_io_value"] / r["secs"]["set_io_value"], (">=", 1.5)),
        ("worker CPU per update_node_view", "us",
         lambda r: r["cpu"]["update_node_view"] / r["acks"]["update_node_view"] * 1e6, ("<=", 0.7)),
        ("worker CPU per set_io_value", "us",
         lambda r: r["cpu"]["set_io_value"] / r["acks"]["set_io_value"] * 1e6, ("<=", 0.7)),
        ("update_node_view ack p50, 1 client", "ms", lambda r: pct(r["lat"]["update_node_view"], 0.5) * 1e3, ("<=", 1.0)),
        ("update_node_view ack p99, 1 client", "ms", lambda r: pct(r["lat"]["update_node_view"], 0.99) * 1e3, None),
        ("set_io_value ack p50, 1 client", "ms", lambda r: pct(r["lat"]["set_io_value"], 0.5) * 1e3, ("<=", 1.0)),
        ("set_io_value ack p99, 1 client", "ms", lambda r: pct(r["lat"]["set_io_value"], 0.99) * 1e3, None),
        (f"{args.nodes}-node chain built by {2 * args.nodes - 1} RPCs (median)", "s",
         lambda r: statistics.median(r["chain"]), ("<=", 1.0)),
    ]


def fmt(v) -> str:
    if v is None or v != v:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def table(res: dict, args) -> str:
    fs, nw = "fsync" in res, "nowatch" in res
    head = ("| figure | stock 1.6.0 | ours | ours / stock | target | met |" + (" ours, fsync |" if fs else "")
            + (" ours, stall watch off |" if nw else ""))
    out = [head, "|---|---:|---:|---:|---|---|" + ("---:|" if fs else "") + ("---:|" if nw else "")]
    for label, unit, get, target in rows(args):
        a, b = get(res["stock"]), get(res["ours"])
        ratio = b / a if a else None
        tgt = met = ""
        if target:
            op, f = target
            tgt = f"{op} {f:g}x"
            if ratio is not None:
                met = "yes" if (ratio <= f if op == "<=" else ratio >= f) else "**no**"
        line = f"| {label} ({unit}) | {fmt(a)} | {fmt(b)} | {fmt(ratio)} | {tgt} | {met} |"
        if fs:
            line += f" {fmt(get(res['fsync']))} |"
        if nw:
            line += f" {fmt(get(res['nowatch']))} |"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="closed-loop seconds per verb and worker (2 rounds)")
    ap.add_argument("--ack-seconds", type=float, default=2.0, help="seconds of sequential acks per verb and worker (p50/p99)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                    help="raw: one process per connection, blocking socket, pre-encoded frames (cheap); "
                         "aiohttp: all connections in one aiohttp process (the figures before)")
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--no-fsync", action="store_true", help="skip the durability: fsync column")
    ap.add_argument("--stall-watch-off", action="store_true",
                    help="add ours with FN_SUPERVISE_STALL_WATCH=0: what the stall watchdog costs the edit path")
    ap.add_argument("--out", help="write the raw figures as JSON here")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    res = asyncio.run(measure(args))
    print(table(res, args))
    print(f"\nhost: {os.cpu_count()} CPUs, load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    if args.out:
        Path(args.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
