"""The codec against funcnodes-core's own encoder and decoder, which it must match:
- codec.loads (one C parse, one walk of the leaves) against its JSONDecoder (an object_hook
  that re-walks every subtree): the same values for a real saved graph and for "<NoValue>" at
  every depth, with every registered decoder, including one a node package adds at run time;
- codec.result_text (a None reply assembled by hand) against its JSONEncoder's text;
- persistence.backend_steps (its round trips through codec.loads, whole or in steps) against core's
  serialize_nodespace_for_saving, on a graph with edges, groups, properties and unset values."""

from __future__ import annotations

import asyncio
import datetime
import json
import random

import funcnodes_core as fn
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import codec


def _same(text: str) -> None:
    ours, core = codec.loads(text), json.loads(text, cls=fn.JSONDecoder)
    assert ours == core
    assert repr(ours) == repr(core)  # NoValue is NoValue, not an equal string


def test_a_saved_graph_decodes_as_the_core_decoder_does(tmp_path):
    from test_journal_replay import _demo, _world
    from worker.effects import OPS

    async def build():
        loop = asyncio.get_running_loop()
        g, store, cmds = _world(tmp_path, loop, _demo(), {})
        store.load(g.apply_state, g.apply_record, OPS)
        store.open(loop)
        for i in range(30):
            cmds.call("add_node", {"id": "demo.add", "uuid": f"n{i}"})
            if i:
                cmds.call("add_edge", {"src_nid": f"n{i - 1}", "src_ioid": "out", "trg_nid": f"n{i}", "trg_ioid": "a"})
        cmds.call("set_io_value", {"nid": "n0", "ioid": "b", "value": [1, {"x": "<NoValue>"}]})
        store.snapshot()
        store.close()
        return store.paths.nodespace.read_text()

    text = asyncio.run(build())
    assert "<NoValue>" in text  # the graph has unset values: the decoder has work to do
    _same(text)


def test_novalue_and_a_package_decoder_at_every_depth():
    rng = random.Random(7)

    def tree(depth: int):
        if depth == 0:
            return rng.choice(["<NoValue>", "<NoValue> ", "x", 1, 2.5, None, True, "<point 1 2>"])
        if rng.random() < 0.5:
            return {f"k{i}": tree(depth - 1) for i in range(rng.randint(0, 4))}
        return [tree(depth - 1) for _ in range(rng.randint(0, 4))]

    def point_decoder(obj):  # what a node package may register
        if isinstance(obj, str) and obj.startswith("<point "):
            return tuple(int(v) for v in obj[7:-1].split()), True
        return obj, False

    fn.JSONDecoder.add_decoder(point_decoder)
    try:
        for _ in range(200):
            _same(json.dumps(tree(rng.randint(0, 6))))
    finally:
        fn.JSONDecoder.decoder.remove(point_decoder)


def test_a_none_result_is_the_text_the_encoder_writes():
    ids = ["abc-1", "", 'quote " and \\ back', "ünïcode ✓", "\ud800", "<NoValue>", 0, 42, -7, None,
           True, 2.5, ["list"], {"d": 1}]
    for msg_id in ids:
        assert codec.result_text(None, msg_id) == codec.dumps(codec.result(None, msg_id)), msg_id
    for res in (1, "x", [1, None], {"a": "<NoValue>"}, False):
        assert codec.result_text(res, "id") == codec.dumps(codec.result(res, "id"))


def test_a_message_skips_revive_only_when_it_cannot_hold_novalue():
    """The server revives a message's kwargs only when its text may hold "<NoValue>": a plain
    one, or any character escaped as \\uXXXX. Every text that parses to a "<NoValue>" anywhere
    must be caught, however the client escaped it; the revived kwargs are the same either way."""
    rng = random.Random(11)

    def tree(depth: int):
        if depth == 0:
            return rng.choice(["<NoValue>", "<NoValue>", "x", "<NoVal>", 1, None, "ünï"])
        if rng.random() < 0.5:
            return {f"k{i}": tree(depth - 1) for i in range(rng.randint(0, 3))}
        return [tree(depth - 1) for _ in range(rng.randint(0, 3))]

    def escape_some(text: str) -> str:  # what another client's encoder may write: \u escapes anywhere
        out, in_str, i = [], False, 0
        while i < len(text):
            ch = text[i]
            if in_str and ch == "\\":  # an escape already there stays whole
                n = 6 if text[i + 1] == "u" else 2
                out.append(text[i:i + n])
                i += n
                continue
            if ch == '"':
                in_str = not in_str
            elif in_str and rng.random() < 0.2:
                ch = "\\u%04x" % ord(ch)
            out.append(ch)
            i += 1
        return "".join(out)

    def holds(obj) -> bool:
        if isinstance(obj, dict):
            return any(holds(v) for v in obj.values())
        if isinstance(obj, list):
            return any(holds(v) for v in obj)
        return obj == "<NoValue>"

    caught = 0
    for _ in range(500):
        msg = {"type": "cmd", "cmd": "set_io_value", "kwargs": {"value": tree(rng.randint(0, 5))}, "id": "1"}
        text = json.dumps(msg, ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.5:
            text = escape_some(text)
        kwargs = codec.parse_message(text)["kwargs"]
        if holds(kwargs):
            assert codec.may_hold_novalue(text), text
            caught += 1
        gated = codec.revive(kwargs) if codec.may_hold_novalue(text) else kwargs
        assert repr(gated) == repr(codec.revive(kwargs))
    assert caught > 100  # the case that matters came up often
    assert not codec.may_hold_novalue(json.dumps({"type": "cmd", "cmd": "update_node_view",
                                                  "kwargs": {"nid": "n1", "data": {"position": {"x": 1, "y": 2}}}}))


def test_the_snapshots_backend_is_cores_serialize_nodespace_for_saving(tmp_path):
    from funcnodes_core.utils.saving import serialize_nodespace_for_saving

    from test_journal_replay import _demo, _world
    from worker import persistence

    async def build():
        g, _store, cmds = _world(tmp_path, asyncio.get_running_loop(), _demo(), {})
        for i in range(12):
            cmds.call("add_node", {"id": "demo.add" if i % 3 else "demo.text", "uuid": f"n{i}"})
            if i % 3 == 2:
                cmds.call("add_edge", {"src_nid": f"n{i - 1}", "src_ioid": "out", "trg_nid": f"n{i}", "trg_ioid": "a"})
        cmds.call("set_io_value", {"nid": "n1", "ioid": "b", "value": [1, {"x": "<NoValue>"}, None, 2.5]})
        cmds.call("set_io_value", {"nid": "n0", "ioid": "value", "value": "t\u00e9xt"})
        cmds.call("update_node", {"nid": "n4", "data": {"name": "renamed", "properties": {"k": [1, "<NoValue>"]}}})
        cmds.call("group_nodes", {"node_ids": ["n1", "n2"]})
        g.nodespace.set_property("p", {"nested": [1, 2, {"z": None}]})
        return g.nodespace

    ns = asyncio.run(build())
    core = serialize_nodespace_for_saving(ns)
    for chunk in (0, 1, 5, 100):  # in one step, and in steps of that many nodes
        ours = persistence.run_steps(persistence.backend_steps(ns, chunk))
        assert ours["groups"] and ours["edges"] and ours["prop"].get("p")  # every part has content
        assert ours == core
        assert repr(ours) == repr(core)  # key order, NoValue as NoValue


# What a client or a node can put in an edit: plain JSON and its edge cases (big ints, NaN,
# lone surrogates, non-str keys, tuples) and types JSON has no word for.
_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["\ud800", "a\udfffb", "ünï", "<NoValue>", "0" * 25, "null", 2**64, -(2**63) - 1, 10**30]),
)
_value = st.recursive(
    _leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.tuples(kids, kids),
        st.dictionaries(st.text(max_size=4), kids, max_size=4),
        st.dictionaries(st.integers(0, 3), kids, max_size=2),
        st.builds(lambda v: {"when": datetime.datetime(2026, 1, 1), "v": v}, kids),
    ),
    max_leaves=12,
)


def _stdlib_value(fn, *args):
    try:
        return repr(fn(*args))
    except (TypeError, ValueError, RecursionError) as e:
        return type(e).__name__


@settings(max_examples=400, deadline=None)
@given(_value, st.booleans(), st.sampled_from([None, (",", ":")]), st.integers(0, 3))
def test_the_c_codec_gives_the_stdlibs_value_or_steps_aside(value, ascii_only, separators, cut):
    """orjson is used on the edit path only where it gives what the stdlib gives: a parsed text is
    the same value (ints stay ints past 64 bits, NaN stays NaN), a record or a json_safe round trip
    is the same JSON or is left to the stdlib, which refuses what it refused before."""
    from worker import journal, persistence

    try:
        text = json.dumps(value, ensure_ascii=ascii_only, separators=separators)
    except TypeError:
        text = None
    if text is not None:
        text = text[: len(text) - cut] if cut and len(text) > cut else text  # a torn frame too
        assert _stdlib_value(codec.plain_loads, text) == _stdlib_value(json.loads, text), text

    out = codec.plain_dumps(value)
    try:
        strict = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        strict = None
    if out is not None:  # orjson wrote it: the stdlib writes it too, and it reads back the same
        assert strict is not None and repr(json.loads(out)) == repr(json.loads(strict))
        assert b"null" not in out

    def stdlib_safe(v):
        try:
            return json.loads(json.dumps(v, allow_nan=False)) == v
        except (TypeError, ValueError):
            return False

    assert persistence.json_safe(value) == stdlib_safe(value)

    rec = {"seq": 1, "op": "value", "value": value}
    stdlib_rec = _stdlib_value(lambda r: json.loads(journal._RECORD.encode(r).encode()), rec)
    assert _stdlib_value(lambda r: json.loads(journal.encode(r)), rec) == stdlib_rec
