"""The journal's files under fault: kills inside a write, torn and corrupt journals, a missing
snapshot, a newer format. Each start keeps every acknowledged edit, logs what it found in one
clear line, and never refuses to start because of its own files."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from editstream import EditStream, check, observed, only
from helpers import Client, RPCError, WorkerProc, run, write_config

OPS = ("node", "rm_node", "edge", "rm_edge", "clear", "attrs", "io", "value_options", "value", "groups")


def data_dir(base: Path, uid: str) -> Path:
    return base / "workers" / f"worker_{uid}"


async def _stream_until_dead(w: WorkerProc, stream: EditStream, limit: int = 400) -> None:
    async with Client(w.url) as c:
        try:
            for _ in range(limit):
                await stream.step(c)
        except (RPCError, ConnectionError, OSError, asyncio.TimeoutError):
            pass


async def _snapshot_until_dead(w: WorkerProc, stream: EditStream) -> None:
    async with Client(w.url) as c:
        try:
            for _ in range(40):
                await stream.step(c)
            await c.cmd("save")  # the snapshot the fault kills
        except (RPCError, ConnectionError, OSError, asyncio.TimeoutError):
            pass


# Snapshot counts include the first one, which a fresh worker writes when it opens its journal.
@pytest.mark.parametrize("fault", ["journal:25", "journal:1", "snapshot:2", "cut:2", "snapshot:4"])
def test_kill_inside_a_write_keeps_every_acknowledged_edit(config_dir, port, fault):
    """FN_SUPERVISE_FAULT makes the worker SIGKILL itself halfway through a journal append, halfway
    through a snapshot's temp file, or between a snapshot's rename and the journal cut."""
    uid = "fault_" + fault.replace(":", "_")
    # snapshot:4: the fourth snapshot, after two background ones triggered by the size bound
    write_config(config_dir, uid, save_delay=60, journal_min_bytes=2048 if fault == "snapshot:4" else 1 << 20)
    stream = EditStream(seed=hash(fault) & 0xFFFF)
    w = WorkerProc(config_dir, uid, port, env={"FN_SUPERVISE_FAULT": fault}).wait_ready()
    run(_snapshot_until_dead(w, stream) if fault in ("snapshot:2", "cut:2") else _stream_until_dead(w, stream))
    w.proc.wait(20)
    assert w.proc.returncode == -signal.SIGKILL, "the fault point was never reached"
    w.log.close()
    w2 = WorkerProc(config_dir, uid, port).wait_ready()

    async def verify():
        async with Client(w2.url) as c:
            return await observed(c)

    got = run(verify())
    out = w2.output()
    assert w2.stop() == 0
    assert not check(stream, got), check(stream, got)
    assert stream.acked >= (24 if fault == "journal:25" else 0)
    if fault.startswith("journal"):
        assert "dropped a torn last record" in out
    assert "not replayed" not in out, out[-3000:]  # a cut after the rename: nothing applied twice
    assert not list(data_dir(config_dir, uid).glob(".*.tmp")), "a half-written temp file was left"


def _seed(base: Path, uid: str, port: int, edits: int = 30) -> EditStream:
    """A worker folder with a snapshot of `edits` edits and a journal of 20 more, left by kill -9."""
    write_config(base, uid, save_delay=60, journal_min_bytes=1 << 20)
    stream = EditStream(seed=7)
    w = WorkerProc(base, uid, port).wait_ready()

    async def go():
        async with Client(w.url) as c:
            while stream.acked < edits:  # a step may find nothing to do: count acknowledgements
                await stream.step(c)
            await c.cmd("save")
            while stream.acked < edits + 20:
                await stream.step(c)

    run(go())
    w.kill9()
    w.log.close()
    return stream


def _start_and_observe(base: Path, uid: str, port: int):
    logfile = base / f"worker_{uid}.test.log"
    seen = logfile.stat().st_size if logfile.exists() else 0  # the log is appended to per start
    w = WorkerProc(base, uid, port).wait_ready()

    async def look():
        async with Client(w.url) as c:
            return await observed(c)

    got = run(look())
    out = w.output()[seen:]
    assert w.stop() == 0
    return got, out


def _lines(p: Path) -> list[bytes]:
    return p.read_bytes().splitlines(keepends=True)


def test_corrupt_record_keeps_what_was_before_it_and_the_rest_aside(config_dir, port):
    uid = "corrupt"
    stream = _seed(config_dir, uid, port)
    jp = data_dir(config_dir, uid) / "nodespace.journal"
    lines = _lines(jp)
    assert len(lines) == 21  # header + 20 records
    lines[11] = b'{"seq": "garbage", "op\n'  # record 11 of 20 is unreadable
    jp.write_bytes(b"".join(lines))
    snap = json.loads((data_dir(config_dir, uid) / "nodespace.json").read_text())
    expected = {n["id"] for n in snap["backend"]["nodes"]}
    for rec in (json.loads(x) for x in lines[1:11]):
        if rec["op"] == "node":
            expected.add(rec["node"]["id"])
        elif rec["op"] == "rm_node":
            expected.discard(rec["id"])
    got, out = _start_and_observe(config_dir, uid, port)
    assert "journal line 12 is unreadable" in out and "replayed the 10 records before it" in out
    kept = list(data_dir(config_dir, uid).glob("nodespace.journal.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"".join(lines[11:])
    assert set(got.nodes) == expected  # the snapshot plus the 10 good records, nothing after
    # the worker goes on journaling after the good records: a kill now loses nothing new
    w = WorkerProc(config_dir, uid, port).wait_ready()

    async def more():
        async with Client(w.url) as c:
            await c.cmd("add_node", id="demo.number", uuid="after_corrupt")
            await c.cmd("update_node_view", nid="after_corrupt", data={"pos": [5, 6]})

    run(more())
    w.kill9()
    w.log.close()
    got2, out2 = _start_and_observe(config_dir, uid, port)
    assert got2.nodes["after_corrupt"]["pos"] == [5, 6]
    assert set(got.nodes) <= set(got2.nodes)
    assert "unreadable" not in out2


def test_torn_last_record_is_dropped_and_logged(config_dir, port):
    uid = "torn"
    stream = _seed(config_dir, uid, port)
    jp = data_dir(config_dir, uid) / "nodespace.journal"
    whole = jp.read_bytes()
    jp.write_bytes(whole + b'{"seq": 999, "op": "attrs", "id": "n1", "pro')  # a write cut short
    got, out = _start_and_observe(config_dir, uid, port)
    assert "dropped a torn last record" in out
    assert not check(stream, got)
    assert jp.read_bytes().endswith(b"\n")  # appends follow the last good record again


def test_journal_whose_snapshot_is_missing_replays_onto_an_empty_graph(config_dir, port):
    uid = "nosnap"
    stream = _seed(config_dir, uid, port)
    d = data_dir(config_dir, uid)
    recs = [json.loads(x) for x in _lines(d / "nodespace.journal")[1:]]
    (d / "nodespace.json").unlink()
    got, out = _start_and_observe(config_dir, uid, port)
    assert "nodespace.json is missing" in out
    added = {r["node"]["id"] for r in recs if r["op"] == "node"}
    removed = {r["id"] for r in recs if r["op"] == "rm_node"}
    assert set(got.nodes) == added - removed  # what the journal alone knows, nothing invented
    assert set(got.nodes) <= set(stream.model.nodes)


def test_journal_from_a_newer_format_is_kept_aside(config_dir, port):
    uid = "newer"
    stream = _seed(config_dir, uid, port)
    d = data_dir(config_dir, uid)
    newer = b'{"fnjournal": 99, "base": 0}\n{"seq": 1, "op": "teleport"}\n'
    (d / "nodespace.journal").write_bytes(newer)
    got, out = _start_and_observe(config_dir, uid, port)
    assert "written by a newer fn-supervise (format 99" in out
    kept = list(d.glob("nodespace.journal.newer-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == newer
    snap = json.loads((d / "nodespace.json").read_text())
    assert set(got.nodes) == {n["id"] for n in snap["backend"]["nodes"]}  # the snapshot, whole


def test_corrupt_snapshot_and_journal_still_start(config_dir, port):
    uid = "bothbad"
    _seed(config_dir, uid, port)
    d = data_dir(config_dir, uid)
    (d / "nodespace.json").write_text("{not json")
    (d / "nodespace.journal").write_bytes(b"\x00\xff garbage\n" * 3)
    got, out = _start_and_observe(config_dir, uid, port)
    assert "nodespace.json cannot be loaded" in out and "journal line 1 is unreadable" in out
    assert list(d.glob("nodespace.corrupt-*.json")) and list(d.glob("nodespace.journal.corrupt-*"))


def test_parse_is_exact_about_good_torn_and_corrupt():
    from worker import journal

    ok = journal.header(5) + journal.encode({"seq": 6, "op": "clear"}) + journal.encode({"seq": 7, "op": "clear"})
    p = journal.parse(ok, set(OPS))
    assert (p.base, [r["seq"] for r in p.good], p.torn, p.corrupt_at) == (5, [6, 7], b"", None)
    p = journal.parse(ok + b'{"seq": 8', set(OPS))
    assert [r["seq"] for r in p.good] == [6, 7] and p.torn == b'{"seq": 8' and p.valid_bytes == len(ok)
    p = journal.parse(ok + journal.encode({"seq": 7, "op": "clear"}), set(OPS))
    assert p.corrupt_at == 4 and "seq 7 after 7" in p.corrupt_reason
    p = journal.parse(ok + journal.encode({"seq": 8, "op": "nope"}) + journal.encode({"seq": 9, "op": "clear"}), set(OPS))
    assert p.corrupt_at == 4 and [r["seq"] for r in p.good] == [6, 7] and p.rest.count(b"\n") == 2
    assert journal.parse(b"", set(OPS)).good == []


@pytest.mark.parametrize("durability", ["fsync", "process"])
def test_concurrent_clients_share_syncs_and_lose_nothing(config_dir, port, durability):
    """Four clients edit at once (group commit under fsync: records that arrive together share one
    fdatasync); every reply arrives, and after kill -9 every acknowledged edit of each is back."""
    uid = "group_" + durability
    write_config(config_dir, uid, durability=durability, journal_min_bytes=8192, save_delay=0.05)
    streams = [EditStream(seed=k, prefix=f"c{k}x", groups=False) for k in range(4)]
    w = WorkerProc(config_dir, uid, port).wait_ready()

    async def edit(s: EditStream):
        async with Client(w.url) as c:
            while s.acked < 60:
                await s.step(c)

    async def all_at_once():
        await asyncio.wait_for(asyncio.gather(*(edit(s) for s in streams)), 90)

    run(all_at_once())
    w.kill9()
    w.log.close()
    got, out = _start_and_observe(config_dir, uid, port)
    for s in streams:
        assert not check(s, only(got, s.prefix)), (s.prefix, check(s, only(got, s.prefix)))
    ours = [line for line in out.splitlines() if "fn_supervise" in line and "ERROR" in line]
    assert not ours, ours  # node errors (an Add just unwired) are the graph's, not ours
