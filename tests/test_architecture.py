"""The layer map of docs/architecture.md holds: no upward import, no import cycle.

Every ``import densedet.…`` in the package (at module level or inside a function: a lazy
import is still a dependency) is an edge between two modules. A module may import from its
own layer and the layers below it, never from one above, and the module graph has no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "densedet"

# Lowest first. The model sits above assign and losses because a detector is trained by its
# own loss, which takes an Assignment; data, assign and losses know nothing of each other.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("densedet.errors", "densedet.boxes", "densedet.priors", "densedet.config")),
    ("data", ("densedet.data",)),
    ("assign", ("densedet.assign",)),
    ("losses", ("densedet.losses",)),
    ("models", ("densedet.models",)),
    ("metrics", ("densedet.evaluate",)),
    ("engine", ("densedet.engine",)),
    ("tools", ("densedet.predict", "densedet.export", "densedet.viz", "densedet.shootout",
               "densedet.convert", "densedet.api", "densedet.bench")),
    ("cli", ("densedet.cli", "densedet.__main__")),
    ("package", ("densedet",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest matching prefix."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # the package root's layer holds densedet/__init__.py alone
            inside = module.startswith(prefix + ".") and prefix != "densedet"
            if (module == prefix or inside) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} is in no layer of LAYERS: add it (and to docs/architecture.md)"
    return best


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``module`` imports (a name imported from a package counts as
    its submodule when one exists by that name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import densedet.x.y` of a non-module name
                t = t.rpartition(".")[0]
            if t.startswith("densedet") and t != module:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_no_upward_import():
    bad = []
    for module, targets in import_graph().items():
        for t in sorted(targets):
            if t == "densedet":  # the package root itself is only ever a namespace here
                continue
            if layer_of(t) > layer_of(module):
                bad.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {t} "
                           f"({LAYERS[layer_of(t)][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None (iterative DFS, three colours)."""
    colour = {n: 0 for n in graph}
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif nxt in graph and colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt in graph and colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_no_import_cycle():
    graph = import_graph()
    # the package root's lazy attribute access (densedet.load, …) is a facade, not a cycle
    graph = {m: {t for t in ts if t != "densedet"} for m, ts in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_should():
    """The checkers themselves: a planted cycle and a planted upward edge are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("densedet.engine.trainer") > layer_of("densedet.models.yolox")
    assert layer_of("densedet.data.voc") < layer_of("densedet.assign.tal")
