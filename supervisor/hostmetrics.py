"""Prometheus metrics of `fn-supervise host` (prometheus_client), on 127.0.0.1:<--metrics-port>.

Counters that must not be lost when a Supervisor's crash history is trimmed (crashes by
reason, phase durations) are fed as each Supervisor's observer (runner.Observer: on_transition,
on_exit); the host passes it in when it builds them. Everything else is read at scrape time.

Names (base units, `_total` counters; `worker` is worker_<uuid>):
  fn_supervise_build_info{version,python}                       1
  fn_supervise_workers{state}                                   workers per state
  fn_supervise_worker_state{worker,state}                       1 for the worker's current state
  fn_supervise_worker_up{worker}                                1 while RUNNING
  fn_supervise_worker_restarts_total{worker}                    restarts by its policy
  fn_supervise_worker_crashes_total{worker,reason}              crashed|hung|start_failed|start_timeout|...
  fn_supervise_phase_duration_seconds{phase}                    histogram: time spent in PREPARING,
                                                                STARTING, BACKOFF, STOPPING
  fn_supervise_worker_heartbeat_age_seconds{worker}             since the worker's last heartbeat
  fn_supervise_worker_heartbeat_lag_seconds{worker}             event-loop lag the worker reports
  fn_supervise_sidecar_up{sidecar} / _sidecar_restarts_total    the shared discovery and monitor
  process_*, python_info                                        the host process
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .states import State

if TYPE_CHECKING:
    from .crash import CrashRecord
    from .files import WorkerPaths
    from .runner import Supervisor


# What the metrics read of the host, declared here (the host module is above this one).
class HostedWorker(Protocol):
    sup: "Supervisor | None"
    paths: "WorkerPaths"
    running: bool


class SharedSidecars(Protocol):
    def status(self) -> list[dict[str, Any]]: ...


class HostView(Protocol):
    entries: dict[str, HostedWorker]
    shared: SharedSidecars

PHASES = (State.PREPARING, State.STARTING, State.BACKOFF, State.STOPPING)
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class HostMetrics:
    def __init__(self, host: HostView):
        from worker.metrics import version

        self.host = host
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Gauge("fn_supervise_build_info", "fn-supervise host build (always 1)", ["version", "python"],
              registry=r).labels(version("fn-supervise"), sys.version.split()[0]).set(1)
        self.crashes = Counter("fn_supervise_worker_crashes", "worker exits the policy counted, by reason",
                               ["worker", "reason"], registry=r)
        self.phase = Histogram("fn_supervise_phase_duration_seconds", "time spent in a start/stop phase",
                               ["phase"], buckets=PHASE_BUCKETS, registry=r)
        r.register(_HostLive(host))
        self._entered: dict[str, float] = {}  # worker -> monotonic time it entered its state

    # the Observer of every Supervisor the host builds (runner.Observer)
    def on_transition(self, sup: "Supervisor", old: State, new: State, name: str, reason: str) -> None:
        now = time.monotonic()
        entered = self._entered.get(sup.paths.name, now)
        if old in PHASES:
            self.phase.labels(old.value).observe(now - entered)
        self._entered[sup.paths.name] = now

    def on_exit(self, sup: "Supervisor", record: "CrashRecord") -> None:
        self.crashes.labels(sup.paths.name, str(record.reason or "unknown")).inc()


class _HostLive:
    def __init__(self, host: HostView):
        self.host = host

    def describe(self) -> list:
        return []

    def collect(self):
        per_state = GaugeMetricFamily("fn_supervise_workers", "workers per state", labels=["state"])
        state = GaugeMetricFamily("fn_supervise_worker_state", "1 for the worker's current state",
                                  labels=["worker", "state"])
        up = GaugeMetricFamily("fn_supervise_worker_up", "1 while the worker is RUNNING", labels=["worker"])
        restarts = CounterMetricFamily("fn_supervise_worker_restarts", "restarts by the worker's policy",
                                       labels=["worker"])
        age = GaugeMetricFamily("fn_supervise_worker_heartbeat_age_seconds", "seconds since the last heartbeat",
                                labels=["worker"])
        lag = GaugeMetricFamily("fn_supervise_worker_heartbeat_lag_seconds",
                                "event-loop lag the worker reports in its heartbeat", labels=["worker"])
        counts = {s.value: 0 for s in State}
        now = time.monotonic()
        for e in list(self.host.entries.values()):
            sup = e.sup
            name = e.paths.name
            st = sup.sm.state.value if (sup is not None and e.running) else State.STOPPED.value
            if sup is not None and not e.running and sup.sm.state == State.FATAL:
                st = State.FATAL.value
            counts[st] += 1
            state.add_metric([name, st], 1.0)
            up.add_metric([name], 1.0 if st == State.RUNNING.value else 0.0)
            restarts.add_metric([name], float(sup.policy.total_restarts if sup is not None else 0))
            h = sup.health if sup is not None and e.running and st == State.RUNNING.value else None
            if h is not None and getattr(h, "last", None) is not None:
                age.add_metric([name], max(0.0, now - h.last))
                if getattr(h, "lag", None) is not None:
                    lag.add_metric([name], float(h.lag))
        for s, n in counts.items():
            per_state.add_metric([s], float(n))
        yield from (per_state, state, up, restarts, age, lag)
        sc_up = GaugeMetricFamily("fn_supervise_sidecar_up", "1 while the shared sidecar runs", labels=["sidecar"])
        sc_restarts = CounterMetricFamily("fn_supervise_sidecar_restarts", "restarts of the shared sidecar",
                                          labels=["sidecar"])
        for sc in self.host.shared.status():
            sc_up.add_metric([sc["name"]], 1.0 if sc.get("state") == "running" else 0.0)
            sc_restarts.add_metric([sc["name"]], float(sc.get("restarts") or 0))
        yield sc_up
        yield sc_restarts


def serve(host: HostView, port: int, addr: str = "127.0.0.1") -> tuple[HostMetrics, Any, tuple[str, int]]:
    """The library's own threaded HTTP server (no aiohttp in the host).
    -> (metrics, server, (addr, port)). The host passes the metrics to the Supervisors it builds."""
    metrics = HostMetrics(host)
    server, _thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return metrics, server, (addr, server.server_port)
