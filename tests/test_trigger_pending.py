"""A trigger requested while a node was not ready starts as soon as an edit makes it ready, even
when the edit sends no event (issue 16, defect 5): `set_default_value` on its missing input. The
safety sweep is set to a minute here, so only the edit itself can start the run. How soon it
starts (a few ms; stock: its 5 ms NodeSpace loop) is measured in benchmarks/bench_worker_compare.py."""

from __future__ import annotations

from helpers import Client, WorkerProc, run, write_config


def test_set_default_value_starts_a_pending_trigger_without_the_sweep(config_dir, port):
    write_config(config_dir, "pending", nodespace_delay=60)
    w = WorkerProc(config_dir, "pending", port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            await c.cmd("add_node", id="demo.add", uuid="b")  # input a has no default: not ready
            assert await c.cmd("request_trigger", nid="b") is True
            assert (await c.cmd("get_node_status", nid="b"))["requests_trigger"] is True
            await c.cmd("set_default_value", nid="b", ioid="a", value=5)
            await c.wait_value("b", "out", 6, timeout=10)
            assert (await c.cmd("get_node_status", nid="b"))["requests_trigger"] is False

    try:
        run(go())
    finally:
        assert w.stop() == 0
