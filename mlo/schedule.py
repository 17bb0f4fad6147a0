"""The schedule: which problems update in an iteration (Betty's semantics).

One iteration visits the problems lowest first. A problem with nothing below it
steps every iteration; any other problem becomes *ready* once every problem directly
below it has taken its ``unroll_steps`` steps since this problem was last ready. A
ready problem updates on every ``update_every``-th readiness (otherwise the update is
skipped), and at most once per block of ``update_every_iterations`` iterations. A
ready problem with lowers *consumes* the windows on its paths (the nesting strategy
says which): they are closed at the end of the iteration.

The schedule reads and writes only counters of :class:`mlo.state.RunState`.

Interrupted iterations. :meth:`Schedule.begin` notes the counters at the start of
an iteration; when an exception ends it early, :meth:`Schedule.interrupt` puts them
back and adds the updates already applied to ``RunState.resume``. The next
iteration then replays the same decisions and skips those updates
(``due(skip=...)``): the run continues as if it had not been interrupted.
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
        self._start: list = []

    def begin(self) -> None:
        """Notes the counters at the start of an iteration (for :meth:`interrupt`)."""
        self._start = [(run, run.ready_count, dict(run.since), run.last_block, run.loop_start)
                       for run in self.state.problems.values()]

    def interrupt(self, applied: int) -> None:
        """An exception ended the iteration after ``applied`` more updates: the counters
        go back to the iteration's start and ``RunState.resume`` counts the updates
        the next iteration must not repeat."""
        for run, ready, since, block, loop_start in self._start:
            run.ready_count, run.last_block, run.loop_start = ready, block, loop_start
            run.since.clear()
            run.since.update(since)
        self.state.resume += applied

    def due(self, skip: int = 0) -> Iterator[Problem]:
        """Yields each problem that updates in this iteration, in order; the caller
        updates it before asking for the next (an update counts for the problems above
        it when the generator resumes, whether it was applied or skipped). The first
        ``skip`` updates were applied before an interruption: their counters advance,
        but they are not yielded and their ``on_window_start`` hooks do not run again."""
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
                if skip <= 0:
                    P.on_window_start()
            if skip > 0:
                skip -= 1
            else:
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
