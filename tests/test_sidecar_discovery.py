"""Discovery sidecar: .py files added / modified / deleted in local_scripts reach the supervisor
quickly, one message per burst; a restarted sidecar resyncs; pipe EOF ends it."""

from __future__ import annotations

import os
import signal
import time

import multiprocess
import pytest

from conftest import poll_until
from test_sidecars_support import Hosted, alive

from sidecars.discovery import run_discovery

DEADLINE = 2.0  # save -> message, hard limit in the tests (the target is well under 1 s)


@pytest.fixture
def scripts(config_dir):
    return config_dir / "workers" / "worker_w1" / "local_scripts"


@pytest.fixture
def disc(scripts):
    h = Hosted("discovery", run_discovery, (str(scripts),), backoff_base=0.05)
    yield h
    h.close()


def changes_after(h, since: float):
    out = []
    for t, m in h.rec.timed("local_scripts"):
        if t >= since and not m.get("initial"):
            out.extend((t, c["change"], c["path"]) for c in m["changes"])
    return out


def wait_change(h, since: float, change: str, path, what: str) -> float:
    """Latency (s) from `since` until `change` for `path` arrives."""
    path = str(path)

    def found():
        for t, c, p in changes_after(h, since):
            if c == change and p == path:
                return t
        return None
    t = poll_until(found, DEADLINE, interval=0.005, what=what)
    return t - since


def test_added_modified_deleted_with_latency(disc, scripts):
    _, init = disc.rec.wait(lambda m: m.get("initial"), 10, "initial listing")
    assert init["changes"] == [] and scripts.is_dir()  # created if missing
    # the first idle tick reconciles; wait for the watcher to be surely running
    f = scripts / "hello.py"
    lat = {}
    t0 = time.monotonic()
    f.write_text("X = 1\n")
    lat["added"] = wait_change(disc, t0, "added", f, "added")

    t0 = time.monotonic()
    f.write_text("X = 2\n")
    lat["modified"] = wait_change(disc, t0, "modified", f, "modified")

    # an editor's atomic save: write a temp file, rename it over the script
    t0 = time.monotonic()
    tmp = scripts / ".hello.py.tmp1234"
    tmp.write_text("X = 3\n")
    os.replace(tmp, f)
    lat["atomic save"] = wait_change(disc, t0, "modified", f, "modified by rename")

    t0 = time.monotonic()
    f.unlink()
    lat["deleted"] = wait_change(disc, t0, "deleted", f, "deleted")

    print("\ndiscovery latency (save -> message at the supervisor): "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in lat.items()))
    assert all(v < 1.0 for v in lat.values()), lat
    paths = {p for _, _, p in changes_after(disc, 0)}
    assert paths == {str(f)}  # the temp file never shows up


def test_non_python_files_are_ignored(disc, scripts):
    disc.rec.wait(lambda m: m.get("initial"), 10, "initial listing")
    t0 = time.monotonic()
    for name in ("notes.txt", "data.json", "mod.pyc", "x.py~", "y.py.swp"):
        (scripts / name).write_text("nothing")
    (scripts / "sub").mkdir()
    (scripts / "sub" / "deep.py").write_text("Y = 1\n")  # recursive: found
    (scripts / "real.py").write_text("Z = 1\n")  # written last
    wait_change(disc, t0, "added", scripts / "real.py", "real.py added")
    wait_change(disc, t0, "added", scripts / "sub" / "deep.py", "sub/deep.py added")
    assert {p for _, _, p in changes_after(disc, t0)} == {
        str(scripts / "real.py"), str(scripts / "sub" / "deep.py")}


def test_a_burst_becomes_few_messages(disc, scripts):
    disc.rec.wait(lambda m: m.get("initial"), 10, "initial listing")
    t0 = time.monotonic()
    for i in range(20):
        (scripts / f"s{i:02d}.py").write_text(f"N = {i}\n")
    for i in range(20):  # and 20 rewrites of one file
        (scripts / "s00.py").write_text(f"N = {i}\n")
    wait_change(disc, t0, "added", scripts / "s19.py", "last file of the burst")
    # a marker written after the burst: every message about the burst precedes its message
    t1 = time.monotonic()
    (scripts / "zz_marker.py").write_text("")
    wait_change(disc, t1, "added", scripts / "zz_marker.py", "marker")
    msgs = [m for t, m in disc.rec.timed("local_scripts") if t >= t0 and not m.get("initial")]
    burst = [m for m in msgs if all(not c["path"].endswith("zz_marker.py") for c in m["changes"])]
    print(f"\n40 writes (20 new files, 20 rewrites) -> {len(burst)} message(s)")
    assert 1 <= len(burst) <= 3
    added = {c["path"] for m in burst for c in m["changes"] if c["change"] == "added"}
    assert added == {str(scripts / f"s{i:02d}.py") for i in range(20)}


def test_directory_removal_reports_each_script(disc, scripts):
    disc.rec.wait(lambda m: m.get("initial"), 10, "initial listing")
    t0 = time.monotonic()
    (scripts / "pkg").mkdir()
    (scripts / "pkg" / "a.py").write_text("")
    (scripts / "pkg" / "b.py").write_text("")
    wait_change(disc, t0, "added", scripts / "pkg" / "b.py", "pkg/b.py added")
    wait_change(disc, t0, "added", scripts / "pkg" / "a.py", "pkg/a.py added")
    t1 = time.monotonic()
    os.rename(scripts / "pkg", scripts.parent / "moved_away")
    wait_change(disc, t1, "deleted", scripts / "pkg" / "a.py", "pkg/a.py deleted")
    wait_change(disc, t1, "deleted", scripts / "pkg" / "b.py", "pkg/b.py deleted")


def test_restart_sends_the_initial_listing_again(disc, scripts):
    _, init = disc.rec.wait(lambda m: m.get("initial"), 10, "initial listing")
    pid1 = disc.status()["pid"]
    (scripts / "one.py").write_text("")
    wait_change(disc, 0, "added", scripts / "one.py", "one.py added")
    os.kill(pid1, signal.SIGKILL)
    poll_until(lambda: not alive(pid1), 5, what="old sidecar gone")
    (scripts / "two.py").write_text("")  # written while no sidecar watches
    t, m = disc.rec.wait(lambda m: m.get("initial") and m["changes"], 10, "second listing")
    assert {c["change"] for c in m["changes"]} == {"added"}
    assert [c["path"] for c in m["changes"]] == [str(scripts / "one.py"), str(scripts / "two.py")]
    st = disc.status()
    assert st["restarts"] == 1 and st["pid"] not in (None, pid1)


@pytest.mark.parametrize("how", ["eof", "stop"])
def test_pipe_eof_or_stop_message_ends_the_process(scripts, how):
    ctx = multiprocess.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=run_discovery, args=(child, str(scripts)), daemon=True)
    p.start()
    child.close()
    try:
        assert parent.poll(10)
        assert parent.recv()["initial"] is True
        t0 = time.monotonic()
        if how == "eof":
            parent.close()
        else:
            parent.send({"type": "stop"})
        p.join(5)
        took = time.monotonic() - t0
        print(f"\ndiscovery exit after {how}: {took * 1000:.0f} ms")
        assert p.exitcode == 0 and took < 2
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        from sidecars.host import stop_helper_processes
        stop_helper_processes()
