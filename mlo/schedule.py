"""The schedule: which problems update in an iteration (Betty's semantics).

One iteration visits the problems lowest first. A problem with nothing below it
steps every iteration; any other problem becomes *ready* once every problem directly
below it has taken its ``unroll_steps`` steps since this problem was last ready. A
ready problem updates on every ``update_every``-th readiness (otherwise the update is
skipped), and at most once per block of ``update_every_iterations`` iterations. A
ready problem with lowers *consumes* the windows on its paths (the nesting strategy
says which): they are closed at the end of the iteration.

The schedule reads and writes only counters of :class:`mlo.state.RunState`.

Interrupted iterations. :meth:`Schedule.due` notes the counters at the start of
an iteration; when an exception ends it early, :meth:`Schedule.interrupt` puts them
back and adds the updates already applied to ``RunState.resume``. The next
iteration then replays the same decisions and skips those updates
(``due(skip=...)``): the run continues as if it had not been interrupted.

``due`` runs once per iteration and visits every problem: its tests are written out in
its loop (no helper calls), and what never changes during a run — which problems
consume which windows — is looked up once, at construction.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Iterator, Mapping, Set

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
        self._runs = list(state.problems.values())     # (the same ProblemRun objects all run long)
        # Per problem with lowers that consumes windows when ready (the nesting strategy's
        # choice): the problems on its paths.
        self._consumes: Dict[str, FrozenSet[str]] = {
            n: frozenset(graph.path_nodes(n)) for n in graph.order if graph.below[n] and nesting.consumes(n)}

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
        but they are not yielded and their ``on_window_start`` hooks do not run again.

        Before anything changes, the counters are noted (for :meth:`interrupt`)."""
        runs, problems, g, consumes = self.state.problems, self.problems, self.graph, self._consumes
        self._start = [(run, run.ready_count, dict(run.since), run.last_block, run.loop_start)
                       for run in self._runs]
        self.consumed = consumed = set()
        for name in g.order:
            P, run = problems[name], runs[name]
            lows = g.below[name]
            if lows:     # ready: every lower took its unroll_steps steps since the last readiness
                since = run.since
                waiting = False
                for lo in lows:
                    if since[lo] < problems[lo].config.unroll_steps:
                        waiting = True
                        break
                if waiting:
                    continue
                for lo in lows:
                    since[lo] = 0
                    runs[lo].loop_start = True
            run.ready_count += 1
            if name in consumes:
                consumed |= consumes[name]
            # an update_every-th readiness, in a new update_every_iterations block
            cfg = P.config
            if run.ready_count % cfg.update_every:
                continue
            if cfg.update_every_iterations is not None:
                block = self.state.iteration // cfg.update_every_iterations
                if run.last_block == block:
                    continue
                run.last_block = block
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
