"""Another local user is kept out of the worker and its subprocess monitor (worker/peers.py).

The rule runs on a table without sockets; the /proc lookup against real sockets, one of them
held by a process of another uid; then both sides end to end: a probe run as `nobody` is refused
(WebSocket, POST /upload/, monitor POST /spawn), the owner and a token holder are served, and
/healthz stays open."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct

import aiohttp
import pytest

from conftest import poll_until
from helpers import Client, WorkerProc, run, write_config
from peerprobe import NOBODY, as_other_user, hold_as_other_user, require_other_user

import ipaddress

from worker.peers import PeerGate, decide, diag_uid, is_local_peer, parse_uid, peer_hung_up, peer_uid, proc_uid

ME = os.getuid()


# region the rule
@pytest.mark.parametrize("kw, allowed", [
    (dict(peer_uid=ME), True),                                   # the owner
    (dict(peer_uid=0), True),                                    # root can act as the owner anyway
    (dict(peer_uid=4242), False),                                # another user
    (dict(peer_uid=None), False),                                # unknown: not proven to be the owner
    (dict(peer_uid=4242, token_ok=True), True),                  # a token holder, whoever
    (dict(peer_uid=4242, path="/healthz"), True),                # probes run as other users
    (dict(peer_uid=4242, path="/readyz"), True),
    (dict(peer_uid=4242, path="/metrics"), False),
    (dict(peer_uid=4242, enabled=False), True),                  # a proxy as another user in front
    (dict(peer_uid=4242, peer_ip="10.1.2.3"), True),             # remote: token and Origin rules decide
    (dict(peer_uid=4242, peer_ip="::1", local_ip="::1"), False),
    (dict(peer_uid=4242, peer_ip="::ffff:127.0.0.5"), False),    # v4 client of a dual-stack socket
    (dict(peer_uid=4242, peer_ip="10.1.2.3", local_ip="10.1.2.3"), False),  # the machine to itself
])
def test_decide(kw, allowed):
    args = dict(enabled=True, path="/", peer_ip="127.0.0.1", local_ip="127.0.0.1", token_ok=False,
                owner_uid=ME if ME not in (0, 4242) else 1000)
    args.update(kw)
    v = decide(**args)
    assert v.allowed is allowed
    if not allowed:
        assert "refused" in v.reason and "\n" not in v.reason


def test_is_local_peer():
    assert is_local_peer("127.9.9.9", "127.0.0.1") and is_local_peer("::1", "::1")
    assert not is_local_peer("192.168.1.2", "127.0.0.1") and not is_local_peer("not an ip", "127.0.0.1")


def test_parse_uid_skips_time_wait_and_orphans():
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    row = "   0: {l} {r} {st} 00000000:00000000 00:00000000 00000000  {uid}        0 {ino} 1 0 20 4 30 10 -1\n"
    l, r = "0100007F:A000", "0100007F:1F90"
    assert parse_uid(head + row.format(l=l, r=r, st="01", uid=1000, ino=555), l, r) == 1000
    assert parse_uid(head + row.format(l=l, r=r, st="06", uid=0, ino=0), l, r) is None
    assert parse_uid(head + row.format(l=l, r=r, st="08", uid=0, ino=0), l, r) is None
    assert parse_uid(head + row.format(l=r, r=l, st="01", uid=1000, ino=5), l, r) is None  # the other direction
# endregion


# region the /proc lookup, real sockets
@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_peer_uid_of_a_real_connection_is_ours(family, host):
    with socket.socket(family) as srv:
        try:
            srv.bind((host, 0))
        except OSError as e:
            pytest.skip(f"no {host} here: {e}")
        srv.listen()
        with socket.create_connection((host, srv.getsockname()[1])) as c:
            conn, peer = srv.accept()
            with conn:
                assert peer_uid(peer, conn.getsockname()) == ME
                assert peer_uid(conn.getsockname(), peer) == ME  # and the other end, seen from the client
                assert c.getsockname()[1] == peer[1]
                both_ways(peer, conn.getsockname(), ME)


def both_ways(peer, ours, uid):
    """netlink sock_diag (the fast path) and /proc/net/tcp* (the fallback) agree."""
    pip, lip = ipaddress.ip_address(peer[0]), ipaddress.ip_address(ours[0])
    assert proc_uid(pip, peer[1], lip, ours[1]) == uid
    via_netlink = diag_uid(pip, peer[1], lip, ours[1])
    assert via_netlink in (uid, None)  # None: netlink not allowed here (then /proc answers)
    # a port nobody uses: neither finds a socket
    assert proc_uid(pip, 1, lip, ours[1]) is None and diag_uid(pip, 1, lip, ours[1]) is None
    # the listening socket is never taken for the peer
    assert diag_uid(lip, ours[1], pip, 1) is None


def test_peer_uid_through_a_dual_stack_socket():
    with socket.socket(socket.AF_INET6) as srv:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            srv.bind(("::", 0))
        except OSError as e:
            pytest.skip(f"no IPv6 here: {e}")
        srv.listen()
        with socket.create_connection(("127.0.0.1", srv.getsockname()[1])):
            conn, peer = srv.accept()
            with conn:
                assert peer[0].startswith("::ffff:127.")
                assert peer_uid(peer, conn.getsockname()) == ME


def test_peer_uid_of_another_users_connection():
    require_other_user()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        p = hold_as_other_user("127.0.0.1", srv.getsockname()[1])
        try:
            conn, peer = srv.accept()
            with conn:
                assert json.loads(p.stdout.readline())["port"] == peer[1]
                assert peer_uid(peer, conn.getsockname()) == NOBODY
                both_ways(peer, conn.getsockname(), NOBODY)
        finally:
            p.stdin.close()
            p.wait(10)


class SockTransport:
    """What PeerGate reads of an asyncio transport, over a real accepted socket (the addresses
    kept from the accept, as asyncio does: after a reset getpeername() fails)."""

    def __init__(self, sock: socket.socket):
        self.extra = {"peername": sock.getpeername(), "sockname": sock.getsockname(), "socket": sock}

    def get_extra_info(self, name: str):
        return self.extra[name]


@pytest.mark.parametrize("reset", [True, False])
def test_a_peer_that_hung_up_is_refused_without_a_warning_or_a_count(reset, caplog):
    """A client that resets (or closes) before it is identified leaves no uid to read: it is
    still not served, but it is the client's doing, not an unknown user at the door."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        c = socket.create_connection(("127.0.0.1", srv.getsockname()[1]))
        conn, _ = srv.accept()
        with conn:
            t = SockTransport(conn)
            assert not peer_hung_up(t)
            live = PeerGate(True)
            assert live.check(t, "/", token_ok=False).allowed  # the owner, while it is there
            if reset:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            poll_until(lambda: peer_hung_up(t), 5, what="our end to see the hang-up")
            gate = PeerGate(True)
            with caplog.at_level(logging.DEBUG, logger="fn_supervise.peers"):
                v = gate.check(t, "/", token_ok=False)
            assert not v.allowed and v.gone and "hung up" in v.reason
            assert gate.refused == 0 and not caplog.records
# endregion


# region end to end: the worker
@pytest.fixture
def worker(config_dir, port):
    require_other_user()
    write_config(config_dir, "p1")
    w = WorkerProc(config_dir, "p1", port).wait_ready()
    yield w
    assert w.stop() == 0, w.output()[-3000:]


UUID_CMD = {"type": "cmd", "cmd": "uuid", "kwargs": {}, "id": "u1"}


def upload_action(port, headers=None):
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"evil.txt\"\r\n\r\n"
            f"nobody was here\r\n--{boundary}--\r\n")
    return {"op": "http", "host": "127.0.0.1", "port": port, "method": "POST", "path": "/upload/", "body": body,
            "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})}}


def metric(url, name):
    async def get():
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
            return await r.text()
    for line in run(get()).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def _get(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.text()


def test_another_user_is_refused_the_owner_served(worker, config_dir, port):
    files = config_dir / "workers" / "worker_p1" / "files"
    r = as_other_user({"op": "ws", "host": "127.0.0.1", "port": port, "path": "/", "send": UUID_CMD})
    assert r["status"] == 403 and f"uid {NOBODY} refused" in r["body"], r
    assert "reply" not in r
    r = as_other_user(upload_action(port))
    assert r["status"] == 403 and "token" in r["body"], r
    assert not (files / "evil.txt").exists()
    r = as_other_user({"op": "http", "host": "127.0.0.1", "port": port, "method": "POST", "path": "/message/",
                       "body": json.dumps(UUID_CMD), "headers": {"Content-Type": "application/json"}})
    assert r["status"] == 403, r
    for probe in ("/healthz", "/readyz"):
        r = as_other_user({"op": "http", "host": "127.0.0.1", "port": port, "method": "GET", "path": probe})
        assert r["status"] == 200, (probe, r)
        assert set(json.loads(r["body"])) <= {"status", "uuid"}, r  # health, nothing beyond
    health = json.loads(run(_get(worker.url + "/healthz")))
    assert {"clients", "journal"} <= set(health), health  # the owner sees the details

    async def owner():
        async with Client(worker.url) as c:
            return await c.cmd("uuid")
    assert run(owner()) == "p1"  # the owner (this test's uid) is served as before
    assert metric(worker.url, "fn_worker_peer_refusals_total") == 3
    assert worker.output().count("refused") == 1  # logged once per peer


def test_a_token_holder_is_served_whoever_sends_it(config_dir, port):
    require_other_user()
    write_config(config_dir, "p2", auth_token="s3cret")
    w = WorkerProc(config_dir, "p2", port).wait_ready()
    try:
        r = as_other_user({"op": "ws", "host": "127.0.0.1", "port": port, "path": "/?token=s3cret", "send": UUID_CMD})
        assert r["status"] == 101 and r["reply"]["result"] == "p2", r
        r = as_other_user(upload_action(port, {"Authorization": "Bearer s3cret"}))
        assert r["status"] == 200, r
        assert (config_dir / "workers" / "worker_p2" / "files" / "evil.txt").read_text() == "nobody was here"
        r = as_other_user({"op": "ws", "host": "127.0.0.1", "port": port, "path": "/?token=wrong", "send": UUID_CMD})
        assert r["status"] == 403, r
    finally:
        assert w.stop() == 0, w.output()[-3000:]


def test_the_check_can_be_turned_off(config_dir, port):
    require_other_user()
    write_config(config_dir, "p3", peer_uid_check=False)
    w = WorkerProc(config_dir, "p3", port).wait_ready()
    try:
        r = as_other_user({"op": "ws", "host": "127.0.0.1", "port": port, "path": "/", "send": UUID_CMD})
        assert r["status"] == 101 and r["reply"]["result"] == "p3", r
    finally:
        assert w.stop() == 0, w.output()[-3000:]
# endregion


# region end to end: the subprocess monitor
def test_monitor_spawn_refused_to_another_user_served_to_the_owner_and_a_token(port, tmp_path):
    require_other_user()
    from test_sidecars_support import Hosted

    from sidecars.monitor import run_monitor

    tmp_path.chmod(0o777)  # so that a refusal, not a permission error, is what keeps the file away
    h = Hosted("monitor", run_monitor, ("127.0.0.1", port), kwargs={"kill_timeout": 1.0, "token": "m0n"})
    try:
        h.rec.wait(lambda m: m["type"] == "monitor", 10, "monitor listening")
        def spawn(target, headers=None):
            return {"op": "http", "host": "127.0.0.1", "port": port, "method": "POST", "path": "/spawn",
                    "headers": {"Content-Type": "application/json", **(headers or {})},
                    "body": json.dumps({"cmd": "/usr/bin/touch", "args": [str(target)], "env": {}})}
        r = as_other_user(spawn(tmp_path / "by-nobody"))
        assert r["status"] == 403 and f"uid {NOBODY} refused" in r["body"], r
        r = as_other_user({"op": "http", "host": "127.0.0.1", "port": port, "method": "GET", "path": "/"})
        assert r["status"] == 403, r
        r = as_other_user(spawn(tmp_path / "by-token", {"Authorization": "Bearer m0n"}))
        assert r["status"] == 200 and r["body"] and json.loads(r["body"])["status"] == "success", r
        poll_until(lambda: (tmp_path / "by-token").exists(), 10, what="the token holder's command ran")

        async def owner():
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{port}/spawn",
                                  json={"cmd": "/usr/bin/touch", "args": [str(tmp_path / "by-owner")], "env": {}}) as r:
                    return r.status, await r.json()
        st, body = run(owner())
        assert st == 200 and body["status"] == "success", body
        poll_until(lambda: (tmp_path / "by-owner").exists(), 10, what="the owner's command ran")
        assert not (tmp_path / "by-nobody").exists()
    finally:
        h.close()
# endregion
