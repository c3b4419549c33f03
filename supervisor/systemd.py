"""systemd integration (Type=notify): the notification socket and the watchdog decision.

Only the supervisor's main process talks to systemd (NotifyAccess=main). `Notifier.from_environ`
reads NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID once, at supervisor start, and removes them
from os.environ, so neither the worker (its env is built from os.environ) nor the sidecars
(they inherit os.environ) can ever notify in our name (systemd#2737).

What is sent, and when (runner.py wires it):

  STATUS=<STATE>: <reason>   on every state change; while backing off the reason is the last
                             crash ("crashed: SIGKILL ...; restart in 0.4s")
  READY=1                    once, when the worker has loaded its graph and listens
  WATCHDOG=1                 every WATCHDOG_USEC/2, gated by WatchdogPolicy (below)
  EXTEND_TIMEOUT_USEC=<n>    while PREPARING (venv build / installs): on each progress step and
                             at least every EXTEND_EVERY s, so a long but live build is not
                             killed by TimeoutStartSec; our own install timeouts bound it
  STOPPING=1                 when a stop begins (not for a SIGHUP restart: systemd would treat
                             STOPPING=1 as the service shutting down and arm TimeoutStopSec)

Watchdog decision (WatchdogPolicy, pure, fake-clock tested). A ping vouches for the whole
service until the next one. It is sent when due (half of WATCHDOG_USEC since the last one) and
  - in PREPARING / STARTING / BACKOFF / STOPPING / FATAL: always. The supervisor itself is
    healthy there, and each of those phases is bounded by our own timers (install timeouts,
    start_timeout, the backoff delay, the stop deadline); a worker that is not running yet
    cannot be "hung".
  - in RUNNING: only while the worker's heartbeat is fresh, i.e. heard within
        stale_after = min(heartbeat_timeout, max(ping interval, 2 x heartbeat_interval))
    plus the `busy_for` the worker declared in its last heartbeat. So a ping covers at most
    one ping interval of worker silence (never stricter than two heartbeat intervals, so
    normal jitter does not skip pings; never looser than our own hang limit). A worker that is
    RUNNING with a stale heartbeat is hung: no pings until the supervisor has replaced it
    (then the new worker is STARTING and pings resume at once). If the supervisor fails to
    resolve the hang within WatchdogSec, systemd's watchdog takes over. A generated unit
    sets WatchdogSec >= 2 x heartbeat_timeout + kill time, so with it systemd only fires when
    the supervisor itself is stuck (the ping task runs in the supervisor's one loop).
  - a skipped ping is sent as soon as the heartbeat is fresh again (checked every
    `recheck` s), not one interval later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, MutableMapping

log = logging.getLogger("fn-supervise")

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
EXTEND_STEP = 180.0   # each EXTEND_TIMEOUT_USEC while preparing asks for this much more time
EXTEND_EVERY = 30.0   # ... and is repeated at least this often while preparing
STATUS_MAX = 400      # characters of a STATUS= line
SEND_TIMEOUT = 0.5    # a full notify queue never blocks the supervisor loop for longer


def watchdog_usec_from(environ: MutableMapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC if it is meant for `pid` (sd_watchdog_enabled(3) semantics), else None."""
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = environ.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != pid:
                return None
        except ValueError:
            return None
    return usec


def socket_address(addr: str | None) -> str | bytes | None:
    """NOTIFY_SOCKET -> an AF_UNIX address: an absolute path, or '@name' -> abstract b'\\0name'."""
    if not addr:
        return None
    if addr.startswith("@"):
        return b"\0" + addr[1:].encode()
    if addr.startswith("/"):
        return addr
    return None  # vsock: and relative paths are not supported (sd_notify(3) ignores them too)


def one_line(text: str, limit: int = STATUS_MAX) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Notifier:
    """sd_notify(3) over AF_UNIX datagrams. Silent (every call a no-op) without NOTIFY_SOCKET."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._addr = socket_address(address)
        self._sock: socket.socket | None = None
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, scrub: bool = True,
                     pid: int | None = None) -> "Notifier":
        env = os.environ if environ is None else environ
        n = cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec_from(env, os.getpid() if pid is None else pid))
        if scrub:
            for k in ENV_VARS:
                env.pop(k, None)
        return n

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> bool:
        if self._addr is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendto(data, self._addr)
        except OSError as e:
            self.failed += 1
            if self.failed <= 3 or self.failed % 100 == 0:
                log.warning("sd_notify to %s failed (%s): %s", self.address, e, fields[0][:40] if fields else "")
            return False
        self.sent += 1
        return True

    def status(self, text: str) -> bool:
        return self.send("STATUS=" + one_line(text))

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *(["STATUS=" + one_line(status)] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *(["STATUS=" + one_line(status)] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def transition(self, state: str, reason: str, *, stopping: bool, preparing: bool) -> None:
        """A Supervisor's state change: STOPPING=1 for a stop (not a restart), more time to prepare."""
        status = f"{state}: {reason}" if reason else state
        if stopping:
            self.stopping(status)
        else:
            self.status(status)
        if preparing:
            self.extend_timeout(EXTEND_STEP)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass
class Probe:
    """What the watchdog looks at, read from the supervisor each tick."""
    state: str                    # a State value ("RUNNING", ...)
    heartbeat_last: float | None  # monotonic time of the current worker's last heartbeat (or ready)
    busy_for: float               # seconds the worker declared busy in its last heartbeat
    heartbeat_timeout: float
    heartbeat_interval: float


def supervisor_probe(sup: Any) -> Probe:
    """The Probe of a runner.Supervisor (its state, its current worker's heartbeats)."""
    h = sup.health
    hb = sup.worker_cfg.get("heartbeat_interval")
    return Probe(state=sup.sm.state.value, heartbeat_last=h.last if h is not None else None,
                 busy_for=h.busy_for if h is not None else 0.0, heartbeat_timeout=sup.cfg.heartbeat_timeout,
                 heartbeat_interval=float(hb) if isinstance(hb, (int, float)) and hb > 0 else 1.0)


class WatchdogPolicy:
    """When to send WATCHDOG=1. Pure: the caller passes `now` and a Probe."""

    def __init__(self, watchdog_usec: int, recheck: float = 0.05):
        self.interval = watchdog_usec / 2_000_000.0
        self.recheck = min(recheck, self.interval / 4)
        self.last_ping: float | None = None
        self.skipped = 0

    def stale_after(self, p: Probe) -> float:
        return min(p.heartbeat_timeout, max(self.interval, 2.0 * p.heartbeat_interval))

    def healthy(self, now: float, p: Probe) -> bool:
        if p.state != "RUNNING":
            return True
        if p.heartbeat_last is None:
            return False
        return now - p.heartbeat_last < self.stale_after(p) + max(0.0, p.busy_for)

    def due(self, now: float) -> bool:
        return self.last_ping is None or now - self.last_ping >= self.interval

    def decide(self, now: float, p: Probe) -> bool:
        """True = send WATCHDOG=1 now (the ping is recorded)."""
        if not self.due(now):
            return False
        if not self.healthy(now, p):
            self.skipped += 1
            return False
        self.last_ping = now
        return True

    def next_check(self, now: float) -> float:
        """Seconds until decide() should be asked again."""
        if self.last_ping is not None and not self.due(now):
            return max(0.0, self.last_ping + self.interval - now)
        return self.recheck  # due but withheld: look again soon


async def keepalive(notifier: Notifier, probe: Callable[[], Probe],
                    clock: Callable[[], float] = time.monotonic) -> None:
    """The timer task in the supervisor loop: watchdog pings and EXTEND_TIMEOUT_USEC while
    preparing. Runs until cancelled; does nothing without NOTIFY_SOCKET."""
    if not notifier.enabled:
        return
    wd = WatchdogPolicy(notifier.watchdog_usec) if notifier.watchdog_usec else None
    next_extend = 0.0
    while True:
        now = clock()
        p = probe()
        waits = [EXTEND_EVERY]
        if wd is not None:
            if wd.decide(now, p):
                notifier.watchdog()
            waits.append(wd.next_check(clock()))
        if p.state == "PREPARING":
            if now >= next_extend:
                notifier.extend_timeout(EXTEND_STEP)
                next_extend = now + EXTEND_EVERY
            waits.append(max(0.0, next_extend - now))
        else:
            next_extend = 0.0
        await asyncio.sleep(max(0.01, min(waits)))
