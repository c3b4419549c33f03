"""A client that edits a graph without pause and remembers what the worker acknowledged.

Shared by the crash tests and `benchmarks/soak_journal.py`. The model changes only when a reply
arrives, so after a crash it is exactly what the worker promised to keep; the one edit in flight
when the worker died may or may not be there (it was never acknowledged) and is allowed either way.
"""

from __future__ import annotations

import asyncio
import copy
import random
from dataclasses import dataclass, field

import aiohttp

from helpers import Client, RPCError


@dataclass
class Model:
    nodes: dict[str, dict] = field(default_factory=dict)  # uuid -> {"kind", "pos", "value"}
    edges: set[tuple[str, str, str, str]] = field(default_factory=set)
    groups: dict[str, list[str]] = field(default_factory=dict)  # group id -> node ids (pinned nodes)


class EditStream:
    """One client, one edit at a time: add_node, add_edge, set_io_value, update_node_view,
    remove_node, group_nodes, as a person dragging and wiring nodes does."""

    def __init__(self, seed: int, prefix: str = "n", groups: bool = True):
        self.rng = random.Random(seed)
        self.model = Model()  # what the worker acknowledged
        self.inflight: Model | None = None  # the model if the edit in flight (unacknowledged) landed
        self.acked = 0
        self.prefix = prefix
        self._n = 0
        self.pinned: set[str] = set()  # nodes in groups are never removed (groups keep ids)
        self.groups = groups  # off when several streams share a worker (group ids come from replies)

    def _new_id(self) -> str:
        self._n += 1
        return f"{self.prefix}{self._n}"

    def _pick(self, kind: str | None = None) -> str | None:
        ids = [k for k, v in self.model.nodes.items() if kind is None or v["kind"] == kind]
        return self.rng.choice(sorted(ids)) if ids else None

    async def step(self, c: Client) -> None:
        m, rng = self.model, self.rng
        ops = ["add_number", "add_add"] if len(m.nodes) < 4 else [
            "add_number", "add_add", "edge", "value", "value", "move", "move", "move", "remove"] + (["group"] if self.groups else [])
        op = rng.choice(ops)
        nxt = copy.deepcopy(m)
        if op in ("add_number", "add_add"):
            nid = self._new_id()
            kind = "number" if op == "add_number" else "add"
            call = ("add_node", {"id": f"demo.{kind}", "uuid": nid})
            nxt.nodes[nid] = {"kind": kind, "pos": None, "value": None}
        elif op == "edge":
            a, b = self._pick("number"), self._pick("add")
            if a is None or b is None:
                return
            port = rng.choice(["a", "b"])
            call = ("add_edge", {"src_nid": a, "src_ioid": "out", "trg_nid": b, "trg_ioid": port, "replace": True})
            if (a, "out", b, port) not in nxt.edges and any((e[2], e[3]) == (b, port) for e in nxt.edges):
                # funcnodes-core (and the stock worker): replacing a taken input also drops every
                # other edge of the output
                nxt.edges = {e for e in nxt.edges if (e[2], e[3]) != (b, port) and e[0] != a}
            nxt.edges |= {(a, "out", b, port)}
        elif op == "value":
            a = self._pick("number")
            if a is None:
                return
            v = rng.randint(-10**6, 10**6)
            call = ("set_io_value", {"nid": a, "ioid": "value", "value": v})
            nxt.nodes[a]["value"] = v
        elif op == "move":
            a = self._pick()
            pos = [rng.randint(0, 2000), rng.randint(0, 2000)]
            call = ("update_node_view", {"nid": a, "data": {"pos": pos}})
            nxt.nodes[a]["pos"] = pos
        elif op == "remove":
            a = self._pick()
            if a in self.pinned:
                return
            call = ("remove_node", {"id": a})
            del nxt.nodes[a]
            nxt.edges = {e for e in nxt.edges if a not in (e[0], e[2])}
        else:  # group two nodes that are not grouped yet
            free = sorted(set(m.nodes) - self.pinned)
            if len(free) < 2:
                return
            pair = rng.sample(free, 2)
            call = ("group_nodes", {"node_ids": pair, "group_ids": []})
        self.inflight = nxt
        res = await c.cmd(call[0], **call[1])
        if call[0] == "group_nodes":
            new = [g for g in res if g not in m.groups]
            for g in new:
                nxt.groups[g] = sorted(res[g]["node_ids"])
            self.pinned |= set(call[1]["node_ids"])
        self.acked += 1
        self.model, self.inflight = nxt, None

    async def run(self, c: Client, stop: asyncio.Event) -> None:
        """Edit until the connection breaks (the worker was killed) or `stop` is set."""
        try:
            while not stop.is_set():
                await self.step(c)
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, RPCError, RuntimeError):
            pass  # the edit in flight was never acknowledged; self.inflight says what it would have done


async def observed(c: Client) -> Model:
    """What the worker holds, in the model's terms."""
    m = Model()
    nodes = await c.cmd("get_nodes", with_frontend=True)
    for n in nodes:
        kind = n["node_id"].split(".", 1)[1]
        props = n.get("properties") or {}
        m.nodes[n["id"]] = {"kind": kind, "pos": props.get("frontend:pos"), "value": None}
        if kind == "number":
            v = await c.cmd("get_io_value", nid=n["id"], ioid="value")
            m.nodes[n["id"]]["value"] = v
    m.edges = {tuple(e) for e in await c.cmd("get_edges")}
    groups = await c.cmd("get_groups")
    m.groups = {g: sorted(info["node_ids"]) for g, info in groups.items()}
    return m


def only(got: Model, prefix: str) -> Model:
    """The part of a worker's graph that one stream (node ids `prefix`N) made."""
    keep = {n for n in got.nodes if n.startswith(prefix)}
    return Model({n: got.nodes[n] for n in keep}, {e for e in got.edges if e[0] in keep or e[2] in keep},
                 {g: ids for g, ids in got.groups.items() if set(ids) & keep})


def differences(expected: Model, got: Model) -> list[str]:
    out = []
    if set(expected.nodes) != set(got.nodes):
        out.append(f"nodes: missing {sorted(set(expected.nodes) - set(got.nodes))}, "
                   f"extra {sorted(set(got.nodes) - set(expected.nodes))}")
    for nid, e in expected.nodes.items():
        g = got.nodes.get(nid)
        if g is None:
            continue
        if e["pos"] is not None and g["pos"] != e["pos"]:
            out.append(f"{nid} pos {g['pos']} != {e['pos']}")
        if e["value"] is not None and g["value"] != e["value"]:
            out.append(f"{nid} value {g['value']} != {e['value']}")
    if expected.edges != got.edges:
        out.append(f"edges: missing {sorted(expected.edges - got.edges)}, extra {sorted(got.edges - expected.edges)}")
    for gid, ids in expected.groups.items():
        if got.groups.get(gid) != ids:
            out.append(f"group {gid}: {got.groups.get(gid)} != {ids}")
    return out


def check(stream: EditStream, got: Model) -> list[str]:
    """Empty when the worker holds every acknowledged edit (the one in flight either way)."""
    diff = differences(stream.model, got)
    if diff and stream.inflight is not None and not differences(stream.inflight, got):
        return []  # the unacknowledged edit landed too: as good
    return diff


def adopt(stream: EditStream, got: Model) -> None:
    """After a check, go on from what the worker holds (the edit in flight may have landed)."""
    stream.model = copy.deepcopy(got)
    stream.inflight = None
    stream.pinned = {n for ids in got.groups.values() for n in ids} & set(got.nodes)
