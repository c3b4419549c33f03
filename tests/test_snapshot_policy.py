"""When the store writes a snapshot: once the graph is still (no edit and no node run for
`save_delay`), never in the middle of a running graph, yet a change the journal does not
carry still reaches one within `save_max_wait` however busy the graph is. A quiet snapshot is
taken SNAPSHOT_STEP nodes per loop turn and starts over when the graph moves meanwhile.

Real Store, real files, a real loop. Node runs ending are played by loop callbacks that call
`store.ran()` (what the runtime does when a run ends), each due before the snapshot timer, so
a loaded host that delays both still runs them in order."""

from __future__ import annotations

import asyncio
import json
import time

from test_journal_replay import _demo, _world


def _runs(loop, store, every: float, count: int, done: asyncio.Future) -> None:
    """count node runs ending `every` seconds apart, as a busy graph's would."""
    def tick(left: int) -> None:
        try:
            store.moved += 1  # the run's events (what the runtime counts for Store.activity)
            store.ran()
        except Exception as e:  # fail the test, not hang it
            done.set_exception(e)
            return
        if left:
            loop.call_later(every, tick, left - 1)
        else:
            done.set_result(None)
    loop.call_later(every, tick, count)


async def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)


def _snapshot_requested(store, before: int) -> bool:
    return store.stats["snapshots"] > before or store._snap_task is not None


def _open(tmp_path, loop):
    """A store on a fresh folder, loaded and open: (store, commands, snapshots so far)."""
    from worker.effects import OPS

    g, store, cmds = _world(tmp_path, loop, _demo(), {"save_delay": 0.2, "save_max_wait": 0.3})
    store.load(g.apply_state, g.apply_record, OPS)
    store.open(loop)
    # as the runtime wires it: quiet snapshots in steps, started over when the graph moves
    store.moved = 0
    store.state_steps = g.state_steps
    store.activity = lambda: store.moved
    return store, cmds, store.stats["snapshots"]


def test_an_edit_is_snapshotted_only_once_nodes_stop_running(tmp_path):
    async def go():
        loop = asyncio.get_running_loop()
        store, cmds, before = _open(tmp_path, loop)
        cmds.call("add_node", {"id": "demo.number", "uuid": "a"})
        await store.flush()  # acknowledged: in the journal, whatever the snapshot does
        busy = loop.create_future()
        _runs(loop, store, 0.05, 30, busy)  # 1.5 s of a running graph, 7x save_max_wait
        await busy
        assert not _snapshot_requested(store, before), "a snapshot was taken while nodes ran"
        await _until(lambda: store.stats["snapshots"] > before and store._snap_task is None, 10,
                     "the snapshot once the graph is still")
        saved = json.loads(store.paths.nodespace.read_text())
        assert [n["id"] for n in saved["backend"]["nodes"]] == ["a"]
        store.close()

    asyncio.run(go())


def test_a_change_no_record_carries_reaches_a_snapshot_while_nodes_run(tmp_path):
    async def go():
        loop = asyncio.get_running_loop()
        store, _cmds, before = _open(tmp_path, loop)
        store.touch()  # node code changed something no record carries
        busy = loop.create_future()
        _runs(loop, store, 0.05, 30, busy)
        seen_during_runs = []
        loop.call_later(0.3 + 0.5, lambda: seen_during_runs.append(_snapshot_requested(store, before)))
        await busy
        assert seen_during_runs == [True], "save_max_wait was not kept while nodes ran"
        await _until(lambda: store._snap_task is None, 10, "the snapshot written")
        store.close()

    asyncio.run(go())


def test_a_quiet_snapshot_lets_the_loop_run_between_its_steps_and_starts_over_when_the_graph_moves(tmp_path):
    from worker.store import SNAPSHOT_STEP

    async def go():
        loop = asyncio.get_running_loop()
        store, cmds, before = _open(tmp_path, loop)
        n = SNAPSHOT_STEP * 3
        for i in range(n):
            cmds.call("add_node", {"id": "demo.number", "uuid": f"n{i}"})
        await store.flush()
        await _until(lambda: store.stats["snapshots"] > before and store._snap_task is None, 10, "the first snapshot")
        before = store.stats["snapshots"]

        # the graph moves between two steps (a node run's events): that snapshot is dropped
        store._quiet_snapshot()
        seen = []
        loop.call_soon(lambda: seen.append(store._steps is not None))  # runs between the steps
        await asyncio.sleep(0)
        store.moved += 1
        for _ in range(5):
            await asyncio.sleep(0)
        assert seen == [True], "the loop did not run between the snapshot's steps"
        assert store._steps is None and store._snap_task is None and store.stats["snapshots"] == before
        assert store._timer is not None, "no snapshot to follow once the graph is still"

        # an edit between two steps: dropped too, and the next snapshot holds it
        store._timer.cancel()
        store._timer = None
        store._quiet_snapshot()
        await asyncio.sleep(0)
        cmds.call("add_node", {"id": "demo.number", "uuid": "late"})
        await store.flush()
        await _until(lambda: store.stats["snapshots"] > before and store._snap_task is None, 10,
                     "the snapshot once the graph is still again")
        saved = json.loads(store.paths.nodespace.read_text())
        assert {x["id"] for x in saved["backend"]["nodes"]} == {f"n{i}" for i in range(n)} | {"late"}
        assert saved["meta"]["journal_seq"] == store.seq
        store.close()

    asyncio.run(go())
