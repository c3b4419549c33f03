"""worker/nodeio.py: a node's IO found once per class gives every node the same inputs and
outputs, in the same order, with the same options, as funcnodes-core's per-node lookup; under
quiet_load a graph is built the same, without node_added events. Run in a fresh interpreter, so
the patch is compared against the unpatched core."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/examples"]
import funcnodes_core as fn
import demo_nodes
from worker import nodeio

classes = [v for v in vars(demo_nodes).values() if isinstance(v, type) and issubclass(v, fn.Node)
           and getattr(v, "node_id", "").startswith("demo.")]
assert len(classes) >= 5, classes

def io(cls):
    n = cls(uuid="x")
    return json.dumps(n.full_serialize(with_io_values=True), sort_keys=True, default=str)

before = {c.node_id: io(c) for c in classes}
nodeio.install()
nodeio.install()  # twice: one patch
for c in classes:
    for _ in range(3):  # the cached answer is a fresh dict each time
        assert io(c) == before[c.node_id], c.node_id

# quiet_load: the same graph, connected the same, and no node_added event
def graph(quiet):
    ns = fn.NodeSpace()
    ns.lib.add_nodes(classes, "demo")
    events = []
    ns.on("*", lambda event, **kw: events.append(event))
    add = [c for c in classes if c.node_id == "demo.add"][0]
    nodes = [add(uuid=f"n{i}") for i in range(5)]
    ctx = nodeio.quiet_load() if quiet else open("/dev/null")
    with ctx:
        for n in nodes:
            ns.add_node_instance(n)
        for a, b in zip(nodes, nodes[1:]):
            a.outputs["out"].connect(b.inputs["a"])
    assert all(n.nodespace is ns for n in nodes)
    return json.dumps(ns.full_serialize(with_io_values=True), sort_keys=True, default=str), events

loud, loud_events = graph(False)
quiet, quiet_events = graph(True)
assert loud_events.count("node_added") == 5 and "node_added" not in quiet_events, (loud_events, quiet_events)
assert quiet == loud
again, again_events = graph(False)  # after the block: events again
assert again_events.count("node_added") == 5
print("ok", len(classes))
"""


def test_nodes_have_the_same_io_with_the_per_class_lookup(config_dir):
    r = subprocess.run([sys.executable, "-c", CHECK, str(REPO)], capture_output=True, text=True, timeout=120,
                       env={"FUNCNODES_CONFIG_DIR": str(config_dir), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok ")
