"""The packages show the architecture: the optimizer (top of ``dsgd/``) never imports the harness
(``dsgd/harness/``) or the advisor (``dsgd/advisor/``); each module has one home."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DSGD = Path(__file__).resolve().parents[1] / "dsgd"
HARNESS = ("measure", "grid", "bench", "profile", "profile_summary", "profile_commits", "regress", "isolate",
           "launch", "gitutil", "models")
ADVISOR = ("plans", "costmodel", "layouts")


def test_optimizer_imports_neither_harness_nor_advisor():
    code = ("import sys, pkgutil, importlib, dsgd, dsgd.impl; import dsgd.optimizer, dsgd.layoutmap, dsgd.mesh, "
            "dsgd.workloads, dsgd.reference64, dsgd.multiclient\n"
            "for m in pkgutil.iter_modules(dsgd.impl.__path__): importlib.import_module('dsgd.impl.' + m.name)\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('dsgd.harness', 'dsgd.advisor')))\n"
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(DSGD.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_one_home_per_module():
    for name in HARNESS:
        assert (DSGD / "harness" / f"{name}.py").is_file() or (DSGD / "harness" / name).is_dir(), name
        assert not (DSGD / f"{name}.py").exists(), f"dsgd/{name}.py: the module lives in dsgd/harness/"
    for name in ADVISOR:
        assert (DSGD / "advisor" / f"{name}.py").is_file() or (DSGD / "advisor" / name).is_dir(), name
        assert not (DSGD / f"{name}.py").exists(), f"dsgd/{name}.py: the module lives in dsgd/advisor/"


# ------------------------------------------------------------------------------- the import graph
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(DSGD.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of ``dsgd`` -> the ``dsgd`` modules it imports, at the top or inside a function
    (``import dsgd.x``, ``from dsgd import x``, ``from dsgd.x import y``, relative imports)."""
    import ast

    files = {_module_name(p): p for p in DSGD.rglob("*.py")}

    def module_of(name: str) -> str | None:  # the longest prefix of a dotted name that is a module
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(module_of(a.name) for a in node.names if a.name.split(".")[0] == "dsgd")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] != "dsgd":
                    continue
                # ``from dsgd import x``: x may be a module; else the name comes from ``base``
                deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else module_of(base) for a in node.names)
        deps.discard(None)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as ``[a, b, ..., a]``, or ``[]`` (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph()
    assert "dsgd.mesh" in graph["dsgd.harness.measure"]  # from dsgd.mesh import ...
    assert "dsgd.meshspec" in graph["dsgd.argcheck"]  # from dsgd import meshspec
    assert "dsgd.multiclient" in graph["dsgd.meshspec"]  # inside make_mesh


def test_no_import_cycles_in_dsgd():
    """No module of dsgd imports, however indirectly, a module that imports it back -- counting the imports
    inside functions, which break no import at run time but tie the two modules together all the same."""
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_generic_modules_stay_below_the_commands():
    """The value checkers know no command, and the shared names import nothing of dsgd (nor TensorFlow)."""
    graph = import_graph()
    assert not [m for m in graph["dsgd.argcheck"] if m.startswith(("dsgd.harness", "dsgd.advisor", "dsgd.cli"))]
    assert graph["dsgd.names"] == set()
    assert "tensorflow" not in (DSGD / "names.py").read_text()
