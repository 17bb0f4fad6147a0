"""The shape of the code: file sizes, the longest functions and import cycles inside ``mlo``.

Prints, for the source tree at ``--root`` (default: this checkout):

* files and lines in ``mlo/``, ``engines/`` and ``problems/`` (totals, then per file);
* the longest functions and methods of those directories (``--top``, default 10);
* the import cycles between modules of the ``mlo`` package.

Import edges are read from the source with :mod:`ast`, not by importing it: every
``import`` statement of a module counts — at module level, under
``if TYPE_CHECKING:`` and inside functions (deferred) — in every form
(``import mlo.x``, ``from mlo.x import y``, ``from . import x``, ``from .x import y``,
``from .. import x``). An edge goes to the most specific ``mlo`` module named:
``from mlo.compare import graphs`` is an edge to ``mlo.compare.graphs``,
``from mlo import Engine`` one to ``mlo`` (the package's ``__init__``). The parents a
Python import also executes (``mlo/__init__.py`` for ``import mlo.engine``) are not
edges. ``tests/test_architecture.py`` uses the same functions.

    python benchmarks/code_shape.py
    python benchmarks/code_shape.py --root /path/to/another/checkout --top 20
"""
from __future__ import annotations

import argparse
import ast
from collections import deque
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
DIRS = ("mlo", "engines", "problems")

#: The kinds of an import edge: at module level, only for type checkers, or deferred
#: (inside a function, run when the function is called).
KINDS = ("module", "type_checking", "function")


# ----------------------------------------------------------------- sizes
def python_files(root: Path, directory: str) -> List[Path]:
    """The ``.py`` files under ``root/directory``, sorted, caches left out."""
    return sorted(p for p in (root / directory).rglob("*.py") if "__pycache__" not in p.parts)


def line_counts(root: Path, dirs: Iterable[str] = DIRS) -> Dict[str, List[Tuple[str, int]]]:
    """``{directory: [(path relative to root, lines), ...]}``, files sorted by path."""
    out = {}
    for d in dirs:
        out[d] = [(p.relative_to(root).as_posix(), len(p.read_text().splitlines()))
                  for p in python_files(root, d)]
    return out


def _functions(tree: ast.AST, prefix: str = "") -> Iterable[Tuple[str, ast.AST]]:
    """``(qualified name, node)`` of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            yield name, node
            yield from _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")
        else:
            yield from _functions(node, prefix)


def function_lengths(root: Path, dirs: Iterable[str] = DIRS) -> List[Tuple[int, str, str]]:
    """``(lines, qualified name, path)`` of every function, longest first. Lines run
    from the ``def`` (decorators excluded) to the function's last line."""
    out = []
    for d in dirs:
        for p in python_files(root, d):
            for name, node in _functions(ast.parse(p.read_text(), str(p))):
                out.append((node.end_lineno - node.lineno + 1, name, p.relative_to(root).as_posix()))
    return sorted(out, key=lambda t: (-t[0], t[2], t[1]))


# --------------------------------------------------------- import graph
def module_names(root: Path, package: str = "mlo") -> Dict[str, Path]:
    """``{dotted module name: file}`` for a package (``mlo/compare/__init__.py`` is
    ``mlo.compare``)."""
    out = {}
    for p in python_files(root, package):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _known(name: str, modules: Set[str]) -> Optional[str]:
    """The longest dotted prefix of ``name`` that is a module of ``modules``."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def _targets(node: ast.AST, importer: str, is_package: bool, modules: Set[str]) -> List[str]:
    """The modules of ``modules`` one ``import`` / ``from ... import`` statement names."""
    if isinstance(node, ast.Import):
        return [t for t in (_known(a.name, modules) for a in node.names) if t]
    if node.level:
        base = importer.split(".")
        if not is_package:
            base = base[:-1]                    # a module's package
        if node.level > 1:
            base = base[:len(base) - (node.level - 1)]
        base = ".".join(base + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        t = sub if sub in modules else _known(base, modules)
        if t:
            out.append(t)
    return out


def _is_type_checking(test: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterable[Tuple[ast.AST, str]]:
    """Every import statement of a module with its kind (:data:`KINDS`)."""
    for node in ast.iter_child_nodes(tree):
        yield from _imports_of(node, "module")


def _imports_of(node: ast.AST, kind: str) -> Iterable[Tuple[ast.AST, str]]:
    """The import statements in ``node`` (itself included); ``kind``: its context's."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, kind
        return
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        kind = "function"
    elif isinstance(node, ast.If) and kind == "module" and _is_type_checking(node.test):
        for child in node.body:
            yield from _imports_of(child, "type_checking")
        for child in node.orelse:
            yield from _imports_of(child, kind)
        return
    for child in ast.iter_child_nodes(node):
        yield from _imports_of(child, kind)


def import_edges(root: Path, package: str = "mlo") -> Dict[Tuple[str, str], Set[str]]:
    """``{(importer, imported): kinds}`` between modules of ``package`` (no self edges)."""
    mods = module_names(root, package)
    names = set(mods)
    edges: Dict[Tuple[str, str], Set[str]] = {}
    for importer, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node, kind in _imports(tree):
            for target in _targets(node, importer, is_package, names):
                if target != importer:
                    edges.setdefault((importer, target), set()).add(kind)
    return edges


def import_graph(root: Path, package: str = "mlo") -> Dict[str, Set[str]]:
    """``{module: modules it imports}`` for every module of ``package``."""
    graph = {m: set() for m in module_names(root, package)}
    for (a, b) in import_edges(root, package):
        graph[a].add(b)
    return graph


# ---------------------------------------------------------------- cycles
def strongly_connected(graph: Dict[str, Iterable[str]]) -> List[List[str]]:
    """The strongly connected components of ``graph`` (Tarjan, iterative), each sorted."""
    nodes = set(graph) | {b for bs in graph.values() for b in bs}
    succ = {n: sorted(graph.get(n, ())) for n in sorted(nodes)}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    comps = []
    for start in succ:
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    comps.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = len(index)
                stack.append(nxt)
                on_stack.add(nxt)
                work.append((nxt, iter(succ[nxt])))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
    return sorted(comps)


def _shortest_cycle_through(node: str, graph: Dict[str, Iterable[str]], allowed: Set[str]) -> List[str]:
    """The shortest ``[node, ..., node]`` inside ``allowed`` (breadth-first)."""
    prev: Dict[str, str] = {}
    queue = deque([node])
    while queue:
        cur = queue.popleft()
        for nxt in sorted(graph.get(cur, ())):
            if nxt not in allowed:
                continue
            if nxt == node:
                path = [cur]
                while path[-1] != node:
                    path.append(prev[path[-1]])
                return path[::-1] + [node]
            if nxt not in prev:
                prev[nxt] = cur
                queue.append(nxt)
    return []


def find_cycles(graph: Dict[str, Iterable[str]]) -> List[List[str]]:
    """Import cycles, each as ``[a, b, ..., a]``: for every strongly connected component
    with a cycle, the shortest cycle through each of its members (duplicates and
    rotations removed). Empty for a DAG."""
    cycles = set()
    for comp in strongly_connected(graph):
        members = set(comp)
        if len(comp) == 1 and comp[0] not in set(graph.get(comp[0], ())):
            continue
        for node in comp:
            cyc = _shortest_cycle_through(node, graph, members)[:-1]
            k = cyc.index(min(cyc))
            cycles.add(tuple(cyc[k:] + cyc[:k]))
    return [list(c) + [c[0]] for c in sorted(cycles, key=lambda c: (len(c), c))]


def format_cycle(cycle: List[str]) -> str:
    """``a -> b -> c -> a``."""
    return " -> ".join(cycle)


def cycle_components(graph: Dict[str, Iterable[str]]) -> List[List[str]]:
    """The strongly connected components that contain a cycle."""
    return [c for c in strongly_connected(graph)
            if len(c) > 1 or c[0] in set(graph.get(c[0], ()))]


# ---------------------------------------------------------------- report
def report(root: Path = ROOT, top: int = 10, dirs: Iterable[str] = DIRS) -> str:
    """The printed picture (see the module docstring)."""
    dirs = tuple(dirs)
    lines = [f"code shape of {root}", "", "files and lines:"]
    counts = line_counts(root, dirs)
    for d in dirs:
        lines.append(f"  {d + '/':<10} {len(counts[d]):4d} files {sum(n for _, n in counts[d]):7d} lines")
    for d in dirs:
        lines.append(f"\n{d}/ per file:")
        lines += [f"  {n:6d}  {p}" for p, n in sorted(counts[d], key=lambda t: -t[1])]
    lines.append(f"\n{top} longest functions ({', '.join(d + '/' for d in dirs)}):")
    lines += [f"  {n:5d}  {name}  ({p})" for n, name, p in function_lengths(root, dirs)[:top]]
    graph = import_graph(root)
    edges = import_edges(root)
    comps = cycle_components(graph)
    cycles = find_cycles(graph)
    lines.append(f"\nimport cycles inside mlo/: {len(comps)} strongly connected component(s) "
                 f"with a cycle, {len(cycles)} shortest cycle(s) through their members")
    for comp in comps:
        lines.append(f"  component of {len(comp)}: {', '.join(comp)}")
    for cyc in cycles:
        deferred = [f"{a} -> {b} ({'/'.join(sorted(edges[(a, b)]))})"
                    for a, b in zip(cyc, cyc[1:]) if "module" not in edges[(a, b)]]
        lines.append(f"  {format_cycle(cyc)}"
                     + (f"    [not at module level: {'; '.join(deferred)}]" if deferred else ""))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="source tree (default: this checkout)")
    ap.add_argument("--top", type=int, default=10, help="how many longest functions to list")
    args = ap.parse_args(argv)
    print(report(args.root.resolve(), args.top))


if __name__ == "__main__":
    main()
