"""No import cycles in the in-image package (``vllm_fleet``) nor the exporter (issue 19).

Every module is parsed with ``ast`` (nothing is imported): every import statement counts, those
inside functions too (a lazy import still ties the two modules together), relative imports
resolved against the module's package. ``from P import name`` is an edge to ``P.name`` when that
is a module of ours, else to ``P``. Imports of modules outside the two packages are ignored.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: import root -> the top-level package under it
ROOTS = {REPO / "images/vllm_fleet/src": "vllm_fleet", REPO / "exporter": "vllm_fleet_exporter"}


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for root, top in ROOTS.items():
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts.pop()
            out[".".join(parts)] = (path, is_pkg)
    return out


def imports_of(name: str, path: Path, is_pkg: bool, known: set[str]) -> set[str]:
    """The modules of ours that ``name`` imports anywhere in its source."""
    package = name if is_pkg else name.rpartition(".")[0]
    edges = set()

    def add(target: str) -> None:
        # the module itself, or the closest enclosing module of ours (``import a.b.c`` of a
        # non-module attribute path never happens here, but stay safe)
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
    return edges


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, is_pkg, known) for name, (path, is_pkg) in mods.items()}


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def cycle_in(g: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One concrete cycle through the component's first module, for the failure message."""
    members = set(comp)
    start = comp[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(g[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return comp


def test_the_scan_sees_both_packages_and_resolves_relative_imports():
    g = graph()
    assert "vllm_fleet.plugin" in g and "vllm_fleet_exporter.collector" in g
    assert "vllm_fleet.fabric_check.launcher" in g["vllm_fleet.fabric_check.cli"]
    # the package's __main__ does ``from .cli import main``: relative to the package itself
    assert g["vllm_fleet.fabric_check.__main__"] == {"vllm_fleet.fabric_check.cli"}


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import(tmp_path):
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    comps = [c for c in strongly_connected(g) if len(c) > 1]
    assert comps == [["a", "b", "c"]]
    assert cycle_in(g, comps[0]) == ["a", "b", "c", "a"]
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("def f():\n    from .y import g\n")
    (pkg / "y.py").write_text("from p import x\n")
    known = {"p", "p.x", "p.y"}
    assert imports_of("p.x", pkg / "x.py", False, known) == {"p.y"}
    assert imports_of("p.y", pkg / "y.py", False, known) == {"p.x"}


def test_no_import_cycles():
    g = graph()
    cycles = [" -> ".join(cycle_in(g, c)) for c in strongly_connected(g) if len(c) > 1]
    assert not cycles, "import cycles (move what both sides need into a module of its own):\n" + \
        "\n".join(cycles)
