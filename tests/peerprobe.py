"""A client that runs as another local user (`setpriv --reuid=65534 ...`): the system python3,
stdlib only, passed with `-c` (another user cannot read files under the test's tmp folder).

    as_other_user(action) -> dict   action: {"op": "http"|"ws"|"hold", ...}; see PROBE below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

NOBODY = 65534

PROBE = r'''
import base64, json, os, socket, ssl, struct, sys
a = json.loads(sys.argv[1])
def conn():
    s = socket.create_connection((a["host"], a["port"]), timeout=10)
    if a.get("cadata"):  # TLS, trusting the PEM given (the test's files are not readable by this user)
        s = ssl.create_default_context(cadata=a["cadata"]).wrap_socket(s, server_hostname=a["host"])
    return s
def http():
    s = conn()
    body = a.get("body", "").encode()
    hdrs = "".join(f"{k}: {v}\r\n" for k, v in a.get("headers", {}).items())
    s.sendall((f"{a['method']} {a['path']} HTTP/1.1\r\nHost: {a['host']}\r\nConnection: close\r\n"
               f"Content-Length: {len(body)}\r\n{hdrs}\r\n").encode() + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return {"status": int(head.split()[1]), "body": rest.decode(errors="replace")}
def ws():
    s = conn()
    key = base64.b64encode(os.urandom(16)).decode()
    hdrs = "".join(f"{k}: {v}\r\n" for k, v in a.get("headers", {}).items())
    s.sendall((f"GET {a['path']} HTTP/1.1\r\nHost: {a['host']}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{hdrs}\r\n").encode())
    f = s.makefile("rb")
    status = int(f.readline().split()[1])
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    out = {"status": status}
    if status != 101:
        out["body"] = f.read(length).decode(errors="replace")
        return out
    if "send" in a:
        p = json.dumps(a["send"]).encode()
        mask = os.urandom(4)
        hdr = bytes([0x81]) + (bytes([0x80 | len(p)]) if len(p) < 126 else bytes([0x80 | 126]) + struct.pack("!H", len(p)))
        s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(p)))
        while True:
            b0, b1 = f.read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", f.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", f.read(8))[0]
            payload = f.read(n)
            if b0 & 0x0F == 1:
                msg = json.loads(payload)
                if msg.get("id") == a["send"].get("id"):
                    out["reply"] = msg
                    return out
    return out
def hold():
    s = conn()
    print(json.dumps({"port": s.getsockname()[1]}), flush=True)
    sys.stdin.read()
    return None
r = {"http": http, "ws": ws, "hold": hold}[a["op"]]()
if r is not None:
    print(json.dumps(r))
'''


def setpriv_argv() -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3", "-c", PROBE]


def require_other_user() -> None:
    """Skip (with the reason) where this test cannot run a process as another uid."""
    if not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs setpriv and /usr/bin/python3 to run a probe as another user")
    if os.getuid() == NOBODY:
        pytest.skip("the tests already run as nobody: no other uid to probe from")
    try:
        r = subprocess.run([*setpriv_argv()[:5], "-c", "import os; print(os.getuid())"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot switch to uid {NOBODY}: {e}")
    if r.returncode != 0 or r.stdout.strip() != str(NOBODY):
        pytest.skip(f"cannot switch to uid {NOBODY} (needs root or CAP_SETUID): {r.stderr.strip()[:200]}")


def as_other_user(action: dict, timeout: float = 20.0) -> dict:
    r = subprocess.run([*setpriv_argv(), json.dumps(action)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def hold_as_other_user(host: str, port: int) -> subprocess.Popen:
    """A connection held open by a nobody process (end it by closing its stdin)."""
    return subprocess.Popen([*setpriv_argv(), json.dumps({"op": "hold", "host": host, "port": port})],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
