"""The layering rule of the guide, read from the source with `ast` (nothing is imported).

kernels/ imports nothing of ours; dejavu_jax/ imports only dejavu_jax/ and kernels/; train/, eval/ and bench/
import dejavu_jax/ (bench/ also the kernels it times) and never one another; nothing of ours imports tools/; and
no import cycle joins our modules. Imports inside functions count: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "dejavu_jax", "train", "eval", "bench")
OURS = (*LAYERS, "tools")
# What each layer may import of ours (itself included).
ALLOWED = {
    "kernels": {"kernels"},
    "dejavu_jax": {"dejavu_jax", "kernels"},
    "train": {"train", "dejavu_jax"},
    "eval": {"eval", "dejavu_jax"},
    "bench": {"bench", "dejavu_jax", "kernels"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Every module of ours: name -> file (packages by their __init__.py)."""
    return {_module_name(p): p for top in OURS for p in sorted((REPO / top).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours an imported name lands in: the longest known prefix (`a.b.func` -> `a.b`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def imports_of(module: str) -> list[tuple[str, int]]:
    """(module of ours imported, line) for every import statement in the module, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # Relative: from the importing module's package, up level - 1 packages.
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found += [(target, node.lineno) for target in map(_resolve, names) if target and target != module]
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: {target for target, _ in imports_of(module)} for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_every_layer():
    for top in LAYERS:
        assert top in MODULES and any(m.startswith(top + ".") for m in MODULES), top
    graph = import_graph()
    assert "kernels.block_math" in graph["kernels.sparse_mlp"]  # an absolute `from kernels.x import y`
    assert any(t.startswith("kernels.") for m in MODULES if m.startswith("dejavu_jax.") for t in graph[m])


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_downward(layer):
    bad = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if module.split(".")[0] == layer
        for target, line in imports_of(module)
        if target.split(".")[0] not in ALLOWED[layer]
    ]
    assert not bad, f"{layer}/ may import only {sorted(ALLOWED[layer])} of ours:\n" + "\n".join(bad)


def _describe(component: frozenset[str], graph) -> str:
    edges = [f"{a} -> {b}" for a in sorted(component) for b in sorted(graph[a] & component)]
    return "cycle among " + ", ".join(sorted(component)) + ": " + "; ".join(edges)


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "\n".join(_describe(c, graph) for c in found)


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
