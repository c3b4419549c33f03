"""memory_max (supervisor/memory.py): the policy on fake samples, the sampler on a real process
tree, the unit's MemoryMax=, and end to end: a node that grows past a small limit is killed
before it reaches twice the limit, the crash record says why, the graph comes back, after three
times the node is quarantined, and another worker beside it is untouched."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from conftest import poll_until
from helpers import Client, RPCError, run
from test_restarts import POISON
from harness import make_worker, running_worker, start_supervisor, state

from supervisor.memory import MemoryPolicy, config_error, parse_size, tree_rss

MB = 10**6


# region the policy, fake samples
@pytest.mark.parametrize("value, expected", [
    (None, None), (0, None), (1234, 1234), ("512MB", 512 * MB), ("512M", 512 * MB), ("2GiB", 2 * 2**30),
    ("0.5 GB", 500 * MB), ("100kb", 100_000), ("700", 700),
])
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-5MB", -1, True, [1]])
def test_bad_sizes_say_what_is_wanted(bad):
    assert "memory_max" in (config_error(bad) or "")


def test_warn_once_at_80_percent_clear_below_70_kill_once_at_the_limit():
    p = MemoryPolicy(1000)
    actions = [p.observe(v).action for v in (100, 790, 800, 900, 750, 810, 690, 700, 850, 999)]
    assert actions == ["ok", "ok", "warn", "ok", "ok", "ok", "clear", "ok", "warn", "ok"]
    d = p.observe(1200)
    assert d.action == "kill" and d.rss == 1200 and "memory limit exceeded" in d.detail and "1.2 KB" in d.detail
    assert [p.observe(v).action for v in (5000, 10)] == ["ok", "ok"]  # one kill per process
    assert p.peak == 5000


def test_a_jump_straight_past_the_limit_kills_without_a_warning_first():
    p = MemoryPolicy(1000)
    assert p.observe(10).action == "ok" and p.observe(1000).action == "kill"
# endregion


# region the sampler, a real process tree
GROW_CHILD = """
import os, sys
pid = os.fork()
if pid == 0:
    block = bytearray(b"\\1") * (120 * 10**6)  # written, so resident
    print("ready", flush=True)
    sys.stdin.read()
    os._exit(0)
sys.stdin.read()
os.waitpid(pid, 0)
"""


def test_tree_rss_counts_the_children():
    p = subprocess.Popen([sys.executable, "-c", GROW_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        total = tree_rss(p.pid)
        assert total >= 120 * MB, total
    finally:
        p.stdin.close()
        p.wait(10)
    assert tree_rss(p.pid) == 0  # gone: nothing, no error


SHARE_CHILD = """
import os, sys
block = bytearray(b"\\1") * (200 * 10**6)  # the parent's, written: resident
pid = os.fork()
if pid == 0:  # reads nothing, writes nothing: every page still shared with the parent
    print("ready", flush=True)
    sys.stdin.read()
    os._exit(0)
sys.stdin.read()
os.waitpid(pid, 0)
"""


def test_a_forked_child_is_not_counted_twice():
    """A separate_process child shares the worker's pages: summing RSS would count a 200 MB worker
    as 400 MB the moment a node forks, and kill it for nothing."""
    p = subprocess.Popen([sys.executable, "-c", SHARE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        own = psutil.Process(p.pid).memory_info().rss
        assert own >= 200 * MB
        total = tree_rss(p.pid)
        assert 150 * MB <= total < own + 50 * MB, (own, total)
    finally:
        p.stdin.close()
        p.wait(10)
# endregion


def test_systemd_unit_has_a_matching_memory_max(config_dir, port):
    from test_systemd import cli, parse_unit

    paths = make_worker(config_dir, port, memory_max="512MB")
    r = cli("systemd-unit", paths.name, base=config_dir)
    assert r.returncode == 0, r.stderr
    assert int(parse_unit(r.stdout)["Service"]["MemoryMax"]) == 512 * MB + 256 * 2**20
    paths2 = make_worker(config_dir, port)
    assert "MemoryMax" not in parse_unit(cli("systemd-unit", paths2.name, base=config_dir).stdout)["Service"]


def test_a_bad_memory_max_is_fatal_at_start(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port, memory_max="plenty")
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    assert sup.wait(30) == 2
    st = state(paths)
    assert st["state"] == "FATAL" and "memory_max" in st.get("reason", json.dumps(st)), st
    assert not st.get("crashes")


# region end to end
GROW = '''
import os
import time
import funcnodes_core as fn

ARMED = {armed!r}
PROGRESS = {progress!r}

@fn.NodeDecorator("grow.big", name="Big")
def big(x: int) -> int:
    if os.path.exists(ARMED):
        blocks = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            blocks.append(bytearray(b"\\1") * (8 * 10**6))  # written, so resident: 8 MB per 10 ms
            with open(PROGRESS + ".tmp", "w") as f:  # replaced whole: the test never reads half a number
                f.write(str(8 * 10**6 * len(blocks)))
            os.replace(PROGRESS + ".tmp", PROGRESS)
            time.sleep(0.01)
    return x

NODE_SHELF = fn.Shelf(nodes=[big], subshelves=[], name="grow", description="")
'''


def test_a_node_past_memory_max_is_killed_recorded_and_quarantined_others_untouched(
        config_dir, port, tmp_path, sup_procs):
    """Under one `fn-supervise host`: the worker with the limit and another one beside it."""
    from conftest import free_port
    from harness import start_host

    limit = 400 * MB
    armed, progress = tmp_path / "armed", tmp_path / "progress"
    # heartbeat_timeout: the node blocks the worker's loop while it grows; on a loaded machine that
    # must not be taken for a hang before the limit is reached
    paths = make_worker(config_dir, port, memory_max="400MB", memory_interval=0.1, heartbeat_timeout=10.0)
    data = paths.data_dir()
    mod = data / "grow_nodes.py"
    mod.write_text(GROW.format(armed=str(armed), progress=str(progress)))
    cfg = paths.read_config()
    square = data / "poison_nodes.py"  # its square node is the rest of the graph (never armed: no die)
    square.write_text(POISON.format(armed=str(tmp_path / "never")))
    cfg["package_dependencies"] = {"grow_nodes": {"package": "grow_nodes", "path": str(mod)},
                                   "poison_nodes": {"package": "poison_nodes", "path": str(square)}}
    cfg["save_delay"] = 0.05
    cfg["autostart"] = "unless-stopped"
    paths.write_config(cfg)
    other = make_worker(config_dir, free_port())  # no limit
    other.update_config(autostart="unless-stopped")
    metrics_port = free_port()
    host = start_host(config_dir, tmp_path, "--metrics-port", str(metrics_port))
    sup_procs.append(host)
    pid = poll_until(lambda: running_worker(paths), 40, what="worker ready")
    other_pid = poll_until(lambda: running_worker(other), 40, what="other worker ready")
    url = f"http://127.0.0.1:{port}"

    async def build():
        async with Client(url) as c:
            await c.cmd("add_node", id="poison.square", uuid="sq")
            await c.cmd("set_io_value", nid="sq", ioid="x", value=3)
            await c.wait_value("sq", "out", 9.0)
            await c.cmd("add_node", id="grow.big", uuid="big")
            await c.cmd("set_io_value", nid="big", ioid="x", value=1)  # harmless until armed
            await c.wait_value("big", "out", 1)
            armed.write_text("1")
            try:
                await c.cmd("trigger_node", nid="big", timeout=5)
            except (RPCError, Exception):  # noqa: BLE001 (the worker is killed under us)
                pass
    run(build())
    poll_until(lambda: (state(paths).get("crashes") or []), 30, what="the first memory kill")
    grown = int(progress.read_text())
    assert grown < 2 * limit, f"node reached {grown} bytes before the kill (limit {limit})"
    print(f"node had allocated {grown} bytes at the kill (limit {limit})")
    first = state(paths)["crashes"][0]
    assert first["reason"] == "memory_limit" and "memory limit exceeded" in first["detail"], first
    print(first["detail"])
    assert first["node"] == "big" and first["signal_name"] == "SIGKILL" and first["signal_by_supervisor"], first

    # every start loads the graph, runs `big` again, is killed; the third time it is quarantined
    poll_until(lambda: "big" in (state(paths).get("quarantine") or {}) and running_worker(paths, not_pid=pid),
               90, what="safe mode")
    st = state(paths)
    mem_kills = [c for c in st["crashes"] if c["reason"] == "memory_limit"]
    assert len(mem_kills) >= 3 and all(c["node"] == "big" for c in mem_kills), st["crashes"]
    assert int(progress.read_text()) < 2 * limit  # the last run too

    async def graph_back():
        async with Client(url) as c:
            await c.wait_value("sq", "out", 9.0)
            await c.cmd("set_io_value", nid="sq", ioid="x", value=4)
            await c.wait_value("sq", "out", 16.0)
            assert "big" in await c.cmd("get_quarantine")
    run(graph_back())
    # the other worker never noticed
    ost = state(other)
    assert running_worker(other) == other_pid and not ost.get("crashes") and ost.get("restarts", 0) == 0
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        kills = [ln for ln in r.read().decode().splitlines()
                 if ln.startswith("fn_supervise_worker_crashes_total{") and 'reason="memory_limit"' in ln]
    assert len(kills) == 1 and paths.name in kills[0] and float(kills[0].split()[-1]) >= 3, kills
    assert (paths.read_state() or {})["supervisor"]["pid"] == (other.read_state() or {})["supervisor"]["pid"] == host.pid
# endregion


def test_the_worker_tells_its_clients_and_counts_the_warning(config_dir, port, tmp_path):
    """The supervisor's 80 % report, as a channel frame: clients get a `memory_warning` worker
    event and /metrics the figures."""
    import asyncio

    import aiohttp

    from helpers import ChannelWorker, write_config

    uuid = "feedbeef000000000000000000000017"
    write_config(config_dir, uuid, port=port)
    w = ChannelWorker(config_dir, uuid, port, tmp_path / "worker.log")
    try:
        w.wait_ready()

        async def go():
            async with Client(f"http://127.0.0.1:{port}") as c:
                await c.cmd("uuid")
                w.send({"type": "memory", "level": "warn", "rss": 330 * MB, "limit": 400 * MB})
                ev = await c.wait_for(lambda e: e.get("event") == "memory_warning", 10, "memory_warning event")
                assert ev["data"]["data"] == {"rss": 330 * MB, "limit": 400 * MB}
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
                return await r.text()
        text = asyncio.run(go())
        assert "fn_worker_memory_warnings_total 1.0" in text and "fn_worker_memory_bytes 3.3e+08" in text, text
        assert w.stop() == 0
    finally:
        w.close()
