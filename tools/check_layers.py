"""Check qkvmean's layering: every import points down, and no module imports itself back.

    python tools/check_layers.py        # prints the violations; exit status 1 if any

Reads every module under ``qkvmean/`` with ``ast`` (imports inside functions count too:
a lazy import is still an arrow) and checks two rules, which docs/architecture.md
explains:

1. a module imports only from its own layer or the layers below it (``LAYERS``);
2. the modules' import graph has no cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "qkvmean"

#: Bottom to top; a module may import from its own layer and those below, except that
#: the packages of a layer in ``APART`` may not import each other.
LAYERS = [
    ["qkvmean._version", "qkvmean.config", "qkvmean.resources", "qkvmean.faults", "qkvmean.files"],
    ["qkvmean.engine"],
    ["qkvmean.io", "qkvmean.store"],
    ["qkvmean.run"],
    ["qkvmean.render"],
    ["qkvmean.cli", "qkvmean.__main__", "qkvmean"],
]
APART = {2}  # the inputs (io) and the store know nothing of each other


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str) -> set:
    """``(module or name, its module)`` for each qkvmean import in ``path`` (module
    ``name``), anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(a.name, a.name) for a in node.names if a.name.split(".")[0] == "qkvmean"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qkvmean":
                continue
            for alias in node.names:  # "from . import x" may name a module, else a name in it
                found.add((f"{target}.{alias.name}", target))
    return found


def resolve(target: str, modules: set) -> str | None:
    """The module ``target`` names (``pkg.name`` may be a name inside ``pkg``)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def layer_of(name: str) -> tuple:
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    return best


def graph() -> dict:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    edges = {}
    for name, path in paths.items():
        targets = {t if t in modules else resolve(m, modules) for t, m in imports(path, name)}
        edges[name] = sorted(t for t in targets if t and t != name)
    return edges


def violations(edges: dict) -> list:
    found = []
    for name, targets in sorted(edges.items()):
        here = layer_of(name)
        for target in targets:
            there = layer_of(target)
            if there[0] < here[0] or there[1] == here[1]:
                continue
            if there[0] == here[0] and here[0] not in APART:
                continue
            found.append(f"{name} ({here[1]}) imports {target} ({there[1]}): not below it")
    found += [f"import cycle among {', '.join(c)}" for c in cycles(edges)]
    return found


def cycles(edges: dict) -> list:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    found = violations(graph())
    for line in found:
        print(line)
    if not found:
        print(f"{len(graph())} modules: every import points down, no cycle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
