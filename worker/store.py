"""The one path from an edit to the disk: journal records, snapshots, the config file.

    command verb -> store.feed(record)        (Commands.run, for verbs marked mutates=True)
    dispatch     -> await store.flush()       write(2) of everything fed, then fdatasync under
                                              durability "fsync" (one per group), THEN the reply
    idle / size  -> snapshot                  nodespace.json rewritten, the journal cut

Durability (`durability` in the worker config):
- "process" (default): a reply leaves after its record went through write(2). The page cache
  belongs to the kernel, so kill -9 of the worker or of the supervisor loses nothing acknowledged.
- "fsync": records that arrive together share one fdatasync before their replies (group
  commit), so an acknowledged edit also survives a power cut.

Snapshots (nodespace.json, the stock format, plus meta.journal_seq) are written when the graph
has been idle (no edit, no node run) for `save_delay`, when the journal outgrows max(snapshot size, journal_min_bytes),
at most `save_max_wait` after a change the journal does not carry (node code changing value
options while it runs), for `save`, for verbs that replace the whole graph, and at a clean stop.
The journal is cut after each snapshot is on disk; a crash in between only leaves records the
next load skips (their seq is at or below the snapshot's).

What stays out of the journal: outputs and anything else node code computes; they are
recomputed by running the graph after a load.

A full disk (ENOSPC, EIO, a quota): an edit whose record cannot be written is undone (the graph
goes back to what nodespace.json and the journal hold, as after a crash) and refused; while the
journal cannot be written every edit is refused before it runs (`check_writable`), reads go on,
and a retry every `disk_retry` seconds (a snapshot and a fresh segment) ends it on its own once
there is room. `trouble` says why; the runtime shows it in /healthz, status and /metrics.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator

from . import journal
from .config import WorkerPaths, write_config
from .fsutil import read_json

log = logging.getLogger("fn_supervise.worker.store")

DURABILITY = ("process", "fsync")
# Under an endless edit stream the journal grows to max(snapshot, this) before a snapshot cuts
# it: 16 KiB cut every ~40 ms at 4k edits/s (a snapshot, a rename and an fsync each time, ~5 %
# of the worker's time); 256 KiB replays in well under 0.1 s after a crash.
JOURNAL_MIN_BYTES = 256 << 10
SNAPSHOT_STEP = 20  # nodes a quiet snapshot serializes per loop turn (~1 ms)


class JournalError(OSError):
    """An edit could not be made durable: it is refused (undone), never acknowledged."""


@dataclass
class LoadReport:
    snapshot_seq: int = 0
    replayed: int = 0
    skipped: int = 0
    torn: int = 0  # bytes of a torn last record that were dropped
    set_aside: str = ""  # file the unreadable rest of the journal was moved to


class Store:
    # The keys the worker itself maintains; everything else in the config file (the supervisor's
    # timers, a user's edits) is re-read and kept, so a write never reverts a concurrent edit.
    OWN_KEYS = ("type", "uuid", "name", "data_path", "env_path", "worker_dependencies", "package_dependencies",
                "pid", "autostart", "update_on_startup", "host", "port", "ssl", "subprocess_monitor")

    def __init__(self, paths: WorkerPaths, config: dict, state: Callable[[], dict]):
        self.paths = paths
        self.config = config
        self.state = state  # the graph's WorkerState, taken on the main loop
        # The same in steps (a generator of SNAPSHOT_STEP nodes per step), and a number that
        # changes with every graph event (node runs included): a quiet snapshot is taken a step
        # per loop turn and started again later if the number or the journal moved meanwhile.
        self.state_steps: Callable[[int], Generator[None, None, dict]] | None = None
        self.activity: Callable[[], int] | None = None
        self._steps: tuple | None = None  # (generator, mark) of the quiet snapshot being taken
        self.journal_path = paths.data / "nodespace.journal"
        durability = config.get("durability") or "process"
        if durability not in DURABILITY:
            log.error("unknown durability %r (expected one of %s); using 'process'", durability, DURABILITY)
            durability = "process"
        self.durability = durability
        self.enabled = False  # journaling and snapshots run only after the load
        self.file: journal.JournalFile | None = None
        self.seq = 0  # the last record fed
        self.covered = 0  # > 0 while a mutating verb runs: its events are in its record
        self._pending: list[bytes] = []
        self._snapshot_due = False  # a record could not be encoded: snapshot before the reply
        self._written = 0  # bytes written since open, across segments
        self._synced = 0
        # Ranges (start, end] of _written whose fdatasync failed: their bytes were cut from the
        # segment, so an edit whose records end inside one is refused. The last few suffice.
        self._lost: list[tuple[int, int]] = []
        self.mine = 0  # end (in _written) of the records the last write_now wrote, 0 if none
        self._epoch = 0  # bumped by restore(): a background snapshot taken before it is stale
        self._sync_task: asyncio.Future | None = None
        self._snap_bytes = 0
        self._snap_task: asyncio.Task | None = None
        self._snap_lock = threading.Lock()  # one snapshot file write at a time, newest wins
        self._disk_seq = -1  # seq of the snapshot on disk
        self._cut_seq = -1  # base of the current segment
        self._tail: list[bytes] | None = None  # records written while a snapshot is written
        self._last_change = 0.0
        self._last_run = 0.0  # a node run ended: a snapshot (compaction) waits for a still graph
        self._first_unjournaled: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stats = {"records": 0, "writes": 0, "syncs": 0, "snapshots": 0, "refused": 0}
        # The journal cannot be written (a full disk): why, since when (wall clock), and who hears
        # of a change (the runtime: log, clients, supervisor). None while all is well.
        self.trouble: str | None = None
        self.trouble_since: float | None = None
        self.on_trouble: Callable[[str | None], None] | None = None
        self.on_restore: Callable[[], None] | None = None
        self._loader: tuple | None = None  # load()'s arguments, to undo an edit from the disk
        self._retry_task: asyncio.Task | None = None
        self._snap_error: str | None = None  # why the last background snapshot failed (logged once)

    # region load
    def load(self, apply_state: Callable[[dict], None], apply_record: Callable[[dict], None],
             known_ops: frozenset[str], clean: bool = True) -> LoadReport:
        """Snapshot, then the journal records after it. Nothing here raises for a bad file: what
        cannot be read is kept aside, logged, and the worker starts with everything that was good.
        `clean` removes temp files a crash left; an undo (restore) keeps them, since a snapshot
        thread may be writing one right now."""
        from . import persistence

        self._loader = (apply_state, apply_record, known_ops)
        rep = LoadReport()
        if clean:
            self._clean_temp_files()
        state = None
        try:
            state = persistence.read_state(self.paths.nodespace)
            if state or self.enabled:  # an undo (restore) clears what no file holds
                apply_state(state or {})
        except Exception as e:  # noqa: BLE001 (any shape of corruption)
            bad = self._set_aside(self.paths.nodespace, "nodespace.corrupt-{}.json")
            self._complain(f"nodespace.json cannot be loaded ({type(e).__name__}: {e}); moved to {bad}")
            apply_state({})
            state = None
        snap_meta = (state or {}).get("meta") or {}
        snap_seq = snap_meta.get("journal_seq")
        foreign = state is not None and not isinstance(snap_seq, int)
        rep.snapshot_seq = snap_seq = snap_seq if isinstance(snap_seq, int) and snap_seq >= 0 else 0
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            data = b""
        p = journal.parse(data, known_ops)
        self.seq = max(snap_seq, p.base)
        if p.newer is not None:
            rep.set_aside = self._set_aside(self.journal_path, "nodespace.journal.newer-{}")
            self._complain(f"the journal was written by a newer fn-supervise (format {p.newer}, ours "
                           f"{journal.VERSION}); kept aside as {rep.set_aside}; starting from nodespace.json")
            return rep
        todo = [r for r in p.good if r["seq"] > snap_seq]
        if todo and foreign and p.base > 0:
            # Our snapshots always carry journal_seq: one without it was written later by another
            # tool (the stock worker) over our folder; replaying would bring back older edits.
            rep.set_aside = self._set_aside(self.journal_path, "nodespace.journal.stale-{}")
            self._complain(f"nodespace.json was written by another program after the journal; the journal "
                           f"({len(todo)} records) is kept aside as {rep.set_aside}")
            return rep
        if todo and p.base > snap_seq:
            what = "missing" if state is None else f"older (seq {snap_seq}) than the journal expects ({p.base})"
            self._complain(f"nodespace.json is {what}; replaying the journal's {len(todo)} records onto it: "
                           f"edits before seq {p.base} are not in either file")
        for rec in todo:
            try:
                apply_record(rec)
                rep.replayed += 1
            except Exception as e:  # noqa: BLE001 (Skip, or a record funcnodes-core refuses)
                rep.skipped += 1
                log.warning("journal record %s (%s) not replayed: %s", rec["seq"], rec["op"], e)
        if p.good:
            self.seq = max(self.seq, p.good[-1]["seq"])
        if p.torn:
            rep.torn = len(p.torn)
            log.warning("journal: dropped a torn last record (%d bytes, a write cut short by a crash)", rep.torn)
        if p.corrupt_at is not None:
            rep.set_aside = self._write_aside(p.rest)
            self._complain(f"journal line {p.corrupt_at} is unreadable ({p.corrupt_reason}); replayed the "
                           f"{rep.replayed} records before it, kept the rest aside as {rep.set_aside}")
        if p.torn or p.corrupt_at is not None:
            with open(self.journal_path, "r+b") as f:  # appends must follow the last good record
                f.truncate(p.valid_bytes)
        self._cut_seq = p.base
        self._disk_seq = snap_seq
        if rep.replayed or rep.skipped:
            log.info("journal: replayed %d records after snapshot seq %d (%d skipped)", rep.replayed, snap_seq, rep.skipped)
        return rep

    def _set_aside(self, path: Path, pattern: str) -> str:
        bad = path.with_name(pattern.format(int(time.time() * 1000)))
        os.replace(path, bad)
        return bad.name

    def _write_aside(self, data: bytes) -> str:
        bad = self.journal_path.with_name(f"nodespace.journal.corrupt-{int(time.time() * 1000)}")
        bad.write_bytes(data)
        return bad.name

    def _complain(self, text: str) -> None:
        log.error(text)
        print(f"fn-supervise worker: {text}", file=sys.stderr, flush=True)

    def _clean_temp_files(self) -> None:
        for pat in (".nodespace.json.*.tmp", ".nodespace.journal.*.tmp"):
            for f in self.paths.data.glob(pat):
                try:
                    f.unlink()
                except OSError:
                    pass
    # endregion

    # region journaling
    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start journaling (after the load): later edits append to the segment."""
        self.loop = loop
        self.paths.data.mkdir(parents=True, exist_ok=True)
        fresh = not self.journal_path.exists() or self.journal_path.stat().st_size == 0
        self.file = journal.JournalFile(self.journal_path)
        if fresh:
            self.file.rewrite(journal.header(self.seq))
            self._cut_seq = self.seq
        self.enabled = True
        try:
            self._snap_bytes = self.paths.nodespace.stat().st_size
        except FileNotFoundError:
            # A first snapshot, even of an empty graph: the journal carries edits, not the
            # NodeSpace's id, which clients key on and which must survive the first crash too.
            self.snapshot()

    def feed(self, rec: dict) -> None:
        """Queue the effect of an edit; the next flush writes it before any reply leaves."""
        if not self.enabled:
            return
        try:
            line = journal.encode({"seq": self.seq + 1, **rec})
        except (TypeError, ValueError):
            # Not plain JSON (NaN in a property, say): the edit is kept by a snapshot before the
            # reply instead, which writes what the stock format can hold.
            self._snapshot_due = True
            return
        self.seq += 1
        self._pending.append(line)
        self.stats["records"] += 1

    async def flush(self, mine: int | None = None) -> None:
        """Write what was fed (and fdatasync under "fsync"); return only when it is durable.
        If it cannot be, the edit is undone and JournalError says so. `mine`: the end of the
        caller's records when an earlier write_now wrote them (self.mine just after it)."""
        durable = self.write_now()
        if mine is None:
            mine = self.mine
        if not durable:
            await self._group_sync(self._written)
        if mine and any(start < mine <= end for start, end in self._lost):
            self.stats["refused"] += 1
            raise JournalError(errno.EIO, f"edit refused and undone: {self.trouble or 'the journal cannot be synced'}. "
                               "The graph can still be read; edits are accepted again as soon as the disk has room")

    def write_now(self) -> bool:
        """The part of flush that needs no wait: write(2) what was fed. True when that made it
        durable (always under "process"); False when a group fdatasync must still follow.
        If the write fails, the edit is undone and JournalError says so."""
        self.mine = 0
        try:
            if self._snapshot_due:
                self._snapshot_due = False
                self.snapshot()  # durable (fsync + rename) before the reply, whatever the level
                return True
            if self._pending:
                self._write_pending()
                self.mine = self._written
        except JournalError:
            raise
        except OSError as e:
            raise self._fail(e) from None
        return not (self.durability == "fsync" and self._synced < self._written)

    def check_writable(self) -> None:
        """Before an edit runs: refuse it while the journal cannot be written."""
        if self.trouble is not None:
            self.stats["refused"] += 1
            raise JournalError(errno.ENOSPC, f"edit refused, nothing was changed: {self.trouble}. The graph "
                               "can still be read; edits are accepted again as soon as the disk has room")

    def _fail(self, e: OSError, count: bool = True) -> JournalError:
        """An edit's record (or snapshot) could not be written: undo it, refuse it, start retrying."""
        self._pending.clear()
        self._snapshot_due = False
        why = f"the journal cannot be written ({e.strerror or e})"
        if self.trouble is None:
            self.trouble, self.trouble_since = why, time.time()
            log.error("%s: edits are refused until it can be", why)
            if self.on_trouble is not None:
                self.on_trouble(why)
        if count:
            self.stats["refused"] += 1
        if self._loader is None:  # stopping: nothing to undo or retry
            return JournalError(e.errno or errno.EIO, why)
        self.restore()
        if self.loop is not None and self._retry_task is None:
            self._retry_task = self.loop.create_task(self._retry())
        return JournalError(e.errno or errno.EIO, f"edit refused and undone: {why}. The graph can still be "
                            "read; edits are accepted again as soon as the disk has room")

    def restore(self) -> None:
        """Put the graph back to what the disk holds (the state a crash would come back to)."""
        if self._loader is None:
            return
        self._tail = None
        with self._snap_lock:  # a snapshot thread mid-write finishes first; one not yet begun is stale
            self._epoch += 1
        self.covered += 1  # the reload's own events are no edits
        try:
            self.load(*self._loader, clean=False)
        except Exception:  # noqa: BLE001 (the graph keeps what it has; the next retry saves it)
            log.exception("undo from the disk failed")
        finally:
            self.covered -= 1
        if self.on_restore is not None:
            self.on_restore()

    def _retry_delay(self) -> float:
        return max(float(self.config.get("disk_retry") or 1.0), float(self.config.get("save_delay") or 0.2))

    async def _retry(self) -> None:
        """While in trouble: try a snapshot and a fresh segment every max(disk_retry, save_delay) seconds."""
        delay = self._retry_delay()
        try:
            while self.trouble is not None:
                await asyncio.sleep(delay)
                if self._snap_task is not None or self.file is None:
                    continue
                try:
                    seq, _state, text = self._take()
                    await asyncio.to_thread(self._write_snapshot, seq, text)
                    self.file.rewrite(journal.header(seq))  # a fresh segment (and fd) proves the journal
                    self._cut_seq, self._synced, self._snap_bytes, self._tail = seq, self._written, len(text), None
                    self._lost.clear()
                except OSError as e:
                    log.debug("disk still failing: %s", e)
                    continue
                log.warning("the journal can be written again (after %.1fs): edits are accepted",
                            time.time() - (self.trouble_since or time.time()))
                self.trouble = self.trouble_since = None
                if self.on_trouble is not None:
                    self.on_trouble(None)
        finally:
            self._retry_task = None

    def _write_pending(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            self.file.append(data)
        except OSError as e:
            raise self._fail(e) from None
        self._written += len(data)
        self.stats["writes"] += 1
        if self._tail is not None:
            self._tail.append(data)
        self._changed()
        if self.file.size > max(self._snap_bytes, int(self.config.get("journal_min_bytes") or JOURNAL_MIN_BYTES)):
            self.request_snapshot()

    async def _group_sync(self, upto: int) -> None:
        # Group commit: one fdatasync covers every record written before it started; whoever
        # arrives while it runs waits for the next one. A failed one has moved _synced past
        # the bytes it dropped (see _lose_unsynced); flush tells their owners.
        while self._synced < upto:
            task = self._sync_task
            if task is None:
                task = self._sync_task = asyncio.ensure_future(self._sync_once(self._written))
            await asyncio.shield(task)

    async def _sync_once(self, target: int) -> None:
        # The task itself records what it made durable before it completes: a waiter that finds
        # it done must see the new _synced at once (awaiting a done future does not yield).
        try:
            fd = os.dup(self.file.fd)  # a cut may close the segment's fd meanwhile

            def sync() -> None:
                try:
                    journal.fdatasync(fd)
                finally:
                    os.close(fd)

            await asyncio.to_thread(sync)
            self._synced = max(self._synced, target)
            self.stats["syncs"] += 1
        except OSError as e:
            if self._synced < target:  # else a cut made it all durable meanwhile
                self._lose_unsynced(e)
        finally:
            self._sync_task = None

    def _lose_unsynced(self, e: OSError) -> None:
        """fdatasync failed: what write(2) took since the last good sync may or may not reach the
        disk. Cut it from the segment, so the undo (which reloads the segment) and a later crash
        both leave those edits out; then undo once, for every waiter of this sync."""
        start, end = self._synced, self._written
        try:  # a cut syncs the whole segment, so every unsynced byte is in this one
            self.file.truncate(self.file.size - (end - start))
        except OSError as te:
            log.error("cannot cut unsynced records from the journal (%s): a crash may bring them back", te)
        self._synced = end
        self._lost = [*self._lost[-15:], (start, end)]
        self._fail(e, count=False)  # flush counts each refused edit
    # endregion

    # region snapshots
    def touch(self) -> None:
        """A change no record carries (node code): make sure a snapshot follows."""
        if not self.enabled or self.covered:
            return
        now = self.loop.time()
        if self._first_unjournaled is None:
            self._first_unjournaled = now
        self._changed()

    def ran(self) -> None:
        """A node run ended. The journal already holds every edit, so the snapshot taken after
        them waits until nothing runs either: serializing the whole graph on the main loop (tens
        of ms for a few hundred nodes) would otherwise land in the middle of a running graph."""
        if self._timer is not None:
            self._last_run = self.loop.time()

    def _changed(self) -> None:
        self._last_change = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_later(float(self.config.get("save_delay") or 0.2), self._on_timer)

    def _on_timer(self) -> None:
        # One timer, re-armed for the remainder, instead of a cancel and a new timer per edit.
        self._timer = None
        now = self.loop.time()
        delay = float(self.config.get("save_delay") or 0.2)
        due = max(self._last_change, self._last_run) + delay
        if self._first_unjournaled is not None:
            due = min(due, self._first_unjournaled + float(self.config.get("save_max_wait") or 2.0))
        if now + 0.001 < due:
            self._timer = self.loop.call_at(due, self._on_timer)
            return
        forced = self._first_unjournaled is not None and due < max(self._last_change, self._last_run) + delay
        if forced or self.state_steps is None or self.activity is None:
            self.request_snapshot()  # save_max_wait: at once, whatever runs
        else:
            self._quiet_snapshot()

    def _quiet_snapshot(self) -> None:
        """The snapshot of a still graph, taken SNAPSHOT_STEP nodes per loop turn: a node run or an
        edit that starts meanwhile waits one step (~1 ms), not the whole graph's serialization,
        and the snapshot starts over save_delay after it (compaction only: the journal holds every
        edit, and the size trigger and save_max_wait still force one)."""
        if not self.enabled or self._snap_task is not None or self._steps is not None:
            return
        if self._pending:
            self._write_pending()
        self._steps = (self.state_steps(SNAPSHOT_STEP), (self.seq, self._epoch, self.activity()))
        self.loop.call_soon(self._quiet_step)

    def _quiet_step(self) -> None:
        if self._steps is None:
            return  # a snapshot taken at once replaced it
        steps, mark = self._steps
        if not self.enabled or self._snap_task is not None or mark != (self.seq, self._epoch, self.activity()):
            self._drop_steps()
            if self.enabled:
                self._changed()  # the graph moved: again once it is still
            return
        try:
            next(steps)
        except StopIteration as done:
            self._steps = None
            self._begin_snapshot(*self._finish_take(done.value))
            return
        self.loop.call_soon(self._quiet_step)

    def _drop_steps(self) -> None:
        if self._steps is not None:
            self._steps[0].close()
            self._steps = None

    def request_snapshot(self) -> None:
        """Write a snapshot in the background (the state is taken now, on the main loop)."""
        if not self.enabled or self._snap_task is not None or self.loop is None:
            return
        self._drop_steps()
        seq, _state, text = self._take()
        self._begin_snapshot(seq, _state, text)

    def _begin_snapshot(self, seq: int, _state: dict, text: bytes) -> None:
        self._tail = []
        self._snap_task = self.loop.create_task(self._background(seq, text, self._epoch))

    async def _background(self, seq: int, text: bytes, epoch: int) -> None:
        try:
            if await asyncio.to_thread(self._write_snapshot, seq, text, epoch):
                self._cut(seq, text)
            else:
                self._tail = None
            if self._snap_error is not None:
                log.info("snapshots are written again")
                self._snap_error = None
        except OSError as e:  # a full disk: the journal still holds every edit
            why = str(e.strerror or e)
            if why != self._snap_error:  # once per cause, not once per try
                log.warning("snapshot failed (%s); the journal keeps every edit, retrying every %gs", why,
                            self._retry_delay())
            self._snap_error = why
            self._tail = None
            if self.loop is not None and self._timer is None:
                self._timer = self.loop.call_later(self._retry_delay(), self._on_timer)
        except Exception:
            log.exception("snapshot failed; the journal keeps every edit, retrying later")
            self._tail = None
            if self.loop is not None:
                self._changed()
        finally:
            self._snap_task = None

    def snapshot(self) -> dict:
        """Write a snapshot now and cut the journal (save, whole-graph verbs, a clean stop).
        On a full disk the graph goes back to what the disk holds (JournalError)."""
        self._drop_steps()
        try:
            if self._pending:
                self._write_pending()
            seq, state, text = self._take()
            self._write_snapshot(seq, text)
        except JournalError:
            raise
        except OSError as e:
            if not self.enabled:
                raise
            raise self._fail(e) from None
        self._tail = []  # nothing after seq was written: this snapshot holds all of it
        try:
            self._cut(seq, text)
        except OSError as e:
            # The snapshot is on disk, so the change is kept: undoing it would reload this very
            # snapshot. The old segment stays; the load skips its records (seq <= the snapshot's).
            log.warning("journal not cut after a snapshot (%s); the next snapshot cuts it", e.strerror or e)
        return state

    def _take(self) -> tuple[int, dict, bytes]:
        if self._pending:
            self._write_pending()
        return self._finish_take(self.state())

    def _finish_take(self, state: dict) -> tuple[int, dict, bytes]:
        from . import persistence

        # journal_seq belongs to this file only: replies and exports get the state without it
        on_disk = dict(state, meta=dict(state.get("meta") or {}, journal_seq=self.seq))
        self._first_unjournaled = None
        return self.seq, state, persistence.dumps_state(on_disk).encode("utf-8")

    def _write_snapshot(self, seq: int, text: bytes, epoch: int | None = None) -> bool:
        """True when `text` is now on disk."""
        with self._snap_lock:
            if seq < self._disk_seq:
                return False  # a newer snapshot is already on disk
            if epoch is not None and epoch != self._epoch:
                return False  # taken before an undo: it may hold the refused edit
            journal.write_durably(self.paths.nodespace, text)
            self._disk_seq = seq
            self.stats["snapshots"] += 1
        if journal.fault_point("cut"):
            journal.die()
        return True

    def _cut(self, seq: int, text: bytes) -> None:
        tail, self._tail = self._tail, None
        if self.file is None or seq <= self._cut_seq or seq < self._disk_seq:
            return
        self.file.rewrite(journal.header(seq) + b"".join(tail or []))
        self._cut_seq = seq
        self._synced = self._written  # rewrite() fsyncs the new segment
        self._snap_bytes = len(text)

    def close(self) -> None:
        """A clean stop: everything goes into nodespace.json, so any FuncNodes worker sees it all."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._retry_task is not None:
            self._retry_task.cancel()
        self._loader = None  # a failing last snapshot is reported, not undone
        if self.enabled:
            self.snapshot()
        self.enabled = False
        if self.file is not None:
            self.file.close()
            self.file = None
    # endregion

    # region config
    def write_config(self) -> dict:
        try:
            disk = read_json(self.paths.config)
            if not isinstance(disk, dict):
                disk = {}
        except (OSError, ValueError):
            disk = {}
        merged = dict(disk)
        merged.update({k: self.config[k] for k in self.OWN_KEYS if k in self.config})
        if merged != disk or not self.paths.config.exists():  # most calls change nothing
            write_config(self.paths.config, merged)
        return merged
    # endregion

