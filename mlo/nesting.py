"""Nesting as a strategy: how far an update's gradient reaches through the levels below.

``EngineConfig(nesting="betty")`` (the default, :class:`BettyNesting`) is Betty's
convention: every problem with lowers treats them at their current state; the
hypergradient is the sum over its paths of best-response VJPs (:mod:`mlo.hypergrad`),
and each such problem consumes (closes at the end of the iteration) the windows on
its paths when it becomes ready.

``EngineConfig(nesting="exact")`` (:class:`ExactNesting`) differentiates the single
top problem through every level's steps: every level below it steps through a
window, every read of a windowed level is of its *live* iterates (no new graph), the
windows stay open until the top consumes them, and the top's gradient is one
backward pass (:func:`one_backward_top_gradient`).

One case of Betty's convention takes the same one backward: a two-level nest in
which every problem on the top's paths steps through a plain window and has no lower
of its own (the *fused* top): reading their live iterates and differentiating
straight to the top's variables is the sum over its paths, with no VJP bookkeeping.

The engine asks its strategy; nothing else on the update path tests the mode.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from .graph import Graph, GraphError
from .hypergrad import combine_gradients
from .second_order import naming_second_order_errors

__all__ = ["BettyNesting", "ExactNesting", "nesting_strategy", "one_backward_top_gradient"]


class BettyNesting:
    """Betty's convention (see the module).

    Args:
        graph: the problem graph; top: the single top problem's name, or ``None``.
        fused: whether the top's update takes one backward (see the module).
    """

    name = "betty"

    def __init__(self, graph: Graph, top: Optional[str], fused: bool):
        self.graph, self.top, self.fused = graph, top, fused
        #: Whether a reported gradient must keep the autograd graph (the live iterates
        #: it backpropagates through are still needed by the next update).
        self.keeps_graph: bool = fused

    def consumes(self, name: str) -> bool:
        """Whether ``name`` (a problem with lowers) becoming ready consumes the windows
        on its paths."""
        return True

    def top_reads_live(self, name: str, by_path: bool, override: Any) -> bool:
        """Whether ``name``'s gradient reads the nest's live iterates and takes one
        backward (the fused top: only its plain total, not a breakdown or override)."""
        return self.fused and name == self.top and not by_path and override is None

    def reads_live(self, source_windowed: bool, top_live: bool) -> bool:
        """Whether a read of a source hands over its live iterates."""
        return top_live and source_windowed

    def own_view(self, name: str, windowed: bool) -> bool:
        """Whether ``name`` differentiates a fresh view of its own iterate."""
        return False


class ExactNesting(BettyNesting):
    """Exact nesting: the top differentiates through every level's steps."""

    name = "exact"

    def __init__(self, graph: Graph, top: Optional[str], fused: bool):
        super().__init__(graph, top, fused)
        self.keeps_graph = True

    def consumes(self, name: str) -> bool:
        return name == self.top          # only the top consumes: the windows stay open

    def top_reads_live(self, name: str, by_path: bool, override: Any) -> bool:
        if name != self.top:
            return False
        if by_path or override is not None:
            raise ValueError("EngineConfig(nesting='exact') gives the total hypergradient only: "
                             "by_path and method overrides need nesting='betty'")
        return True

    def reads_live(self, source_windowed: bool, top_live: bool) -> bool:
        return source_windowed           # every level reads the live iterates of the others

    def own_view(self, name: str, windowed: bool) -> bool:
        # A bottom level's step is the partial derivative at fixed uppers, whose live
        # iterates may depend on this problem's earlier iterates (a middle level stepped
        # on them): a fresh view of the iterate carries its gradient, so no path through
        # the uppers' live iterates reaches it.
        return windowed and not self.graph.lowers(name)

    def check(self, problems: Mapping[str, Any], windowed: Set[str], plain: Callable[[str], bool],
              monitor: bool, data_parallel: bool) -> None:
        """Raises :class:`GraphError` for a graph exact nesting cannot run."""
        g, top = self.graph, self.top
        tops = [n for n in problems if not g.above[n]]
        if len(tops) != 1:
            raise GraphError(f"EngineConfig(nesting='exact') needs a single top problem (the one "
                             f"that consumes the nest); this graph has {sorted(tops)}")
        for n in g.order:
            if n != top and n not in windowed:
                method = problems[n].config.method
                raise GraphError(
                    f"problem {n!r}: EngineConfig(nesting='exact') differentiates through every "
                    f"level's steps, but its method {method!r} is implicit at the current state "
                    f"(an implicit middle level would need Hessian-vector products through its "
                    f"lower's differentiable solve, which mlo does not do). Set "
                    f"config.method='unrolled' on {n!r}, or use nesting='betty'")
        for n in g.order:
            if n == top or not g.lowers(n):
                continue
            bad = [s for s in g.reads[n] if s in windowed and g.is_below(n, s)]
            if bad:
                raise GraphError(
                    f"problem {n!r}: EngineConfig(nesting='exact') supports middle levels that read "
                    f"their lowers and the top, but {n!r} also reads {bad}, a level above it that "
                    f"steps through a window: its gradient would run through that level's steps. "
                    f"Use nesting='betty' for this graph")
        for n in g.order:
            if n != top and not plain(n):
                cfg = problems[n].config
                raise GraphError(f"problem {n!r}: EngineConfig(nesting='exact') differentiates through "
                                 f"every step, but method {cfg.method!r} with options "
                                 f"{dict(cfg.method_options)} is not plain reverse mode through its "
                                 f"window (e.g. first_order=True); remove those options or use "
                                 f"nesting='betty'")
        if monitor:
            raise GraphError("EngineConfig(nesting='exact') and monitor: the monitor's reference "
                             "re-evaluates levels at fixed lowers (Betty's convention); use one or the other")
        if data_parallel:
            raise GraphError("EngineConfig(nesting='exact') is not supported with distributed data "
                             "parallelism yet; run it on one process")


def nesting_strategy(mode: str, graph: Graph, problems: Mapping[str, Any], windowed: Set[str],
                     plain: Callable[[str], bool], monitor: bool, data_parallel: bool) -> BettyNesting:
    """The strategy for ``EngineConfig.nesting`` (checked against the graph)."""
    tops = [n for n in problems if not graph.above[n]]
    top = tops[0] if len(tops) == 1 else None
    if mode == "exact":
        strategy = ExactNesting(graph, top, fused=False)
        strategy.check(problems, windowed, plain, monitor, data_parallel)
        return strategy
    nodes = graph.path_nodes(top) if top else set()
    fused = bool(nodes) and not data_parallel and all(
        n in windowed and not graph.lowers(n) and plain(n) for n in nodes)
    return BettyNesting(graph, top, fused)


def one_backward_top_gradient(P: Any, loss: Tensor, keep_graph: bool, nest_reads: List[Any],
                              nest: Tuple[Sequence[str], Sequence[str]]
                              ) -> Tuple[Tensor, List[Optional[Tensor]], Dict[str, Any]]:
    """The top's gradient in one backward: its loss read the nest's live iterates, so
    one backward reaches every read of the top's variables made inside the nest's open
    windows (``nest_reads``: those windows' reads; aliases, new graphs) — the total
    derivative. ``nest``: the problems on the top's paths (sorted) and their methods,
    for errors that name them.

    Returns ``(loss, total gradient, {"own": ..., "hyper": ...})``."""
    if not loss.requires_grad:
        raise RuntimeError(f"problem {P.name!r}: its loss has no autograd graph (it depends "
                           f"neither on its own variables {P.param_names} nor on its lowers)")
    own = list(P.own_state().values())
    seen, leaves = set(), []
    for r in nest_reads:
        if r.source == P.name and not r.live:
            for k, a in r.alias.items():
                if a.requires_grad:
                    i = id(a)
                    if i not in seen:
                        seen.add(i)
                        leaves.append((k, a))
    with naming_second_order_errors(*nest):
        allg = torch.autograd.grad(loss, own + [a for _, a in leaves], allow_unused=True,
                                   retain_graph=keep_graph or None)
    n = len(own)
    acc: Dict[str, Tensor] = {}
    for (k, _), x in zip(leaves, allg[n:]):
        if x is not None:
            acc[k] = acc[k] + x if k in acc else x
    own_d, hyper, total = combine_gradients(P.param_names, own, allg[:n], acc)
    return loss, total, {"own": own_d, "hyper": hyper}
