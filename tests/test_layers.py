"""worker/ is layered: every module imports only modules of a lower layer (no circle).

The table is the architecture (STYLE.md section 3): the server knows a backend callable, the
commands know the graph, the store and a narrow Host, the store knows only files. Imports inside
functions and under TYPE_CHECKING count too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

WORKER = Path(__file__).resolve().parents[1] / "worker"

LAYERS = [
    {"channel", "codec", "errors", "external", "fsutil", "journal", "listener", "metrics", "packages", "peers", "__init__"},
    {"config", "control", "install", "modules"},
    {"tls"},
    {"persistence", "health"},
    {"effects", "store", "localworkers", "server", "quarantine"},
    {"graph"},
    {"commands"},
    {"runtime"},
    {"__main__"},
    {"forkserver"},  # forks workers that run __main__.main
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def imports(path: Path) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level == 1:
                out |= {n.module.split(".")[0]} if n.module else {a.name for a in n.names}
            elif n.module and n.module.split(".")[0] == "worker":
                parts = n.module.split(".")
                out |= {parts[1]} if len(parts) > 1 else {a.name for a in n.names}
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[1] for a in n.names if a.name.startswith("worker.")}
    return out


def test_every_worker_module_imports_only_lower_layers():
    bad = []
    for f in sorted(WORKER.glob("*.py")):
        m = f.stem
        assert m in RANK, f"worker/{f.name} is in no layer: add it to LAYERS in {Path(__file__).name}"
        for dep in sorted(imports(f)):
            if dep in RANK and RANK[dep] >= RANK[m]:
                bad.append(f"{m} (layer {RANK[m]}) imports {dep} (layer {RANK[dep]})")
    assert not bad, "\n".join(bad)


def test_the_transport_never_touches_the_graph():
    src = (WORKER / "server.py").read_text()
    assert "nodespace" not in src and "self.rt" not in src
