"""worker/deferred.py: pytest (imported by funcnodes-core at every start) runs only when used,
and the client SSL contexts aiohttp makes at import load the system CAs only when used.

A real worker, alone and forked by a supervisor's fork server, starts without running pytest,
and a node module that uses pytest at import still works in it. The deferred module's own
rules (a second import does not run it, threads wait for one load, a failing module raises at
its use and leaves sys.modules) run in a fresh interpreter: this one has pytest imported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, poll_until
from harness import child_env, make_worker, running_worker, start_supervisor
from helpers import Client, WorkerProc, run, write_config

PROBE = '''
import sys
import funcnodes_core as fn

@fn.NodeDecorator("probe.pytest_ran", name="pytest ran")
def pytest_ran(x: int) -> bool:
    return "_pytest.fixtures" in sys.modules

NODE_SHELF = fn.Shelf(nodes=[pytest_ran], subshelves=[], name="probe", description="")
'''

USES_PYTEST = '''
import pytest
import funcnodes_core as fn

SLOW = pytest.mark.slow  # a use at import: pytest runs here

@fn.NodeDecorator("usespytest.version", name="pytest version")
def pytest_version(x: int) -> str:
    return f"{pytest.__version__} {SLOW.name}"

NODE_SHELF = fn.Shelf(nodes=[pytest_version], subshelves=[], name="usespytest", description="")
'''


def _check_pytest_deferred(url: str, data) -> None:
    (data / "pkgs").mkdir(parents=True, exist_ok=True)
    (data / "pkgs" / "probe_nodes.py").write_text(PROBE)
    (data / "pkgs" / "uses_pytest.py").write_text(USES_PYTEST)

    async def go():
        async with Client(url) as c:
            await c.cmd("add_package_dependency", name="probe_nodes", dep={"path": str(data / "pkgs" / "probe_nodes.py")})
            await c.wait_for(lambda e: e.get("event") == "lib_update" and e["type"] == "workerevent")
            await c.cmd("add_node", id="probe.pytest_ran", uuid="p1")
            await c.cmd("set_io_value", nid="p1", ioid="x", value=1)
            await c.wait_value("p1", "out", False)  # started, served, a module loaded: pytest never ran
            c.events.clear()
            await c.cmd("add_package_dependency", name="uses_pytest", dep={"path": str(data / "pkgs" / "uses_pytest.py")})
            await c.wait_for(lambda e: e.get("event") == "lib_update" and e["type"] == "workerevent")
            await c.cmd("add_node", id="usespytest.version", uuid="v1")
            await c.cmd("set_io_value", nid="v1", ioid="x", value=1)
            await c.wait_value("v1", "out", f"{pytest.__version__} slow")
            await c.cmd("add_node", id="probe.pytest_ran", uuid="p2")
            await c.cmd("set_io_value", nid="p2", ioid="x", value=2)
            await c.wait_value("p2", "out", True)
    run(go())


def test_a_lone_worker_runs_pytest_only_for_a_module_that_uses_it(config_dir, port):
    write_config(config_dir, "d1")
    w = WorkerProc(config_dir, "d1", port).wait_ready()
    _check_pytest_deferred(w.url, config_dir / "workers" / "worker_d1")
    assert w.stop() == 0


def test_a_forked_worker_runs_pytest_only_for_a_module_that_uses_it(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port)
    sup_procs.append(start_supervisor(paths, tmp_path))
    poll_until(lambda: running_worker(paths), 30, what="worker ready")
    _check_pytest_deferred(f"http://127.0.0.1:{port}", paths.data_dir())


RULES = r'''
import builtins, sys, threading
sys.path.insert(0, sys.argv[1])
from worker.deferred import defer, is_deferred

builtins.RUNS = 0
assert defer("slowmod")
import slowmod
import slowmod as again  # the import system reads __spec__: that must not run it
assert again is slowmod and is_deferred(slowmod) and builtins.RUNS == 0, builtins.RUNS
assert repr(slowmod).startswith("<module 'slowmod'") and builtins.RUNS == 0  # repr: no run either
seen = []
threads = [threading.Thread(target=lambda: seen.append(slowmod.VALUE)) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert seen == [42] * 8 and builtins.RUNS == 1, (seen, builtins.RUNS)
assert not is_deferred(slowmod) and sys.modules["slowmod"] is slowmod
from slowmod import VALUE
assert VALUE == 42 and not defer("slowmod")  # already imported: left alone
assert defer("dirmod")
import dirmod
assert "ANSWER" in dir(dirmod) and not is_deferred(dirmod)  # dir() runs it

assert defer("boom")
import boom
try:
    boom.X
except RuntimeError as e:
    assert str(e) == "boom at import", e
else:
    raise AssertionError("boom ran")
assert "boom" not in sys.modules
try:
    import boom  # a fresh import raises as a plain one would
except RuntimeError:
    pass
else:
    raise AssertionError("second import of boom")
assert not defer("no_such_module_anywhere")
print("rules ok")
'''


def test_deferred_module_runs_once_for_all_threads_and_a_failure_is_raised_at_use(tmp_path):
    (tmp_path / "slowmod.py").write_text(textwrap.dedent('''
        import builtins, time
        builtins.RUNS += 1
        time.sleep(0.2)  # the other threads ask for VALUE while this runs
        VALUE = 42
    '''))
    (tmp_path / "boom.py").write_text('raise RuntimeError("boom at import")\n')
    (tmp_path / "dirmod.py").write_text("ANSWER = 42\n")
    r = subprocess.run([sys.executable, "-c", RULES, str(tmp_path)], cwd=str(REPO), env=child_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "rules ok" in r.stdout, r.stdout + r.stderr


HTTPS = r"""
import asyncio, ssl, sys
from worker.deferred import deferred_ca_certificates

with deferred_ca_certificates():
    with deferred_ca_certificates():  # nested: the outer block still defers, and ends it
        import aiohttp
        from aiohttp import web
    mine = ssl.create_default_context()
    class Own(ssl.SSLContext):
        pass
    own = Own(ssl.PROTOCOL_TLS_CLIENT)
    own.set_default_verify_paths()
assert "set_default_verify_paths" not in vars(ssl.SSLContext)  # the patch is gone
assert type(mine) is not ssl.SSLContext, "not deferred"
assert type(own) is Own and own.cert_store_stats()["x509_ca"] >= 1  # a subclass loads at once
assert mine.cert_store_stats()["x509_ca"] >= 1 and type(mine) is ssl.SSLContext  # loaded at the query

async def serve(cert, key):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_get("/", lambda r: web.Response(text="hi"))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]

async def main():
    good, gport = await serve(sys.argv[1], sys.argv[2])
    bad, bport = await serve(sys.argv[3], sys.argv[4])
    try:
        async with aiohttp.ClientSession() as s:  # aiohttp's own default context, made deferred
            async with s.get(f"https://127.0.0.1:{gport}/") as r:
                assert r.status == 200 and await r.text() == "hi"
            try:
                async with s.get(f"https://127.0.0.1:{bport}/") as r:
                    raise AssertionError(f"an untrusted certificate was accepted: {r.status}")
            except aiohttp.ClientConnectorCertificateError:
                pass
    finally:
        await good.cleanup()
        await bad.cleanup()

asyncio.run(main())
print("https ok")
"""


def _self_signed(tmp_path, name: str) -> tuple[str, str]:
    c, k = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(k), "-out", str(c)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate here: {r.stderr.strip()[:200]}")
    return str(c), str(k)


def test_aiohttp_client_contexts_load_the_cas_at_first_use_and_still_verify(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl binary to make self-signed certificates")
    good, bad = _self_signed(tmp_path, "trusted"), _self_signed(tmp_path, "untrusted")
    # the default verify paths read SSL_CERT_FILE: the one CA the deferred contexts must load
    r = subprocess.run([sys.executable, "-c", HTTPS, *good, *bad], cwd=str(REPO),
                       env=child_env(SSL_CERT_FILE=good[0]), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "https ok" in r.stdout, r.stdout + r.stderr
