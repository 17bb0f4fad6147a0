"""The problem graph: dependency parsing, validation, orders and hypergradient paths.

Vocabulary (Betty's, so its users feel at home):

* ``u2l = {upper: [lower, ...]}`` — the lower problem's loss reads the upper's variables.
* ``l2u = {lower: [upper, ...]}`` — the upper problem's loss reads the lower's variables.

Both kinds of edge say "``lower`` sits below ``upper``"; together they must form a
directed acyclic hierarchy. A hypergradient path of problem ``U`` starts at ``U``,
descends along ``u2l`` edges, then climbs back to ``U`` along ``l2u`` edges::

    U -u2l-> D1 -u2l-> ... -u2l-> Dm -l2u-> A1 -l2u-> ... -l2u-> U

Every step ``X -> Y`` of a path is the best response of ``Y`` to ``X``'s variables
(``Y`` reads ``X``). ``∇_U F_U = ∂F_U/∂λ_U + Σ_paths (product of best-response
Jacobians along the path)ᵀ ∂F_U/∂(last node)``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Sequence, Set, Tuple

__all__ = ["Graph", "GraphError"]


class GraphError(ValueError):
    """An invalid problem graph. The message names the offending problems."""


class Graph:
    """Validated dependency structure over problem *names*.

    Args:
        names: the problems' names, in the order given to the engine.
        u2l: ``{upper: [lower, ...]}`` (names).
        l2u: ``{lower: [upper, ...]}`` (names).
    """

    def __init__(self, names: Sequence[str], u2l: Mapping[str, Iterable[str]],
                 l2u: Mapping[str, Iterable[str]]):
        seen: Set[str] = set()
        for n in names:
            if n in seen:
                raise GraphError(f"duplicate problem name {n!r}: every problem in an engine "
                                 f"needs a unique name")
            seen.add(n)
        self.names = list(names)
        self.u2l: Dict[str, List[str]] = {n: [] for n in names}
        self.l2u: Dict[str, List[str]] = {n: [] for n in names}
        for kind, table, store in (("u2l", u2l, self.u2l), ("l2u", l2u, self.l2u)):
            for src, dsts in table.items():
                self._check_known(kind, src, f"{kind} key")
                if isinstance(dsts, str):
                    raise GraphError(f"{kind}[{src!r}] must be a list of problem names, "
                                     f"got the string {dsts!r}")
                for dst in dsts:
                    self._check_known(kind, dst, f"{kind}[{src!r}] entry")
                    if dst == src:
                        raise GraphError(f"{kind}: problem {src!r} depends on itself")
                    if dst in store[src]:
                        raise GraphError(f"{kind}[{src!r}] lists {dst!r} twice")
                    store[src].append(dst)
        # below[u] = problems directly below u in the hierarchy.
        self.below: Dict[str, List[str]] = {n: [] for n in names}
        self.above: Dict[str, List[str]] = {n: [] for n in names}
        for up, lows in self.u2l.items():
            for lo in lows:
                self._link(lo, up)
        for lo, ups in self.l2u.items():
            for up in ups:
                self._link(lo, up)
        # reads[p] = problems whose variables p's loss reads.
        self.reads: Dict[str, Set[str]] = {n: set() for n in names}
        for up, lows in self.u2l.items():
            for lo in lows:
                self.reads[lo].add(up)
        for lo, ups in self.l2u.items():
            for up in ups:
                self.reads[up].add(lo)
        self.order = self._toposort()  # lowest problems first
        if len(names) > 1:
            lonely = [n for n in names if not self.below[n] and not self.above[n]]
            if lonely:
                raise GraphError(
                    f"problem(s) {lonely} are not connected to any other problem: "
                    f"add them to u2l/l2u or run them in an engine of their own")
        self._paths = {n: self._find_paths(n) for n in names}
        self._path_nodes: Dict[str, frozenset] = {}
        self._descendants = {n: self._closure(n, self.below) for n in names}

    # ----------------------------------------------------------------- checks
    def _check_known(self, kind: str, name, where: str) -> None:
        if not isinstance(name, str):
            raise GraphError(f"{kind}: {where} {name!r} is not a problem or problem name")
        if name not in self.u2l:
            raise GraphError(f"{kind}: {where} {name!r} is not a problem in this engine "
                             f"(known: {self.names})")

    def _link(self, lo: str, up: str) -> None:
        if lo not in self.below[up]:
            self.below[up].append(lo)
        if up not in self.above[lo]:
            self.above[lo].append(up)

    def _toposort(self) -> List[str]:
        """Kahn's algorithm, lowest first; ties keep the user's order."""
        indeg = {n: len(self.below[n]) for n in self.names}
        out: List[str] = []
        ready = [n for n in self.names if indeg[n] == 0]
        while ready:
            n = ready.pop(0)
            out.append(n)
            for up in self.above[n]:
                indeg[up] -= 1
                if indeg[up] == 0:
                    ready.append(up)
            ready.sort(key=self.names.index)
        if len(out) != len(self.names):
            cyc = self._find_cycle()
            raise GraphError("the dependencies form a cycle: " + " -> ".join(cyc) +
                             " (each arrow: 'is below'); a problem cannot be both above "
                             "and below another")
        return out

    def _find_cycle(self) -> List[str]:
        color = {n: 0 for n in self.names}
        stack: List[str] = []

        def dfs(n):
            color[n] = 1
            stack.append(n)
            for m in self.above[n]:
                if color[m] == 1:
                    return stack[stack.index(m):] + [m]
                if color[m] == 0:
                    c = dfs(m)
                    if c:
                        return c
            stack.pop()
            color[n] = 2
            return None

        for n in self.names:
            if color[n] == 0:
                c = dfs(n)
                if c:
                    return c
        return []  # pragma: no cover

    @staticmethod
    def _closure(n: str, nxt: Mapping[str, List[str]]) -> Set[str]:
        out, todo = set(), list(nxt[n])
        while todo:
            m = todo.pop()
            if m not in out:
                out.add(m)
                todo.extend(nxt[m])
        return out

    # ------------------------------------------------------------------ paths
    def _find_paths(self, u: str) -> List[Tuple[str, ...]]:
        paths: List[Tuple[str, ...]] = []

        inside = self._closure(u, self.below)

        # Descending and climbing are each strictly monotone in the (acyclic)
        # hierarchy, so both terminate; a node may appear once in each phase.
        def climb(path):
            for up in self.l2u[path[-1]]:
                if up == u:
                    paths.append(tuple(path) + (u,))
                elif up in inside:
                    climb(path + [up])

        def descend(path):
            climb(path)
            for lo in self.u2l[path[-1]]:
                descend(path + [lo])

        for lo in self.u2l[u]:
            descend([u, lo])
        return paths

    def paths(self, name: str) -> List[Tuple[str, ...]]:
        """Hypergradient paths of ``name`` (each starts and ends at ``name``)."""
        return list(self._paths[name])

    def path_nodes(self, name: str) -> Set[str]:
        """Problems lying on some hypergradient path of ``name`` (excluding itself)."""
        nodes = self._path_nodes.get(name)
        if nodes is None:
            nodes = self._path_nodes[name] = frozenset(m for p in self._paths[name] for m in p[1:-1])
        return nodes

    def is_below(self, a: str, b: str) -> bool:
        """Whether ``a`` is (transitively) below ``b``."""
        return a in self._descendants[b]

    def lowers(self, name: str) -> List[str]:
        """Problems directly below ``name``."""
        return list(self.below[name])

    def leaves(self) -> List[str]:
        return [n for n in self.order if not self.below[n]]
