"""Liveness answers on connections the main loop serves, while a node holds that loop.

The main loop serves most connections with no thread hop. While one turn of it runs long (a node
blocking for seconds), the I/O thread borrows the plain sockets of those connections: it reads
their bytes, answers WebSocket pings, JSON pings and the liveness commands (`uuid`, `heartbeat`,
...) itself, and keeps every other byte, in order, for the main loop. The main loop takes the
socket back before it reads from it again: at the start of its next select (wakeup.py), or in
its own recv if a read of this socket was already queued in the stalled turn. Either way the
kept bytes come first, so the main loop sees the byte stream as the client sent it, minus the
frames answered here.

WatchedSocket stands in for the transport's socket (asyncio's selector transport calls only
recv, send and, on 3.12+, sendmsg on it; the rest is passed through). One lock per connection
orders every read and write of both threads: a reply from here never splits or interleaves a
frame of the main loop's, and is written only when nothing of the main loop's is pending on the
socket (else the frame it answers is kept for the main loop, which answers it after the stall).

Not borrowed: TLS connections (their bytes are encrypted records, not frames), connections that
deflate (permessage-deflate), and a socket whose reader sits inside a frame. A frame this module
does not parse (compressed, fragmented, close, or larger than `limit`) stops parsing for that
socket until it is given back: from there on every byte is kept.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, Callable

from .wsread import unmask

log = logging.getLogger("fn_supervise.worker.stallwatch")

MAX_KEPT = 1 << 20  # bytes read and kept per borrowed socket; beyond, the kernel holds the rest
_READS = 16  # recv calls per socket per watch tick


def enabled() -> bool:
    """FN_SUPERVISE_STALL_WATCH=0 turns the watchdog off (connections on the main loop then wait
    for it during a block, as every connection of the stock worker does)."""
    return os.environ.get("FN_SUPERVISE_STALL_WATCH", "1") != "0"


def _frame(opcode: int, payload: bytes) -> bytes:
    """A short server frame (control frames and small replies)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def scan(buf: bytes | bytearray, limit: int):
    """The first client frame of buf: (opcode, payload, length in buf), None while incomplete,
    or "opaque" for a frame this module does not parse (the rest is then kept unparsed)."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    opcode = b0 & 0x0F
    if not b0 & 0x80 or b0 & 0x70 or opcode not in (0x1, 0x2, 0x9, 0xA) or not b1 & 0x80:
        return "opaque"  # fragmented, compressed (RSV1), close, unknown, or unmasked
    length, head = b1 & 0x7F, 2
    if length == 126:
        head = 4
        if len(buf) < head:
            return None
        length = int.from_bytes(buf[2:4], "big")
    elif length == 127:
        head = 10
        if len(buf) < head:
            return None
        length = int.from_bytes(buf[2:10], "big")
    if length > limit or (opcode >= 0x8 and length > 125):
        return "opaque"  # too large to hold here, or a control frame aiohttp rejects
    end = head + 4 + length
    if len(buf) < end:
        return None
    return opcode, unmask(bytes(buf[head:head + 4]), bytes(buf[head + 4:end])), end


class WatchedSocket:
    """The transport's socket, lent to the I/O thread while the main loop stalls."""

    __slots__ = ("_sock", "transport", "tap", "main_quiet", "limit", "lock", "lent", "inbuf", "kept", "opaque",
                 "ended", "partial", "out")  # recv and send are on the edit path: each attribute counts

    def __init__(self, sock: socket.socket, transport: Any, tap: Any, main_quiet: Callable[[], bool],
                 limit: int):
        self._sock = sock
        self.transport = transport
        self.tap = tap  # wsread.FrameTap: where the main loop's reader stands in the stream
        self.main_quiet = main_quiet  # no frame of the main loop's is half written (its write loop)
        self.limit = limit
        self.lock = threading.Lock()
        self.lent = False  # the I/O thread reads this socket now
        self.inbuf = bytearray()  # read while lent, not yet a whole frame
        self.kept = bytearray()  # read while lent, for the main loop
        self.opaque = False  # stop parsing: keep every byte
        self.ended = False  # EOF or an error seen while lent: the main loop reads it itself
        self.partial = False  # the main loop's last send left bytes in the transport's buffer
        self.out = b""  # our reply frames the socket has not taken yet (sent before anything else)

    def __getattr__(self, name: str) -> Any:  # fileno, shutdown, getsockopt, ...
        return getattr(self._sock, name)

    # region the main loop's side (asyncio's transport calls these)
    def recv(self, n: int) -> bytes:
        lock = self.lock
        lock.acquire()
        try:
            if self.lent:
                data = self._take_back()
                if data:
                    return data  # the socket, if readable still, is reported again by select
            data = self._sock.recv(n)
            if data:
                self.tap.idle = False  # its feed_data marks the reader at rest again
            return data
        finally:
            lock.release()

    def send(self, data: Any) -> int:
        lock = self.lock
        lock.acquire()
        try:
            if self.out and not self._send_out():
                self.partial = True
                raise BlockingIOError  # the transport buffers data and retries
            n = self._sock.send(data)
            self.partial = n != len(data)
            return n
        finally:
            lock.release()

    def sendmsg(self, buffers: Any, *args: Any) -> int:  # asyncio 3.12+
        with self.lock:
            if self.out and not self._send_out():
                self.partial = True
                raise BlockingIOError
            n = self._sock.sendmsg(buffers, *args)
            self.partial = n < sum(len(b) for b in buffers)
            return n

    def close(self) -> None:
        with self.lock:
            self.lent = False
            self._sock.close()

    def give_back(self) -> None:
        """On the main loop: the kept bytes go to the connection's reader before anything else."""
        with self.lock:
            if not self.lent:
                return
            data = self._take_back()
            out, self.out = self.out, b""
            if out and (self.partial or self.transport.get_write_buffer_size()):
                self.out = out  # the next send of the transport takes it first
                out = b""
        if out:
            self.transport.write(out)  # the rest of our reply, before anything of the main loop's
        if data and not self.transport.is_closing():
            try:
                self.transport.get_protocol().data_received(data)
            except Exception:  # as asyncio's own read path does: this connection ends, not the loop
                log.exception("a connection failed on bytes read during a stall")
                self.transport.abort()

    def _take_back(self) -> bytes:
        self.lent = False
        self.opaque = self.ended = False
        data = bytes(self.kept + self.inbuf)
        self.kept.clear()
        self.inbuf.clear()
        if data:
            self.tap.idle = False
        return data
    # endregion

    # region the I/O thread's side
    def serve(self, answer: Callable[[str], str | None]) -> bool:
        """Borrow the socket if its reader is at rest between frames, then read and answer what
        came; True while lent. answer(text) is the reply to a liveness message, else None."""
        with self.lock:
            if not self.lent:
                tap = self.tap
                if (not tap.idle or tap._owed or self.transport.is_closing()
                        or self._sock.fileno() < 0):
                    return False
                # The reader's partial frame comes with the socket: the next bytes complete it.
                self.inbuf += tap._buf
                tap._buf = b""
                self.lent = True
            if self.out:
                self._send_out()
            for _ in range(_READS):
                if self.ended or len(self.kept) + len(self.inbuf) >= MAX_KEPT:
                    break
                try:
                    data = self._sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self.ended = True  # the main loop's own recv sees the error
                    break
                if not data:
                    self.ended = True  # EOF: stays readable for the main loop
                    break
                self.inbuf += data
            self._parse(answer)
            return True

    def _parse(self, answer: Callable[[str], str | None]) -> None:
        while self.inbuf and not self.opaque:
            got = scan(self.inbuf, self.limit)
            if got is None:
                return
            if got == "opaque":
                self.opaque = True
                break
            opcode, payload, end = got
            reply = None
            if opcode == 0x9:
                reply = _frame(0xA, payload)
            elif opcode == 0x1:
                try:
                    text = answer(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    text = None  # the main loop closes with 1007, as ever
                except Exception:  # a bug here must not end the watch: the main loop answers it
                    log.exception("a liveness reply failed")
                    text = None
                if text is not None:
                    reply = _frame(0x1, text.encode("utf-8"))
            if reply is None or not self._write(reply):
                self.kept += self.inbuf[:end]  # the main loop reads (and answers) it after the stall
            del self.inbuf[:end]
        if self.opaque:
            self.kept += self.inbuf
            self.inbuf.clear()

    def _write(self, frame: bytes) -> bool:
        """Our whole frame, after what we wrote before, never inside one of the main loop's."""
        if not self.out and (self.partial or self.transport.get_write_buffer_size() or not self.main_quiet()):
            return False
        self.out += frame
        self._send_out()
        return True

    def _send_out(self) -> bool:
        """Send what is left of our frames; True once all went."""
        try:
            n = self._sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.out = b""  # the connection is gone: the main loop learns it on its own
            return True
        self.out = self.out[n:]
        return not self.out
    # endregion
