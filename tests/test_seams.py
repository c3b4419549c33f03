"""The supervisor declares what others may hook, and nobody patches it from outside.

Host mode once replaced `sup.reaper`, `sm._on_change` and `_after_exit` per instance, swapped
the module global `runner.ForkServer` for the whole process and called private methods
(`_event`, `_route_sidecar`, `_reap`): a rename in runner.py broke host mode and nothing said
so. Now a Supervisor takes its seams in the constructor (reaper=, launcher=, observers=) and
offers public verbs (request_stop, request_restart, deliver, reap); these tests walk the code.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "supervisor").glob("*.py"), *(ROOT / "sidecars").glob("*.py"),
                  *(ROOT / "worker").glob("*.py")])


def supervisor_private_names() -> set[str]:
    tree = ast.parse((ROOT / "supervisor" / "runner.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Supervisor")
    names = {f.name for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for n in ast.walk(cls):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self":
            names.add(n.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_member_of_supervisor_is_touched_outside_runner():
    private = supervisor_private_names()
    assert {"_queue", "_on_signal", "_after_exit"} <= private  # the walk finds them
    bad = []
    for f in SOURCES:
        if f == ROOT / "supervisor" / "runner.py":
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            # self._x is the module's own class; anything else reaching a Supervisor private is not
            if isinstance(n, ast.Attribute) and n.attr in private and not (
                    isinstance(n.value, ast.Name) and n.value.id == "self"):
                bad.append(f"{f.relative_to(ROOT)}:{n.lineno}: .{n.attr}")
    assert not bad, "\n".join(bad)


def test_no_module_global_is_replaced_at_run_time():
    """`module.name = ...` on an imported module (the old `runner.ForkServer = pool.make`), in
    supervisor/ and sidecars/. (worker/runtime.py still sets `control.CURRENT`: issue 15's
    worker part, safe mode through declared seams, is not done.)"""
    bad = []
    for f in SOURCES:
        if f.parent.name == "worker":
            continue
        tree = ast.parse(f.read_text())
        modules = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):  # our modules only: a forked child setting up its
                # own sys.argv / sys.stdout (what a fresh interpreter would have) is no swap
                modules |= {(a.asname or a.name).split(".")[0] for a in n.names
                            if a.name.split(".")[0] in ("supervisor", "worker", "sidecars")}
            elif isinstance(n, ast.ImportFrom):
                # `from . import runner` binds a module; `from .x import Class` binds a class,
                # whose attributes are set by its own module only (checked by the same rule there)
                modules |= {a.asname or a.name for a in n.names if n.module is None}
        for n in ast.walk(tree):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(
                n, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in modules:
                    bad.append(f"{f.relative_to(ROOT)}:{n.lineno}: {t.value.id}.{t.attr} = ...")
    assert not bad, "\n".join(bad)


def test_host_builds_supervisors_through_their_seams():
    src = (ROOT / "supervisor" / "host.py").read_text()
    assert "reaper=" in src and "launcher=" in src and "observers=" in src
