"""worker/, supervisor/ and sidecars/ are layered: every module imports only modules of a lower
layer of its package (no circle), and across packages only down: supervisor -> worker's shared
leaves and sidecars' entry points; worker and sidecars import neither of the others.

The tables are the architecture (STYLE.md sections 3 and 6): the server knows a backend callable,
the commands know the graph, the store and a narrow Host, the store knows only files; in the
supervisor the runner knows its parts, the host builds runners, the CLI is a front end nobody
imports. Imports inside functions and under TYPE_CHECKING count too: a lazy import is still a
dependency.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "worker"

LAYERS = [
    {"channel", "codec", "errors", "external", "fsutil", "listener", "metrics", "packages", "peers",
     "plugins", "wakeup", "nodeio", "wsread", "deferred", "__init__"},
    {"config", "control", "install", "journal", "modules", "pyproject", "stallwatch"},  # journal: codec's plain_dumps
    {"tls", "separate"},  # separate: separate_process=True nodes run in a forked child
    {"persistence", "health", "transfer"},
    {"effects", "store", "localworkers", "server", "quarantine"},
    {"graph"},
    {"commands"},
    {"runtime"},
    {"__main__"},
    {"forkserver"},  # forks workers that run __main__.main
]


SUPERVISOR_LAYERS = [
    {"__init__", "config", "crash", "environment", "files", "forkstandby", "health", "listener", "memory", "progress",
     "states", "systemd"},
    {"forkclient"},  # a fork server: spawned, or the standby forked from the supervisor becomes it
    # attempt: one worker start (pure); status: what cli and hostctl both show; the rest are the
    # runner's parts: installs, safe mode's record, the state files
    {"attempt", "policy", "process", "units", "forkpool", "status", "installs", "safemode", "statefile", "modules",
     "observers"},  # modules: the modules CLI's client
    {"launcher", "inbox"},  # fork server or spawn: the launching seam; the runner's event queue
    {"preparer"},  # the runner's PREPARING phase: environment, port, how a worker is launched
    {"runner"},  # one Supervisor: knows its parts, not who hosts it
    {"sidecarset", "hostmetrics", "hostctl"},  # plug into a runner / talk to a host through a socket
    {"host", "managerhost"},  # build runners
    {"cli"},  # the front end: nobody imports it
    {"__main__"},
]
SIDECARS_LAYERS = [
    {"__init__", "_lifeline", "entry", "roles"},  # roles: which role of a shared sidecar gets what
    {"forked"},  # a child forked from the supervisor, made clean
    {"host"},
    {"discovery", "monitor"},
    {"pair"},  # both roles in one process (per-worker mode)
]
PACKAGES = {"worker": LAYERS, "supervisor": SUPERVISOR_LAYERS, "sidecars": SIDECARS_LAYERS}
# Across packages: what each package may import of the others (nothing else; never upwards).
SHARED = {
    "worker": {},
    "sidecars": {"worker": {"peers"}},  # the peer-uid rule: a stdlib-only leaf both servers apply
    # worker.forkserver: the supervisor's fork server standby (forkstandby.py) becomes one
    "supervisor": {"worker": {"__init__", "channel", "config", "fsutil", "metrics", "tls", "forkserver"},
                   "sidecars": {"entry", "host", "forked"}},
}


def imports(path: Path, pkg: str = "worker") -> set[tuple[str, str]]:
    """(package, module) of every import of our packages in path, lazy and TYPE_CHECKING ones too."""
    out: set[tuple[str, str]] = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level == 1:
                out |= {(pkg, n.module.split(".")[0])} if n.module else {(pkg, a.name) for a in n.names}
            elif n.module and n.module.split(".")[0] in PACKAGES:
                parts = n.module.split(".")
                out |= {(parts[0], parts[1])} if len(parts) > 1 else {(parts[0], a.name) for a in n.names}
        elif isinstance(n, ast.Import):
            for a in n.names:
                parts = a.name.split(".")
                if parts[0] in PACKAGES:
                    out.add((parts[0], parts[1] if len(parts) > 1 else "__init__"))
    return out


def violations(pkg: str) -> list[str]:
    rank = {m: i for i, layer in enumerate(PACKAGES[pkg]) for m in layer}
    bad = []
    for f in sorted((ROOT / pkg).glob("*.py")):
        m = f.stem
        assert m in rank, f"{pkg}/{f.name} is in no layer: add it to the {pkg} table in {Path(__file__).name}"
        for dpkg, dep in sorted(imports(f, pkg)):
            if dpkg != pkg:
                if dep not in SHARED[pkg].get(dpkg, set()):
                    bad.append(f"{pkg}.{m} imports {dpkg}.{dep} (not shared with {pkg}: see SHARED)")
            elif dep in rank and rank[dep] >= rank[m]:
                bad.append(f"{pkg}.{m} (layer {rank[m]}) imports {dep} (layer {rank[dep]})")
    return bad


def test_every_worker_module_imports_only_lower_layers():
    bad = violations("worker")
    assert not bad, "\n".join(bad)


def test_every_supervisor_module_imports_only_lower_layers():
    bad = violations("supervisor")
    assert not bad, "\n".join(bad)


def test_every_sidecars_module_imports_only_lower_layers():
    bad = violations("sidecars")
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_circle_anywhere():
    """The layer tables forbid circles within a package and SHARED across them; this checks the
    whole graph directly, so a table edited by mistake cannot hide one."""
    graph: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).glob("*.py"):
            graph[(pkg, f.stem)] = {d for d in imports(f, pkg) if d in graph or (ROOT / d[0] / f"{d[1]}.py").exists()}
    done: set = set()

    def visit(node, path):
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(".".join(x) for x in [*path[path.index(node):], node]))
        if node in done:
            return
        for d in graph.get(node, ()):
            visit(d, [*path, node])
        done.add(node)

    for node in list(graph):
        visit(node, [])


def test_the_transport_never_touches_the_graph():
    src = (WORKER / "server.py").read_text()
    assert "nodespace" not in src and "self.rt" not in src
