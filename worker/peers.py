"""Who is on the other end of a loopback connection, and whether to serve them.

Any local user can reach a port on 127.0.0.1; the worker runs arbitrary Python for its owner
and its subprocess monitor runs commands as the owner. So a connection over loopback is served
only when the peer process belongs to the owner (or root, who can act as the owner anyway),
unless it carries the worker's token. On Linux the peer's own socket is the one whose local
address is the peer's and whose remote address is ours, and the kernel knows its owner's uid:
asked by netlink sock_diag (one exact lookup, ~50 us) or, where netlink is not allowed, read from
/proc/net/tcp{,6} the way identd does (a walk over every socket: 5-17 ms with 2000 open).

`decide` is the pure rule (tested without sockets); `peer_uid` is the /proc lookup; both the
worker's server and the monitor sidecar call `check`. Stdlib only: the monitor imports this
from the supervisor's interpreter, the worker from its venv.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import weakref
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fn_supervise.peers")

# Paths every local user may reach: probes (systemd, k8s, monitoring) run as other users and
# learn nothing beyond health there.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
TIME_WAIT = "06"  # a socket without an owner any more: its uid column reads 0


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""  # one line, for the 403 body and the log
    gone: bool = False  # refused because the peer hung up before it could be identified


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a v4 client of a dual-stack socket
    return ip


def is_local_peer(peer_ip: str, local_ip: str) -> bool:
    """Over loopback, or from one of our own addresses (the machine talking to itself)."""
    p, l = _ip(peer_ip), _ip(local_ip)
    return p is not None and (p.is_loopback or p == l)


def decide(*, enabled: bool, path: str, peer_ip: str, local_ip: str, token_ok: bool,
           peer_uid: int | None, owner_uid: int) -> Verdict:
    """Serve this request? Remote peers pass here (the token and Origin rules judge them)."""
    if not enabled or path in OPEN_PATHS or token_ok or not is_local_peer(peer_ip, local_ip):
        return Verdict(True)
    if peer_uid is not None and peer_uid in (owner_uid, 0):
        return Verdict(True)
    who = "an unknown user" if peer_uid is None else f"uid {peer_uid}"
    return Verdict(False, f"local connection from {who} refused: this worker belongs to uid {owner_uid} "
                          "(send the worker's token to be served)")


def _hex_addr(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, v6: bool) -> str:
    """An address as /proc/net/tcp{,6} prints it: the address in host-order 32-bit words."""
    if v6:
        if isinstance(ip, ipaddress.IPv4Address):
            ip = ipaddress.IPv6Address("::ffff:" + str(ip))
        raw = ip.packed
    else:
        if not isinstance(ip, ipaddress.IPv4Address):
            return ""
        raw = ip.packed
    words = [raw[i:i + 4] for i in range(0, len(raw), 4)]
    native = "".join(int.from_bytes(w, "big").to_bytes(4, "little" if _LITTLE else "big").hex() for w in words)
    return f"{native.upper()}:{port:04X}"


_LITTLE = socket.htonl(1) != 1


def parse_uid(table: str, local: str, remote: str) -> int | None:
    """The uid column of the live entry (local, remote) in one /proc/net/tcp* text, or None."""
    for line in table.splitlines()[1:]:
        f = line.split()
        if len(f) > 9 and f[1] == local and f[2] == remote and f[3] != TIME_WAIT and f[9] != "0":
            return int(f[7])  # f[9] is the inode: 0 for a socket no process holds any more
    return None


# sock_diag (what `ss` uses): the kernel looks up one socket by its address pair, O(1), where
# reading /proc/net/tcp walks every socket of the machine (5-17 ms with 2000 open).
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, NLMSG_ERROR = 4, 20, 1, 2
_LIVE_STATES = 0xFFF & ~(1 << 6)  # every TCP state but TIME_WAIT
_NOCOOKIE = 0xFFFFFFFF
TCP_LISTEN = 10


def diag_uid(peer_ip: ipaddress.IPv4Address | ipaddress.IPv6Address, peer_port: int,
             our_ip: ipaddress.IPv4Address | ipaddress.IPv6Address, our_port: int) -> int | None:
    """The uid of the socket (peer -> ours) by netlink sock_diag, None if none or no netlink."""
    family = socket.AF_INET if isinstance(peer_ip, ipaddress.IPv4Address) else socket.AF_INET6

    def addr(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
        return ip.packed.ljust(16, b"\0")
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _LIVE_STATES)
    req += struct.pack("!HH", peer_port, our_port) + addr(peer_ip) + addr(our_ip)
    req += struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE)
    msg = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.sendto(msg, (0, 0))
            data = nl.recv(8192)
    except (OSError, AttributeError):
        return None
    if len(data) < 16 or struct.unpack_from("=H", data, 4)[0] == NLMSG_ERROR:
        return None  # ENOENT: no such socket (gone, or not on this machine)
    body = data[16:]
    if len(body) < 72 or body[0] != family or body[1] == TCP_LISTEN:
        return None  # the kernel falls back to a listener on that port: not our peer
    if struct.unpack_from("!HH", body, 4) != (peer_port, our_port):
        return None
    uid, inode = struct.unpack_from("=II", body, 64)
    return uid if inode else None  # inode 0: a socket no process holds any more


def peer_uid(peer: tuple, ours: tuple) -> int | None:
    """The uid of the process holding the other end of our connection ours <- peer, or None
    (the peer is already gone, or neither netlink nor /proc is there)."""
    pip, lip = _ip(peer[0]), _ip(ours[0])
    if pip is None or lip is None:
        return None
    if isinstance(pip, type(lip)):
        uid = diag_uid(pip, int(peer[1]), lip, int(ours[1]))
        if uid is not None:
            return uid
    return proc_uid(pip, int(peer[1]), lip, int(ours[1]))


def proc_uid(pip: ipaddress.IPv4Address | ipaddress.IPv6Address, pport: int,
             lip: ipaddress.IPv4Address | ipaddress.IPv6Address, lport: int) -> int | None:
    """The same from /proc/net/tcp{,6} (identd's way), where netlink is not allowed."""
    peer, ours = (pip, pport), (lip, lport)
    for path in PROC_TABLES:
        v6 = path.endswith("6")
        local, remote = _hex_addr(pip, int(peer[1]), v6), _hex_addr(lip, int(ours[1]), v6)
        if not local or not remote:
            continue
        try:
            with open(path) as f:
                uid = parse_uid(f.read(), local, remote)
        except OSError:
            continue
        if uid is not None:
            return uid
    return None


# tcpi_state of our end: ESTABLISHED while the peer may still be there; CLOSE after its reset,
# CLOSE_WAIT / LAST_ACK after its FIN.
TCP_ESTABLISHED = 1


def peer_hung_up(transport: Any) -> bool:
    """Our end of the connection says the peer reset or closed it (TCP_INFO, no side effect):
    then its socket is gone, which is why its uid could not be read."""
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except (OSError, AttributeError, ValueError):
        return False
    return bool(info) and info[0] != TCP_ESTABLISHED


def available() -> bool:
    return os.path.exists(PROC_TABLES[0])  # Linux (netlink sock_diag, or /proc as the fallback)


def enabled_by(config_value: Any) -> bool:
    """The `peer_uid_check` config key, overridden by FN_SUPERVISE_PEER_UID_CHECK=0|1."""
    env = os.environ.get("FN_SUPERVISE_PEER_UID_CHECK")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    return config_value is not False


class PeerGate:
    """The check as the servers use it: one uid lookup per connection, one log line per peer
    uid, a count of refusals for /metrics."""

    def __init__(self, enabled: bool, owner_uid: int | None = None, what: str = "worker"):
        self.enabled = enabled and available()
        if enabled and not self.enabled:
            log.warning("peer uid check unavailable here (no /proc/net/tcp): local users are not told apart")
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self.what = what
        self.refused = 0
        self._logged: set[Any] = set()
        # transport -> peer uid: one lookup per connection (never by address: ports are reused)
        self._uids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def check(self, transport: Any, path: str, token_ok: bool) -> Verdict:
        """The verdict for a request; a refusal is counted and logged (once per uid)."""
        v = self.verdict(transport, path, token_ok)
        if not v.allowed and not v.gone:
            self.refused += 1
            uid = self._uids.get(transport) if transport is not None else None
            if uid not in self._logged and len(self._logged) < 1024:
                self._logged.add(uid)
                log.warning("%s: %s", self.what, v.reason)
        return v

    def verdict(self, transport: Any, path: str, token_ok: bool) -> Verdict:
        """The verdict alone, nothing counted or logged (what /healthz asks to decide how much to say)."""
        if not self.enabled:
            return Verdict(True)
        if transport is None:  # aiohttp drops it at connection_lost: nobody left to serve
            return Verdict(path in OPEN_PATHS or token_ok, "the peer hung up before it could be identified", gone=True)
        peer, ours = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        if not (isinstance(peer, tuple) and isinstance(ours, tuple)):
            return Verdict(True)  # a Unix socket: only its mode bits let anyone in
        uid = self._uids.get(transport, -1)
        if uid == -1 and is_local_peer(peer[0], ours[0]) and not token_ok and path not in OPEN_PATHS:
            uid = peer_uid(peer, ours)
            try:
                self._uids[transport] = uid
            except TypeError:  # a transport without weak references: look up every time
                pass
        v = decide(enabled=True, path=path, peer_ip=peer[0], local_ip=ours[0], token_ok=token_ok,
                   peer_uid=None if uid == -1 else uid, owner_uid=self.owner_uid)
        if not v.allowed and uid is None and peer_hung_up(transport):
            # A client that gave up (a reset mid-handshake): nobody is there to refuse, so no
            # warning about an unknown user and no count; still not served.
            return Verdict(False, "the peer hung up before it could be identified", gone=True)
        return v
