"""Wire encoding of the FuncNodes protocol: JSON envelopes, value previews, binary frames.

Byte-compatible with funcnodes-worker 1.6.0 (spec section 1), minus its bugs: empty payloads
still produce a frame, and header values that would break the `k=v; ` format are escaped.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
import re
from random import getrandbits
from typing import Any
from urllib.parse import quote

try:  # a C codec for the plain JSON of the edit path (see plain_loads / plain_dumps)
    import orjson as _orjson
except ImportError:  # a worker venv built before it was a dependency: the stdlib alone
    _orjson = None

_fn = None


def _core():
    # funcnodes-core is imported on first use, so the server can listen (and answer pings)
    # while the worker is still importing it.
    global _fn
    if _fn is None:
        import funcnodes_core

        _fn = funcnodes_core
    return _fn


_encoder = None


def dumps(obj: Any) -> str:
    # One encoder instance, not one per message as json.dumps(cls=...) makes: the same defaults,
    # and encode() keeps no state between calls (safe from both threads).
    global _encoder
    if _encoder is None:
        _encoder = _core().JSONEncoder()
    return _encoder.encode(obj)


def loads(text: str | bytes) -> Any:
    """JSON with funcnodes-core's value decoders applied (its JSONDecoder turns "<NoValue>" into
    the NoValue sentinel, as the stock worker does). That decoder's object_hook walks the whole
    subtree of every object it is handed, and json calls it for every object, bottom up: each
    leaf is decoded once per enclosing object (13 % of a 1000-node graph's load in py-spy). The C
    parser and one walk give the same result."""
    data = json.loads(text)
    decoders = tuple(_core().JSONDecoder.decoder)
    return _decode_leaves(data, decoders, False) if decoders else data


def _decode_leaves(obj: Any, decoders: tuple, in_object: bool) -> Any:
    # As the hook does: leaves are decoded only inside an object (json never hands it a bare
    # top-level value or a top-level list's items).
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _decode_leaves(value, decoders, True)  # same keys: no resize while iterating
        return obj
    if isinstance(obj, list):
        return [_decode_leaves(item, decoders, in_object) for item in obj]
    if in_object:
        for dec in decoders:
            res, handled = dec(obj)
            if handled:
                return res
    return obj


# Deeper messages are refused before anything walks them: the parser, revive() and the encoders
# recurse, and a '[' * 100000 frame must be an error reply, not a RecursionError that ends the
# connection. 128 levels is far beyond any FuncNodes message.
MAX_JSON_DEPTH = 128


# orjson answers as the stdlib does for every text it accepts, but for integers past 64 bits,
# which it turns into floats: a text with a run of 19 digits is left to the stdlib (found by
# zeroing the digits and searching for 19 zeros: 0.2 us for an edit's frame, a regex takes 1.1).
_ZEROED = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19


def plain_loads(text: str | bytes) -> Any:
    """json.loads's value, through orjson where that is the same value (0.6 instead of 1.5 us for
    an edit's frame). What orjson refuses (NaN, 1e400, deep nesting, a lone surrogate, UTF-16)
    the stdlib decides."""
    if _orjson is not None:
        try:
            raw = text.encode() if type(text) is str else text
        except UnicodeEncodeError:
            raw = None
        if raw is not None and raw.translate(_ZEROED).find(_NINETEEN_DIGITS) < 0:
            try:
                return _orjson.loads(raw)
            except _orjson.JSONDecodeError:
                pass
    return json.loads(text)


def _refuse(obj: Any) -> Any:
    raise TypeError


# Types orjson would write itself where the stdlib calls default() (or, for a subclass of dict,
# str, int or list, its own methods): handed to _refuse instead, so the stdlib decides.
_PLAIN_OPTIONS = (_orjson.OPT_PASSTHROUGH_DATACLASS | _orjson.OPT_PASSTHROUGH_DATETIME
                  | _orjson.OPT_PASSTHROUGH_SUBCLASS) if _orjson else 0


def plain_dumps(obj: Any) -> bytes | None:
    """Compact UTF-8 JSON of plain data (dict, list, str, int, float, bool, None) by orjson, or
    None where only the stdlib can say what the text is or that there is none: another type, a
    non-str key, an int past 64 bits, a lone surrogate, or a `null` in the text (orjson writes
    NaN and infinities as null; the stdlib writes NaN or refuses it). Unlike the stdlib, orjson
    writes an Enum member or a UUID as its value; callers hand it data that holds neither."""
    if _orjson is None:
        return None
    try:
        out = _orjson.dumps(obj, default=_refuse, option=_PLAIN_OPTIONS)
    except (_orjson.JSONEncodeError, TypeError):
        return None
    return None if b"null" in out else out


class MessageError(ValueError):
    """A client message that cannot be parsed; the text says why."""


def parse_message(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with bounded nesting (stdlib only: pings need no funcnodes-core)."""
    try:
        data = plain_loads(text)
    except RecursionError:
        raise MessageError(f"message is nested too deeply (more than {max_depth} levels)") from None
    except ValueError as e:
        raise MessageError(f"message is not valid JSON: {e}") from None
    # Counting brackets is cheap and bounds the depth from above; only then walk the tree.
    if (text.count("[") + text.count("{") > max_depth) and _deeper_than(data, max_depth):
        raise MessageError(f"message is nested too deeply (more than {max_depth} levels)")
    return data


def _deeper_than(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:  # iterative: this is what must not recurse
        o, d = stack.pop()
        children = o.values() if isinstance(o, dict) else o if isinstance(o, list) else None
        if children is None:
            continue
        if d > limit:
            return True
        stack.extend((v, d + 1) for v in children if isinstance(v, (dict, list)))
    return False


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_SPACE = re.compile(r"\s*")
_SPECIAL = re.compile(r'["\[\]{}]')
_TAIL_ID = re.compile(
    r'[,{]\s*"id"\s*:\s*("(?:[^"\\]|\\.){0,1024}"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|null|true|false)\s*}\s*$')


def peek_id(text: str, scan: int = 1 << 16, tokens: int = 10000) -> Any:
    """The top-level "id" of a JSON object message too large to parse, or None. Clients put it
    first or last, so the first `scan` characters are walked (strings skipped by a regex, at
    most `tokens` steps: this runs on the I/O loop), then the last member is tried."""
    head = text[:scan]
    depth, i = 0, 0
    dec = json.JSONDecoder()
    for _ in range(tokens):
        m = _SPECIAL.search(head, i)
        if m is None:
            break
        i = m.start()
        c = head[i]
        if c != '"':
            depth += 1 if c in "[{" else -1
            i += 1
            continue
        m = _STRING.match(head, i)
        if m is None:
            break  # a string longer than the scan
        i = m.end()
        if depth == 1 and m.group(0) == '"id"':
            j = _SPACE.match(head, i).end()
            if j < len(head) and head[j] == ":":
                try:
                    value, _ = dec.raw_decode(head, _SPACE.match(head, j + 1).end())
                except ValueError:
                    break
                return value if isinstance(value, (str, int, float, bool)) or value is None else None
    m = _TAIL_ID.search(text[-2048:])
    if m is not None:
        try:
            return json.loads(m.group(1))
        except ValueError:
            return None
    return None


def may_hold_novalue(text: str) -> bool:
    """Whether a message's text can parse to a "<NoValue>" string: written plainly, or with some
    character escaped as \\uXXXX. Most edits hold neither, and skip revive's walk (~2 us)."""
    return "<NoValue>" in text or "\\u" in text


def revive(obj: Any) -> Any:
    """What the core decoder does to a parsed message: "<NoValue>" becomes the NoValue sentinel."""
    if isinstance(obj, str):
        return _core().NoValue if obj == "<NoValue>" else obj
    if isinstance(obj, dict):
        return {k: revive(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [revive(v) for v in obj]
    return obj


def preview(value: Any) -> Any:
    """The JSON preview of a value (long strings cut, lists to 10 items, NaN to null)."""
    return _core().JSONEncoder.apply_custom_encoding(value, preview=True)


def to_jsonable(obj: Any) -> Any:
    return json.loads(dumps(obj))


def result(res: Any, msg_id: Any) -> dict:
    return {"type": "result", "result": res, "id": msg_id}


_RESULT = '{"type": "result", "result": '
_SCALARS = {  # the stdlib's spelling of a plain scalar, as funcnodes-core's encoder writes it
    type(None): lambda v: "null",
    bool: lambda v: "true" if v else "false",
    int: int.__repr__,
    str: encode_basestring_ascii,
}


def result_text(res: Any, msg_id: Any) -> str:
    """dumps(result(res, msg_id)), the same text. Most edits answer None or a scalar (set_io_value
    answers the value): that reply is assembled without funcnodes-core's encoder (5 us -> 0.3 us
    per edit, on the path to the ack)."""
    spell = _SCALARS.get(type(res))
    if spell is None and type(res) is float and res - res == 0:  # finite: NaN and infinities are the encoder's
        spell = float.__repr__
    if spell is not None:
        if type(msg_id) is str:
            return _RESULT + spell(res) + ', "id": ' + encode_basestring_ascii(msg_id) + "}"
        if msg_id is None or type(msg_id) is int:
            return _RESULT + spell(res) + ', "id": ' + json.dumps(msg_id) + "}"
    return dumps(result(res, msg_id))


def error(message: str, tb: list[str], msg_id: Any) -> dict:
    return {"type": "error", "error": message, "tb": tb, "id": msg_id}


def nsevent(event: str, data: dict) -> dict:
    return {"type": "nsevent", "event": event, "data": data}


def workerevent(event: str, **kwargs: Any) -> dict:
    # Nested twice, as the stock worker does and clients expect.
    return {"type": "workerevent", "event": event, "data": {"data": kwargs}}


def progress(message: str, status: str, progress: float, blocking: bool) -> dict:
    return {
        "type": "progress",
        "message": message,
        "status": status,
        "progress": progress,
        "blocking": blocking,
    }


def _header_value(v: Any) -> str:
    s = v if type(v) is str else str(v)
    # Node uuids are client-chosen; ';' '=' or CR/LF would corrupt the header, and a lone
    # surrogate (valid in a JSON string) cannot be encoded at all.
    if _HEADER_UNSAFE.search(s) is not None or not s.isascii() and not _encodable(s):
        return quote(s.encode("utf-8", "surrogatepass"), safe="")
    return s


_HEADER_UNSAFE = re.compile(r"[;=\r\n%]")


def _msgid() -> str:
    """A random (version 4) UUID string: uuid.uuid4() reads os.urandom, a syscall per value sent."""
    h = "%032x" % (getrandbits(128) & _V4_MASK | _V4_BITS)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_V4_MASK = ~(0xF000 << 64 | 0xC000 << 48) & ((1 << 128) - 1)  # clear the version and variant bits
_V4_BITS = 0x4000 << 64 | 0x8000 << 48  # version 4, RFC 4122 variant


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_HEADS: dict[tuple, str] = {}


def _head_text(header: dict[str, Any]) -> str:
    return "; ".join([f"{k}={_header_value(v)}" for k, v in header.items()])


def binary_frames(header: dict[str, Any], payload: bytes, max_size: int, repeats: bool = False) -> list[bytes]:
    """Frames `chunk=i/n;msgid=<uuid>;k=v; k=v\\r\\n\\r\\n<payload part>`. repeats: the header
    comes again and again (a value frame's: node, io, mime), so its text is kept."""
    msgid = _msgid()
    if repeats:
        key = tuple(header.items())
        head = _HEADS.get(key)
        if head is None:
            if len(_HEADS) >= 4096:  # bounded: a graph's (node, io, mime) triples, not a stream's
                _HEADS.clear()
            head = _HEADS[key] = _head_text(header)
    else:
        head = _head_text(header)
    single = f"chunk=1/1;msgid={msgid};{head}\r\n\r\n".encode()
    chunk = max(1, max_size - len(single) - 6)  # room for the widest "chunk=0000/0000"
    if len(payload) <= chunk:  # one frame: every value under the chunk size (all, by default)
        return [single + payload]
    parts = [payload[i : i + chunk] for i in range(0, len(payload), chunk)]
    n = len(parts)
    return [
        f"chunk={i + 1}/{n};msgid={msgid};{head}\r\n\r\n".encode() + part
        for i, part in enumerate(parts)
    ]


def encode_bytes(value: Any, preview: bool) -> tuple[bytes, str]:
    enc = _core().ByteEncoder.encode(value, preview=preview)
    return enc.data, enc.mime


def is_bytes_result(obj: Any) -> bool:
    return isinstance(obj, _core().BytesEncdata)
