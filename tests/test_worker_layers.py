"""worker/server.py is the transport: it knows the Backend protocol, not the runtime or the graph
(STYLE.md section 3). Imports inside functions and TYPE_CHECKING blocks count too."""

import ast

from conftest import REPO

ALLOWED = {
    "server": {"codec", "config", "errors", "fsutil"},
    "errors": set(),
    "fsutil": set(),
}


def worker_imports(name: str) -> set[str]:
    tree = ast.parse((REPO / "worker" / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif (node.module or "").startswith("worker"):
                found.add((node.module.split(".") + [""])[1] or node.names[0].name)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("worker.")}
    return found


def test_the_transport_and_the_leaves_import_only_what_lies_below_them():
    for name, allowed in ALLOWED.items():
        assert worker_imports(name) <= allowed, (name, worker_imports(name) - allowed)


def test_the_transport_never_touches_the_graph():
    src = (REPO / "worker" / "server.py").read_text()
    assert "nodespace" not in src and "self.rt" not in src
