"""``Engine``: runs a problem graph and computes its hypergradients.

Scheduling (Betty's semantics). One iteration visits the problems lowest first.
A problem with nothing below it steps every iteration; any other problem becomes
*ready* once every problem directly below it has taken its ``unroll_steps``
steps since this problem was last ready. A ready problem updates on every
``update_every``-th readiness (otherwise the update is skipped).

Hypergradients. When a problem ``U`` updates, its gradient is
``∂F_U/∂λ_U`` plus the sum over its paths (:mod:`mlo.hypergrad`). A problem on a
path of some upper problem whose ``config.method`` is ``"unrolled"`` takes its
steps with a differentiable twin of its optimizer (:mod:`mlo.optim`): the iterates
stay in the autograd graph — a *window* — until the problems above it that
consume them become ready; then the iterates are written back into the module,
the optimizer state is handed back to ``torch.optim`` and the graph is freed.
Everything else steps in place with its ``torch.optim`` optimizer.

Non-finite guard. Before every optimizer step (in place or inside a window) the
update's loss, own gradient and hypergradient are checked — one fused check on
their norms, one host synchronisation per update, shared with ``records``. A NaN
or infinity raises ``FloatingPointError`` (``EngineConfig(nonfinite="raise")``,
the default) or skips that update with a ``RuntimeWarning`` (``"skip"``), naming
the problem, the iteration and the quantity. Either way the problem's parameters,
optimizer state, scheduler and ``step_count`` are untouched; a skipped update
still counts for the schedule (the problems above become ready as usual) and in
``records[name]["skipped"]``.

Layout. This module holds construction, the graph checks and the schedule; the
engine's other parts are mixins along their seams: :mod:`mlo.update` (one update:
loss, gradient, hypergradient, step), :mod:`mlo.reads` (windows and reads),
:mod:`mlo.guard` (the non-finite guard) and :mod:`mlo.events` (progress, loggers,
validation, early stopping, monitor). The run state is :mod:`mlo.state`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

import engines.base as eb

from . import callbacks as cb
from . import distributed as _dist
from .config import EngineConfig
from .graph import Graph, GraphError
from .optim import FunctionalOptimizer
from .problem import Problem
from .state import RunState
from .events import EventsMixin
from .reads import ReadsMixin
from .update import UpdateMixin

__all__ = ["Engine"]

Deps = Mapping[str, Mapping[Union[str, Problem], Sequence[Union[str, Problem]]]]


class Engine(UpdateMixin, ReadsMixin, EventsMixin):
    """Runs problems connected by dependencies.

    Args:
        problems: the :class:`Problem` nodes.
        dependencies: ``{"u2l": {upper: [lower, ...]}, "l2u": {lower: [upper, ...]}}``
            with problems or their names (see :mod:`mlo.graph`).
        config: an :class:`EngineConfig`.

    Raises:
        GraphError: unknown or duplicate names, a problem not in this engine, a
            cycle, a problem connected to nothing, an unknown method name.
    """

    def __init__(self, problems: Sequence[Problem], dependencies: Optional[Deps] = None,
                 config: Optional[EngineConfig] = None):
        problems = list(problems)
        for p in problems:
            if not isinstance(p, Problem):
                raise TypeError(f"Engine expects Problem instances, got {type(p).__name__}")
        if not problems:
            raise GraphError("an engine needs at least one problem")
        dependencies = dict(dependencies or {})
        unknown = set(dependencies) - {"u2l", "l2u"}
        if unknown:
            raise GraphError(f"unknown dependency kind(s) {sorted(unknown)}; use 'u2l' and 'l2u'")
        ids = {id(p): p.name for p in problems}
        self.graph = Graph([p.name for p in problems],
                           self._names(dependencies.get("u2l", {}), ids, "u2l"),
                           self._names(dependencies.get("l2u", {}), ids, "l2u"))
        self.problems: Dict[str, Problem] = {p.name: p for p in problems}
        self.config = config or EngineConfig()
        on_path = set().union(*(self.graph.path_nodes(n) for n in self.problems))
        for n in on_path:
            cfg = self.problems[n].config
            try:
                eb.check_options(cfg.method, cfg.method_options)
            except KeyError as e:
                raise GraphError(f"problem {n!r}: {e.args[0]}") from None
            except (TypeError, ValueError) as e:
                raise type(e)(f"problem {n!r}: ProblemConfig.method_options: {e}") from None
        # The method contract (engines.base): methods that differentiate through the
        # lower's steps get a window; the others work at the current iterate.
        self._windowed = {n for n in on_path if eb.info(self.problems[n].config.method).window}
        for n, P in self.problems.items():
            if P.per_window:
                self._check_per_window(P)
                self._windowed.add(n)
        self._exact = self.config.nesting == "exact"
        for n in sorted(self._windowed):
            opt = self.problems[n].optimizer
            if not FunctionalOptimizer.supports(opt):
                raise GraphError(
                    f"problem {n!r}: method {self.problems[n].config.method!r} steps with a "
                    f"differentiable twin of its optimizer, which exists for torch.optim "
                    f"{FunctionalOptimizer.supported()} (exactly those classes, not subclasses); got "
                    f"{type(opt).__name__}. Use one of those, or an implicit / "
                    f"finite-difference method (config.method='cg', 'neumann' or 'finite_difference')")
        #: The run state (mlo.state.RunState): iteration, windows, counters, last batches.
        self.state = RunState({n: self.graph.lowers(n) for n in self.problems})
        for n, P in self.problems.items():
            P.bind(self.state[n])
        # The last gradient applied, for problems whose method needs the optimizer (SAMA).
        self._keep_grad = {n for n in on_path if "optimizer" in eb.info(self.problems[n].config.method).needs}
        self._last_grad: Dict[str, List[Tensor]] = {}
        self._learned_hp: Dict[str, set] = {}
        #: Per problem: updates, seconds spent in them (own gradient + hypergradient +
        #: optimizer step), and the last update's loss and gradient norms.
        self.records: Dict[str, Dict[str, float]] = {
            n: {"updates": 0, "seconds": 0.0} for n in self.problems}
        #: Per problem with paths: the hypergradient (sum over paths, without the
        #: direct term ``∂F/∂λ``) applied at its last update, ``{param: tensor}``.
        self.last_hypergradient: Dict[str, Dict[str, Tensor]] = {}
        tops = [n for n in self.problems if not self.graph.above[n]]
        self._unique_top = tops[0] if len(tops) == 1 else None
        self.history: List[Dict[str, Any]] = []
        # Device and precision (mlo.precision): modules moved now, batches before each loss.
        self._device = None if self.config.device is None else torch.device(self.config.device)
        if self._device is not None:
            for P in problems:
                P.module.to(self._device)
        # Data parallel over torch.distributed (mlo.distributed): same start on every rank.
        self._dist = _dist.enabled(getattr(self.config, "distributed", "auto"))
        if self._exact:
            self._check_exact(on_path)
        # One backward for the top of a two-level nest: when every problem on the top's
        # paths steps through a window and has no lower of its own, the top reading
        # their live iterates and differentiating straight to its own variables (as
        # read inside those windows) is the sum over its paths — the same value as the
        # cotangent hand-over, one backward pass and no VJP bookkeeping fewer.
        top_nodes = self.graph.path_nodes(self._unique_top) if self._unique_top else set()
        self._fused = bool(top_nodes) and not self._dist and all(
            n in self._windowed and not self.graph.lowers(n) and self._plain(n) for n in top_nodes)
        if self._dist:
            # Modules may still be on the CPU under NCCL (built before .to("cuda")): the
            # broadcast goes through copies on the group's device (collective_device).
            _dist.broadcast_parameters(problems)
            if not _dist.is_main():   # rank 0 alone prints, logs and shows progress
                self.config = dataclasses.replace(self.config, progress=False, loggers=[], log_every=None)
        self._init_events()

    def _plain(self, name: str) -> bool:
        """Whether problem ``name``'s VJP is plain reverse mode through its window (a
        WindowProblem's steps always are: its options do not change them)."""
        cfg = self.problems[name].config
        return eb.info(cfg.method).is_plain_backward(cfg.method_options)

    def _check_exact(self, on_path) -> None:
        tops = [n for n in self.problems if not self.graph.above[n]]
        if len(tops) != 1:
            raise GraphError(f"EngineConfig(nesting='exact') needs a single top problem (the one "
                             f"that consumes the nest); this graph has {sorted(tops)}")
        for n in self.graph.order:
            if n != tops[0] and n not in self._windowed:
                method = self.problems[n].config.method
                raise GraphError(
                    f"problem {n!r}: EngineConfig(nesting='exact') differentiates through every "
                    f"level's steps, but its method {method!r} is implicit at the current state "
                    f"(an implicit middle level would need Hessian-vector products through its "
                    f"lower's differentiable solve, which mlo does not do). Set "
                    f"config.method='unrolled' on {n!r}, or use nesting='betty'")
        for n in self.graph.order:
            if n == tops[0] or not self.graph.lowers(n):
                continue
            bad = [s for s in self.graph.reads[n] if s in self._windowed and self.graph.is_below(n, s)]
            if bad:
                raise GraphError(
                    f"problem {n!r}: EngineConfig(nesting='exact') supports middle levels that read "
                    f"their lowers and the top, but {n!r} also reads {bad}, a level above it that "
                    f"steps through a window: its gradient would run through that level's steps. "
                    f"Use nesting='betty' for this graph")
        for n in self.graph.order:
            if n != tops[0] and not self._plain(n):
                cfg = self.problems[n].config
                raise GraphError(f"problem {n!r}: EngineConfig(nesting='exact') differentiates through "
                                 f"every step, but method {cfg.method!r} with options "
                                 f"{dict(cfg.method_options)} is not plain reverse mode through its "
                                 f"window (e.g. first_order=True); remove those options or use "
                                 f"nesting='betty'")
        if self.config.monitor:
            raise GraphError("EngineConfig(nesting='exact') and monitor: the monitor's reference "
                             "re-evaluates levels at fixed lowers (Betty's convention); use one or the other")
        if self._dist:
            raise GraphError("EngineConfig(nesting='exact') is not supported with distributed data "
                             "parallelism yet; run it on one process")

    def _check_per_window(self, P: Problem) -> None:
        n, cfg = P.name, P.config
        if not eb.info(cfg.method).window:
            raise GraphError(f"problem {n!r} has per-window variables (WindowProblem): its method must "
                             f"step through a window (e.g. config.method='unrolled'), got "
                             f"{cfg.method!r} — an implicit method has no iterate that outlives the window")
        if not self.graph.above[n]:
            raise GraphError(f"problem {n!r} has per-window variables but no problem above it to "
                             f"consume its windows; declare its upper in u2l/l2u")
        if P.scheduler is not None:
            raise GraphError(f"problem {n!r} has per-window variables: a scheduler has nothing to "
                             f"schedule (every window starts a fresh optimizer); remove it")
        if P.config.update_every != 1 or P.config.update_every_iterations is not None:
            raise GraphError(f"problem {n!r} has per-window variables: update_every / "
                             f"update_every_iterations would leave a window without steps; use the "
                             f"upper's schedule instead")

    @property
    def iteration(self) -> int:
        """Iterations completed (``state.iteration``)."""
        return self.state.iteration

    @staticmethod
    def _names(table, ids, kind) -> Dict[str, List[str]]:
        def name(x):
            if isinstance(x, Problem):
                if id(x) not in ids:
                    raise GraphError(f"{kind}: problem {x.name!r} is not in this engine's problem list")
                return x.name
            return x

        if not isinstance(table, Mapping):
            raise GraphError(f"{kind} must be a dict {{problem: [problems]}}, got {type(table).__name__}")
        return {name(k): [name(v) for v in (vs if not isinstance(vs, (str, Problem)) else [vs])]
                for k, vs in table.items()}

    # ------------------------------------------------------------- schedule
    def run(self, iterations: int, callbacks: Sequence[Any] = ()) -> List[Dict[str, Any]]:
        """Runs ``iterations`` iterations; returns the validation history.

        Args:
            iterations: how many.
            callbacks: objects with any of ``after_update(engine, problem)``,
                ``after_iteration(engine)``, ``after_validation(engine, metrics)``
                (:mod:`mlo.callbacks`). Early stopping or ``request_stop()`` ends the
                run after the current iteration.
        """
        if not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
        self._callbacks, self._progress = list(callbacks or ()), cb.Progress(self, iterations)
        self.stop_requested = False
        try:
            for _ in range(iterations):
                self.step()
                self._progress.update()
                if self.stop_requested:
                    break
        finally:
            self._progress.close()
            self._callbacks, self._progress = [], None
        return self.history

    def step(self) -> None:
        """One iteration: lower problems step, ready upper problems update."""
        consumed = set()
        runs, problems, g = self.state.problems, self.problems, self.graph
        below, above = g.below, g.above
        for name in g.order:
            P, run = problems[name], runs[name]
            lows = below[name]
            if lows:
                since = run.since
                ready = True
                for lo in lows:
                    if since[lo] < problems[lo].config.unroll_steps:
                        ready = False
                        break
                if not ready:
                    continue
                for lo in lows:
                    since[lo] = 0
                    runs[lo].loop_start = True
            run.ready_count += 1
            if lows and (not self._exact or name == self._unique_top):
                consumed |= g.path_nodes(name)   # exact: only the top consumes
            if run.ready_count % P.config.update_every:
                continue
            period = P.config.update_every_iterations
            if period is not None:
                block = self.state.iteration // period
                if run.last_block == block:
                    continue
                run.last_block = block
            if run.loop_start:
                run.loop_start = False
                P.on_window_start()
            self._update(P)
            for up in above[name]:
                runs[up].since[name] += 1
        for n in consumed:
            self._close_window(n)
        self.state.iteration += 1
        c = self.config
        if c.log_every is not None or c.loggers or (c.validate_every and c.validation) or self._callbacks:
            self._end_of_iteration()      # (nothing to do otherwise)
        if self.periodic_checkpoints is not None:   # EngineConfig(checkpoint_every=N)
            self.periodic_checkpoints.after_iteration(self)

    # ------------------------------------------------------------- helpers
    @property
    def data_parallel(self) -> bool:
        """Whether the engine averages over ``torch.distributed`` ranks."""
        return self._dist

    def counts(self) -> Dict[str, int]:
        """Updates taken per problem."""
        return {n: p.step_count for n, p in self.problems.items()}
