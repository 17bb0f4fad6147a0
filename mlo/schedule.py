"""The schedule: which problems update in an iteration (Betty's semantics).

One iteration visits the problems lowest first. A problem with nothing below it
steps every iteration; any other problem becomes *ready* once every problem directly
below it has taken its ``unroll_steps`` steps since this problem was last ready. A
ready problem updates on every ``update_every``-th readiness (otherwise the update is
skipped), and at most once per block of ``update_every_iterations`` iterations. A
ready problem with lowers *consumes* the windows on its paths (the nesting strategy
says which): they are closed at the end of the iteration.

The schedule reads and writes only counters of :class:`mlo.state.RunState`.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Set

from .graph import Graph
from .nesting import BettyNesting
from .problem import Problem
from .state import RunState

__all__ = ["Schedule"]


class Schedule:
    """Who updates, iteration by iteration.

    Args:
        problems, graph, state: the engine's; nesting: its nesting strategy.
    """

    def __init__(self, problems: Mapping[str, Problem], graph: Graph, state: RunState,
                 nesting: BettyNesting):
        self.problems, self.graph, self.state, self.nesting = problems, graph, state, nesting
        #: The problems whose windows the current iteration consumed.
        self.consumed: Set[str] = set()

    def due(self) -> Iterator[Problem]:
        """Yields each problem that updates in this iteration, in order; the caller
        updates it before asking for the next (an update counts for the problems above
        it when the generator resumes, whether it was applied or skipped)."""
        self.consumed = consumed = set()
        runs, problems, g = self.state.problems, self.problems, self.graph
        for name in g.order:
            P, run = problems[name], runs[name]
            lows = g.below[name]
            if lows:
                if not self._ready(run.since, lows):
                    continue
                for lo in lows:
                    run.since[lo] = 0
                    runs[lo].loop_start = True
            run.ready_count += 1
            if lows and self.nesting.consumes(name):
                consumed |= g.path_nodes(name)
            if not self._takes_update(P, run):
                continue
            if run.loop_start:
                run.loop_start = False
                P.on_window_start()
            yield P
            for up in g.above[name]:
                runs[up].since[name] += 1

    def _ready(self, since, lows) -> bool:
        """Every lower has taken its ``unroll_steps`` steps since the last readiness."""
        problems = self.problems
        for lo in lows:
            if since[lo] < problems[lo].config.unroll_steps:
                return False
        return True

    def _takes_update(self, P: Problem, run) -> bool:
        """This readiness is an ``update_every``-th one, in a new iterations block."""
        if run.ready_count % P.config.update_every:
            return False
        period = P.config.update_every_iterations
        if period is not None:
            block = self.state.iteration // period
            if run.last_block == block:
                return False
            run.last_block = block
        return True
