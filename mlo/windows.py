"""Windows and reads: who sees which state of whom.

A *window* is the span of a problem's differentiable steps between two consumptions
by the problems above it (docs/design.md#windows): its iterates
stay in the autograd graph until then, and are written back into the module when it
closes (a :class:`mlo.WindowProblem`'s per-window variables are dropped instead).

:class:`Windows` opens, closes and discards windows, and hands a reading loss the
state of the problem it calls: an *alias* that starts a new autograd graph and is
recorded as a :class:`mlo.state.Read` (so a hypergradient can map the vector that
arrives at the alias back to the source's state at the time of the read), or — as
the nesting strategy decides — the source's live iterates themselves.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Set

from engines.base import grad_mode

from .graph import Graph, GraphError
from .nesting import BettyNesting
from .problem import Problem
from .state import Read, RunState, Window

__all__ = ["Windows"]


class Windows:
    """The windows of an engine's problems and the reads their losses make.

    Args:
        problems: ``{name: Problem}``; graph: their graph; state: the run state.
        windowed: the problems that step through windows.
        nesting: the nesting strategy (which reads are live).
    """

    def __init__(self, problems: Mapping[str, Problem], graph: Graph, state: RunState,
                 windowed: Set[str], nesting: BettyNesting):
        self.problems, self.graph, self.state = problems, graph, state
        self.windowed, self.nesting = windowed, nesting
        self._runs = state.problems
        # (the strategy's answers that do not change during a run, looked up once)
        self._always_live = nesting.reads_live(True, False)
        self._nodes = {n: graph.path_nodes(n) for n in problems}
        top = nesting.top
        self._top_nodes = graph.path_nodes(top) if top is not None else set()

    # ------------------------------------------------------------ lifecycle
    def open(self, P: Problem, evaluate: Callable[[Problem, Callable[[Any], Any], Any], Any]) -> None:
        """Opens ``P``'s window (:meth:`mlo.Problem.start_window`). ``evaluate(P, fn,
        batch)`` runs ``fn(batch)`` as the engine evaluates a loss of ``P`` (device,
        double-differentiable kernels), with ``P``'s reads recorded into its window."""
        P.start_window(lambda fn, batch: evaluate(P, fn, batch))

    def discard(self, P: Problem) -> None:
        """Drops a window in which nothing stepped (also one that failed to open)."""
        self._runs[P.name].window = None
        P.drop_window()

    def close(self, name: str) -> None:
        """Closes ``name``'s window: iterates written back (:meth:`mlo.Problem.end_window`),
        every path through it truncated, its reads released."""
        run = self._runs[name]
        win, run.window = run.window, None
        if win is None:
            return
        with grad_mode(False):
            self.problems[name].end_window(win)
        for r in win.referrers:   # truncate paths through the closed window
            r.src_state = None
        win.reads.clear()
        win.referrers.clear()

    def close_all(self) -> None:
        """Closes every open window (e.g. before saving)."""
        for n in list(self.state.open_windows()):
            self.close(n)

    def get(self, name: str) -> Optional[Window]:
        """Problem ``name``'s open window, or ``None``."""
        return self._runs[name].window

    # ------------------------------------------------------------ reads
    def resolver(self, reader: Problem, diff: bool, reads: List[Read], top_live: bool = False):
        """``resolve(source)`` for ``reader``'s loss: the state it sees of each problem ``source`` it
        calls, every read recorded in ``reads`` (one per source)."""
        nodes = self._nodes[reader.name]
        return lambda source: self.alias(reader, source, diff, nodes, reads, top_live)

    def alias(self, reader: Problem, source: Problem, diff: bool, nodes: Set[str], reads: List[Read],
              top_live: bool = False) -> Dict[str, Any]:
        """The state ``reader``'s loss sees when it calls problem ``source``.

        Args:
            diff: ``reader`` steps through a window (its loss is differentiated again later).
            nodes: the problems on ``reader``'s hypergradient paths.
            reads: this evaluation's reads so far (a source is read once per evaluation).
            top_live: ``reader`` is a top that reads the nest's live iterates (the nesting
                strategy's one-backward top).
        """
        # (a declared source is a problem of this engine: the graph was made from them)
        if source.name not in self.graph.reads[reader.name] or self.problems[source.name] is not source:
            self._undeclared(reader, source)
        for r in reads:
            if r.source == source.name:
                return r.alias
        st = source.readable_state()
        if (top_live or self._always_live) and source.name in self.windowed:
            reads.append(Read(source.name, st, st, live=True))
            return st
        # Aliases carry a graph when a gradient may flow through them: reader differentiates
        # its steps, source is on reader's paths, or reader's first evaluation (mlo.lint sees every read).
        track = diff or source.name in nodes or reader.name not in self.state.linted
        srun = self._runs[source.name]
        swin = srun.window
        rwin = self._runs[reader.name].window if diff else None
        # (source's version: changes whenever its values change — its steps, its in-place edits)
        version = (srun.step_count, srun.edits)
        if rwin is not None and swin is None and track:
            shared = self._shared(rwin, source, version)
            if shared is not None:
                reads.append(shared)
                return shared.alias
        clone = diff and swin is None and not self._top_reads_below(source, reader)
        alias = {}
        for k, t in st.items():
            a = t.detach()
            if clone:
                a = a.clone()
            alias[k] = a.requires_grad_() if track else a
        r = Read(source.name, alias, st if swin is not None else None)
        if swin is not None:
            swin.referrers.append(r)
        elif rwin is not None and track:
            rwin.shared[source.name] = (version, r)
        reads.append(r)
        return alias

    def _undeclared(self, reader: Problem, source: Problem) -> None:
        """Raises the error for a read no dependency declares (or of a foreign problem)."""
        if source.name not in self.problems or self.problems[source.name] is not source:
            raise GraphError(f"problem {reader.name!r} read problem {source.name!r}, which is not in this engine")
        if source.name not in self.graph.reads[reader.name]:
            raise GraphError(
                f"problem {reader.name!r} read the variables of {source.name!r}, but no dependency declares "
                f"it: add {source.name!r} to u2l[...]/l2u[...] (u2l={{{source.name!r}: [{reader.name!r}]}} if "
                f"{source.name!r} is the upper, l2u={{{source.name!r}: [{reader.name!r}]}} if it is the lower)")

    @staticmethod
    def _shared(rwin: Window, source: Problem, version: tuple) -> Optional[Read]:
        """Inside ``reader``'s window, the read of ``source`` from an earlier step when ``source`` has
        not changed since (its ``version`` is the same: one set of leaves per window, not one per step)."""
        hit = rwin.shared.get(source.name)
        return hit[1] if hit is not None and hit[0] == version else None

    def _top_reads_below(self, source: Problem, reader: Problem) -> bool:
        """Whether ``source`` is the single top problem and ``reader`` lies on one of its paths.

        A differentiable reader keeps its graph past this step; if ``source`` then steps in
        place, the saved values would change under it, so the alias is a clone —
        except here: the top is the last problem of an iteration, it backpropagates
        through ``reader``'s window before its own in-place step, and that window is closed
        (never backpropagated again) at the end of the same iteration."""
        return source.name == self.nesting.top and reader.name in self._top_nodes
