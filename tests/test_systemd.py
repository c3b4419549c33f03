"""systemd integration: the watchdog decision (fake clock), the notify socket (path and abstract
form) with a real supervisor and a real worker, and the generated units (systemd-analyze verify
where it exists, else parsed as INI; timeouts nest with ours)."""

from __future__ import annotations

import asyncio
import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from pathlib import Path

import psutil
import pytest

from conftest import poll_until
from supervisor import systemd, units
from supervisor.config import SupervisorConfig
from supervisor.systemd import Notifier, Probe, WatchdogPolicy
from harness import (HAVE_WORKER, REPO, make_worker, output, running_worker, start_supervisor,  # noqa: F401
                     stop_supervisor, ws_uuid)

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


# ---------------------------------------------------------------------- WatchdogPolicy (fake clock)
def probe(state="RUNNING", last=None, busy=0.0, timeout=10.0, interval=1.0) -> Probe:
    return Probe(state=state, heartbeat_last=last, busy_for=busy, heartbeat_timeout=timeout,
                 heartbeat_interval=interval)


def test_watchdog_interval_is_half_of_watchdog_usec_and_first_ping_is_immediate():
    wd = WatchdogPolicy(4_000_000)
    assert wd.interval == 2.0
    assert wd.decide(100.0, probe(last=100.0))
    assert not wd.decide(101.9, probe(last=101.9))
    assert wd.next_check(101.9) == pytest.approx(0.1)
    assert wd.decide(102.0, probe(last=101.9))


@pytest.mark.parametrize("st", ["PREPARING", "STARTING", "BACKOFF", "STOPPING", "FATAL"])
def test_watchdog_pings_while_the_supervisor_is_busy_without_a_running_worker(st):
    wd = WatchdogPolicy(1_000_000)
    # no heartbeat at all, or a very old one: not running means not hung
    assert wd.decide(0.0, probe(st, last=None))
    assert wd.decide(0.5, probe(st, last=-1000.0))


def test_watchdog_stale_after_bounds():
    # interval 0.25, heartbeat 0.2 -> two heartbeats (0.4) bound it from below
    assert WatchdogPolicy(500_000).stale_after(probe(timeout=1.5, interval=0.2)) == pytest.approx(0.4)
    # long interval: capped by our own hang limit
    assert WatchdogPolicy(60_000_000).stale_after(probe(timeout=10.0, interval=1.0)) == 10.0
    # in between: one ping interval
    assert WatchdogPolicy(6_000_000).stale_after(probe(timeout=10.0, interval=1.0)) == 3.0


def test_watchdog_stops_for_a_hung_worker_and_resumes_at_once_when_fresh():
    wd = WatchdogPolicy(2_000_000)  # interval 1 s
    p = probe(last=0.0, timeout=5.0, interval=0.5)  # stale after min(5, max(1, 1)) = 1 s
    assert wd.decide(0.0, p)
    assert wd.decide(1.0, probe(last=0.9, timeout=5.0, interval=0.5))
    # the worker goes silent at 0.9: at 2.0 it is 1.1 s old -> withheld, asked again soon
    hung = probe(last=0.9, timeout=5.0, interval=0.5)
    for t in (2.0, 2.5, 3.0, 4.0):
        assert not wd.decide(t, hung)
        assert wd.next_check(t) == wd.recheck
    assert wd.skipped == 4
    # replaced: the new worker is STARTING -> ping at once, not one interval later
    assert wd.decide(4.05, probe("STARTING", last=0.9))
    # and RUNNING with a fresh heartbeat keeps the cadence
    assert not wd.decide(4.5, probe(last=4.5))
    assert wd.decide(5.05, probe(last=5.0))


def test_watchdog_honours_the_declared_busy_time():
    wd = WatchdogPolicy(2_000_000)
    assert wd.decide(0.0, probe(last=0.0, busy=30.0, timeout=5.0, interval=0.5))
    assert wd.decide(20.0, probe(last=0.0, busy=30.0, timeout=5.0, interval=0.5))  # within 1 + 30
    assert not wd.decide(40.0, probe(last=0.0, busy=30.0, timeout=5.0, interval=0.5))


def test_watchdog_simulated_run_never_leaves_a_gap_while_healthy():
    """Fake clock, 10 ms ticks: heartbeats every 0.2 s; the worker hangs at 4.0, is replaced at
    6.0 (BACKOFF), the new one is ready at 6.5 and beats again."""
    wd = WatchdogPolicy(600_000)  # interval 0.3
    pings, t, last_hb, nxt, beat_before_hang = [], 0.0, 0.0, 0.0, 0.0
    while t < 10.0:
        st = "RUNNING" if t < 6.0 or t >= 6.5 else "BACKOFF"
        if (t < 4.0 or t >= 6.5) and t - last_hb >= 0.2 - 1e-9:
            last_hb = t
            if t < 4.0:
                beat_before_hang = t
        if t >= nxt:
            if wd.decide(t, probe(st, last=last_hb, timeout=2.0, interval=0.2)):
                pings.append(t)
            nxt = t + wd.next_check(t)
        t = round(t + 0.01, 2)
    gaps = [(a, b) for a, b in zip(pings, pings[1:]) if b - a > 0.3 + 0.011]
    # exactly one gap: from the silence (last beat + stale 0.4) until the BACKOFF at 6.0
    assert len(gaps) == 1, gaps
    a, b = gaps[0]
    assert beat_before_hang <= a < beat_before_hang + 0.4 and b == pytest.approx(6.0, abs=wd.recheck + 0.011)


# ---------------------------------------------------------------------- Notifier
class Listener:
    """A bound AF_UNIX datagram socket (path or abstract) that records (monotonic time, line)."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                self.lines.extend((now, line) for line in data.decode().split("\n") if line)

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def first(self, pred, after: float = 0.0):
        for t, m in self.snapshot():
            if t >= after and pred(m):
                return t, m
        return None

    def wait(self, pred, timeout: float, after: float = 0.0, what: str = "message"):
        return poll_until(lambda: self.first(pred, after), timeout, what=what)

    def close(self):
        self._stop.set()
        self._t.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path):
    made = []

    def make(address: str) -> Listener:
        lst = Listener(address)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst.close()


def test_notifier_path_and_abstract_forms_and_scrubbed_environment(tmp_path, listener):
    for addr in (str(tmp_path / "n.sock"), f"@fn-supervise-test-{uuidlib.uuid4().hex}"):
        lst = listener(addr)
        env = {"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242", "OTHER": "x"}
        n = Notifier.from_environ(env, pid=4242)
        assert env == {"OTHER": "x"}  # nothing left for the children
        assert n.enabled and n.watchdog_usec == 2_000_000
        assert n.ready("RUNNING: up") and n.watchdog() and n.extend_timeout(1.5)
        lst.wait(lambda m: m.startswith("EXTEND"), 5)
        assert [m for _, m in lst.snapshot()] == ["READY=1", "STATUS=RUNNING: up", "WATCHDOG=1",
                                                 "EXTEND_TIMEOUT_USEC=1500000"]
        n.close()


def test_notifier_watchdog_for_another_pid_and_silence_without_socket():
    n = Notifier.from_environ({"NOTIFY_SOCKET": "/nonexistent/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"},
                              pid=2)
    assert n.enabled and n.watchdog_usec is None
    assert not n.send("READY=1")  # unreachable socket: reported, never raised
    silent = Notifier.from_environ({})
    assert not silent.enabled and not silent.ready()
    for bad in ("relative/path", "vsock:2:1234"):
        assert not Notifier(bad).enabled
    long = "x " * 1000 + "\nsecond line"
    assert len(systemd.one_line(long)) <= systemd.STATUS_MAX and "\n" not in systemd.one_line(long)


def test_keepalive_pings_and_extends_while_preparing(tmp_path, listener):
    lst = listener(str(tmp_path / "k.sock"))
    n = Notifier(str(tmp_path / "k.sock"), watchdog_usec=100_000)  # every 50 ms
    st = {"s": "PREPARING"}

    async def main():
        task = asyncio.ensure_future(systemd.keepalive(n, lambda: probe(st["s"], last=time.monotonic())))
        await asyncio.sleep(0.3)
        st["s"] = "RUNNING"
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(main())
    n.close()
    msgs = [m for _, m in lst.snapshot()]
    assert msgs.count("WATCHDOG=1") >= 6
    assert msgs.count(f"EXTEND_TIMEOUT_USEC={int(systemd.EXTEND_STEP * 1e6)}") == 1  # once per EXTEND_EVERY


# ---------------------------------------------------------------------- real supervisor, real worker
def _env_of(pid: int) -> dict:
    try:
        return psutil.Process(pid).environ()
    except psutil.Error:
        return {}


@pytest.mark.skipif(not HAVE_WORKER, reason="worker package not there yet")
def test_notify_order_watchdog_gated_by_heartbeat_and_stop(config_dir, port, tmp_path, sup_procs, listener,
                                                           monkeypatch):
    """STATUS... -> READY=1 once the worker answers -> WATCHDOG=1 every WATCHDOG_USEC/2 ->
    SIGSTOP the worker: pings stop while it hangs, resume once it is replaced -> SIGTERM ->
    STOPPING=1, within the TimeoutStopSec of the unit generated for this worker."""
    addr = str(tmp_path / "notify.sock")
    lst = listener(addr)
    usec = 600_000  # pings every 0.3 s
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    monkeypatch.setenv("WATCHDOG_USEC", str(usec))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    paths = make_worker(config_dir, port)  # FAST: heartbeat_timeout 1.5, heartbeats every 0.2 s
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)

    t_ready, _ = lst.wait(lambda m: m == "READY=1", 30, what="READY=1")
    assert ws_uuid(port) == paths.uuid  # READY=1 means: it answers, no retry needed
    before = [m for t, m in lst.snapshot() if t <= t_ready and not m.startswith(("WATCHDOG", "EXTEND"))]
    assert before[0].startswith("STATUS=PREPARING")
    assert [m.split(":")[0] for m in before] == ["STATUS=PREPARING", "STATUS=STARTING", "STATUS=RUNNING",
                                                 "READY=1"], before
    assert lst.first(lambda m: m.startswith("EXTEND_TIMEOUT_USEC="))  # sent on entering PREPARING
    pid1 = poll_until(lambda: running_worker(paths), 10, what="worker running")
    # only the supervisor can notify: neither the worker nor the sidecars inherited the socket
    for child in psutil.Process(sup.pid).children(recursive=True):
        env = _env_of(child.pid)
        assert not any(k in env for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")), child.cmdline()

    # steady pings while healthy
    time.sleep(2.0)
    t_stop = time.monotonic()
    pings = [t for t, m in lst.snapshot() if m == "WATCHDOG=1" and t_ready <= t <= t_stop]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 4, pings
    assert max(gaps) < usec / 1e6, gaps  # never as long as WatchdogSec (ping at half of it, + jitter)
    assert 0.2 <= sum(gaps) / len(gaps) <= 0.45, gaps

    # hang: pings stop (stale after 0.4 s) until the supervisor replaces the worker (1.5 s)
    os.kill(pid1, signal.SIGSTOP)
    t_hang = time.monotonic()
    t_backoff, status = lst.wait(lambda m: m.startswith("STATUS=BACKOFF"), 15, after=t_hang, what="BACKOFF")
    assert "hung" in status
    poll_until(lambda: running_worker(paths, not_pid=pid1), 20, what="replacement")
    t_resumed, _ = lst.wait(lambda m: m == "WATCHDOG=1", 5, after=t_backoff, what="pings resume")
    assert t_resumed - t_backoff < 0.3 + 0.2
    hung_pings = [t for t, m in lst.snapshot() if m == "WATCHDOG=1" and t_hang + 0.4 + 0.3 + 0.15 < t < t_backoff]
    assert not hung_pings, (hung_pings, t_hang, t_backoff)
    assert t_backoff - t_hang > 1.0  # the window above was real
    assert [m for _, m in lst.snapshot()].count("READY=1") == 1  # READY once per service start
    assert ws_uuid(port) == paths.uuid

    # stop: STOPPING=1 at its start, and all of it inside the generated unit's TimeoutStopSec
    r = subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(paths.base), "systemd-unit", paths.name],
                       capture_output=True, text=True, cwd=str(REPO), timeout=30)
    timeout_stop = float(parse_unit(r.stdout)["Service"]["TimeoutStopSec"])
    t0 = time.monotonic()
    assert stop_supervisor(sup) == 0, output(sup)
    took = time.monotonic() - t0
    assert took < timeout_stop
    t_stopping, _ = lst.wait(lambda m: m == "STOPPING=1", 5, after=t0, what="STOPPING=1")
    assert lst.first(lambda m: m.startswith("STATUS=STOPPING"), after=t0)
    assert lst.first(lambda m: m.startswith("STATUS=STOPPED"), after=t0)
    print(f"hang to BACKOFF {t_backoff - t_hang:.2f}s, pings resumed after {t_resumed - t_backoff:.2f}s, "
          f"stop {took:.2f}s < TimeoutStopSec {timeout_stop:g}")


@pytest.mark.skipif(not HAVE_WORKER, reason="worker package not there yet")
def test_abstract_socket_sighup_is_not_a_stop_and_foreign_watchdog_pid(config_dir, port, tmp_path, sup_procs,
                                                                       listener, monkeypatch):
    addr = f"@fn-supervise-test-{uuidlib.uuid4().hex}"
    lst = listener(addr)
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process: we must not ping
    paths = make_worker(config_dir, port)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    lst.wait(lambda m: m == "READY=1", 30, what="READY=1")
    pid1 = poll_until(lambda: running_worker(paths), 10, what="worker running")
    t_hup = time.monotonic()
    sup.send_signal(signal.SIGHUP)
    lst.wait(lambda m: m.startswith("STATUS=RUNNING"), 30, after=t_hup, what="running again")
    poll_until(lambda: running_worker(paths, not_pid=pid1), 10, what="restarted worker")
    after_hup = [m for t, m in lst.snapshot() if t >= t_hup]
    assert any(m.startswith("STATUS=STOPPING") for m in after_hup)
    assert "STOPPING=1" not in after_hup  # systemd would arm TimeoutStopSec and kill us
    assert ws_uuid(port) == paths.uuid
    t0 = time.monotonic()
    assert stop_supervisor(sup) == 0
    lst.wait(lambda m: m == "STOPPING=1", 5, after=t0, what="STOPPING=1")
    msgs = [m for _, m in lst.snapshot()]
    assert "WATCHDOG=1" not in msgs
    assert msgs.count("READY=1") == 1


def test_without_notify_socket_nothing_is_sent_and_run_is_unchanged(config_dir, port, tmp_path, sup_procs,
                                                                    monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # stray: ignored without a socket
    paths = make_worker(config_dir, port, fake=True)
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    poll_until(lambda: running_worker(paths), 15, what="worker ready")
    assert stop_supervisor(sup) == 0
    assert "sd_notify" not in output(sup)


# ---------------------------------------------------------------------- units
def parse_unit(text: str) -> dict[str, dict[str, str]]:
    """systemd unit -> {section: {key: value}} (repeated keys joined by newlines)."""
    out: dict[str, dict[str, str]] = {}
    sec = None
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("[") and s.endswith("]"):
            sec = out.setdefault(s[1:-1], {})
            continue
        assert sec is not None and "=" in s, line
        k, v = s.split("=", 1)
        sec[k] = (sec[k] + "\n" + v) if k in sec else v
    return out


def cli(*args: str, base: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(base), *args],
                          capture_output=True, text=True, cwd=str(REPO), timeout=30)


def verify(unit_path: Path) -> None:
    if SYSTEMD_ANALYZE is None:
        parse_unit(unit_path.read_text())
        return
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", unit_path.name], cwd=str(unit_path.parent),
                       capture_output=True, text=True, timeout=60)
    # complaints about our file (unknown keys, bad values, missing executables) name it
    ours = [ln for ln in r.stderr.splitlines() if unit_path.name in ln or "Unknown key" in ln or "Failed to parse" in ln]
    assert r.returncode == 0 and not ours, r.stderr + r.stdout


@pytest.mark.parametrize("timers", [{}, {"stop_grace": 20, "term_timeout": 10, "kill_timeout": 5,
                                         "heartbeat_timeout": 30}])
def test_systemd_unit_verifies_and_nests_our_timeouts(config_dir, tmp_path, timers):
    from supervisor.cli import create_worker
    paths = create_worker(config_dir, name="unit test", no_venv=True, supervisor=timers)
    cfg = SupervisorConfig.from_worker_config(paths.read_config())
    r = cli("systemd-unit", paths.name, "--watchdog", str(units.watchdog_floor(cfg)), base=config_dir)
    assert r.returncode == 0, r.stderr
    unit = tmp_path / f"fn-supervise-{paths.uuid}.service"
    unit.write_text(r.stdout)
    verify(unit)
    svc = parse_unit(r.stdout)["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main" and svc["KillMode"] == "mixed"
    assert float(svc["TimeoutStopSec"]) > cfg.stop_deadline() + units.SIDECAR_STOP
    assert float(svc["TimeoutStartSec"]) >= cfg.start_budget * cfg.start_timeout  # --no-venv: no build
    assert float(svc["WatchdogSec"]) >= 2 * cfg.heartbeat_timeout
    assert svc["Restart"] == "on-failure" and float(svc["RestartSec"]) >= 1
    assert set(svc["RestartPreventExitStatus"].split()) >= {"2", "4"}
    assert f"FUNCNODES_CONFIG_DIR={config_dir}" in svc["Environment"]
    exe = svc["ExecStart"].split()
    assert os.path.isabs(exe[0]) and exe[-2:] == ["run", paths.name]
    # the command as written runs this fn-supervise (PYTHONPATH from the unit when not installed)
    env = dict(os.environ)
    for line in svc["Environment"].split("\n"):
        k, v = line.strip('"').split("=", 1)
        env[k] = v
    r2 = subprocess.run([*exe[:-2], "status", paths.name], capture_output=True, text=True, env=env,
                        cwd="/", timeout=30)
    assert r2.returncode == 0 and paths.name in r2.stdout, r2.stderr


def test_systemd_template_unit_verifies(config_dir, tmp_path):
    r = cli("systemd-unit", "--template", base=config_dir)
    assert r.returncode == 0, r.stderr
    (tmp_path / "fn-supervise@.service").write_text(r.stdout)
    os.symlink("fn-supervise@.service", tmp_path / "fn-supervise@0123abcd.service")
    verify(tmp_path / "fn-supervise@0123abcd.service")
    svc = parse_unit(r.stdout)["Service"]
    assert svc["ExecStart"].endswith(" run worker_%i")
    assert "WatchdogSec" not in svc
    venv_start = units.start_timeout(SupervisorConfig(), venv=True)
    assert float(svc["TimeoutStartSec"]) == venv_start > units.prepare_budget()
    assert float(svc["TimeoutStopSec"]) > SupervisorConfig().stop_deadline()


def test_unit_cli_usage_errors(config_dir):
    assert cli("systemd-unit", base=config_dir).returncode == 2
    assert cli("systemd-unit", "worker_nope", base=config_dir).returncode == 2
    assert cli("systemd-unit", "--template", "--exec", "relative/fn-supervise", base=config_dir).returncode == 2
    assert cli("systemd-unit", "--template", "--watchdog", "0", base=config_dir).returncode == 2
    assert cli("supervisord-conf", "worker_nope", base=config_dir).returncode == 2


def test_systemd_quoting_of_odd_paths():
    t = units.Target(["/opt/my tools/fn-supervise"], "/srv/fn 100%/$HOME")
    text = units.systemd_unit(t, SupervisorConfig(), worker="worker_abc")
    svc = parse_unit(text)["Service"]
    assert svc["ExecStart"] == '"/opt/my tools/fn-supervise" run worker_abc'
    assert 'Environment="FUNCNODES_CONFIG_DIR=/srv/fn 100%%/$$HOME"' in text


def test_section_parses_as_ini():
    t = units.Target(["/usr/local/bin/fn-supervise"], "/var/lib/funcnodes")
    text = units.supervisord_program(t, SupervisorConfig(), worker="worker_abc", uuid="abc",
                                     logfile="/var/lib/funcnodes/workers/worker_abc/fn-supervise.log")
    cp = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    cp.read_string(text)
    sec = cp["program:fn-supervise-abc"]
    assert int(sec["stopwaitsecs"]) > SupervisorConfig().stop_deadline()
