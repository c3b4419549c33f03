"""Prometheus metrics of one worker (prometheus_client), served at GET /metrics (server.py).

Each worker has a registry of its own (never the library's global one: tests and the host run
several in one process), built at the first scrape: until then every figure is a plain number
here, so a start (the fork server's preload, a lone worker) does not import prometheus_client.
Counting happens at three seams of the runtime: `rpc` from runtime.execute, `ns_event` from the
nodespace event hook, `watch_store` once the journal exists (it times the Store's append and
fdatasync here, so store.py stays as it is).

Names (base units, `_total` counters):
  fn_worker_build_info{version,python,funcnodes_core}       1
  fn_worker_ready                                           1 once the graph is loaded and served
  fn_worker_rpcs_total{command,outcome}                     outcome ok|error; unknown commands are "other"
  fn_worker_rpc_duration_seconds{command}                   histogram, the command plus its journal flush
  fn_worker_clients                                         connected WebSocket clients
  fn_worker_memory_warnings_total, fn_worker_memory_bytes,   memory_max reports of the supervisor (80 %, back under 70 %)
    fn_worker_memory_limit_bytes
  fn_worker_peer_refusals_total                             loopback requests refused (another local user)
  fn_worker_node_runs_total / fn_worker_node_errors_total   node triggers started / node errors
  fn_worker_journal_write_seconds                           histogram of journal appends
  fn_worker_journal_fsync_seconds                           histogram of journal fdatasyncs
  fn_worker_journal_records_total / _snapshots_total        from Store.stats
  fn_worker_journal_writable                                0 while the journal cannot be written (disk full)
  fn_worker_edits_refused_total                             edits refused (or undone) for that reason
  process_*, python_info, python_gc_*                       the library's standard collectors

`/metrics` needs the worker's token like every other route, unless the config says
`"metrics_public": true` (Prometheus scraping a loopback worker without the secret)."""

from __future__ import annotations

import sys
import threading
import time
from bisect import bisect_left
from typing import Any

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
IO_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
NOT_INSTALLED = b"# prometheus_client is not installed in this worker's environment\n"


class Tally:
    """A histogram kept as plain numbers and exported at scrape time. Counted on one thread (the
    main loop, per edit), so no lock: prometheus_client's labelled Counter + Histogram cost
    1.3 us per RPC and its journal histogram 0.6 us per append, ~4 % of an edit's CPU; this
    costs ~0.3 us."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        from prometheus_client.utils import floatToGoString  # noqa: PLC0415 (scrape time only)

        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append((floatToGoString(bound), float(total)))
        out.append(("+Inf", float(total + self.counts[-1])))
        return out


def version(dist: str) -> str:
    from importlib import metadata  # noqa: PLC0415 (scrape time only)

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class WorkerMetrics:
    """Counts in plain numbers from the worker's start; prometheus_client is imported, and the
    registry with its standard collectors built, at the first scrape. A worker that is never
    scraped never pays for them: ~7 ms of import in every start (the fork server's preload or a
    lone worker's) and ~2.5 ms building the collectors."""

    def __init__(self, rt: Any):
        self.rt = rt
        self.public = bool((getattr(rt, "config", None) or {}).get("metrics_public"))
        self.registry: Any = None  # built by render()
        self._build = threading.Lock()  # /metrics may be served by the I/O thread and the main loop
        self.created = time.time()
        # RPCs and journal appends are counted per edit: plain numbers, exported by _Live.
        self._rpc_children: dict[tuple[str, bool], tuple] = {}
        self.rpc_counts: dict[tuple[str, str], list] = {}  # (label, outcome) -> [count, created]
        self.rpc_seconds: dict[str, Tally] = {}  # label -> latency
        self.journal_write = Tally(IO_BUCKETS)
        self.journal_fsync = Tally(IO_BUCKETS)
        self.node_runs = 0
        self.node_errors = 0
        self.memory_warnings = 0
        self.memory_bytes = 0.0
        self.memory_limit = 0.0

    # region counting seams
    def command_label(self, cmd: str) -> str:
        known = getattr(getattr(self.rt, "commands", None), "registry", None)
        return cmd if isinstance(known, dict) and cmd in known else "other"  # bounded label set

    def rpc(self, cmd: str, started: float, ok: bool) -> None:
        children = self._rpc_children.get((cmd, ok))
        if children is None:
            label = self.command_label(cmd)
            key = (label, "ok" if ok else "error")
            count = self.rpc_counts.get(key)
            if count is None:
                count = self.rpc_counts[key] = [0, time.time()]
            tally = self.rpc_seconds.get(label)
            if tally is None:
                tally = self.rpc_seconds[label] = Tally(RPC_BUCKETS)
            children = (count, tally)
            if label == cmd:  # known verbs only: a bounded set, and "other" stays a lookup
                self._rpc_children[(cmd, ok)] = children
        children[0][0] += 1
        children[1].observe(time.perf_counter() - started)

    def ns_event(self, event: str) -> None:
        if event in ("triggerstart", "triggerfast"):
            self.node_runs += 1
        elif event in ("node_trigger_error", "node_error"):
            self.node_errors += 1

    def memory(self, report: dict) -> None:
        if report.get("level") == "warn":
            self.memory_warnings += 1
        self.memory_bytes = float(report.get("rss") or 0)
        self.memory_limit = float(report.get("limit") or 0)

    def watch_store(self, store: Any) -> None:
        """Time the Store's journal append and fdatasync (instance wrappers, store.py unchanged)."""
        write, sync = getattr(store, "_write_pending", None), getattr(store, "_sync_once", None)
        if write is not None:
            def timed_write(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return write(*a, **kw)
                finally:
                    self.journal_write.observe(time.perf_counter() - t)
            store._write_pending = timed_write
        if sync is not None:
            async def timed_sync(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await sync(*a, **kw)
                finally:
                    self.journal_fsync.observe(time.perf_counter() - t)
            store._sync_once = timed_sync
    # endregion

    def render(self) -> tuple[bytes, str]:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415
        except ImportError:  # a worker venv built before prometheus-client was a core package
            return NOT_INSTALLED, "text/plain; charset=utf-8"
        with self._build:
            if self.registry is None:
                self.registry = self._registry()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _registry(self) -> Any:
        from prometheus_client import CollectorRegistry, Gauge  # noqa: PLC0415
        from prometheus_client.gc_collector import GCCollector  # noqa: PLC0415
        from prometheus_client.platform_collector import PlatformCollector  # noqa: PLC0415
        from prometheus_client.process_collector import ProcessCollector  # noqa: PLC0415

        r = CollectorRegistry(auto_describe=True)  # the worker's own, never the library's global one
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        info = Gauge("fn_worker_build_info", "fn-supervise worker build (always 1)",
                     ["version", "python", "funcnodes_core"], registry=r)
        info.labels(version("fn-supervise"), sys.version.split()[0], version("funcnodes-core")).set(1)
        r.register(_Live(self.rt, self))
        return r


class _Live:
    """Values read at scrape time from the runtime and the per-edit tallies."""

    def __init__(self, rt: Any, metrics: WorkerMetrics):
        self.rt = rt
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

        m = self.metrics
        rpcs = CounterMetricFamily("fn_worker_rpcs", "RPC commands handled", labels=["command", "outcome"])
        for (label, outcome), (n, created) in list(m.rpc_counts.items()):
            rpcs.add_metric([label, outcome], float(n), created=created)
        yield rpcs
        yield self._histogram("fn_worker_rpc_duration_seconds", "RPC command time, journal flush included",
                              list(m.rpc_seconds.items()), ["command"])
        yield self._histogram("fn_worker_journal_write_seconds", "journal append time", [(None, m.journal_write)])
        yield self._histogram("fn_worker_journal_fsync_seconds", "journal fdatasync time", [(None, m.journal_fsync)])
        yield CounterMetricFamily("fn_worker_node_runs", "node triggers started", value=float(m.node_runs),
                                  created=m.created)
        yield CounterMetricFamily("fn_worker_node_errors", "node errors", value=float(m.node_errors), created=m.created)
        yield CounterMetricFamily("fn_worker_memory_warnings", "times the worker's process group passed 80 % of its "
                                  "memory_max (the supervisor's watch)", value=float(m.memory_warnings),
                                  created=m.created)
        yield GaugeMetricFamily("fn_worker_memory_bytes", "the process group's memory at the supervisor's last "
                                "memory_max report", value=m.memory_bytes)
        yield GaugeMetricFamily("fn_worker_memory_limit_bytes", "memory_max (0: no report yet)", value=m.memory_limit)
        rt = self.rt
        yield GaugeMetricFamily("fn_worker_ready", "1 once the graph is loaded and served",
                                value=1.0 if getattr(rt, "ready", False) else 0.0)
        server = getattr(rt, "server", None)
        yield GaugeMetricFamily("fn_worker_clients", "connected WebSocket clients",
                                value=float(len(getattr(server, "clients", None) or {})))
        gate = getattr(server, "peers", None)
        yield CounterMetricFamily("fn_worker_peer_refusals", "loopback requests refused: another user, no token",
                                  value=float(getattr(gate, "refused", 0)))
        stats = getattr(getattr(rt, "store", None), "stats", None) or {}
        yield CounterMetricFamily("fn_worker_journal_records", "edit records fed to the journal",
                                  value=float(stats.get("records", 0)))
        yield CounterMetricFamily("fn_worker_journal_snapshots", "snapshots written (journal cuts)",
                                  value=float(stats.get("snapshots", 0)))
        yield GaugeMetricFamily("fn_worker_journal_writable", "0 while the journal cannot be written "
                                "(a full disk): edits are refused", value=0.0 if getattr(
                                    getattr(rt, "store", None), "trouble", None) else 1.0)
        yield CounterMetricFamily("fn_worker_edits_refused", "edits refused because the journal could not be written",
                                  value=float(stats.get("refused", 0)))

    @staticmethod
    def _histogram(name: str, doc: str, tallies: list, labels: list[str] | None = None):
        from prometheus_client.core import HistogramMetricFamily  # noqa: PLC0415

        fam = HistogramMetricFamily(name, doc, labels=labels)
        for label, tally in tallies:
            fam.add_metric([label] if labels else [], tally.buckets(), tally.sum)
        return fam
