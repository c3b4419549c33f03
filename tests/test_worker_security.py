"""What a hostile client (or a careless node) tries: symlinks out of files/, JSON nested to blow
the parser's stack, bodies beyond FUNCNODES_WS_WORKER_MAX_DATA_SIZE."""

import base64
import io
import json
import os
import zipfile

import aiohttp
import pytest

from helpers import Client, RPCError, WorkerProc, run, write_config


@pytest.fixture
def worker(config_dir, port):
    write_config(config_dir, "s1")
    w = WorkerProc(config_dir, "s1", port).wait_ready()
    yield w
    assert w.stop() == 0, w.output()[-3000:]


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def outside(tmp_path):
    """A folder outside the data folder, with a secret, and what it holds to compare with."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text("do not leak")
    return d


async def post_upload(url, parts):
    with aiohttp.MultipartWriter("form-data") as mp:
        for name, data in parts:
            p = mp.append(data)
            p.set_content_disposition("form-data", name="file", filename=name)
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/upload/", data=mp) as r:
                return r.status, await r.json()


def test_uploads_through_a_symlink_in_files_are_refused(worker, config_dir, outside):
    files = config_dir / "workers" / "worker_s1" / "files"
    os.symlink(outside, files / "link")
    before = tree(outside)

    st, body = run(post_upload(worker.url, [("ok.txt", b"fine"), ("link/evil.txt", b"x")]))
    assert st == 400 and "symbolic link" in body["error"], body
    assert not (files / "ok.txt").exists()  # all or nothing
    st, body = run(post_upload(worker.url, [("link/deeper/evil.txt", b"x")]))
    assert st == 400 and "symbolic link" in body["error"], body

    async def cmd():
        async with Client(worker.url) as c:
            with pytest.raises(RPCError, match="symbolic link"):
                await c.cmd("upload", data=base64.b64encode(b"x").decode(), filename="link/evil.txt")
            # a symlink as the last component is replaced, never written through
            os.symlink(outside / "secret.txt", files / "last")
            assert await c.cmd("upload", data=base64.b64encode(b"mine").decode(), filename="last") == "last"
            # still fine: a plain upload
            assert await c.cmd("upload", data=base64.b64encode(b"y").decode(), filename="sub/y.txt") == "sub/y.txt"
    run(cmd())
    assert tree(outside) == before and (outside / "secret.txt").read_text() == "do not leak"
    assert not (files / "last").is_symlink() and (files / "last").read_bytes() == b"mine"
    assert (files / "sub" / "y.txt").read_bytes() == b"y"
    assert not list(files.rglob(".upload-*")) and not (files / "deeper").exists()


def test_a_symlinked_files_folder_is_refused_too(worker, config_dir, outside):
    files = config_dir / "workers" / "worker_s1" / "files"
    files.rmdir()
    os.symlink(outside, files)
    st, body = run(post_upload(worker.url, [("a.txt", b"x")]))
    assert st == 400 and "files is a symbolic link" in body["error"], body
    assert tree(outside) == ["secret.txt"]


def export_zip(entries: dict) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("config", json.dumps({"name": "imported"}))
        zf.writestr("state", json.dumps({"backend": {"nodes": [], "edges": []}, "view": {}, "meta": {}}))
        for k, v in entries.items():
            zf.writestr(k, v)
    return base64.b64encode(buf.getvalue()).decode()


def test_export_and_import_do_not_follow_symlinks(worker, config_dir, outside):
    files = config_dir / "workers" / "worker_s1" / "files"
    (files / "mine.txt").write_text("mine")
    os.symlink(outside, files / "linkdir")
    os.symlink(outside / "secret.txt", files / "linkfile")

    async def go():
        async with Client(worker.url) as c:
            reply = await c.request({"type": "cmd", "cmd": "export_worker", "kwargs": {}})
            assert reply["type"] == "result", reply
            data = base64.b64decode(reply["result"]) if isinstance(reply["result"], str) else None
            if data is None:  # bytes results come back base64-encoded by the core encoder
                raise AssertionError(reply)
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
            assert "files/mine.txt" in names
            assert not [n for n in names if "link" in n or "secret" in n], names
            # import: an entry under the symlinked folder is refused, and nothing is written
            with pytest.raises(RPCError, match="symbolic link"):
                await c.cmd("update_from_export", data=export_zip({"files/ok.txt": "1", "files/linkdir/evil.txt": "x"}))
            assert not (files / "ok.txt").exists()
            await c.cmd("update_from_export", data=export_zip({"files/linkfile": "replaced"}))
    run(go())
    assert tree(outside) == ["secret.txt"] and (outside / "secret.txt").read_text() == "do not leak"
    assert not (files / "linkfile").is_symlink() and (files / "linkfile").read_text() == "replaced"


@pytest.mark.parametrize("raw", [
    "[" * 100000,
    '{"type": "cmd", "cmd": "uuid", "id": "deep", "kwargs": {"x": ' + "[" * 5000 + "]" * 5000 + "}}",
    '{"type": "cmd", "cmd": "set_io_value", "id": "deep", "kwargs": {"nid": "n", "ioid": "value", "value": '
    + '{"a": ' * 900 + "1" + "}" * 900 + "}}",
])
def test_deeply_nested_json_gets_an_error_and_the_connection_stays(worker, raw):
    async def go():
        async with Client(worker.url) as c:
            await c.send_raw(raw)
            err = await c.wait_for(lambda e: e.get("type") == "error", what="error reply")
            assert "nested" in err["error"], err
            assert await c.cmd("uuid") == "s1"
        async with aiohttp.ClientSession() as s:
            async with s.post(worker.url + "/message/", data=raw) as r:
                assert r.status == 400 and "nested" in (await r.json())["error"]
    run(go())


def test_max_data_size_caps_uploads_with_a_413_that_says_so(config_dir, port):
    write_config(config_dir, "m8")  # max_upload_size stays at its 1 GiB default: the smaller wins
    w = WorkerProc(config_dir, "m8", port, env={"FUNCNODES_WS_WORKER_MAX_DATA_SIZE": str(8 << 20)}).wait_ready()
    files = config_dir / "workers" / "worker_m8" / "files"

    async def body():  # streamed: chunked, no Content-Length to refuse up front
        chunk = b"z" * (1 << 20)
        yield (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="big/huge.bin"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(64):
            yield chunk
        yield b"\r\n--XX--\r\n"

    async def go():
        async with aiohttp.ClientSession() as s:
            hdrs = {"Content-Type": "multipart/form-data; boundary=XX"}
            try:
                async with s.post(w.url + "/upload/", data=body(), headers=hdrs) as r:
                    status, reply = r.status, await r.json()
            except aiohttp.ClientError as e:  # the worker may answer and close before we finish
                raise AssertionError(f"no 413 reply: {e!r}")
            assert status == 413 and "FUNCNODES_WS_WORKER_MAX_DATA_SIZE" in reply["error"], reply
            # with a Content-Length, refused before a byte is read
            data = aiohttp.FormData()
            data.add_field("file", b"y" * (9 << 20), filename="sized.bin")
            async with s.post(w.url + "/upload/", data=data) as r:
                assert r.status == 413 and "FUNCNODES_WS_WORKER_MAX_DATA_SIZE" in (await r.json())["error"]
            async with s.post(w.url + "/message/", data=b"{" + b" " * (9 << 20) + b"}") as r:
                assert r.status == 413 and "FUNCNODES_WS_WORKER_MAX_DATA_SIZE" in (await r.json())["error"]
            st, reply = await post_upload(w.url, [("small.txt", b"ok")])
            assert st == 200
    run(go())
    assert tree(files) == ["small.txt"]
    assert w.stop() == 0
