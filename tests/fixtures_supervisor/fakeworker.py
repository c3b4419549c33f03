"""A misbehaving stand-in for `python -m worker` (jupyter_client pattern: switched by env vars).

Same command line and control channel as the real worker; answers `uuid` and `ping` over
WebSocket. Switches:
  FAKE_FAIL_ON_START=<code>   exit with <code> before anything else
  FAKE_STARTUP_DELAY=<s>      sleep before listening
  FAKE_IGNORE_SIGTERM=1       SIG_IGN for SIGTERM
  FAKE_IGNORE_STOP=1          ignore the in-band stop frame
  FAKE_NO_HEARTBEAT=1         never send heartbeats (looks hung once ready)
  FAKE_BUSY_FOR=<s>           heartbeats declare busy_for
  FAKE_STARTS_FILE=<path>     append "<pid>\n" at each start
  FAKE_GRANDCHILD=1           start a `sleep 300` in the worker's process group
"""

import asyncio
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

from aiohttp import web

sys.path.insert(0, os.environ.get("FAKE_REPO", ""))
from worker.channel import FrameBuffer, encode  # noqa: E402


def main():
    args = sys.argv[1:]
    wid = args[0]
    opts = {}
    i = 1
    while i < len(args):
        opts[args[i]] = args[i + 1]
        i += 2
    if os.environ.get("FAKE_STARTS_FILE"):
        with open(os.environ["FAKE_STARTS_FILE"], "a") as f:
            f.write(f"{os.getpid()}\n")
    if os.environ.get("FAKE_FAIL_ON_START"):
        print("fake worker: failing on purpose", flush=True)
        os._exit(int(os.environ["FAKE_FAIL_ON_START"]))
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.environ.get("FAKE_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    base = opts.get("--dir") or os.environ["FUNCNODES_CONFIG_DIR"]
    uuid = wid[len("worker_"):]
    with open(os.path.join(base, "workers", f"{wid}.json")) as f:
        cfg = json.load(f)
    port = int(opts.get("--port") or cfg.get("port"))
    host = cfg.get("host") or "127.0.0.1"
    fd = int(opts["--control-fd"])
    lfd = int(opts["--listen-fd"]) if "--listen-fd" in opts else None
    asyncio.run(serve(uuid, host, port, fd, float(cfg.get("heartbeat_interval", 1.0)), lfd))


async def serve(uuid, host, port, fd, hb_interval, lfd=None):
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    done = loop.create_future()

    def send(msg):
        try:
            sock.sendall(encode(msg))
        except OSError:
            pass

    send({"type": "runstate", "state": "starting", "detail": "fake: loading"})
    print(f"fake worker {os.getpid()} starting on {port}", flush=True)
    if os.environ.get("FAKE_GRANDCHILD"):
        subprocess.Popen(["sleep", "300"])
    delay = float(os.environ.get("FAKE_STARTUP_DELAY", "0"))
    if delay:
        await asyncio.sleep(delay)

    async def ws_handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for m in ws:
            try:
                msg = json.loads(m.data)
            except ValueError:
                continue
            if msg.get("type") == "ping":
                await ws.send_str(json.dumps({"type": "pong"}))
            elif msg.get("cmd") == "uuid":
                await ws.send_str(json.dumps({"type": "result", "result": uuid, "id": msg.get("id")}))
            elif msg.get("cmd") == "stop_worker":
                send({"type": "stopping", "reason": "stop_worker"})
                await ws.close(code=1001)
                if not done.done():
                    done.set_result(0)
        return ws

    app = web.Application()
    app.router.add_get("/", ws_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    if lfd is not None:  # the supervisor's held socket
        site = web.SockSite(runner, socket.socket(fileno=lfd))
    else:
        site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        print(f"fake worker: cannot bind {port}: {e}", flush=True)
        os._exit(3)
    send({"type": "ready", "host": host, "port": port, "pid": os.getpid()})
    print("fake worker ready", flush=True)

    buf = FrameBuffer()

    def on_channel():
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            os._exit(0)  # lifeline
        for msg in buf.feed(data):
            if isinstance(msg, dict) and msg.get("type") == "stop" and not os.environ.get("FAKE_IGNORE_STOP"):
                if not done.done():
                    done.set_result(0)

    loop.add_reader(fd, on_channel)
    seq = 0
    busy = float(os.environ.get("FAKE_BUSY_FOR", "0")) or None

    async def beat():
        nonlocal seq
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(hb_interval)
            seq += 1
            if not os.environ.get("FAKE_NO_HEARTBEAT"):
                send({"type": "heartbeat", "seq": seq, "lag": time.monotonic() - t0 - hb_interval,
                      "busy_for": busy, "node": None})

    hb = asyncio.ensure_future(beat())
    code = await done
    hb.cancel()
    await runner.cleanup()
    print("fake worker stopped", flush=True)
    os._exit(code)


if __name__ == "__main__":
    main()
