"""worker/nodeio.py: a node's IO found once per class gives every node the same inputs and
outputs, in the same order, with the same options, as funcnodes-core's per-node lookup. Run in a
fresh interpreter, so the patch is compared against the unpatched core."""

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
print("ok", len(classes))
"""


def test_nodes_have_the_same_io_with_the_per_class_lookup(config_dir):
    r = subprocess.run([sys.executable, "-c", CHECK, str(REPO)], capture_output=True, text=True, timeout=120,
                       env={"FUNCNODES_CONFIG_DIR": str(config_dir), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok ")
