"""TLS on the worker's own port (worker/tls.py): a self-signed certificate made for the run; a
client that trusts it is served over wss:// and https:// (WebSocket, /message/, /upload/,
/healthz, /readyz, /metrics), also after a kill -9 (held socket, fork server); a plain ws://
client is not; a missing certificate is a clear FATAL at start, not a crash loop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys

import aiohttp
import pytest

from conftest import REPO, poll_until
from harness import make_worker, running_worker, start_supervisor, state, stop_supervisor

from supervisor.status import format_status as _fmt_status, live_status
from worker.tls import TLSConfigError, server_context


@pytest.fixture
def cert(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl binary to make a self-signed certificate for the run")
    c, k = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                        "-keyout", str(k), "-out", str(c)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate here: {r.stderr.strip()[:200]}")
    return c, k


def trusting(cert_path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_path))


async def wss_uuid(port, ctx, scheme="wss"):
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{scheme}://127.0.0.1:{port}/", ssl=ctx,
                                timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
            await ws.send_str(json.dumps({"type": "cmd", "cmd": "uuid", "kwargs": {}, "id": "u1"}))
            msg = await asyncio.wait_for(ws.receive(), 5)
            return json.loads(msg.data)["result"]


async def https_routes(port, ctx, files_dir):
    base = f"https://127.0.0.1:{port}"
    out = {}
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz", "/metrics"):
            async with s.get(base + path, ssl=ctx) as r:
                out[path] = r.status
        async with s.post(base + "/message/", ssl=ctx,
                          json={"type": "cmd", "cmd": "uuid", "kwargs": {}, "id": "m1"}) as r:
            out["/message/"] = (r.status, await r.text())
        with aiohttp.MultipartWriter("form-data") as mp:
            part = mp.append(b"over tls")
            part.set_content_disposition("form-data", name="file", filename="tls.txt")
            async with s.post(base + "/upload/", data=mp, ssl=ctx) as r:
                out["/upload/"] = r.status
    return out


def test_server_context_says_what_is_wrong(tmp_path, cert):
    assert server_context({"ssl": False}) is None
    with pytest.raises(TLSConfigError, match="needs"):
        server_context({"ssl": True})
    with pytest.raises(TLSConfigError, match="does not exist"):
        server_context({"ssl": True, "ssl_certfile": str(tmp_path / "nope.pem")})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match="cannot load"):
        server_context({"ssl": True, "ssl_certfile": str(junk), "ssl_keyfile": str(junk)})
    assert isinstance(server_context({"ssl": True, "ssl_certfile": str(cert[0]), "ssl_keyfile": str(cert[1])}),
                      ssl.SSLContext)


def test_supervised_worker_serves_wss_and_https_across_a_kill9(config_dir, port, tmp_path, sup_procs, cert):
    paths = make_worker(config_dir, port)
    paths.update_config(ssl=True, ssl_certfile=str(cert[0]), ssl_keyfile=str(cert[1]))
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    pid1 = poll_until(lambda: running_worker(paths), 30, what="worker ready")
    ctx = trusting(cert[0])
    assert asyncio.run(wss_uuid(port, ctx)) == paths.uuid
    got = asyncio.run(https_routes(port, ctx, paths.data_dir() / "files"))
    assert got == {"/healthz": 200, "/readyz": 200, "/metrics": 200, "/message/": (200, "Message received"),
                   "/upload/": 200}, got
    assert (paths.data_dir() / "files" / "tls.txt").read_bytes() == b"over tls"

    # A plain client is not served: the handshake is not HTTP.
    with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)):
        asyncio.run(asyncio.wait_for(wss_uuid(port, None, scheme="ws"), 10))
    # And one that does not trust the certificate is refused by its own side.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        asyncio.run(wss_uuid(port, ssl.create_default_context()))

    st = live_status(paths)
    assert st["url"] == f"wss://127.0.0.1:{port}/" and f"wss://127.0.0.1:{port}/" in _fmt_status(st)
    assert paths.read_config()["ssl"] is True  # what the Workermanager and the UI build wss:// from

    os.kill(pid1, signal.SIGKILL)
    poll_until(lambda: running_worker(paths, not_pid=pid1), 30, what="replacement")
    assert poll_until(lambda: _try(lambda: asyncio.run(wss_uuid(port, ctx))), 15, what="wss after restart") == paths.uuid
    # the held socket is plain TCP; each worker the fork server forks builds TLS from the config
    assert state(paths)["launches"] == {"fork": 2, "spawn": 0}, state(paths)["launches"]
    assert stop_supervisor(sup) == 0


def _try(fn):
    try:
        return fn()
    except (OSError, aiohttp.ClientError, asyncio.TimeoutError):
        return None


def test_missing_certificate_is_fatal_at_start_not_a_crash_loop(config_dir, port, tmp_path, sup_procs):
    paths = make_worker(config_dir, port)
    paths.update_config(ssl=True, ssl_certfile=str(tmp_path / "missing.pem"), ssl_keyfile=str(tmp_path / "k.pem"))
    sup = start_supervisor(paths, tmp_path)
    sup_procs.append(sup)
    assert sup.wait(30) == 2
    st = state(paths)
    assert st["state"] == "FATAL" and "missing.pem does not exist" in st.get("reason", json.dumps(st)), st
    assert not st.get("worker") and not st.get("crashes") and not st.get("restarts")


def test_standalone_worker_with_a_bad_certificate_exits_with_the_reason(config_dir, port, tmp_path):
    from helpers import write_config

    write_config(config_dir, "t1", ssl=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "worker", "worker_t1", "--dir", str(config_dir), "--port", str(port)],
                       capture_output=True, text=True, timeout=60, env=env, cwd=str(REPO))
    assert r.returncode != 0 and "ssl_certfile" in r.stderr, r.stderr


def test_over_tls_another_local_user_is_still_refused_and_a_token_holder_served(config_dir, port, cert):
    from helpers import WorkerProc, write_config
    from peerprobe import NOBODY, as_other_user, require_other_user

    require_other_user()
    write_config(config_dir, "t2", ssl=True, ssl_certfile=str(cert[0]), ssl_keyfile=str(cert[1]), auth_token="tok")
    w = WorkerProc(config_dir, "t2", port)
    try:
        poll_until(lambda: _try(lambda: asyncio.run(_https_status(port, "/readyz", trusting(cert[0])))) == 200, 30,
                   what="worker ready over https")
        ask = {"op": "ws", "host": "127.0.0.1", "port": port, "cadata": cert[0].read_text(),
               "send": {"type": "cmd", "cmd": "uuid", "kwargs": {}, "id": "u1"}}
        r = as_other_user({**ask, "path": "/"})
        assert r["status"] == 403 and f"uid {NOBODY} refused" in r["body"], r
        r = as_other_user({**ask, "path": "/?token=tok"})
        assert r["status"] == 101 and r["reply"]["result"] == "t2", r
    finally:
        assert w.stop() == 0, w.output()[-3000:]


async def _https_status(port, path, ctx):
    async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{port}{path}", ssl=ctx) as r:
        return r.status
