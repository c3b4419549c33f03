"""The real FuncNodes Workermanager (funcnodes 1.7.1, in its own venv: tests/funcnodesenv.py)
against fn-supervise, talked to over its WebSocket exactly as the bundled UI does
(spec/workermanager.md 2.9): `worker_status`, `set_active`, `stop_worker`.

  * a supervised worker is listed active; `stop_worker` stops it and its supervisor exits 0;
    after a SIGKILL our supervisor restarts it and the manager lists it active again;
  * the contract (spec 5.2): `uuid` is the first frame on a fresh connection within 1 s while a
    node blocks the worker's event loop, and the manager's own probes still see it alive;
  * hook A (spec 5.1): the manager runs as a child of our monitor sidecar; its worker start for
    a uuid starts that worker under fn-supervise exactly once, however often it is requested.

The manager gets its config in the test's FUNCNODES_CONFIG_DIR (`--dir` too) with
`worker_manager` on 127.0.0.1 and a free port. Its logs are under <CFG>/logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from conftest import free_port, marked_processes, poll_until
from funcnodesenv import funcnodes_python
from helpers import Client, run
from supervisor.cli import add_demo_nodes
from harness import FIXTURES, child_env, make_worker, output, running_worker, start_supervisor, state, stop_supervisor


@pytest.fixture(scope="session")
def fn_python() -> str:
    return funcnodes_python()


def write_fn_config(base: Path, wm_port: int) -> None:
    """<CFG>/config.json: funcnodes fills the remaining keys with its defaults on load."""
    cfg = {"worker_manager": {"host": "127.0.0.1", "port": wm_port, "ssl": False}}
    (base / "config.json").write_text(json.dumps(cfg, indent=2))


def manager_log(base: Path) -> str:
    p = base / "logs" / "funcnodes.worker_manager.log"
    return p.read_text(errors="replace")[-4000:] if p.exists() else "(no manager log)"


class Manager:
    """`funcnodes --dir CFG --use-subprocess-monitor 0 startworkermanager`, in-process (no
    launcher monitor of its own): the manager is the very process we started."""

    def __init__(self, fn_python: str, base: Path, port: int, tmp_path: Path):
        self.base, self.port = base, port
        write_fn_config(base, port)
        env = dict(os.environ)
        for k in ("PYTHONPATH", "VIRTUAL_ENV", "SUBPROCESS_MONITOR_PORT", "SUBPROCESS_MONITOR_HOST",
                  "SUBPROCESS_MONITOR_PID"):
            env.pop(k, None)
        env["FUNCNODES_CONFIG_DIR"] = str(base)
        self.out = tmp_path / "manager.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [fn_python, "-m", "funcnodes", "--dir", str(base), "--use-subprocess-monitor", "0",
                 "startworkermanager"],
                env=env, cwd=str(tmp_path), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        poll_until(lambda: self.answers(), 60, interval=0.1, what="manager answering ping")

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"manager exited {self.proc.returncode}:\n{self.out.read_text()[-3000:]}")
        return manager_pings(self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def manager_pings(port: int) -> bool:
    async def go() -> bool:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send_str("ping")
                msg = await asyncio.wait_for(ws.receive(), 2)
                return msg.type == aiohttp.WSMsgType.TEXT and msg.data == "pong"
    try:
        return asyncio.run(go())
    except (OSError, aiohttp.ClientError, asyncio.TimeoutError):
        return False


class UI:
    """A client of the manager that speaks like the bundled React UI."""

    def __init__(self, port: int):
        self.url = f"ws://127.0.0.1:{port}/"
        self.messages: list = []

    async def __aenter__(self) -> "UI":
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url)
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._reader.cancel()
        await self.ws.close()
        await self.session.close()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    self.messages.append(json.loads(msg.data))
                except ValueError:
                    self.messages.append(msg.data)

    async def send(self, msg) -> None:
        await self.ws.send_str(msg if isinstance(msg, str) else json.dumps(msg))

    async def wait_for(self, pred, timeout: float, what: str, start: int = 0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages[start:]:
                if pred(m):
                    return m
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; got {self.messages[-5:]}")

    async def status_until(self, pred, timeout: float, what: str) -> dict:
        """Ask for `worker_status` (cached lists) until pred(status) holds; the manager's poll
        refreshes them within 1 s of a file change and at least every 10 s."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            n = len(self.messages)
            await self.send("worker_status")
            last = await self.wait_for(lambda m: isinstance(m, dict) and m.get("type") == "worker_status",
                                       5, "worker_status", start=n)
            if pred(last):
                return last
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last status {last}")


def listed(status: dict, which: str, uuid: str) -> dict | None:
    for w in status.get(which) or []:
        if w.get("uuid") == uuid:
            return w
    return None


@pytest.fixture
def manager(fn_python, config_dir, tmp_path):
    m = Manager(fn_python, config_dir, free_port(), tmp_path)
    yield m
    m.stop()


@pytest.fixture
def supervised(config_dir, port, tmp_path):
    paths = make_worker(config_dir, port)
    sup = start_supervisor(paths, tmp_path)
    poll_until(lambda: running_worker(paths), 30, what="worker ready")
    yield paths, sup
    if sup.poll() is None:
        assert stop_supervisor(sup) == 0, output(sup)


# ---------------------------------------------------------------------- tests
def test_listed_active_then_restarted_after_sigkill_on_the_same_port(manager, supervised, port):
    paths, sup = supervised

    async def go():
        async with UI(manager.port) as ui:
            pid1 = running_worker(paths)
            # Our worker answers `uuid` before it is ready (and before .p exists), so the manager
            # may first list it active without a PID; its next reload reads .p.
            st = await ui.status_until(lambda s: (x := listed(s, "active", paths.uuid)) and x.get("pid") == pid1,
                                       30, "worker active with its pid")
            w = listed(st, "active", paths.uuid)
            assert w["port"] == port and w["type"] == "WSWorker" and w["pid"] == pid1
            assert w["autostart"] == "never"  # the supervisor restarts, the manager must not race it

            os.kill(pid1, signal.SIGKILL)
            pid2 = poll_until(lambda: running_worker(paths, not_pid=pid1), 20, what="replacement")
            st = await ui.status_until(lambda s: (x := listed(s, "active", paths.uuid)) and x["pid"] == pid2,
                                       20, "the replacement listed active")
            assert listed(st, "active", paths.uuid)["port"] == port
            assert not listed(st, "inactive", paths.uuid)
            return pid1, pid2

    pid1, pid2 = run(go())
    assert pid1 != pid2 and sup.poll() is None
    assert state(paths)["restarts"] == 1


def test_manager_stop_worker_stops_worker_and_supervisor(manager, supervised):
    paths, sup = supervised

    async def go():
        async with UI(manager.port) as ui:
            await ui.status_until(lambda s: listed(s, "active", paths.uuid), 15, "worker active")
            n = len(ui.messages)
            await ui.send({"type": "stop_worker", "workerid": paths.uuid})
            # the manager's stop_worker ends with a reset progress frame; it only returns once
            # its own poll has seen the worker gone (it got `result: true`)
            await ui.wait_for(lambda m: isinstance(m, dict) and m.get("type") == "progress"
                              and m.get("message") == "Stopping worker.", 5, "Stopping worker.", start=n)
            await ui.wait_for(lambda m: isinstance(m, dict) and m.get("type") == "progress"
                              and m.get("message") == "" and m.get("progress") == 1, 20, "stop finished", start=n)
            assert sup.wait(20) == 0, output(sup)
            st = await ui.status_until(lambda s: listed(s, "inactive", paths.uuid), 15, "worker inactive")
            assert not listed(st, "active", paths.uuid)

    run(go())
    assert not paths.pidfile.exists() and not paths.runstate.exists()
    assert state(paths)["state"] == "STOPPED"


def test_uuid_first_within_1s_and_manager_sees_it_alive_while_a_node_blocks(manager, config_dir, port, tmp_path):
    # the blocking node holds the worker's event loop (and so its heartbeat) for 6 s
    paths = make_worker(config_dir, port, heartbeat_timeout=30.0)
    add_demo_nodes(paths)
    sup = start_supervisor(paths, tmp_path)
    try:
        poll_until(lambda: running_worker(paths), 30, what="worker ready")
        url = f"http://127.0.0.1:{port}"

        async def fresh_uuid() -> tuple[dict, float]:
            async with aiohttp.ClientSession() as s:
                t0 = time.monotonic()
                async with s.ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                    await ws.send_str(json.dumps({"type": "cmd", "cmd": "uuid"}))  # as check_worker does
                    msg = await asyncio.wait_for(ws.receive(), 1.0)
                    took = time.monotonic() - t0
                    assert msg.type == aiohttp.WSMsgType.TEXT
                    return json.loads(msg.data), took

        async def go():
            async with UI(manager.port) as ui:
                await ui.status_until(lambda s: listed(s, "active", paths.uuid), 15, "worker active")
                async with Client(url) as c:
                    await c.cmd("add_node", id="demo.block", uuid="blk")
                    await c.request({"type": "cmd", "cmd": "set_io_value",
                                     "kwargs": {"nid": "blk", "ioid": "seconds", "value": 6.0}})
                    await c.wait_for(lambda e: e.get("event") == "triggerstart" and e["data"]["node"] == "blk")
                    t_block = time.monotonic()
                    done = lambda e: e.get("event") == "triggerdone" and e["data"]["node"] == "blk"  # noqa: E731

                    # 1. the contract, measured: first frame, the result, within 1 s
                    first, took = await fresh_uuid()
                    assert first == {"type": "result", "result": paths.uuid, "id": None}, first
                    assert took < 1.0, took

                    # 2. the manager's own full reload probes every worker; force one now with
                    #    a file change (a second, dead worker config) and read its broadcast
                    n = len(ui.messages)
                    (paths.workers / "worker_deadbeef0001.json").write_text(json.dumps(
                        {"type": "WSWorker", "uuid": "deadbeef0001", "name": "dead", "host": "127.0.0.1",
                         "port": free_port()}))
                    st = await ui.wait_for(lambda m: isinstance(m, dict) and m.get("type") == "worker_status"
                                           and listed(m, "inactive", "deadbeef0001"), 5, "reload", start=n)
                    assert listed(st, "active", paths.uuid), st
                    assert paths.pidfile.exists()  # the manager deletes .p of workers it judges dead

                    # 3. the UI's set_active on the busy worker: the manager contacts it (1 s + 1 s
                    #    budget) and hands the UI its address
                    n = len(ui.messages)
                    await ui.send({"type": "set_active", "workerid": paths.uuid})
                    sw = await ui.wait_for(lambda m: isinstance(m, dict) and m.get("type") in ("set_worker", "error"),
                                           5, "set_worker", start=n)
                    assert sw["type"] == "set_worker" and sw["data"]["uuid"] == paths.uuid
                    assert sw["data"]["port"] == port

                    assert not any(done(e) for e in c.events), "the node finished before the probes"
                    assert time.monotonic() - t_block < 6.0
                    await c.wait_for(done, timeout=15)
                assert running_worker(paths)  # no hang kill: the block was within the heartbeat timeout

        run(go())
        assert state(paths)["restarts"] == 0
    finally:
        assert stop_supervisor(sup) == 0, output(sup)


# ---------------------------------------------------------------------- hook A
def supervisors_of(marker: str, uuid: str) -> list[int]:
    """PIDs of the fn-supervise processes (this test's) that run worker_<uuid>."""
    out = []
    for p in marked_processes(marker):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "supervisor" in cmd and f"worker_{uuid}" in cmd and "-m" in cmd:
            out.append(p.pid)
    return out


def test_hook_a_manager_under_our_monitor_starts_a_worker_once(fn_python, config_dir, tmp_path,
                                                               no_leaked_processes):
    from subprocess_monitor import helper

    marker = no_leaked_processes
    wm_port = free_port()
    write_fn_config(config_dir, wm_port)
    host_paths = make_worker(config_dir, free_port())      # the supervisor whose monitor hosts the manager
    b_port = free_port()
    b = make_worker(config_dir, b_port)                    # started by the manager, under fn-supervise
    host = start_supervisor(host_paths, tmp_path)
    try:
        poll_until(lambda: running_worker(host_paths), 30, what="host worker ready")

        async def monitor_addr():
            async with Client(f"http://127.0.0.1:{host_paths.read_config()['port']}") as c:
                return (await c.cmd("get_config")).get("subprocess_monitor")
        mon = poll_until(lambda: run(monitor_addr()), 30, interval=0.2, what="monitor address")

        # the manager, spawned through our monitor's POST /spawn: it inherits
        # SUBPROCESS_MONITOR_HOST/PORT/PID, so its launcher runs it in-process (no monitor of
        # its own) and every worker start it makes comes back to our POST /spawn
        res = run(helper.send_spawn_request(
            fn_python, ["-m", "funcnodes", "--dir", str(config_dir), "startworkermanager"],
            {"PYTHONPATH": "", "FUNCNODES_CONFIG_DIR": str(config_dir)}, host=mon["host"], port=mon["port"]))
        assert res["status"] == "success", res
        mgr = psutil.Process(res["pid"])
        poll_until(lambda: manager_pings(wm_port), 60, interval=0.2, what="manager answering")
        env = mgr.environ()
        assert env["SUBPROCESS_MONITOR_PORT"] == str(mon["port"])
        assert env["SUBPROCESS_MONITOR_PID"] == str(host.pid)
        assert not mgr.children(), "the launcher must not have started a monitor of its own"

        async def go():
            async with UI(wm_port) as ui1, UI(wm_port) as ui2:
                await ui1.status_until(lambda s: listed(s, "inactive", b.uuid), 15, "worker B inactive")
                # two UIs activate B at once: both see it inactive, both make the manager start it
                await asyncio.gather(ui1.send({"type": "set_active", "workerid": b.uuid}),
                                     ui2.send({"type": "set_active", "workerid": b.uuid}))
                sws = await asyncio.gather(*(
                    ui.wait_for(lambda m: isinstance(m, dict) and m.get("type") in ("set_worker", "error"),
                                60, "set_worker") for ui in (ui1, ui2)))
                for ui, sw in zip((ui1, ui2), sws):
                    assert sw["type"] == "set_worker", sw
                    # "Starting worker." precedes each start_worker(): two start requests reached us
                    assert any(isinstance(m, dict) and m.get("message") == "Starting worker." for m in ui.messages)
                    assert sw["data"]["uuid"] == b.uuid and sw["data"]["port"] == b_port
                st = await ui1.status_until(lambda s: listed(s, "active", b.uuid), 15, "worker B active")
                return st

        st = run(go())
        sups = supervisors_of(marker, b.uuid)
        assert len(sups) == 1, sups
        bst = state(b)
        assert bst["state"] == "RUNNING" and bst["supervisor"]["pid"] == sups[0]
        assert listed(st, "active", b.uuid)["pid"] == bst["worker"]["pid"] == int(b.pidfile.read_text())
        assert psutil.Process(sups[0]).ppid() == host.pid  # a child of the hosting supervisor

        # the manager's exact start request, repeated while B runs: the same PID, nothing new
        args = ["-m", "funcnodes", "--dir", str(config_dir), "worker", "--uuid", b.uuid, "start"]
        for _ in range(3):
            again = run(helper.send_spawn_request(fn_python, args, {}, host=mon["host"], port=mon["port"]))
            assert again == {"status": "success", "pid": sups[0]}, again
        assert supervisors_of(marker, b.uuid) == sups
        assert state(b)["worker"]["pid"] == bst["worker"]["pid"]

        async def uuid_of_b():
            async with Client(f"http://127.0.0.1:{b_port}") as c:
                return await c.cmd("uuid")
        assert run(uuid_of_b()) == b.uuid
    finally:
        code = stop_supervisor(host, 30)
        print(manager_log(config_dir))
    assert code == 0, output(host)
    # B's supervisor was the host's child: it stopped with it, cleanly
    poll_until(lambda: not supervisors_of(marker, b.uuid), 10, what="B's supervisor gone")
    assert state(b)["state"] == "STOPPED"


def test_cli_workermanager_starts_stops_and_restarts_workers_under_fn_supervise(fn_python, config_dir, tmp_path,
                                                                                no_leaked_processes):
    """`fn-supervise workermanager`: the user-facing form of hook A."""
    from subprocess_monitor import helper

    marker = no_leaked_processes
    wm_port, mon_port, b_port = free_port(), free_port(), free_port()
    write_fn_config(config_dir, 9)  # --port overrides it
    b = make_worker(config_dir, b_port)
    env = child_env(FIXTURES, inherit_path=False)
    out = tmp_path / "workermanager.out"
    with open(out, "wb") as f:
        wm = subprocess.Popen([sys.executable, "-m", "supervisor", "--dir", str(config_dir), "workermanager",
                               "--python", fn_python, "--host", "127.0.0.1", "--port", str(wm_port),
                               "--monitor-port", str(mon_port)],
                              env=env, cwd=str(tmp_path), stdout=f, stderr=subprocess.STDOUT)

    def activate(ui: UI):
        async def go():
            n = len(ui.messages)
            await ui.send({"type": "set_active", "workerid": b.uuid})
            sw = await ui.wait_for(lambda m: isinstance(m, dict) and m.get("type") in ("set_worker", "error"),
                                   60, "set_worker", start=n)
            assert sw["type"] == "set_worker" and sw["data"]["port"] == b_port, sw
        return go()

    try:
        poll_until(lambda: wm.poll() is None and manager_pings(wm_port), 60, interval=0.2,
                   what="manager answering: " + out.read_text(errors="replace")[-2000:] if out.exists() else "")

        async def go():
            async with UI(wm_port) as ui:
                await ui.status_until(lambda s: listed(s, "inactive", b.uuid), 15, "worker B inactive")
                await activate(ui)
                sups = supervisors_of(marker, b.uuid)
                assert len(sups) == 1 and psutil.Process(sups[0]).ppid() == wm.pid, sups
                again = await helper.send_spawn_request(
                    fn_python, ["-m", "funcnodes", "--dir", str(config_dir), "worker", "--uuid", b.uuid, "start"],
                    {}, host="127.0.0.1", port=mon_port)
                assert again == {"status": "success", "pid": sups[0]}, again
                await ui.status_until(lambda s: listed(s, "active", b.uuid), 15, "worker B active")

                # the UI stops it: the worker and its supervisor end; the manager lists it inactive
                await ui.send({"type": "stop_worker", "workerid": b.uuid})
                await asyncio.to_thread(poll_until, lambda: not psutil.pid_exists(sups[0]), 20, 0.05,
                                        "B's supervisor gone")
                assert state(b)["state"] == "STOPPED" and state(b)["exit_code"] == 0
                await ui.status_until(lambda s: listed(s, "inactive", b.uuid), 15, "worker B inactive again")

                # and starts it again: a new supervisor, once
                await activate(ui)
                sups2 = supervisors_of(marker, b.uuid)
                assert len(sups2) == 1 and sups2 != sups, sups2
                await ui.status_until(lambda s: listed(s, "active", b.uuid), 15, "worker B active again")
        run(go())
    finally:
        if wm.poll() is None:
            wm.send_signal(signal.SIGTERM)
        try:
            code = wm.wait(30)
        except subprocess.TimeoutExpired:
            wm.kill()
            wm.wait(5)
            raise
    assert code == 0, out.read_text(errors="replace")[-3000:]
    assert not supervisors_of(marker, b.uuid)
    assert state(b)["state"] == "STOPPED"


def test_five_workers_created_at_once_on_one_port_all_start_on_distinct_ports(fn_python, config_dir, tmp_path,
                                                                             no_leaked_processes):
    """Issue 10 (with issue 9's held socket): the supervisor picks the port. Five workers the
    Workermanager's `new_worker` made at once, all configured on one port, activated at once:
    each supervisor binds the first free port from there (the stock walk) and writes it to the
    config before the manager looks, so all five serve, each on its own port."""
    marker = no_leaked_processes
    wm_port, mon_port = free_port(), free_port()
    start = free_port()
    write_fn_config(config_dir, 9)
    env = child_env(FIXTURES, inherit_path=False)
    env["FUNCNODES_WS_WORKER_STARTPORT"] = str(start)
    env["FUNCNODES_WS_WORKER_ENDPORT"] = str(start + 40)
    out = tmp_path / "workermanager.out"
    with open(out, "wb") as f:
        wm = subprocess.Popen([sys.executable, "-m", "supervisor", "--dir", str(config_dir), "workermanager",
                               "--python", fn_python, "--host", "127.0.0.1", "--port", str(wm_port),
                               "--monitor-port", str(mon_port)],
                              env=env, cwd=str(tmp_path), stdout=f, stderr=subprocess.STDOUT)
    try:
        poll_until(lambda: wm.poll() is None and manager_pings(wm_port), 60, interval=0.2, what="manager answering")

        async def go():
            async with UI(wm_port) as ui:
                await asyncio.gather(*(ui.send({"type": "new_worker", "kwargs": {"name": f"five{i}", "in_venv": False}})
                                       for i in range(5)))
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    made = [m["uuid"] for m in ui.messages if isinstance(m, dict) and m.get("type") == "worker_created"]
                    if len(made) == 5:
                        break
                    await asyncio.sleep(0.05)
                assert len(made) == 5, ui.messages[-5:]
                # all on one port (whatever the stock manager chose), no venv build (not the point here)
                for u in made:
                    p = config_dir / "workers" / f"worker_{u}.json"
                    cfg = json.loads(p.read_text())
                    cfg["port"], cfg["host"] = start, "127.0.0.1"
                    cfg["supervisor"] = {"venv": False}
                    p.write_text(json.dumps(cfg))
                # the manager finds new workers on its next scan (<= 10 s): activate them once listed
                await ui.status_until(lambda s: all(listed(s, "inactive", u) for u in made), 30, "five listed")
                n = len(ui.messages)
                await asyncio.gather(*(ui.send({"type": "set_active", "workerid": u}) for u in made))
                deadline = time.monotonic() + 120
                got: dict[str, dict] = {}
                while time.monotonic() < deadline and len(got) < 5:
                    for m in ui.messages[n:]:
                        if isinstance(m, dict) and m.get("type") == "set_worker":
                            got[m["data"]["uuid"]] = m["data"]
                        elif isinstance(m, dict) and m.get("type") == "error":
                            raise AssertionError(m)
                    await asyncio.sleep(0.05)
                assert set(got) == set(made), (sorted(got), ui.messages[-5:])
                return made, got
        made, got = run(go())
        ports = {u: json.loads((config_dir / "workers" / f"worker_{u}.json").read_text())["port"] for u in made}
        assert len(set(ports.values())) == 5 and all(start <= p <= start + 40 for p in ports.values()), ports
        assert {u: d["port"] for u, d in got.items()} == ports

        async def uuid_on(port: int) -> str:
            async with Client(f"http://127.0.0.1:{port}") as c:
                return await c.cmd("uuid")
        for u, p in ports.items():
            assert run(uuid_on(p)) == u
        assert all(len(supervisors_of(marker, u)) == 1 for u in made)
    finally:
        if wm.poll() is None:
            wm.send_signal(signal.SIGTERM)
        try:
            code = wm.wait(60)
        except subprocess.TimeoutExpired:
            wm.kill()
            wm.wait(5)
            raise
    assert code == 0, out.read_text(errors="replace")[-3000:]
