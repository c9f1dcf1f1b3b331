#!/usr/bin/env python3
"""specdec's import graph, and the layer rule it must keep (docs/ARCHITECTURE.md).

    python scripts/import_graph.py            # package-level edges, then any violation; exit 1 if there is one
    python scripts/import_graph.py --modules  # module-level edges

Every ``import`` and ``from ... import`` in the package counts, at the top of a module or inside a function, with
or without TYPE_CHECKING: a deferred import is still a dependency. The rule:
- a module imports only modules of its own layer or of the layers below it (LAYERS, bottom first);
- no two modules import each other, directly or around a circle.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# Bottom first. A module belongs to the entry that names it or a package above it; the top-level package
# ``specdec`` itself (its __init__) is at the bottom and imports nothing of its own.
LAYERS: list[tuple[str, ...]] = [
    ("specdec", "specdec.types", "specdec.torch_env", "specdec.v1", "specdec._kernels"),
    ("specdec.kernels",),
    ("specdec.tt",),
    ("specdec.backends",),
    ("specdec.models",),
    ("specdec.engine",),
    ("specdec.bench",),
    ("specdec.serving",),
    ("specdec.client",),
    ("specdec.loadtest",),
    ("specdec.cli",),
]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, set[str]]:
    """module -> the specdec modules it imports (a ``from pkg import name`` counts as pkg.name when that is a module)."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    known = set(files) | {"specdec._kernels"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
        graph[name] = {d for d in deps if d in known and d != name and not name.startswith(d + ".")}
    return graph


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or (n != "specdec" and module.startswith(n + ".")) for n in names):
            return i
    raise ValueError(f"{module} is in no layer: add it to LAYERS in scripts/import_graph.py")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = [f"{m} (layer {LAYERS[layer(m)][0]}) imports {d} (layer {LAYERS[layer(d)][0]}), a layer above it"
           for m, deps in sorted(graph.items()) for d in sorted(deps) if layer(d) > layer(m)]  # fmt: skip
    out += ["import cycle: " + " <-> ".join(c) for c in cycles(graph)]
    return out


def package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    edges: dict[str, set[str]] = {}
    for m, deps in graph.items():
        edges.setdefault(top(m), set()).update(top(d) for d in deps if top(d) != top(m))
    return edges


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1] / "python" / "specdec")
    parser.add_argument("--modules", action="store_true", help="print module-level edges")
    args = parser.parse_args(argv)
    graph = imports(args.root)
    edges = graph if args.modules else package_edges(graph)
    for m in sorted(edges, key=lambda m: (layer(m), m)):
        print(f"{m} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
    bad = violations(graph)
    for line in bad:
        print("VIOLATION:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
