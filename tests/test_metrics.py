"""Prometheus metrics, scraped from a real worker and a real host and parsed with
prometheus_client's own text parser; the example scrape config and Grafana dashboard are
checked against the names those real endpoints export."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, free_port, poll_until
from helpers import WorkerProc, write_config
from harness import running_pid, start_host, workers, ws_uuid

EXAMPLES = REPO / "examples"


def scrape(url: str, token: str | None = None) -> dict[str, list]:
    """{sample name: [samples]} of every metric at url; the parser raises on anything malformed."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")  # the text exposition format
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", fam.name)
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples: dict, name: str, **labels) -> float:
    for s in samples.get(name, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{name}{labels} not exported")


def rpc(port: int, cmd: str, token: str | None = None, **kwargs) -> dict:
    import asyncio

    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {token}"}
                                    if token else {}) as ws:
                await ws.send_str(json.dumps({"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": "m1"}))
                while True:  # events (nsevent...) may come first
                    data = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
                    if data.get("id") == "m1":
                        return data
    return asyncio.run(go())


WORKER_NAMES = ["fn_worker_build_info", "fn_worker_ready", "fn_worker_rpcs_total", "fn_worker_rpc_duration_seconds_bucket",
                "fn_worker_clients", "fn_worker_node_runs_total", "fn_worker_node_errors_total",
                "fn_worker_journal_write_seconds_bucket", "fn_worker_journal_fsync_seconds_bucket",
                "fn_worker_journal_records_total", "process_resident_memory_bytes", "process_cpu_seconds_total"]
HOST_NAMES = ["fn_supervise_build_info", "fn_supervise_workers", "fn_supervise_worker_state", "fn_supervise_worker_up",
              "fn_supervise_worker_restarts_total", "fn_supervise_worker_crashes_total",
              "fn_supervise_phase_duration_seconds_bucket", "fn_supervise_worker_heartbeat_age_seconds",
              "fn_supervise_sidecar_up", "fn_supervise_sidecar_restarts_total", "process_resident_memory_bytes"]


def test_worker_metrics_behind_its_token_unless_public(config_dir):
    uid, port = "a" * 32, free_port()
    write_config(config_dir, uid, port=port, auth_token="s3cret")
    w = WorkerProc(config_dir, uid, port).wait_ready()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(f"{w.url}/metrics")
        assert e.value.code == 401
        assert "fn_worker_ready" in scrape(f"{w.url}/metrics", token="s3cret")
        assert rpc(port, "add_node", token="s3cret", id="demo.add", uuid="n1")["type"] == "result"
        rpc(port, "no_such_command", token="s3cret")
        m = scrape(f"{w.url}/metrics", token="s3cret")
        for n in WORKER_NAMES:  # labelled families appear with their first sample
            assert n in m, n
        assert value(m, "fn_worker_rpcs_total", command="add_node", outcome="ok") == 1
        assert value(m, "fn_worker_rpcs_total", command="other", outcome="error") == 1  # bounded labels
        assert value(m, "fn_worker_rpc_duration_seconds_count", command="add_node") == 1
        assert value(m, "fn_worker_journal_records_total") >= 1
        assert value(m, "fn_worker_journal_write_seconds_count") >= 1
        assert value(m, "fn_worker_ready") == 1
    finally:
        w.stop()
    cfg = json.loads((config_dir / "workers" / f"worker_{uid}.json").read_text())
    cfg["metrics_public"] = True
    (config_dir / "workers" / f"worker_{uid}.json").write_text(json.dumps(cfg))
    w = WorkerProc(config_dir, uid, port).wait_ready()
    try:
        assert "fn_worker_ready" in scrape(f"{w.url}/metrics")  # exempt like /healthz
        with pytest.raises(urllib.error.HTTPError):  # the rest still needs the token
            urllib.request.urlopen(f"{w.url}/node/x/io/y/value", timeout=5)
    finally:
        w.stop()


def test_host_and_worker_metrics_parse_and_the_examples_use_real_names(config_dir, tmp_path, sup_procs):  # noqa: F811
    ws = workers(config_dir, 2)
    mport = free_port()
    host = start_host(config_dir, tmp_path, "--metrics-port", str(mport))
    sup_procs.append(host)
    pids = [poll_until(lambda p=p: running_pid(p), 40, what=f"{p.name} answers") for p in ws]
    url = f"http://127.0.0.1:{mport}/metrics"
    m = scrape(url)
    assert value(m, "fn_supervise_workers", state="RUNNING") == 2
    assert value(m, "fn_supervise_worker_up", worker=ws[0].name) == 1
    assert value(m, "fn_supervise_phase_duration_seconds_count", phase="STARTING") == 2
    os.kill(pids[0], signal.SIGKILL)
    poll_until(lambda: running_pid(ws[0], not_pid=pids[0]), 30, what="worker 0 restarted")

    # The lag is what a worker reports in its heartbeats: it is exported from each worker's first
    # heartbeat on (a worker that just became RUNNING may not have sent one yet), so wait for that.
    def after_first_heartbeats() -> dict | None:
        s = scrape(url)
        lagging = {x.labels.get("worker") for x in s.get("fn_supervise_worker_heartbeat_lag_seconds", [])}
        return s if lagging >= {p.name for p in ws} else None

    m = poll_until(after_first_heartbeats, 15, interval=0.1, what="a heartbeat from each worker")
    for n in HOST_NAMES:
        assert n in m, n
    assert value(m, "fn_supervise_worker_crashes_total", worker=ws[0].name, reason="crashed") == 1
    assert value(m, "fn_supervise_worker_restarts_total", worker=ws[0].name) == 1
    assert value(m, "fn_supervise_worker_restarts_total", worker=ws[1].name) == 0
    assert value(m, "fn_supervise_phase_duration_seconds_count", phase="BACKOFF") == 1
    wport = (ws[1].read_state() or {})["port"]
    assert ws_uuid(wport) == ws[1].uuid
    assert rpc(wport, "get_meta")["type"] == "result"
    wm = scrape(f"http://127.0.0.1:{wport}/metrics")
    for n in WORKER_NAMES:
        assert n in wm, n
    exported = set(m) | set(wm)
    host.send_signal(signal.SIGTERM)
    assert host.wait(40) == 0

    # examples/prometheus: scrape jobs for the host and the workers, on /metrics
    prom = yaml.safe_load((EXAMPLES / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert {"fn-supervise-host", "fn-supervise-workers"} <= set(jobs)
    for j in jobs.values():
        assert j.get("metrics_path", "/metrics") == "/metrics"
    assert "authorization" in jobs["fn-supervise-workers"]  # workers need their token
    # examples/grafana: valid JSON, every metric a panel queries is one the real endpoints export
    dash = json.loads((EXAMPLES / "grafana" / "fn-supervise.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = set()
    for e in exprs:
        used |= {n for n in re.findall(r"\b((?:fn_supervise|fn_worker|process)_[a-z_]+)\b", e)}
    assert used, exprs
    missing = sorted(n for n in used if n not in exported)
    assert not missing, f"dashboard queries metrics nobody exports: {missing}"
