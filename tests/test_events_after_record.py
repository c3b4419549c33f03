"""No client sees an edit that a crash then takes back: an edit's events leave the worker only
after its journal record was written, for connections the main loop serves and for those the
I/O thread keeps (one accepted while a node runs).

The worker SIGKILLs itself halfway through the Kth journal append (FN_SUPERVISE_FAULT, as in
test_journal_files): that edit is torn, never acknowledged, and gone after the restart. Every
`node_added` a watching client saw before the kill must name a node the restarted worker has."""

from __future__ import annotations

import asyncio
import signal

import pytest

from helpers import Client, RPCError, WorkerProc, run, write_config


async def _edit_until_dead(url: str) -> tuple[list[str], list[list[str]]]:
    async with Client(url) as editor:
        # A node that runs for a minute: a connection accepted meanwhile stays on the I/O thread.
        await editor.cmd("add_node", id="demo.sleep", uuid="sleeper")
        await editor.cmd("set_io_value", nid="sleeper", ioid="seconds", value=60)
        await editor.wait_for(lambda e: e.get("event") == "triggerstart" and
                              (e.get("data") or {}).get("node") == "sleeper", 10, "the sleeper running")
        watchers = [Client(url), Client(url)]  # one kept by the I/O thread, one the editor's kind
        for w in watchers:
            await w.__aenter__()
        acked: list[str] = []

        def added(w: Client, nid: str) -> bool:
            return any(e.get("event") == "node_added" and (e.get("data") or {}).get("node", {}).get("id") == nid
                       for e in w.events)

        try:
            for i in range(200):
                await editor.cmd("add_node", id="demo.number", uuid=f"n{i}")
                acked.append(f"n{i}")
                if i == 0:  # both watchers are live before the stream runs into the fault
                    for w in watchers:
                        await w.wait_for(lambda e, w=w: added(w, "n0"), 10, "n0's node_added")
        except (RPCError, ConnectionError, OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0)  # frames already read are in each watcher's list
        seen = [[(e.get("data") or {}).get("node", {}).get("id") for e in w.events
                 if e.get("event") == "node_added"] for w in watchers]
        for w in watchers:
            try:
                await w.__aexit__(None, None, None)
            except Exception:
                pass
    return acked, seen


@pytest.mark.parametrize("k", [7, 9, 11, 14, 20])
def test_no_client_sees_an_edit_the_crash_takes_back(config_dir, port, k):
    uid = f"evrec{k}"
    write_config(config_dir, uid, save_delay=60)
    w = WorkerProc(config_dir, uid, port, env={"FN_SUPERVISE_FAULT": f"journal:{k}"}).wait_ready()
    acked, seen = run(_edit_until_dead(w.url))
    w.proc.wait(20)
    assert w.proc.returncode == -signal.SIGKILL, "the fault point was never reached"
    w.log.close()
    w2 = WorkerProc(config_dir, uid, port).wait_ready()

    async def nodes():
        async with Client(w2.url) as c:
            return {n["id"] for n in await c.cmd("get_nodes")}

    held = run(nodes())
    assert w2.stop() == 0
    assert set(acked) <= held  # every acknowledged edit is back
    for ids in seen:
        ghosts = [i for i in ids if i and i.startswith("n") and i not in held]
        assert not ghosts, f"a client saw {ghosts} added, which the crash took back"
