"""After a clean stop of ours, the stock funcnodes-worker 1.6.0 opens the data folder and shows the
same graph: nodespace.json stays the stock snapshot and holds every edit (the journal is cut)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from conftest import free_port
from editstream import EditStream, differences, observed
from helpers import Client, WorkerProc, run, write_config
from stockenv import StockWorker, stock_python

pytestmark = pytest.mark.stock
UUID = "journalstock"


def test_stock_worker_sees_the_whole_graph_after_a_clean_stop(config_dir, tmp_path, port):
    write_config(config_dir, UUID, save_delay=60, journal_min_bytes=1 << 20)  # no snapshot but the last
    w = WorkerProc(config_dir, UUID, port).wait_ready()
    stream = EditStream(seed=11)

    async def edit():
        async with Client(w.url) as c:
            while stream.acked < 120:
                await stream.step(c)
            return await observed(c)

    ours = run(edit())
    assert w.stop() == 0
    sbase = tmp_path / "stockcfg"
    shutil.copytree(config_dir / "workers" / f"worker_{UUID}", sbase / "workers" / f"worker_{UUID}")
    stock = StockWorker(stock_python(), sbase, UUID, free_port())
    try:
        async def look():
            deadline = asyncio.get_running_loop().time() + 90
            while True:
                try:
                    async with Client(stock.url) as c:
                        return await observed(c)
                except Exception:
                    if stock.proc.poll() is not None or asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.1)

        theirs = run(look())
    except BaseException:
        print(stock.output()[-3000:])
        raise
    finally:
        stock.kill()
    assert set(ours.nodes) == set(stream.model.nodes) and len(ours.nodes) > 5
    assert not differences(ours, theirs), differences(ours, theirs)
