"""separate_process=True (issue 16): the node's function runs in a child forked from the worker.
Its result comes back; a child that raises, calls os._exit, is SIGKILLed or cannot pickle its
result fails that run with a clear error while the worker keeps its PID and serves; the child
is in the worker's process tree and group (the supervisor's memory watch counts it) and none
outlives a cancelled run or the worker. Real worker processes; the nodes are tests/separate_nodes.py."""

from __future__ import annotations

import asyncio
import os

import psutil

from conftest import REPO, poll_until
from helpers import DEMO_NODES, Client, WorkerProc, run, write_config
from supervisor.memory import tree_rss

SEP_NODES = REPO / "tests" / "separate_nodes.py"
DEPS = {"demo_nodes": {"package": "demo_nodes", "path": str(DEMO_NODES)},
        "separate_nodes": {"package": "separate_nodes", "path": str(SEP_NODES)}}


def _start(config_dir, uuid, port) -> WorkerProc:
    write_config(config_dir, uuid, package_dependencies=DEPS)
    return WorkerProc(config_dir, uuid, port).wait_ready()


async def _error_of(c: Client, nid: str) -> str:
    e = await c.wait_for(lambda e: e.get("event") in ("node_trigger_error", "node_error")
                         and e.get("data", {}).get("node") == nid, timeout=20, what=f"error of {nid}")
    return e["data"]["error"]


async def _pid_of_run(c: Client, nid: str, x: int) -> int:
    """Trigger the sep.pid node nid; the PID its function ran in."""
    await c.cmd("set_io_value", nid=nid, ioid="x", value=x)
    for _ in range(500):
        v = await c.cmd("get_io_value", nid=nid, ioid="out")
        if isinstance(v, int):
            return v
        await asyncio.sleep(0.02)
    raise AssertionError(f"{nid} returned no pid")


def test_results_come_back_and_crashes_fail_only_the_run(config_dir, port):
    w = _start(config_dir, "sep1", port)
    wpid = w.proc.pid

    async def go():
        async with Client(w.url) as c:
            await c.cmd("add_node", id="sep.pid", uuid="p")
            child = await _pid_of_run(c, "p", 1)
            assert child != wpid, (child, wpid)
            poll_until(lambda: not psutil.pid_exists(child), 10, what="the child reaped")

            # a separate_thread node stays in the worker (the flag we changed is only separate_process)
            await c.cmd("add_node", id="sep.thread_pid", uuid="t")
            await c.cmd("set_io_value", nid="t", ioid="x", value=1)
            await c.wait_value("t", "out", wpid, timeout=20)

            await c.cmd("add_node", id="sep.square", uuid="sq")
            await c.cmd("set_io_value", nid="sq", ioid="x", value=7)
            await c.wait_value("sq", "out", 49, timeout=20)

            await c.cmd("add_node", id="sep.exit", uuid="ex")
            await c.cmd("set_io_value", nid="ex", ioid="code", value=3)
            err = await _error_of(c, "ex")
            assert "separate process" in err and "exited with status 3 before it returned a result" in err, err

            await c.cmd("add_node", id="sep.sigkill", uuid="k")
            await c.cmd("set_io_value", nid="k", ioid="x", value=1)
            err = await _error_of(c, "k")
            assert "was killed by SIGKILL" in err, err

            await c.cmd("add_node", id="sep.segv", uuid="sv")
            await c.cmd("set_io_value", nid="sv", ioid="x", value=1)
            err = await _error_of(c, "sv")
            assert "was killed by SIGSEGV (a crash: segmentation fault)" in err, err

            await c.cmd("add_node", id="sep.raise", uuid="r")
            await c.cmd("set_io_value", nid="r", ioid="message", value="kaputt")
            assert "kaputt" in await _error_of(c, "r")

            await c.cmd("add_node", id="sep.unpicklable", uuid="u")
            await c.cmd("set_io_value", nid="u", ioid="x", value=1)
            err = await _error_of(c, "u")
            assert "cannot be pickled" in err and "lock" in err, err

            # the worker is the same process and serves: a plain node runs, commands answer
            assert w.proc.poll() is None and await c.cmd("uuid") == "sep1"
            await c.cmd("add_node", id="demo.add", uuid="a")
            await c.cmd("set_io_value", nid="a", ioid="a", value=41)
            await c.wait_value("a", "out", 42, timeout=20)
            # and a separate_process node still works after the crashes
            await c.cmd("set_io_value", nid="sq", ioid="x", value=5)
            await c.wait_value("sq", "out", 25, timeout=20)
            assert psutil.Process(wpid).children() == []  # every child was reaped

    try:
        run(go())
        assert w.proc.pid == wpid and w.proc.poll() is None
    finally:
        assert w.stop() == 0


def _children_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_child_memory_counts_and_no_child_outlives_a_cancel_or_the_worker(config_dir, port):
    w = _start(config_dir, "sep2", port)
    wpid = w.proc.pid
    mb = 150

    def big_child():
        kids = [p for p in _children_of(wpid) if p.memory_info().rss > mb * 2**20 * 0.9]
        return kids[0] if kids else None

    async def go():
        async with Client(w.url) as c:
            alone = tree_rss(wpid)
            assert alone < mb * 2**20 * 0.8  # the worker alone is far below what its child will hold
            await c.cmd("add_node", id="sep.hold", uuid="h")
            await c.cmd("set_io_value", nid="h", ioid="mb", value=mb)
            child = poll_until(big_child, 30, what="the allocating child in the worker's tree")
            assert os.getpgid(child.pid) == os.getpgid(wpid)  # what a memory_max kill of the group reaches
            # the supervisor's sampler counts it (RSS alone, PSS once there are children: see memory.py)
            assert tree_rss(wpid) > alone + mb * 2**20 * 0.5 and tree_rss(wpid) > mb * 2**20 * 0.9
            # the run is cancelled (a new graph replaces the running node): its child is killed
            await c.cmd("load_data", data={"backend": {"nodes": [], "edges": []}})
            poll_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10,
                       what="the cancelled run's child gone")
            poll_until(lambda: _children_of(wpid) == [], 10, what="the child reaped")
            assert await c.cmd("uuid") == "sep2"

            # a child still running when the worker stops goes with it
            await c.cmd("add_node", id="sep.hold", uuid="h2")
            await c.cmd("set_io_value", nid="h2", ioid="mb", value=1)
            return poll_until(lambda: [p for p in _children_of(wpid)], 30, what="second child")[0]

    try:
        child = run(go())
    finally:
        assert w.stop() == 0
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_worker_killed_takes_its_child_and_replayed_nodes_still_fork(config_dir, port):
    w = _start(config_dir, "sep3", port)

    async def build(wpid: int):
        async with Client(w.url) as c:
            await c.cmd("add_node", id="sep.hold", uuid="h")
            await c.cmd("set_io_value", nid="h", ioid="mb", value=1)
            await c.cmd("add_node", id="sep.pid", uuid="p")  # runs after the restart below
            return poll_until(lambda: [p for p in _children_of(wpid) if p.pid != wpid], 30, what="child")

    try:
        kids = run(build(w.proc.pid))
        w.kill9()  # no stop, no kill_all: the parent-death signal ends the child
        poll_until(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in kids), 10,
                   what="the child of the killed worker gone")
    finally:
        w.stop()

    # the graph comes back from the journal; its separate_process node still runs in a child
    w = WorkerProc(config_dir, "sep3", port).wait_ready()

    async def again():
        async with Client(w.url) as c:
            await c.cmd("remove_node", id="h")
            return await _pid_of_run(c, "p", 2)

    try:
        child = run(again())
        assert isinstance(child, int) and child != w.proc.pid
    finally:
        assert w.stop() == 0


def test_supervised_a_crash_in_the_child_is_no_worker_crash_and_memory_max_counts_it(
        config_dir, port, tmp_path, sup_procs):
    """Under the supervisor, worker forked by the fork server: a child that SIGKILLs itself costs
    no restart; a child past memory_max gets the worker's group killed and recorded like any node."""
    from harness import make_worker, running_worker, start_supervisor, state

    paths = make_worker(config_dir, port, memory_max="300MB", memory_interval=0.1, heartbeat_timeout=10.0)
    paths.update_config(package_dependencies=DEPS)
    sup_procs.append(start_supervisor(paths, tmp_path))
    pid = poll_until(lambda: running_worker(paths), 60, what="worker ready")

    async def crash_then_grow():
        async with Client(f"http://127.0.0.1:{port}") as c:
            await c.cmd("add_node", id="sep.sigkill", uuid="k")
            await c.cmd("set_io_value", nid="k", ioid="x", value=1)
            assert "was killed by SIGKILL" in await _error_of(c, "k")
            await c.cmd("add_node", id="sep.pid", uuid="p")
            child = await _pid_of_run(c, "p", 1)
            assert child != pid and await c.cmd("uuid") == paths.name.removeprefix("worker_")
            st = state(paths)
            assert running_worker(paths) == pid and not st.get("crashes") and st.get("restarts", 0) == 0, st
            await c.cmd("add_node", id="sep.hold", uuid="h")
            await c.cmd("set_io_value", nid="h", ioid="mb", value=400)

    run(crash_then_grow())
    crash = poll_until(lambda: (state(paths).get("crashes") or [None])[0], 30, what="the memory kill")
    assert crash["reason"] == "memory_limit" and crash["node"] == "h", crash
