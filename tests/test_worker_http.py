"""HTTP on the worker port: health, large messages, POST /message/, uploads, CORS, auth."""

import json

import aiohttp
import pytest

from helpers import Client, RPCError, WorkerProc, run, write_config


@pytest.fixture
def worker(config_dir, port):
    write_config(config_dir, "h1", cors_origins=["https://app.example"], max_upload_size=1 << 20)
    w = WorkerProc(config_dir, "h1", port).wait_ready()
    yield w
    assert w.stop() == 0


async def _get(url, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, **kw) as r:
            return r.status, dict(r.headers), await r.read()


def test_health_and_ready(worker):
    st, _, body = run(_get(worker.url + "/healthz"))
    assert st == 200 and json.loads(body)["uuid"] == "h1"
    st, _, body = run(_get(worker.url + "/readyz"))
    assert st == 200 and json.loads(body)["status"] == "ready"


def test_large_result_goes_through_a_stub(worker):
    async def go():
        async with Client(worker.url) as c:
            await c.cmd("add_node", id="demo.text", uuid="t")
            big = "y" * (1_200_000)
            # too big for a frame: send it over HTTP, the result is broadcast
            async with aiohttp.ClientSession() as s:
                body = json.dumps({"type": "cmd", "cmd": "set_io_value", "id": "big", "kwargs": {"nid": "t", "ioid": "value", "value": big}})
                async with s.post(worker.url + "/message/", data=body) as r:
                    assert r.status == 200
            ev = await c.wait_for(lambda e: e.get("id") == "big")
            assert ev["result"] == big  # arrived through a large_message stub and GET /message/<id>
            st, _, body = await _get(worker.url + "/message/nope")
            assert st == 404
            st, h, body = await _get(worker.url + "/node/t/io/value/value")
            assert st == 200 and body == big.encode() and h["Content-Type"].startswith("text/plain")
            st, _, _ = await _get(worker.url + "/node/zz/io/value/value")
            assert st == 404
    run(go())


def test_upload_streams_into_files_and_refuses_traversal_and_oversize(worker, config_dir):
    files = config_dir / "workers" / "worker_h1" / "files"

    async def post(parts):
        with aiohttp.MultipartWriter("form-data") as mp:
            for name, data in parts:
                p = mp.append(data)
                p.set_content_disposition("form-data", name="file", filename=name)
            async with aiohttp.ClientSession() as s:
                async with s.post(worker.url + "/upload/", data=mp) as r:
                    return r.status, await r.json()

    st, body = run(post([("dir/a.txt", b"A"), ("dir/b.txt", b"B")]))
    assert st == 200 and body == {"file": "dir"}
    assert (files / "dir" / "a.txt").read_bytes() == b"A"
    st, body = run(post([("ok.txt", b"1"), ("../../escape.txt", b"2")]))
    assert st == 400 and "relative path" in body["error"]
    assert not (files / "ok.txt").exists()  # all or nothing
    assert not (config_dir / "workers" / "escape.txt").exists()
    st, body = run(post([("huge.bin", b"z" * (2 << 20))]))
    assert st == 413
    assert not list(files.rglob("huge.bin")) and not list(files.rglob(".upload-*"))

    async def bad():
        async with Client(worker.url) as c:
            with pytest.raises(RPCError, match="relative path"):
                await c.cmd("upload", data="QQ==", filename="/etc/passwd")
    run(bad())


def test_cors_only_for_loopback_and_allow_list(worker):
    for origin, granted in [("http://localhost:8000", True), ("http://127.0.0.1:3000", True),
                            ("https://app.example", True), ("https://evil.example", False)]:
        st, h, _ = run(_get(worker.url + "/healthz", headers={"Origin": origin}))
        assert (h.get("Access-Control-Allow-Origin") == origin) is granted, (origin, h)

    async def ws(origin):
        async with aiohttp.ClientSession() as s:
            try:
                async with s.ws_connect(worker.url + "/", headers={"Origin": origin}):
                    return True
            except aiohttp.WSServerHandshakeError as e:
                return e.status

    assert run(ws("http://localhost:8000")) is True
    assert run(ws("https://evil.example")) == 403


def test_token_is_required_everywhere_when_set(config_dir, port):
    write_config(config_dir, "a1", auth_token="s3cret")
    w = WorkerProc(config_dir, "a1", port).wait_ready()

    async def go():
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as ei:
                async with s.ws_connect(w.url + "/"):
                    pass
            assert ei.value.status == 401
            async with s.post(w.url + "/message/", data='{"type":"cmd","cmd":"uuid"}') as r:
                assert r.status == 401
            async with s.post(w.url + "/upload/", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            # large-message stubs are fetched by a random id, with no token, as stock clients do
            async with s.get(w.url + "/message/x") as r:
                assert r.status == 404
        async with Client(w.url, headers={"Authorization": "Bearer s3cret"}) as c:
            assert await c.cmd("uuid") == "a1"
        async with Client(w.url, params={"token": "s3cret"}) as c:  # what a browser can do
            assert await c.cmd("uuid") == "a1"
            cfg = await c.cmd("get_config")
            assert "auth_token" not in cfg
    run(go())
    assert w.stop() == 0


def test_a_foreign_page_cannot_post_commands(worker):
    """A browser sends a text/plain POST cross-site without a preflight: it must not run."""
    async def go():
        async with aiohttp.ClientSession() as s:
            body = '{"type":"cmd","cmd":"update_worker_config","kwargs":{"name":"PWNED"},"id":"x"}'
            hdrs = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
            async with s.post(worker.url + "/message/", data=body, headers=hdrs) as r:
                assert r.status == 403
            async with s.post(worker.url + "/upload/", data=b"x", headers=hdrs) as r:
                assert r.status == 403
            hdrs["Origin"] = "http://localhost:8000"  # the UI on loopback is fine
            body = body.replace("PWNED", "fine")
            async with s.post(worker.url + "/message/", data=body, headers=hdrs) as r:
                assert r.status == 200
        async with Client(worker.url) as c:
            assert await c.cmd("name") == "fine"
    run(go())


def test_bodies_over_max_data_size_are_refused(config_dir, port):
    write_config(config_dir, "m1")
    w = WorkerProc(config_dir, "m1", port, env={"FUNCNODES_WS_WORKER_MAX_DATA_SIZE": str(1 << 20)}).wait_ready()

    async def go():
        async with aiohttp.ClientSession() as s:
            body = json.dumps({"type": "cmd", "cmd": "uuid", "pad": "x" * (2 << 20)})
            async with s.post(w.url + "/message/", data=body) as r:
                assert r.status == 413
            async with s.post(w.url + "/message/", data="{not json") as r:
                assert r.status == 400 and "not valid JSON" in (await r.json())["error"]
        async with Client(w.url) as c:
            assert await c.cmd("uuid") == "m1"
    run(go())
    assert w.stop() == 0
